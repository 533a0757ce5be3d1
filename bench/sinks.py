"""Sink throughput: records per second written in batches, each record carrying 3 upstream errors.

The records are made the way the middleware makes them (the three benchmark events appended to a
collector, so sanitized), each with its own id; ``sink.write`` gets batches of ``BATCH_SIZE``, as the
dispatcher hands them over. PostgreSQL is measured when a server is reachable at
``$UPSTREAM_OPS_BENCH_PG_DSN`` (else ``$UPSTREAM_OPS_TEST_PG_DSN``) and the PostgreSQL sink is part of
this build; the database should be a scratch one (the bench writes its records there).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.apps import UPSTREAM_ERRORS

PG_DSN_VARS = ("UPSTREAM_OPS_BENCH_PG_DSN", "UPSTREAM_OPS_TEST_PG_DSN")


def make_records(count: int) -> list[Any]:
    from upstream_ops import Collector
    from upstream_ops.record import RequestRecord

    collector = Collector("bench")
    for fields in UPSTREAM_ERRORS:
        stored = collector.append(_event(fields))
        assert stored is not None
    events = collector.events
    now_ms = time.time_ns() // 1_000_000
    return [
        RequestRecord(
            id=uuid.uuid4().hex,
            request_id=uuid.uuid4().hex,
            service="bench",
            method="POST",
            path="/v1/chat/completions",
            route="/v1/chat/completions",
            status_code=200,
            duration_ms=5312.5,
            started_at_ms=now_ms - i,
            upstream_errors=list(events),
            recovered=True,
        )
        for i in range(count)
    ]


def _event(fields: dict[str, Any]) -> Any:
    from upstream_ops.events import UpstreamErrorEvent

    return UpstreamErrorEvent(**fields)


def _sinks(directory: Path) -> dict[str, Callable[[], Any] | str]:
    """Name -> a factory of the sink, or the reason it is not measured here."""
    from upstream_ops.sinks import JsonlSink, SQLiteSink, sink_from_url

    sinks: dict[str, Callable[[], Any] | str] = {
        "SQLite": lambda: SQLiteSink(directory / "records.db"),
        "JSONL": lambda: JsonlSink(directory / "records.jsonl"),
    }
    dsn = next((os.environ[v] for v in PG_DSN_VARS if os.environ.get(v)), None)
    try:
        import upstream_ops.sinks.postgres  # noqa: F401  (part of the build, or not)
    except ImportError:
        sinks["PostgreSQL"] = "no PostgreSQL sink in this build"
    else:
        if dsn is None:
            sinks["PostgreSQL"] = f"no server: set {PG_DSN_VARS[0]} to a scratch database"
        else:
            sinks["PostgreSQL"] = lambda: sink_from_url(dsn)
    return sinks


def run_sinks(records_per_sample: int, samples: int) -> dict[str, dict[str, Any]]:
    from upstream_ops.defaults import BATCH_SIZE
    from upstream_ops.sinks.base import close_sink

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="upstream-ops-bench-sinks-") as tmp:
        for name, factory in _sinks(Path(tmp)).items():
            if isinstance(factory, str):
                results[name] = {"skipped": factory}
                continue
            sink = factory()
            try:
                sink.write(make_records(BATCH_SIZE))  # schema, connection, first pages
                rates = []
                for _ in range(samples):
                    records = make_records(records_per_sample)
                    started = time.perf_counter()
                    for i in range(0, len(records), BATCH_SIZE):
                        sink.write(records[i : i + BATCH_SIZE])
                    rates.append(len(records) / (time.perf_counter() - started))
            finally:
                close_sink(sink)
            results[name] = {
                "median_records_per_s": statistics.median(rates),
                "min_records_per_s": min(rates),
                "max_records_per_s": max(rates),
                "samples_records_per_s": rates,
                "batch_size": BATCH_SIZE,
                "events_per_record": len(UPSTREAM_ERRORS),
            }
    return results
