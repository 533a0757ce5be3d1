"""Test your error handling: an httpx transport that injects upstream faults, and a test collector.

``FaultInjectionTransport`` answers some requests with the failures real upstreams produce (429 with
``Retry-After``, 503, a gateway's 504, Anthropic's 529), raises connect errors and timeouts, or
breaks a response body after N bytes; the other requests go to the wrapped transport. Which requests
are hit is decided by the faults' rules and a seeded random generator: the same seed and the same
sequence of requests give the same faults. Nothing sleeps unless a fault asks for ``delay_s``.

``collecting()`` makes a fresh collector current, as the middleware does for a request, so a test
can call code that records events and then look at them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypedDict, Unpack

import anyio
import httpx

from upstream_ops.collector import Collector, _activate, _deactivate
from upstream_ops.defaults import MAX_EVENTS_PER_REQUEST

__all__ = [
    "Fault",
    "FaultInjectionTransport",
    "Trigger",
    "broken_stream",
    "collecting",
    "connect_error",
    "gateway_timeout",
    "http_error",
    "overloaded",
    "rate_limited",
    "service_unavailable",
    "timeout",
]

RequestMatcher = Callable[[httpx.Request], bool]


class Trigger(TypedDict, total=False):
    """When a fault applies. All given conditions must hold."""

    #: Chance that a matching request is hit (drawn from the transport's seeded generator).
    probability: float
    #: Hit at most this many requests, then stop.
    times: int
    #: Only requests for which this returns True.
    match: RequestMatcher
    #: Sleep this long before answering or raising (default: no sleep at all).
    delay_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One rule: which requests it hits (the ``Trigger`` fields) and what it does to them.

    It answers ``status`` with ``body`` and ``headers``, or raises ``error``, or (with
    ``break_after_bytes``) lets the request through and breaks the response body after that many
    bytes. ``request_id_header`` names a header set to a fresh id (``fault-1``, ``fault-2`` ...).
    Build faults with the functions of this module rather than by hand.
    """

    name: str
    status: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    request_id_header: str = ""
    error: type[httpx.TransportError] | None = None
    error_message: str = ""
    break_after_bytes: int | None = None
    probability: float = 1.0
    times: int | None = None
    match: RequestMatcher | None = None
    delay_s: float = 0.0


def http_error(
    status: int,
    body: object = None,
    headers: Mapping[str, str] | None = None,
    *,
    name: str = "",
    request_id_header: str = "x-request-id",
    **trigger: Unpack[Trigger],
) -> Fault:
    """Answer ``status``; ``body`` is JSON-encoded unless it is ``bytes`` or ``str``."""
    if isinstance(body, str):
        content, content_type = body.encode(), "text/plain; charset=utf-8"
    elif isinstance(body, bytes):
        content, content_type = body, "application/octet-stream"
    else:
        content, content_type = json.dumps(body).encode(), "application/json"
    return Fault(
        name=name or f"http_{status}",
        status=status,
        body=content,
        headers=(("content-type", content_type), *(headers or {}).items()),
        request_id_header=request_id_header,
        **trigger,
    )


