"""Sink throughput: records per second written in batches, each record carrying 3 upstream errors.

The records are made the way the middleware makes them (the three benchmark events appended to a
collector, so sanitized; a record id from ``new_record_id`` and a request id from ``new_request_id``,
time-ordered UUIDv7s, as ``Recorder`` makes them when no ``X-Request-ID`` came in); ``sink.write``
gets batches of ``BATCH_SIZE``, as the dispatcher hands them over, from one thread. SQLite is also
measured with the request ids a client would send (random uuid4s), which land on random pages of
the request-id index. Measured: SQLite, JSONL, the durable spool's fsync'd appends (what absorbs the
traffic while a database is away), and PostgreSQL when the build has its sink and a server answers
at ``$UPSTREAM_OPS_BENCH_PG_DSN`` (else ``$UPSTREAM_OPS_TEST_PG_DSN``, else
``postgresql://postgres@127.0.0.1:5432/test``), in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import importlib
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
PG_DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def make_records(count: int, *, client_request_ids: bool = False) -> list[Any]:
    """``count`` records; ``client_request_ids``: random request ids, as incoming ``X-Request-ID``s."""
    from upstream_ops import Collector
    from upstream_ops.record import RequestRecord
    from upstream_ops.recorder import new_record_id, new_request_id

    collector = Collector("bench")
    for fields in UPSTREAM_ERRORS:
        stored = collector.append(_event(fields))
        assert stored is not None
    events = collector.events
    now_ms = time.time_ns() // 1_000_000
    return [
        RequestRecord(
            id=new_record_id(),
            request_id=uuid.uuid4().hex if client_request_ids else new_request_id(),
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


class _Measured:
    """What is timed (a sink's ``write``, the spool's ``append``) and how to clean up after it."""

    def __init__(
        self,
        write: Callable[[Any], object],
        close: Callable[[], object],
        *,
        client_request_ids: bool = False,
    ) -> None:
        self.write = write
        self.close = close
        self.client_request_ids = client_request_ids


def _targets(directory: Path) -> dict[str, Callable[[], _Measured] | str]:
    """Name -> a factory of what is measured, or the reason it is not measured here."""
    from upstream_ops.sinks import JsonlSink, SQLiteSink
    from upstream_ops.sinks.base import close_sink

    def sink(make: Callable[[], Any], client_request_ids: bool = False) -> Callable[[], _Measured]:
        def factory() -> _Measured:
            made = make()
            return _Measured(
                made.write, lambda: close_sink(made), client_request_ids=client_request_ids
            )

        return factory

    targets: dict[str, Callable[[], _Measured] | str] = {
        "SQLite": sink(lambda: SQLiteSink(directory / "records.db")),
        "SQLite, random request ids (incoming uuid4s)": sink(
            lambda: SQLiteSink(directory / "client-ids.db"), client_request_ids=True
        ),
        "JSONL": sink(lambda: JsonlSink(directory / "records.jsonl")),
    }
    try:
        spool_module = importlib.import_module("upstream_ops.spool")
    except ImportError:
        targets["spool (fsync'd appends)"] = "no durable spool in this build"
    else:

        def spool() -> _Measured:
            made = spool_module.Spool(directory / "spool")
            return _Measured(made.append, made.close)

        targets["spool (fsync'd appends)"] = spool
    targets["PostgreSQL"] = _postgres()
    return targets


def _postgres() -> Callable[[], _Measured] | str:
    dsn = next((os.environ[v] for v in PG_DSN_VARS if os.environ.get(v)), PG_DEFAULT_DSN)
    try:
        import psycopg

        postgres_module = importlib.import_module("upstream_ops.sinks.postgres")
    except ImportError as exc:
        return f"not in this build ({exc.name} missing)"
    try:
        with psycopg.connect(dsn, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no server at {dsn} ({' '.join(str(exc).split())[:120]})"
    schema = f"upstream_ops_bench_{uuid.uuid4().hex[:8]}"

    def factory() -> _Measured:
        made = postgres_module.PostgresSink(dsn, schema=schema)
        made.migrate()

        def close() -> None:
            made.close()
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        return _Measured(made.write, close)

    return factory


def run_sinks(records_per_sample: int, samples: int) -> dict[str, dict[str, Any]]:
    from upstream_ops.defaults import BATCH_SIZE

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="upstream-ops-bench-sinks-") as tmp:
        for name, factory in _targets(Path(tmp)).items():
            if isinstance(factory, str):
                results[name] = {"skipped": factory}
                continue
            target = factory()
            try:
                target.write(make_records(BATCH_SIZE))  # schema, connection, first pages
                rates = []
                for _ in range(samples):
                    records = make_records(
                        records_per_sample, client_request_ids=target.client_request_ids
                    )
                    started = time.perf_counter()
                    for i in range(0, len(records), BATCH_SIZE):
                        target.write(records[i : i + BATCH_SIZE])
                    rates.append(len(records) / (time.perf_counter() - started))
            finally:
                target.close()
            results[name] = {
                "median_records_per_s": statistics.median(rates),
                "min_records_per_s": min(rates),
                "max_records_per_s": max(rates),
                "samples_records_per_s": rates,
                "batch_size": BATCH_SIZE,
                "events_per_record": len(UPSTREAM_ERRORS),
            }
    return results
