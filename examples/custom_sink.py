"""Writing your own sink: a class with ``write(records)``; ``close()`` is optional.

This one appends a CSV line per failed upstream attempt. ``write`` runs on the dispatcher's
background thread, never on the request path; if it raises, the batch is retried.

Run it:   python examples/custom_sink.py attempts.csv
"""

from __future__ import annotations

import asyncio
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import upstream_ops
from upstream_ops import RequestRecord, UpstreamOpsMiddleware, append_upstream_error


class CsvAttemptsSink:
    """One CSV row per failed attempt: request id, upstream status, kind, message."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, records: Sequence[RequestRecord]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            for record in records:
                for event in record.upstream_errors:
                    writer.writerow(
                        [record.request_id, event.upstream_status_code, event.kind, event.message]
                    )


async def endpoint(request: Request) -> JSONResponse:
    append_upstream_error(upstream_status_code=429, kind="http_error", message="rate limited")
    append_upstream_error(upstream_status_code=200, kind="failover", message="backup account ok")
    return JSONResponse({"ok": True})


async def main(path: Path) -> None:
    app = Starlette(routes=[Route("/", endpoint)])
    wrapped = UpstreamOpsMiddleware(app, sink=CsvAttemptsSink(path))
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        response = await client.get("/", headers={"X-Request-ID": "custom-sink-demo"})
    print("client saw", response.status_code)
    upstream_ops.flush()
    print(path.read_text(encoding="utf-8"), end="")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "attempts.csv")))
