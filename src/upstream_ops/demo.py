"""``upstream-ops demo``: a flaky upstream, a gateway in front of it, and what landed in SQLite.

Both servers run under uvicorn on 127.0.0.1 (ephemeral ports), the gateway answers its clients 200
whenever a retry or a failover saves the day, and the demo then prints the records the middleware
wrote: the failures a plain access log would have hidden.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

import upstream_ops
from upstream_ops import UpstreamOpsMiddleware, append_upstream_error
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import SQLiteSink

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
    """A gateway that fails over from the primary account to the backup one."""
    app = FastAPI()
    app.add_middleware(UpstreamOpsMiddleware, sink=sink, service="demo-gateway")

    @app.post("/generate/{key}")
    async def generate(key: int) -> JSONResponse:
        async with httpx.AsyncClient(timeout=2.0) as client:
            for account_id, account_name in ACCOUNTS:
                base = dead_url if key % 5 == 4 and account_id == 1 else upstream_url
                url = f"{base}/v1/images/{key}?account={account_id}"
                try:
                    response = await client.post(url)
                except httpx.TransportError as exc:
                    append_upstream_error(
                        platform="rix",
                        account_id=account_id,
                        account_name=account_name,
                        kind="request_error",
                        message=f"{type(exc).__name__}: {exc}",
                        method="POST",
                        upstream_url=url,
                    )
                    continue
                if response.status_code < 400:
                    return JSONResponse(response.json())
                append_upstream_error(
                    platform="rix",
                    account_id=account_id,
                    account_name=account_name,
                    upstream_status_code=response.status_code,
                    upstream_request_id=response.headers.get("x-request-id", ""),
                    kind="http_error",
                    message=response.reason_phrase,
                    detail=response.text,
                    method="POST",
                    upstream_url=url,
                )
        return JSONResponse({"error": "all upstream accounts failed"}, status_code=502)

    return app


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


def format_table(records: list[RequestRecord]) -> str:
    """Records as an 80-column table: one line per request."""
    header = f"{'request':<10} {'route':<16} {'client':>6} {'attempts failed':<28} {'recovered':<9}"
    lines = [header, "-" * len(header)]
    for record in sorted(records, key=lambda r: int(r.path.rsplit("/", 1)[-1] or 0)):
        failures = ",".join(
            str(e.upstream_status_code) if e.upstream_status_code else e.kind
            for e in record.upstream_errors
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
