"""Write throughput of the built-in stores, in records per second.

Each sink gets the same records (three upstream-error events each, with realistic messages and
details) in batches of the dispatcher's default size, written back to back by one thread, which is
how the dispatcher uses a sink. The on-disk spool (fsync'd appends) is measured too: it is what
absorbs traffic while the database is away. Results are printed and written to
``bench/results/sinks.json``.

    python bench/bench_sinks.py [--records 20000] [--pg-dsn postgresql://...]

PostgreSQL is used when reachable at ``--pg-dsn`` (default ``$UPSTREAM_OPS_TEST_PG_DSN``, else
``postgresql://postgres@127.0.0.1:5432/test``), in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from upstream_ops.defaults import BATCH_SIZE
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import JsonlSink, SQLiteSink
from upstream_ops.spool import Spool

RESULTS = Path(__file__).parent / "results" / "sinks.json"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def make_records(count: int) -> list[RequestRecord]:
    now = time.time_ns() // 1_000_000
    detail = '{"error":{"message":"upstream timed out","type":"rix_api_error","code":"504"}}'
    records = []
    for i in range(count):
        events = [
            UpstreamErrorEvent(
                at_unix_ms=now + i + attempt,
                platform=("openai", "anthropic", "rix")[i % 3],
                account_id=i % 17,
                upstream_status_code=(429, 502, 504)[attempt],
                upstream_request_id=f"up-{i}-{attempt}",
                kind=("http_error", "retry", "failover")[attempt],
                message=f"attempt {attempt + 1} failed: gateway timeout",
                detail=detail,
                model="gpt-4o",
                attempt=attempt + 1,
                duration_ms=1234.5,
            )
            for attempt in range(3)
        ]
        records.append(
            RequestRecord(
                id=uuid.uuid4().hex,
                request_id=uuid.uuid4().hex,
                service="bench",
                method="POST",
                path=f"/v1/images/{i}",
                route="/v1/images/{n}",
                status_code=200,
                duration_ms=2345.6,
                started_at_ms=now + i,
                upstream_status_code=504,
                upstream_error_message="gateway timeout",
                upstream_error_detail=detail,
                upstream_errors=events,
                recovered=True,
            )
        )
    return records


def measure(write: Callable[[Sequence[RequestRecord]], Any], records: list[RequestRecord]) -> float:
    """Seconds to write ``records`` in dispatcher-sized batches, one after the other."""
    started = time.perf_counter()
    for start in range(0, len(records), BATCH_SIZE):
        write(records[start : start + BATCH_SIZE])
    return time.perf_counter() - started


def postgres(dsn: str, records: list[RequestRecord]) -> tuple[float, str] | str:
    """Seconds, and the server version; or why PostgreSQL was not measured."""
    try:
        import psycopg

        from upstream_ops.sinks.postgres import PostgresSink
    except ImportError as exc:
        return f"skipped: {exc.name} is missing (pip install 'upstream-ops[postgres]')"
    try:
        with psycopg.connect(dsn, connect_timeout=3) as connection:
            version = str(connection.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    except psycopg.Error as exc:
        return f"skipped: PostgreSQL is not reachable at {dsn} ({' '.join(str(exc).split())})"
    schema = f"upstream_ops_bench_{uuid.uuid4().hex[:8]}"
    sink = PostgresSink(dsn, schema=schema)
    try:
        sink.migrate()
        sink.write(make_records(BATCH_SIZE))  # warm the pool and the plans
        return measure(sink.write, records), version
    finally:
        sink.close()
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument(
        "--pg-dsn", default=os.environ.get("UPSTREAM_OPS_TEST_PG_DSN") or DEFAULT_DSN
    )
    args = parser.parse_args()
    records = make_records(args.records)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SQLiteSink(Path(tmp) / "ops.db")
        sqlite.write(make_records(BATCH_SIZE))
        results["sqlite"] = {"seconds": measure(sqlite.write, records)}
        sqlite.close()
        jsonl = JsonlSink(Path(tmp) / "ops.jsonl")
        results["jsonl"] = {"seconds": measure(jsonl.write, records)}
        jsonl.close()
        spool = Spool(Path(tmp) / "spool")
        results["spool"] = {"seconds": measure(spool.append, records)}
        spool.close()
    measured = postgres(args.pg_dsn, records)
    if isinstance(measured, str):
        results["postgresql"] = {"note": measured}
    else:
        results["postgresql"] = {"seconds": measured[0], "server_version": measured[1]}
    for result in results.values():
        if "seconds" in result:
            result["records_per_s"] = round(args.records / result["seconds"])
            result["seconds"] = round(result["seconds"], 3)
    report = {
        "what": "records written per second, one thread, batches of the dispatcher's size",
        "records": args.records,
        "batch_size": BATCH_SIZE,
        "events_per_record": 3,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"{args.records} records, batches of {BATCH_SIZE}, 3 events each:")
    for name, result in results.items():
        shown = f"{result['records_per_s']:>9,} records/s" if "records_per_s" in result else ""
        print(f"  {name:<11}{shown}  {result.get('note', '')}".rstrip())
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
