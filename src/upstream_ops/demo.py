"""``upstream-ops demo``: a flaky upstream, a gateway in front of it, and what landed in SQLite.

Both servers run under uvicorn on 127.0.0.1 (ephemeral ports), the gateway answers its clients 200
whenever a failover saves the day, and the demo then prints the records the middleware wrote: the
failures a plain access log would have hidden. The gateway's httpx client captures its failed
attempts through ``AsyncUpstreamOpsTransport``; nothing is appended by hand.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

import upstream_ops
from upstream_ops import UpstreamOpsMiddleware, record_failover, upstream
from upstream_ops.events import HTTP_ERROR, REQUEST_ERROR, STREAM_ERROR
from upstream_ops.httpx import AsyncUpstreamOpsTransport
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import SQLiteSink
from upstream_ops.testing import FaultInjectionTransport, broken_stream, timeout

REQUESTS = 36
ACCOUNTS = ((1, "primary"), (2, "backup"))


def build_upstream() -> FastAPI:
    """An image provider that times out, rate-limits and sometimes works (deterministic by key)."""
    upstream = FastAPI()

    @upstream.post("/v1/images/{key}")
    async def generate(key: int, account: int) -> JSONResponse:
        if account == 1 and key % 3 == 0:
            return JSONResponse(
                {"error": {"message": "", "type": "rix_api_error", "code": "bade_status_code"}},
                status_code=504,
                headers={"x-request-id": f"rix-{key}-{account}"},
            )
        if account == 1 and key % 3 == 1:
            return JSONResponse(
                {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                status_code=429,
                headers={"retry-after": "2", "x-request-id": f"rix-{key}-{account}"},
            )
        if key % 7 == 0:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return JSONResponse({"url": f"https://cdn.example/{key}.png"})

    return upstream


def build_gateway(sink: SQLiteSink, upstream_url: str, dead_url: str) -> FastAPI:
    """A gateway that fails over from the primary account to the backup one.

    Its client records every failed attempt by itself (the capture transport); the endpoint only
    labels the attempts (platform and model for the call, the account per try) and records its
    failover decisions. A fault-injecting transport under it adds what the flaky upstream cannot
    do on its own: a body cut off mid-way and a read timeout, both on the backup account.
    """
    faults = FaultInjectionTransport(
        httpx.AsyncHTTPTransport(),
        faults=[
            broken_stream(after_bytes=8, match=_on_backup(lambda key: key % 11 == 10)),
            timeout("read", match=_on_backup(lambda key: key % 17 == 16)),
        ],
    )
    client = httpx.AsyncClient(timeout=2.0, transport=AsyncUpstreamOpsTransport(faults))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(UpstreamOpsMiddleware, sink=sink, service="demo-gateway")

    @app.post("/generate/{key}")
    @upstream(platform="rix", model="img-v2")
    async def generate(key: int) -> JSONResponse:
        for index, (account_id, account_name) in enumerate(ACCOUNTS):
            base = dead_url if key % 5 == 4 and account_id == 1 else upstream_url
            with upstream(account_id=account_id, account_name=account_name):
                try:
                    response = await client.post(f"{base}/v1/images/{key}?account={account_id}")
                except httpx.TransportError as exc:
                    reason = type(exc).__name__
                else:
                    if response.status_code < 400:
                        return JSONResponse(response.json())
                    reason = f"HTTP {response.status_code}"
                if index + 1 < len(ACCOUNTS):
                    next_account = ACCOUNTS[index + 1][0]
                    record_failover(from_account=account_id, to_account=next_account, reason=reason)
        return JSONResponse({"error": "all upstream accounts failed"}, status_code=502)

    return app


def _on_backup(keys: Callable[[int], bool]) -> Callable[[httpx.Request], bool]:
    """A fault rule matching the backup account's calls for the image keys ``keys`` selects."""

    def match(request: httpx.Request) -> bool:
        key = request.url.path.rsplit("/", 1)[-1]
        return request.url.params.get("account") == "2" and key.isdigit() and keys(int(key))

    return match


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn on an ephemeral 127.0.0.1 port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the demo server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def unused_port_url() -> str:
    """A 127.0.0.1 URL with nothing listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def drive(url: str, count: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        responses = await asyncio.gather(*(client.post(f"/generate/{k}") for k in range(count)))
    for response in responses:
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    return statuses


_FAILED_ATTEMPT_KINDS = (HTTP_ERROR, REQUEST_ERROR, STREAM_ERROR)


def format_table(records: list[RequestRecord]) -> str:
    """Records as an 80-column table: one line per request, its failed attempts in order."""
    header = f"{'request':<10} {'route':<16} {'client':>6} {'attempts failed':<28} {'recovered':<9}"
    lines = [header, "-" * len(header)]
    for record in sorted(records, key=lambda r: int(r.path.rsplit("/", 1)[-1] or 0)):
        failures = ",".join(
            str(e.upstream_status_code) if e.kind == HTTP_ERROR else e.kind
            for e in record.upstream_errors
            if e.kind in _FAILED_ATTEMPT_KINDS
        )
        lines.append(
            f"{record.request_id[:10]:<10} {record.path[:16]:<16} {record.status_code:>6} "
            f"{failures[:28]:<28} {'yes' if record.recovered else 'no':<9}"
        )
    return "\n".join(lines)


def run_demo(*, sink_path: Path | None = None, requests: int = REQUESTS, out: TextIO) -> int:
    """Run the whole demo; returns the number of records that landed."""
    directory = None
    if sink_path is None:
        directory = tempfile.TemporaryDirectory(prefix="upstream-ops-demo-")
        sink_path = Path(directory.name) / "demo.db"
    sink = SQLiteSink(sink_path)
    try:
        with serve(build_upstream()) as upstream_url:
            gateway = build_gateway(sink, upstream_url, unused_port_url())
            with serve(gateway) as gateway_url:
                out.write(f"upstream on {upstream_url}, gateway on {gateway_url}\n")
                statuses = asyncio.run(drive(gateway_url, requests))
                upstream_ops.flush(timeout=10)
        records = sink.query_records(0, 2**62, limit=500)
        ok = statuses.get(200, 0)
        hidden = sum(1 for r in records if r.recovered)
        out.write(
            f"\n{requests} client requests: {ok} answered 200 OK, "
            f"{requests - ok} failed outright.\n"
            f"{len(records)} records landed; {hidden} of them are failures hidden behind a 200.\n"
            f"(SQLite file: {sink_path})\n\n"
        )
        out.write(format_table(records) + "\n")
        # The reference failure: a 504 from the provider, and yet the client got 200.
        example = next(
            (
                r
                for r in records
                if r.recovered and any(e.upstream_status_code == 504 for e in r.upstream_errors)
            ),
            records[-1] if records else None,
        )
        if example is not None:
            out.write(
                f"\nFailed attempts behind {example.path} (request {example.request_id[:10]}, "
                f"client saw {example.status_code}):\n"
            )
            out.write(
                json.dumps(
                    [e.to_dict() for e in example.upstream_errors], indent=2, ensure_ascii=False
                )
                + "\n"
            )
        return len(records)
    finally:
        sink.close()
        if directory is not None:
            directory.cleanup()