def rate_limited(retry_after: float = 1.0, **trigger: Unpack[Trigger]) -> Fault:
    """429 with ``Retry-After`` (seconds) and ``retry-after-ms``, in OpenAI's error envelope."""
    seconds = int(retry_after) if float(retry_after).is_integer() else retry_after
    return http_error(
        429,
        {
            "error": {
                "message": "Rate limit reached for requests",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        {"retry-after": str(seconds), "retry-after-ms": str(round(retry_after * 1000))},
        name="rate_limited",
        **trigger,
    )


def service_unavailable(**trigger: Unpack[Trigger]) -> Fault:
    """503 in OpenAI's envelope: the upstream is overloaded or not ready."""
    return http_error(
        503,
        {
            "error": {
                "message": "The server is overloaded or not ready yet.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        name="service_unavailable",
        **trigger,
    )


def gateway_timeout(**trigger: Unpack[Trigger]) -> Fault:
    """504 from an API gateway (BlueKing APIGateway's envelope and headers): the backend timed out."""
    message = 'Request backend service timeout [upstream_error="cannot read header from upstream"]'
    return http_error(
        504,
        {
            "code_name": "REQUEST_BACKEND_TIMEOUT",
            "data": None,
            "code": 1650401,
            "message": message,
            "result": False,
        },
        {"X-Bkapi-Error-Code": "1650401", "X-Bkapi-Error-Message": message},
        name="gateway_timeout",
        request_id_header="X-Bkapi-Request-Id",
        **trigger,
    )


def overloaded(**trigger: Unpack[Trigger]) -> Fault:
    """Anthropic's 529: the API is overloaded for everyone."""
    return http_error(
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        name="overloaded",
        request_id_header="request-id",
        **trigger,
    )


def connect_error(**trigger: Unpack[Trigger]) -> Fault:
    """Raise ``httpx.ConnectError`` as a refused connection does."""
    return Fault(
        name="connect_error",
        error=httpx.ConnectError,
        error_message="[Errno 111] Connection refused",
        **trigger,
    )


_TIMEOUTS: dict[str, type[httpx.TimeoutException]] = {
    "connect": httpx.ConnectTimeout,
    "read": httpx.ReadTimeout,
    "write": httpx.WriteTimeout,
    "pool": httpx.PoolTimeout,
}


def timeout(
    phase: Literal["connect", "read", "write", "pool"] = "read", **trigger: Unpack[Trigger]
) -> Fault:
    """Raise the httpx timeout of ``phase`` at once (pass ``delay_s`` to really wait first)."""
    return Fault(
        name=f"{phase}_timeout", error=_TIMEOUTS[phase], error_message="timed out", **trigger
    )


def broken_stream(after_bytes: int, **trigger: Unpack[Trigger]) -> Fault:
    """Let the request through, then break its response body after ``after_bytes`` bytes."""
    if after_bytes < 0:
        raise ValueError(f"after_bytes must be 0 or more, got {after_bytes!r}")
    return Fault(name="broken_stream", break_after_bytes=after_bytes, **trigger)


class FaultInjectionTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps ``transport`` (sync or async) and injects ``faults``, the first that applies winning.

    Without a transport, requests that no fault hits are answered ``200 {"ok": true}``. ``counts``
    says how often each fault (by name) was injected. Thread-safe; usable by ``httpx.Client`` and
    ``httpx.AsyncClient`` (with a transport of the matching kind).
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        *,
        faults: Sequence[Fault] = (),
        seed: int = 0,
    ) -> None:
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"faults must be Fault objects, got {type(fault).__name__}")
        self.transport = transport
        self.faults = tuple(faults)
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._sequence = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault, sequence = self._pick(request)
        if fault is not None and fault.delay_s > 0:
            time.sleep(fault.delay_s)
        if fault is None or fault.break_after_bytes is not None:
            if isinstance(self.transport, httpx.BaseTransport):
                response = self.transport.handle_request(request)
            elif self.transport is None:
                response = _default_response()
            else:
                raise TypeError("an httpx.Client needs a sync transport to wrap")
            return response if fault is None else _broken(response, fault, request)
        return _answer(fault, sequence, request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fault, sequence = self._pick(request)
        if fault is not None and fault.delay_s > 0:
            await anyio.sleep(fault.delay_s)
        if fault is None or fault.break_after_bytes is not None:
            if isinstance(self.transport, httpx.AsyncBaseTransport):
                response = await self.transport.handle_async_request(request)
            elif self.transport is None:
                response = _default_response()
            else:
                raise TypeError("an httpx.AsyncClient needs an async transport to wrap")
            return response if fault is None else _broken(response, fault, request)
        return _answer(fault, sequence, request)

    def close(self) -> None:
        if isinstance(self.transport, httpx.BaseTransport):
            self.transport.close()

    async def aclose(self) -> None:
        if isinstance(self.transport, httpx.AsyncBaseTransport):
            await self.transport.aclose()

    def _pick(self, request: httpx.Request) -> tuple[Fault | None, int]:
        with self._lock:
            self._sequence += 1
            for fault in self.faults:
                if fault.times is not None and self.counts[fault.name] >= fault.times:
                    continue
                if fault.match is not None and not fault.match(request):
                    continue
                if fault.probability < 1.0 and self._random.random() >= fault.probability:
                    continue
                self.counts[fault.name] += 1
                return fault, self._sequence
            return None, self._sequence


def _default_response() -> httpx.Response:
    return httpx.Response(200, json={"ok": True})


def _answer(fault: Fault, sequence: int, request: httpx.Request) -> httpx.Response:
    if fault.error is not None:
        raise fault.error(fault.error_message, request=request)
    headers = list(fault.headers)
    if fault.request_id_header:
        headers.append((fault.request_id_header, f"fault-{sequence}"))
    return httpx.Response(fault.status, headers=headers, content=fault.body, request=request)


def _broken(response: httpx.Response, fault: Fault, request: httpx.Request) -> httpx.Response:
    after = fault.break_after_bytes or 0
    stream = response.stream
    if response.is_closed:  # built with content=...: the body is in memory
        stream = httpx.ByteStream(response.content)
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=_BrokenStream(stream, after),
        extensions=response.extensions,
        request=request,
    )


class _BrokenStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """Yields the first ``after`` bytes of ``stream``, then fails as a dropped connection does."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, after: int) -> None:
        self._stream = stream
        self._after = after

    def __iter__(self) -> Iterator[bytes]:
        if not isinstance(self._stream, httpx.SyncByteStream):
            raise RuntimeError("Attempted to call a sync iterator on an async stream.")
        sent = 0
        for chunk in self._stream:
            chunk = chunk[: self._after - sent]
            if chunk:
                sent += len(chunk)
                yield chunk
            if sent >= self._after:
                break
        raise self._error(sent)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if not isinstance(self._stream, httpx.AsyncByteStream):
            raise RuntimeError("Attempted to call an async iterator on a sync stream.")
        sent = 0
        async for chunk in self._stream:
            chunk = chunk[: self._after - sent]
            if chunk:
                sent += len(chunk)
                yield chunk
            if sent >= self._after:
                break
        raise self._error(sent)

    def close(self) -> None:
        if isinstance(self._stream, httpx.SyncByteStream):
            self._stream.close()

    async def aclose(self) -> None:
        if isinstance(self._stream, httpx.AsyncByteStream):
            await self._stream.aclose()

    @staticmethod
    def _error(sent: int) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(
            f"peer closed connection without sending complete message body (received {sent} bytes)"
        )


@contextmanager
def collecting(
    request_id: str = "test", *, max_events: int = MAX_EVENTS_PER_REQUEST
) -> Iterator[Collector]:
    """Run the block as if inside a request: a fresh ``Collector`` is current until it ends.

    ``with collecting() as collector: call_the_code(); assert collector.events[0].kind == ...``
    """
    collector = Collector(request_id, max_events=max_events)
    token = _activate(collector)
    try:
        yield collector
    finally:
        _deactivate(token)
