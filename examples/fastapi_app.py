"""A FastAPI gateway whose upstream fails, yet the client gets 200: the failure lands in SQLite.

Run it:   UPSTREAM_OPS_SINK=sqlite:///ops.db uvicorn examples.fastapi_app:app --port 8000
Then:     curl -X POST localhost:8000/generate      (answers 200 with a placeholder)
And look: upstream-ops query --sink sqlite:///ops.db      (or sqlite3 ops.db, see docs/sinks.md)

The upstream URL comes from UPSTREAM_URL; by default it points at a port where nothing listens,
so every call fails with a refused connection.
"""

from __future__ import annotations

import os

import httpx
from fastapi import FastAPI

from upstream_ops import UpstreamOpsMiddleware, append_upstream_error

UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9")

app = FastAPI()
# No sink given: $UPSTREAM_OPS_SINK, else sqlite:///upstream_ops.db in the working directory.
# echo_request_id: the response carries X-Request-ID, the key of the request's record.
app.add_middleware(UpstreamOpsMiddleware, service="listing-images", echo_request_id=True)


@app.post("/generate")
async def generate() -> dict[str, object]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        try:
            response = await client.post(f"{UPSTREAM_URL}/v1/images")
        except httpx.TransportError as exc:
            append_upstream_error(
                platform="rix", kind="request_error", message=f"{type(exc).__name__}: {exc}"
            )
        else:
            if response.status_code < 400:
                return {"ok": True, "image": response.json()}
            append_upstream_error(
                platform="rix",
                upstream_status_code=response.status_code,
                upstream_request_id=response.headers.get("x-request-id", ""),
                kind="http_error",
                message=response.reason_phrase,
                detail=response.text,
            )
    return {"ok": True, "image": None, "note": "placeholder served; see the ops record"}
