"""The same gateway in Flask.

Run it:   UPSTREAM_OPS_SINK=sqlite:///ops.db waitress-serve --listen=127.0.0.1:8000 examples.flask_app:app
Then:     curl -X POST localhost:8000/generate
"""

from __future__ import annotations

import os

import httpx
from flask import Flask

from upstream_ops import append_upstream_error
from upstream_ops.flask import UpstreamOps

UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:9")

app = Flask(__name__)
UpstreamOps(app, service="listing-images-flask", echo_request_id=True)


@app.post("/generate")
def generate() -> dict[str, object]:
    try:
        response = httpx.post(f"{UPSTREAM_URL}/v1/images", timeout=5.0)
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
            kind="http_error",
            message=response.reason_phrase,
            detail=response.text,
        )
    return {"ok": True, "image": None}


if __name__ == "__main__":
    app.run(port=8000)
