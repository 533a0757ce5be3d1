"""Load generators for the server mode: ``wrk`` when installed, else a bounded Python one.

Both keep ``connections`` keep-alive connections busy for ``duration`` seconds against one URL on
127.0.0.1, check every response (status 200 and the exact body) and report requests per second and
the latency percentiles. wrk's checks run in its Lua ``response`` hook (the same for every variant).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.apps import EXPECTED_BODY, EXPECTED_STATUS

#: The Python generator never sends more than this many requests in one run, whatever the duration.
PYTHON_MAX_REQUESTS = 200_000


@dataclass
class LoadResult:
    tool: str
    requests: int
    seconds: float
    requests_per_s: float
    p50_us: float
    p99_us: float
    bad: int  # wrong status or body
    errors: int  # connect, read, write, timeout

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_WRK_SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) checked = 0; bad = 0 end
function response(status, headers, body)
  checked = checked + 1
  if status ~= %(status)d or body ~= '%(body)s' then bad = bad + 1 end
end
function done(summary, latency, requests)
  local c, b = 0, 0
  for _, t in ipairs(threads) do c = c + t:get("checked"); b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format("BENCH checked=%%d bad=%%d requests=%%d duration_us=%%d errors=%%d p50=%%d p99=%%d\\n",
    c, b, summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""
_WRK_LINE = re.compile(
    r"BENCH checked=(\d+) bad=(\d+) requests=(\d+) duration_us=(\d+) errors=(\d+) p50=(\d+) p99=(\d+)"
)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, duration: float, connections: int) -> LoadResult:
    script = _WRK_SCRIPT % {"status": EXPECTED_STATUS, "body": EXPECTED_BODY.decode()}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        completed = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "5s",
                "-s",
                handle.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=duration + 30,
            check=False,
        )
    finally:
        Path(handle.name).unlink(missing_ok=True)
    match = _WRK_LINE.search(completed.stdout)
    if completed.returncode != 0 or match is None:
        raise RuntimeError(
            f"wrk failed ({completed.returncode}): {completed.stdout}{completed.stderr}"
        )
    checked, bad, requests, duration_us, errors, p50, p99 = map(int, match.groups())
    seconds = duration_us / 1e6
    return LoadResult(
        "wrk",
        requests,
        seconds,
        requests / seconds,
        float(p50),
        float(p99),
        bad + (requests - checked),  # a response not checked counts as bad
        errors,
    )


def run_python(url: str, duration: float, connections: int) -> LoadResult:
    """The fallback: asyncio, one keep-alive HTTP/1.1 connection per task, bounded in time and count."""
    return asyncio.run(_python_load(url, duration, connections))


async def _python_load(url: str, duration: float, connections: int) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench\r\n\r\n"
    ).encode()
    expected_status = f" {EXPECTED_STATUS} ".encode()
    latencies: list[float] = []
    counts = {"bad": 0, "errors": 0, "sent": 0}
    started = time.perf_counter()
    deadline = started + duration

    async def connection() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["errors"] += 1
            return
        # As wrk does, a request still in flight at the end is left unanswered, not an error
        # (a server paused by ``modes.run_in_turns`` may hold it for seconds).
        run = asyncio.timeout(duration - (time.perf_counter() - started))
        try:
            async with run:
                await send_requests(reader, writer)
        except TimeoutError:
            if not run.expired():
                counts["errors"] += 1  # a request's own time limit
        except (OSError, asyncio.IncompleteReadError, ValueError):
            counts["errors"] += 1
        finally:
            writer.close()

    async def send_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while time.perf_counter() < deadline and counts["sent"] < PYTHON_MAX_REQUESTS:
            counts["sent"] += 1
            sent_at = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await asyncio.wait_for(reader.readexactly(length), 5)
            latencies.append(time.perf_counter() - sent_at)
            if expected_status not in head.split(b"\r\n", 1)[0] or body != EXPECTED_BODY:
                counts["bad"] += 1

    await asyncio.gather(*(connection() for _ in range(connections)))
    seconds = time.perf_counter() - started
    latencies.sort()

    def percentile(p: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6

    return LoadResult(
        "python",
        len(latencies),
        seconds,
        len(latencies) / seconds,
        percentile(50),
        percentile(99),
        counts["bad"],
        counts["errors"],
    )


def run_load(url: str, duration: float, connections: int, tool: str) -> LoadResult:
    if tool == "wrk":
        return run_wrk(url, duration, connections)
    return run_python(url, duration, connections)
