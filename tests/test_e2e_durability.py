"""End to end against the machine's PostgreSQL: the database goes away, the process dies.

Nothing may be lost and the requests may not notice: records wait in the spool while the path to
PostgreSQL is cut, and a spool left by a killed process is written by the next one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import pg_rows, wait_for
from tests.tcp_proxy import TcpProxy
from upstream_ops.defaults import QUEUE_SIZE
from upstream_ops.sinks.postgres import PostgresSink

pytestmark = pytest.mark.postgres

REQUESTS = 10_000
CUT_AFTER = 3_000  # requests completed before the path to PostgreSQL is cut
OUTAGE_S = 6.0
CONCURRENCY = 8


@pytest.fixture
def proxy(pg_dsn: str) -> Iterator[TcpProxy]:
    target = urlsplit(pg_dsn)
    with TcpProxy(target.hostname or "127.0.0.1", target.port or 5432) as p:
        yield p


def via(proxy: TcpProxy, dsn: str) -> str:
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}").geturl()


# The gateway runs in a process of its own, as in production: its memory and its latency are
# its own, not shared with the load generator and the proxy in the test process.
_GATEWAY = textwrap.dedent(
    """
    import dataclasses, socket, sys
    import anyio, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from upstream_ops import UpstreamOpsMiddleware, append_upstream_error
    from upstream_ops.sinks.postgres import PostgresSink

    dsn, schema, spool_dir = sys.argv[1:4]

    async def call(request):
        for attempt in (1, 2, 3):
            append_upstream_error(
                platform="rix", upstream_status_code=501 + attempt, attempt=attempt,
                kind="http_error" if attempt < 3 else "retry_exhausted",
                message=f"attempt {attempt} failed",
                detail='{"error":{"type":"rix_api_error","code":"bade_status_code"}}')
        return JSONResponse({"ok": True})

    async def stats(request):
        return JSONResponse(dataclasses.asdict(gateway.dispatcher.stats()))

    async def flush(request):
        return JSONResponse(await anyio.to_thread.run_sync(gateway.dispatcher.flush, 1.0))

    app = Starlette(routes=[Route("/call/{n}", call), Route("/stats", stats),
                            Route("/flush", flush)])
    sink = PostgresSink(dsn, schema=schema, timeout=0.5, connect_timeout=2)
    gateway = UpstreamOpsMiddleware(app, sink=sink, spool_dir=spool_dir, service="outage-test")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(gateway, log_level="warning")).run(sockets=[sock])
    """
)


class Gateway:
    """The gateway process, and a lean HTTP/1.1 client for it (httpx would be the bottleneck)."""

    def __init__(self, dsn: str, schema: str, spool_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _GATEWAY, dsn, schema, str(spool_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in range(100):
            try:
                return await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("the gateway does not accept connections")

    @staticmethod
    async def get(
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str, request_id: str
    ) -> tuple[int, bytes]:
        reader, writer = connection
        writer.write(
            f"GET {path} HTTP/1.1\r\nhost: t\r\nx-request-id: {request_id}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        assert match is not None, head
        return int(head.split(b" ", 2)[1]), await reader.readexactly(int(match[1]))

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)  # uvicorn's shutdown: the lifespan drains
        _, err = self.process.communicate(timeout=30)
        return err


async def load(
    gateway: Gateway, proxy: TcpProxy
) -> tuple[list[tuple[float, float]], float, float, list[tuple[float, int, int]]]:
    """Send REQUESTS requests; cut the path after CUT_AFTER, restore it OUTAGE_S later."""
    latencies: list[tuple[float, float]] = []  # (started, seconds)
    samples: list[tuple[float, int, int]] = []  # (when, gateway RSS, records in its memory)
    counter = iter(range(REQUESTS))
    cut_at = restored_at = 0.0
    cut_event = asyncio.Event()
    done = asyncio.Event()

    async def worker() -> None:
        connection = await gateway.connect()
        for n in counter:
            started = time.monotonic()
            status, body = await gateway.get(connection, f"/call/{n}", f"load-{n:05d}")
            latencies.append((started, time.monotonic() - started))
            assert (status, body) == (200, b'{"ok":true}')
            if len(latencies) == CUT_AFTER:
                cut_event.set()
        connection[1].close()

    async def outage() -> None:
        nonlocal cut_at, restored_at
        await cut_event.wait()
        proxy.cut()
        cut_at = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        proxy.restore()
        restored_at = time.monotonic()

    async def sample() -> None:
        connection = await gateway.connect()
        while not done.is_set():
            _, body = await gateway.get(connection, "/stats", "sampler")
            samples.append((time.monotonic(), gateway.rss(), json.loads(body)["queued"]))
            await asyncio.sleep(0.05)
        connection[1].close()

    cutter = asyncio.create_task(outage())
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await cutter
    done.set()
    await sampler
    return latencies, cut_at, restored_at, samples


async def gateway_stats(gateway: Gateway) -> dict[str, int]:
    connection = await gateway.connect()
    _, body = await gateway.get(connection, "/stats", "stats")
    connection[1].close()
    stats: dict[str, int] = json.loads(body)
    return stats


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def test_every_record_lands_once_while_postgres_is_cut_and_requests_do_not_notice(
    pg_dsn: str, pg_schema: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    PostgresSink(pg_dsn, schema=pg_schema).migrate()
    gateway = Gateway(via(proxy, pg_dsn), pg_schema, tmp_path / "spool")
    try:
        latencies, cut_at, restored_at, samples = asyncio.run(load(gateway, proxy))
        assert proxy.dropped + proxy.refused > 0  # the path to PostgreSQL really was cut
        stats = asyncio.run(gateway_stats(gateway))
        assert stats["spooled"] > 0, stats  # the outage outlasted the retries: records on disk
        assert wait_for(lambda: asyncio.run(gateway_stats(gateway))["in_spool"] == 0, timeout=60), (
            asyncio.run(gateway_stats(gateway))
        )
        stats = asyncio.run(gateway_stats(gateway))
    finally:
        errors = gateway.stop()
    # uvicorn shuts down gracefully, then re-raises SIGTERM: it dies of it, as without us.
    assert gateway.process.returncode == -signal.SIGTERM, errors
    assert "Traceback" not in errors, errors
    assert (stats["dropped"], stats["failed"], stats["evicted"]) == (0, 0, 0), stats
    assert stats["replayed"] == stats["spooled"], stats

    # Every request's record is in PostgreSQL exactly once, with its three events.
    rows = pg_rows(
        pg_dsn,
        pg_schema,
        "SELECT count(*), count(DISTINCT request_id), min(request_id), max(request_id) "
        "FROM ops_error_logs",
    )
    assert rows == [(REQUESTS, REQUESTS, "load-00000", f"load-{REQUESTS - 1:05d}")]
    assert pg_rows(pg_dsn, pg_schema, "SELECT count(*) FROM ops_upstream_error_events") == [
        (3 * REQUESTS,)
    ]

    # Latency while PostgreSQL is cut is that of the same server before the cut.
    before = [d for s, d in latencies[500:] if s + d < cut_at]  # after a warm-up
    during = [d for s, d in latencies if cut_at + 0.5 < s and s + d < restored_at]
    assert len(before) > 1000 and len(during) > 1000, (len(before), len(during))
    p50 = (statistics.median(before), statistics.median(during))
    p99 = (percentile(before, 99), percentile(during, 99))
    print(
        f"\n{REQUESTS} requests, {len(during)} during the {OUTAGE_S:.0f} s outage; latency "
        f"p50 {p50[0] * 1000:.2f} -> {p50[1] * 1000:.2f} ms, "
        f"p99 {p99[0] * 1000:.2f} -> {p99[1] * 1000:.2f} ms"
    )
    assert p50[1] < p50[0] * 1.5 + 0.001, p50
    assert p99[1] < p99[0] * 2.0 + 0.005, p99

    # Memory. While the first failing batch is retried, new records wait in the queue (up to
    # half of it, then they spill to disk); once the circuit opens everything goes to the spool
    # and memory stays flat however long the outage lasts.
    in_outage = [(w, rss, queued) for w, rss, queued in samples if cut_at <= w < restored_at]
    queued_peak = max(queued for _, _, queued in in_outage)
    peak_at = next(w for w, _, queued in in_outage if queued == queued_peak)
    opened_at = next(w for w, _, queued in in_outage if w > peak_at and queued < 1000)
    rss_at_cut = max(rss for w, rss, _ in samples if cut_at - 1.0 <= w < cut_at)
    rss_open = [rss for w, rss, _ in in_outage if w >= opened_at]
    print(
        f"gateway: at most {queued_peak} records in memory, spooling from "
        f"{opened_at - cut_at:.1f} s into the outage; RSS {rss_at_cut / 2**20:.1f} MiB at the "
        f"cut, {rss_open[0] / 2**20:.1f} -> {max(rss_open) / 2**20:.1f} MiB while spooling"
    )
    assert queued_peak <= QUEUE_SIZE
    assert restored_at - opened_at > 1.5  # long enough to see that memory stays flat
    assert max(rss_open) - rss_open[0] < 2 * 2**20, rss_open
    assert max(rss_open) - rss_at_cut < 48 * 2**20  # the queue's worth of records, at most


_SPOOLER = textwrap.dedent(
    """
    import sys, time
    from upstream_ops.dispatcher import Dispatcher
    from upstream_ops.record import RequestRecord
    from upstream_ops.events import UpstreamErrorEvent
    from upstream_ops.sinks.postgres import PostgresSink

    dsn, schema, spool_dir, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    d = Dispatcher(PostgresSink(dsn, schema=schema, timeout=0.3), spool_dir=spool_dir,
                   write_attempts=1, batch_interval=0.01)
    for i in range(count):
        event = UpstreamErrorEvent(at_unix_ms=i, platform="rix", upstream_status_code=504)
        d.submit(RequestRecord(id=f"crash-{i:05d}", request_id=f"crash-{i:05d}",
                               started_at_ms=i, upstream_errors=[event]))
    assert d.flush(timeout=30)  # nothing only in memory: every record is fsync'd in the spool
    s = d.stats()
    print(f"spooled {s.spooled} in_spool {s.in_spool}", flush=True)
    time.sleep(60)  # killed here
    """
)

_NEXT_PROCESS = textwrap.dedent(
    """
    import sys
    from upstream_ops.dispatcher import Dispatcher
    from upstream_ops.sinks.postgres import PostgresSink

    dsn, schema, spool_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    d = Dispatcher(PostgresSink(dsn, schema=schema), spool_dir=spool_dir, batch_interval=0.01)
    ok = d.flush(timeout=30)
    s = d.stats()
    d.close()
    print(f"flushed {ok} replayed {s.replayed} in_spool {s.in_spool}", flush=True)
    """
)


def test_spooled_records_survive_sigkill_and_the_next_process_writes_them(
    pg_dsn: str, pg_schema: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    count = 3000
    proxy.cut()  # PostgreSQL unreachable for the first process
    first = subprocess.Popen(
        [sys.executable, "-c", _SPOOLER, via(proxy, pg_dsn), pg_schema, str(spool_dir), str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert first.stdout is not None
    line = first.stdout.readline()
    assert line == f"spooled {count} in_spool {count}\n", first.stderr and first.stderr.read()
    first.send_signal(signal.SIGKILL)  # no atexit, no drain: only what is on disk survives
    first.wait(10)
    assert first.returncode == -signal.SIGKILL
    assert len(list(spool_dir.iterdir())) == 1  # the dead process's directory, unlocked

    proxy.restore()
    second = subprocess.run(
        [sys.executable, "-c", _NEXT_PROCESS, pg_dsn, pg_schema, str(spool_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout == f"flushed True replayed {count} in_spool 0\n", second.stderr
    assert pg_rows(
        pg_dsn,
        pg_schema,
        "SELECT count(*), count(DISTINCT id), min(id), max(id) FROM ops_error_logs",
    ) == [(count, count, "crash-00000", f"crash-{count - 1:05d}")]
    assert pg_rows(pg_dsn, pg_schema, "SELECT count(*) FROM ops_upstream_error_events") == [
        (count,)
    ]
    assert list(spool_dir.iterdir()) == []  # adopted, replayed, cleaned up


def test_a_kill_in_the_middle_of_a_replay_duplicates_nothing(
    pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    """The cursor is not synced, so a replay may repeat after a crash: the ids absorb it."""
    spool_dir = tmp_path / "spool"
    from upstream_ops.record import RequestRecord
    from upstream_ops.spool import Spool

    spool = Spool(spool_dir)
    spool.append(
        [RequestRecord(id=f"r-{i:04d}", request_id="x", started_at_ms=i) for i in range(1000)]
    )
    chunk = spool.read(400)
    assert chunk is not None
    sink = PostgresSink(pg_dsn, schema=pg_schema)
    sink.write(chunk.records)  # written, but the process "dies" before commit
    os.close(spool._lock_fd)  # type: ignore[arg-type]  # the kernel releasing a dead process's lock
    spool._lock_fd = None
    result = subprocess.run(
        [sys.executable, "-c", _NEXT_PROCESS, pg_dsn, pg_schema, str(spool_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout == "flushed True replayed 1000 in_spool 0\n", result.stderr
    assert pg_rows(
        pg_dsn, pg_schema, "SELECT count(*), count(DISTINCT id) FROM ops_error_logs"
    ) == [(1000, 1000)]
    sink.close()
