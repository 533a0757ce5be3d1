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
SQLite, JSONL and PostgreSQL are also measured behind a busy app thread (``busy_app_rate``): records
a second a dispatcher writes while the measuring thread runs pure Python.
"""

from __future__ import annotations

import importlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
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


#: The sinks also measured behind a busy app thread, how many records are queued for it, and how
#: long the thread stays busy at most.
BUSY_APP_SINKS = ("SQLite", "JSONL", "PostgreSQL")
BUSY_APP_RECORDS = 5_000
BUSY_APP_SECONDS = 2.0


class _WriteOnly:
    """A sink made of a ``write`` (the dispatcher closes it; its owner closes the real one)."""

    def __init__(self, write: Callable[[Any], object]) -> None:
        self._write = write

    def write(self, records: Sequence[Any], /) -> None:
        self._write(records)


def busy_app_rate(write: Callable[[Any], object], records: list[Any], seconds: float) -> float:
    """Records a second a ``Dispatcher`` writes through ``write`` while this thread runs pure Python.

    The sink's writer then gets the interpreter lock back only a switch interval (5 ms) after each
    time it let go of it (a SQLite step, a write call), so a sink that lets go of it once a row
    falls far behind an app that keeps the lock busy.
    """
    from upstream_ops.dispatcher import Dispatcher

    dispatcher = Dispatcher(_WriteOnly(write))
    try:
        for record in records:
            dispatcher.submit(record)
        started = time.perf_counter()
        next_look = started + 0.05
        busy = 0
        while (now := time.perf_counter()) - started < seconds:
            for i in range(1_000):
                busy += i
            if now >= next_look:  # the stats take the dispatcher's lock: not too often
                next_look = now + 0.05
                if dispatcher.stats().written >= len(records):
                    break
        elapsed = time.perf_counter() - started
        return dispatcher.stats().written / elapsed
    finally:
        dispatcher.close()


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
                busy_rate = (
                    busy_app_rate(target.write, make_records(BUSY_APP_RECORDS), BUSY_APP_SECONDS)
                    if name in BUSY_APP_SINKS
                    else None
                )
            finally:
                target.close()
            results[name] = {
                "busy_app_records_per_s": busy_rate,
                "median_records_per_s": statistics.median(rates),
                "min_records_per_s": min(rates),
                "max_records_per_s": max(rates),
                "samples_records_per_s": rates,
                "batch_size": BATCH_SIZE,
                "events_per_record": len(UPSTREAM_ERRORS),
            }
    return results
