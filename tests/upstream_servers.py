"""Real upstreams for the capture tests: a misbehaving ASGI app, a socket that drops bodies, a dead port.

``misbehaving_upstream()`` answers every provider envelope with its real status and headers, fails
the first N calls of a key, streams server-sent events (with and without errors), sends 10 MB error
pages, stalls, and echoes planted secrets back. ``body_dropping_server()`` promises a body and closes
the connection part-way. ``refused_url()`` is a 127.0.0.1 port where nothing listens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

#: Planted in URLs, headers and bodies by the secret tests; must never appear in an event.
SECRET = "sk-proj-PLANTEDsecret0123456789abcdefXYZ"
PASSWORD = "hunter2-PLANTED-password"


class Envelope(NamedTuple):
    """One provider error response and what the capture must read out of it."""

    status: int
    body: bytes
    headers: dict[str, str]
    message: str
    provider_type: str
    provider_code: str
    origin: str = ""
    request_id: str = ""
    content_type: str = "application/json"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


ENVELOPES: dict[str, Envelope] = {
    "openai": Envelope(
        429,
        _json(
            {
                "error": {
                    "message": "Rate limit reached for gpt-4o",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
        ),
        {"x-request-id": "req_openai_1", "retry-after-ms": "1500"},
        "Rate limit reached for gpt-4o",
        "requests",
        "rate_limit_exceeded",
        request_id="req_openai_1",
    ),
    "openai_nested": Envelope(
        400,
        _json(
            {
                "error": {
                    "message": json.dumps({"error": {"message": "inner detail", "code": "x"}}),
                    "type": "invalid_request_error",
                    "code": "bad",
                }
            }
        ),
        {},
        "inner detail",
        "invalid_request_error",
        "bad",
    ),
    "anthropic": Envelope(
        529,
        _json({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        {"request-id": "req_ant_1", "x-should-retry": "true"},
        "Overloaded",
        "overloaded_error",
        "",
        request_id="req_ant_1",
    ),
    "google": Envelope(
        429,
        _json(
            {
                "error": {
                    "code": 429,
                    "message": "Resource has been exhausted",
                    "status": "RESOURCE_EXHAUSTED",
                }
            }
        ),
        {"retry-after": "7"},
        "Resource has been exhausted",
        "RESOURCE_EXHAUSTED",
        "429",
    ),
    "aws": Envelope(
        400,
        _json({"message": "1 validation error detected"}),
        {
            "x-amzn-ErrorType": "ValidationException:http://internal.amazon.com/coral/",
            "x-amzn-RequestId": "aws-req-1",
        },
        "1 validation error detected",
        "ValidationException",
        "",
        request_id="aws-req-1",
    ),
    "bkapi_gateway": Envelope(
        504,
        _json(
            {
                "code_name": "REQUEST_BACKEND_TIMEOUT",
                "data": None,
                "code": 1650401,
                "message": "Request backend service timeout",
                "result": False,
            }
        ),
        {"X-Bkapi-Error-Code": "1650401", "X-Bkapi-Request-Id": "bk-req-1"},
        "Request backend service timeout",
        "REQUEST_BACKEND_TIMEOUT",
        "1650401",
        origin="gateway",
        request_id="bk-req-1",
    ),
    "bkapi_backend": Envelope(
        400,
        _json({"code": 40001, "message": "bad args", "result": False, "data": None}),
        {"x-bkapi-request-id": "bk-req-2"},
        "bad args",
        "",
        "40001",
        request_id="bk-req-2",
    ),
    "kimi": Envelope(
        401,
        _json({"errcode": -2002, "errmsg": "Token expired"}),
        {},
        "Token expired",
        "",
        "-2002",
    ),
    "dify": Envelope(
        400,
        _json({"code": "invalid_param", "message": "Model is not configured", "status": 400}),
        {"x-request-id": "dify-1"},
        "Model is not configured",
        "",
        "invalid_param",
        request_id="dify-1",
    ),
    "fastapi": Envelope(
        422,
        _json({"detail": [{"loc": ["body", "model"], "msg": "Field required", "type": "missing"}]}),
        {},
        "body.model: Field required",
        "missing",
        "",
    ),
    "generic_message": Envelope(
        500, _json({"message": "internal failure"}), {}, "internal failure", "", ""
    ),
    "generic_error_string": Envelope(
        403, _json({"error": "forbidden for this key"}), {}, "forbidden for this key", "", ""
    ),
    "nginx_html": Envelope(
        502,
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n"
        b"</html>\r\n",
        {"cf-ray": "8a1b2c3d4e5f-AMS"},
        "502 Bad Gateway",
        "",
        "",
        request_id="8a1b2c3d4e5f-AMS",
        content_type="text/html",
    ),
    "plain_text": Envelope(
        503,
        b"upstream connect error or disconnect/reset before headers\n",
        {"retry-after": "3"},
        "upstream connect error or disconnect/reset before headers",
        "",
        "",
        content_type="text/plain",
    ),
    "garbage": Envelope(
        500,
        b"\x00\x01\x02\xff\xfe binary \x00 junk" * 20,
        {},
        "500 Internal Server Error",
        "",
        "",
        content_type="application/octet-stream",
    ),
    "empty": Envelope(404, b"", {}, "404 Not Found", "", "", content_type="text/plain"),
}

SSE_OK = (
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n'
    b"data: [DONE]\n\n"
)
SSE_ANTHROPIC_ERROR = (
    b"event: message_start\r\n"
    b'data: {"type":"message_start","message":{"id":"msg_1"}}\r\n\r\n'
    b"event: error\r\n"
    b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\r\n\r\n'
)
SSE_OPENAI_ERROR = (
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"error":{"message":"The server had an error","type":"server_error","code":"500"}}\n\n'
)


def misbehaving_upstream() -> Starlette:
    calls: dict[str, int] = {}
    lock = threading.Lock()

    async def envelope(request: Request) -> Response:
        found = ENVELOPES[request.path_params["name"]]
        return Response(
            found.body,
            status_code=found.status,
            headers=found.headers,
            media_type=found.content_type,
        )

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True}, headers={"x-request-id": "ok-1"})

    async def flaky(request: Request) -> Response:
        """Fails the first ``fail`` calls of each key with ``status``, then answers 200."""
        key = request.path_params["key"]
        with lock:
            calls[key] = calls.get(key, 0) + 1
            call = calls[key]
        if call <= int(request.query_params.get("fail", "1")):
            status = int(request.query_params.get("status", "503"))
            return JSONResponse(
                {"error": {"message": f"call {call} failed", "type": "server_error"}},
                status_code=status,
                headers={"x-request-id": f"{key}-{call}", "retry-after": "0"},
            )
        return JSONResponse({"ok": True, "call": call}, headers={"x-request-id": f"{key}-{call}"})

    async def by_account(request: Request) -> Response:
        """Account 1 is rate limited, account 2 overloaded, account 3 works."""
        account = request.query_params.get("account")
        if account == "1":
            return JSONResponse(
                {"error": {"message": "Rate limit reached", "type": "requests"}},
                status_code=429,
                headers={"retry-after": "2", "x-request-id": "acct-1"},
            )
        if account == "2":
            return JSONResponse(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                status_code=529,
                headers={"request-id": "acct-2"},
            )
        return JSONResponse({"ok": True})

    async def sse(request: Request) -> Response:
        body = {
            "ok": SSE_OK,
            "anthropic_error": SSE_ANTHROPIC_ERROR,
            "openai_error": SSE_OPENAI_ERROR,
            "long_lines": b"data: " + b"x" * 100_000 + b"\n\n" + SSE_OK,
        }[request.path_params["variant"]]

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 7):  # split lines across chunks on purpose
                yield body[start : start + 7]

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def big(request: Request) -> Response:
        status = int(request.path_params["status"])

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"error":{"message":"huge failure page","type":"server_error"},"pad":"'
            for _ in range(160):
                yield b"x" * 65536
            yield b'"}'

        return StreamingResponse(chunks(), status_code=status, media_type="application/json")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(float(request.query_params.get("s", "2")))
        return JSONResponse({"ok": True})

    async def echo(request: Request) -> Response:
        """A 401 that echoes the credentials it got: in the body, the headers and the message."""
        auth = request.headers.get("authorization", "")
        api_key = request.query_params.get("api_key", "")
        return JSONResponse(
            {
                "error": {
                    "message": f"Incorrect API key provided: {api_key}. Authorization: {auth}",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                },
                "echo": {"authorization": auth, "api_key": api_key, "password": PASSWORD},
            },
            status_code=401,
            headers={"x-echo-authorization": auth, "x-request-id": "echo-1"},
        )

    return Starlette(
        routes=[
            Route("/ok", ok, methods=["GET", "POST"]),
            Route("/envelope/{name}", envelope, methods=["GET", "POST"]),
            Route("/flaky/{key}", flaky, methods=["GET", "POST"]),
            Route("/by-account", by_account, methods=["GET", "POST"]),
            Route("/sse/{variant}", sse, methods=["GET", "POST"]),
            Route("/big/{status}", big),
            Route("/slow", slow),
            Route("/echo", echo, methods=["GET", "POST"]),
        ]
    )


@contextmanager
def body_dropping_server() -> Iterator[str]:
    """An HTTP/1.1 server that announces a 1000-byte body, sends 20 bytes and closes.

    The path picks the status: ``/200`` (a success whose body breaks) or ``/502``.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            status = int(path.strip("/").split("?")[0] or "200")
            conn.sendall(
                f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000\r\nx-request-id: drop-{status}\r\n\r\n".encode()
                + b'{"error":{"message":'
            )

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def refused_url() -> str:
    """A 127.0.0.1 URL with nothing listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
