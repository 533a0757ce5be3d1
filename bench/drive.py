"""Driving an ASGI or WSGI callable directly, as a server would, and checking every response.

No server, no sockets: what is timed is the app and the wrappers around it. Each request gets a fresh
scope or environ (the middleware may add to it); each response must be ``200`` with the expected
body, else it is counted as bad (the first bad one is kept to say why).
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.apps import EXPECTED_BODY, EXPECTED_STATUS, PATH

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": PATH,
    "raw_path": PATH.encode(),
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": PATH,
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1",
    "HTTP_HOST": "127.0.0.1:8000",
    "HTTP_USER_AGENT": "bench",
    "HTTP_ACCEPT": "*/*",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": False,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


@dataclass
class RunResult:
    requests: int
    elapsed_ns: int
    bad: int
    first_bad: str | None

    @property
    def us_per_request(self) -> float:
        return self.elapsed_ns / self.requests / 1000


class ASGIDriver:
    """Runs requests through an ASGI app on one event loop kept for the whole benchmark."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()

    def run(self, requests: int) -> RunResult:
        return self.loop.run_until_complete(self._run(requests))

    async def _run(self, requests: int) -> RunResult:
        app = self.app
        bad = 0
        first_bad: str | None = None
        sent: list[dict[str, Any]] = []
        record: Callable[[dict[str, Any]], Awaitable[None]] = _appender(sent)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        started = time.perf_counter_ns()
        for _ in range(requests):
            await app(dict(SCOPE), receive, record)
            # The check: status of the start message, and the whole body.
            if (
                len(sent) != 2
                or sent[0].get("status") != EXPECTED_STATUS
                or sent[1].get("body") != EXPECTED_BODY
            ):
                bad += 1
                if first_bad is None:
                    first_bad = repr(sent)[:300]
            sent.clear()
        return RunResult(requests, time.perf_counter_ns() - started, bad, first_bad)

    def close(self) -> None:
        self.loop.close()


def _appender(sent: list[dict[str, Any]]) -> Callable[[dict[str, Any]], Awaitable[None]]:
    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return send


class WSGIDriver:
    """Runs requests through a WSGI app as a server does: call, iterate the body, close it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def run(self, requests: int) -> RunResult:
        app = self.app
        bad = 0
        first_bad: str | None = None
        status: list[str] = []

        def start_response(
            status_line: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            status.append(status_line)
            return _discard

        expected_status = f"{EXPECTED_STATUS} "
        started = time.perf_counter_ns()
        for _ in range(requests):
            environ = dict(ENVIRON)
            environ["wsgi.input"] = io.BytesIO(b"")
            result = app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if (
                len(status) != 1
                or not status[0].startswith(expected_status)
                or body != EXPECTED_BODY
            ):
                bad += 1
                if first_bad is None:
                    first_bad = f"{status!r} {body[:200]!r}"
            status.clear()
        return RunResult(requests, time.perf_counter_ns() - started, bad, first_bad)

    def close(self) -> None:
        pass


def _discard(data: bytes) -> None:
    pass


def driver_for(family: str, app: Any) -> ASGIDriver | WSGIDriver:
    return ASGIDriver(app) if family == "asgi" else WSGIDriver(app)
