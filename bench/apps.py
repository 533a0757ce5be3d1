"""The applications every variant serves: one small JSON endpoint, Starlette (ASGI) and Flask (WSGI).

The endpoint answers ``GET /items/42`` with ``{"id":42,"ok":true}``. Before answering it asks the
variant's *probe* whether the instrumentation under test is really active in this request (a span is
recording, a collector is current, the events were stored ...); when it is not, the endpoint answers
500, so a variant that silently lost its instrumentation fails the response checks instead of
looking fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PATH = "/items/42"
ROUTE = "/items/{item_id}"
EXPECTED_STATUS = 200
EXPECTED_BODY = b'{"id":42,"ok":true}'
PROBE_FAILED_BODY = b"probe failed"

#: What a request asks of the instrumentation: returns True when the variant is active as claimed.
Probe = Callable[[], bool]

# Three failed attempts as a capture integration records them: secrets in the URL, the message and
# the body, so that the sanitizer has real work to do.
UPSTREAM_ERRORS: tuple[dict[str, Any], ...] = (
    {
        "platform": "openai",
        "kind": "http_error",
        "method": "POST",
        "upstream_url": "https://api.example.com/v1/chat/completions?api_key=sk-proj-AbCdEfGhIjKlMnOpQrSt",
        "upstream_status_code": 429,
        "message": "upstream returned 429 Too Many Requests",
        "detail": '{"error": {"message": "Rate limit reached for requests", "type": "requests",'
        ' "code": "rate_limit_exceeded"}}',
        "model": "gpt-4o-mini",
        "account_name": "primary",
        "attempt": 1,
        "duration_ms": 212.5,
        "retry_after_ms": 1200,
    },
    {
        "platform": "openai",
        "kind": "http_error",
        "method": "POST",
        "upstream_url": "https://api.example.com/v1/chat/completions",
        "upstream_status_code": 503,
        "message": "upstream returned 503 Service Unavailable; Authorization: Bearer "
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dBjftJeZ4CVPmB92K27uhbUJU1p1r",
        "detail": '{"error": {"message": "The server is overloaded", "type": "server_error"}}',
        "model": "gpt-4o-mini",
        "account_name": "primary",
        "attempt": 2,
        "duration_ms": 98.0,
    },
    {
        "platform": "anthropic",
        "kind": "request_error",
        "method": "POST",
        "upstream_url": "https://user:s3cr3t@fallback.example.com/v1/messages",
        "message": "ConnectTimeout: timed out after 5.0s",
        "model": "claude-3-5-haiku",
        "account_name": "fallback",
        "attempt": 3,
        "duration_ms": 5001.0,
        "error_class": "connect_timeout",
    },
)


def always() -> bool:
    return True


def upstream_errors_probe() -> Probe:
    """The endpoint work of the "3 upstream errors" variants; True when all three were stored."""
    from upstream_ops import append_upstream_error

    def record_upstream_errors() -> bool:
        stored = [append_upstream_error(**fields) for fields in UPSTREAM_ERRORS]
        return all(event is not None for event in stored)

    return record_upstream_errors


def starlette_app(probe: Probe = always) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def item(request: Any) -> Response:
        if not probe():
            return Response(PROBE_FAILED_BODY, status_code=500)
        return Response(
            b'{"id":%d,"ok":true}' % request.path_params["item_id"],
            media_type="application/json",
        )

    return Starlette(routes=[Route("/items/{item_id:int}", item)])


def plain_wsgi_app(probe: Probe = always) -> Any:
    """The endpoint as a bare WSGI callable, no framework: what the middleware costs by itself, without
    a framework's own work around it (``wsgi_plain`` family, in-process only)."""
    prefix = PATH.rsplit("/", 1)[0] + "/"
    headers = [("Content-Type", "application/json")]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        item = path[len(prefix) :]
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or not path.startswith(prefix)
            or not item.isdigit()
        ):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        if not probe():
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [PROBE_FAILED_BODY]
        start_response(f"{EXPECTED_STATUS} OK", headers)
        return [b'{"id":%d,"ok":true}' % int(item)]

    return app


def flask_app(probe: Probe = always) -> Any:
    from flask import Flask, Response

    app = Flask("bench")

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> Response:
        if not probe():
            return Response(PROBE_FAILED_BODY, status=500)
        return Response(b'{"id":%d,"ok":true}' % item_id, mimetype="application/json")

    return app
