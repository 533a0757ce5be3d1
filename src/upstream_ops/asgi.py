"""ASGI middleware (FastAPI, Starlette, any ASGI app): one collector and one record per HTTP request.

Shaped like Starlette's ``GZipMiddleware``: the middleware holds configuration only; each request gets
its own ``_HTTPRequestRecording`` that wraps ``receive`` and ``send`` and owns that request's state.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import anyio
from opentelemetry import metrics, trace
from opentelemetry.propagators.textmap import Getter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from upstream_ops.collector import Collector, _activate, _deactivate
from upstream_ops.defaults import (
    FLUSH_TIMEOUT_S,
    MAX_EVENTS_PER_REQUEST,
    REQUEST_ID_HEADER,
    SPOOL_MAX_BYTES,
)
from upstream_ops.dispatcher import Dispatcher
from upstream_ops.recorder import Recorder, RecordFilter, RecordHook, RequestFacts, now_ms
from upstream_ops.sinks.base import Sink
from upstream_ops.telemetry._server import IncomingRequest, RequestTelemetry, ServerTelemetry

__all__ = ["UpstreamOpsMiddleware"]

#: Status recorded when the client went away before the response was complete (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class UpstreamOpsMiddleware:
    """Records every failed upstream attempt of each HTTP request and flushes one record per request.

    ``sink`` is a sink object or URL (default: ``$UPSTREAM_OPS_SINK``, else ``sqlite:///upstream_ops.db``);
    ``should_record`` replaces the rule for which requests are stored; ``before_flush`` may enrich or
    drop a record. ``spool_dir`` keeps records on local disk while the sink cannot take them, and
    ``retention`` purges old ones (see ``Dispatcher``). Non-HTTP scopes pass through; lifespan
    shutdown drains the queue to the sink, or to the spool, within ``shutdown_timeout``.

    OpenTelemetry: the request's server span is the instrumentation's when one is current, else one
    started here (``create_server_span``); every event becomes an ``upstream.error`` span event on
    it. ``tracer_provider`` and ``meter_provider`` default to the global ones.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        sink: Sink | str | None = None,
        dispatcher: Dispatcher | None = None,
        service: str = "",
        request_id_header: str | None = REQUEST_ID_HEADER,
        should_record: RecordFilter | None = None,
        before_flush: RecordHook | None = None,
        max_events: int = MAX_EVENTS_PER_REQUEST,
        shutdown_timeout: float = FLUSH_TIMEOUT_S,
        create_server_span: bool = True,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = SPOOL_MAX_BYTES,
        retention: timedelta | str | None = None,
    ) -> None:
        self.app = app
        self.recorder = Recorder(
            sink=sink,
            dispatcher=dispatcher,
            service=service,
            request_id_header=request_id_header,
            should_record=should_record,
            before_flush=before_flush,
            max_events=max_events,
            meter_provider=meter_provider,
            spool_dir=spool_dir,
            spool_max_bytes=spool_max_bytes,
            retention=retention,
        )
        self.telemetry = ServerTelemetry(
            create_server_span=create_server_span,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self.shutdown_timeout = shutdown_timeout
        header = request_id_header.lower().encode("latin-1") if request_id_header else None
        self._header_name = header

    @property
    def dispatcher(self) -> Dispatcher:
        return self.recorder.dispatcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await _HTTPRequestRecording(self, scope, receive, send).run()
        elif scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
        else:
            await self.app(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def send_after_draining(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await anyio.to_thread.run_sync(self.dispatcher.drain, self.shutdown_timeout)
            await send(message)

        return send_after_draining


class _HTTPRequestRecording:
    """The state of one HTTP request: status sent, completion, disconnect, and its collector."""

    __slots__ = (
        "_collector",
        "_disconnected",
        "_middleware",
        "_receive",
        "_request_id",
        "_response_complete",
        "_response_ended_at",
        "_scope",
        "_send",
        "_status_code",
        "_telemetry",
    )

    def __init__(
        self, middleware: UpstreamOpsMiddleware, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self._middleware = middleware
        self._scope = scope
        self._receive = receive
        self._send = send
        self._status_code = 0
        self._response_complete = False
        self._response_ended_at = 0.0
        self._disconnected = False
        self._request_id = ""
        self._collector: Collector | None = None
        self._telemetry: RequestTelemetry | None = None

    async def run(self) -> None:
        middleware = self._middleware
        recorder = middleware.recorder
        scope = self._scope
        started_at_ms = now_ms()
        started = time.perf_counter()
        path = scope.get("path", "")
        root_path = scope.get("root_path", "")
        self._request_id = recorder.request_id_for(self._incoming_request_id())
        collector = self._collector = recorder.start(self._request_id)
        state = scope.setdefault("state", {})
        if isinstance(state, dict):
            state["upstream_ops"] = collector
        telemetry = self._telemetry = middleware.telemetry.start(collector, _describe, scope)
        otel_token = telemetry.activate() if telemetry is not None else None
        token = _activate(collector)
        error: BaseException | None = None
        try:
            await middleware.app(scope, self.receive, self.send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _deactivate(token)
            ended = self._response_ended_at or time.perf_counter()
            status_code = self._final_status(error)
            route = _route_template(scope, root_path)
            app_error = None if _is_cancellation(error) else error
            span_context = None
            if telemetry is not None:
                telemetry.end(status_code=status_code, route=route, error=app_error)
                telemetry.deactivate(otel_token)
                span_context = telemetry.span_context
            recorder.finish(
                collector,
                RequestFacts(
                    method=scope.get("method", ""),
                    path=path,
                    route=route,
                    status_code=status_code,
                    started_at_ms=started_at_ms,
                    duration_ms=(ended - started) * 1000.0,
                    error=app_error,
                    span_context=span_context,
                ),
            )

    def _incoming_request_id(self) -> str | None:
        name = self._middleware._header_name or b"x-request-id"
        for key, value in self._scope.get("headers", ()):
            if key.lower() == name:
                try:
                    return str(value.decode("latin-1"))
                except (AttributeError, UnicodeDecodeError):
                    return None
        return None

    def _final_status(self, error: BaseException | None) -> int:
        if self._response_complete:
            return self._status_code
        if self._disconnected or _is_cancellation(error):
            return CLIENT_CLOSED_REQUEST
        if self._status_code:
            return self._status_code
        return 500 if error is not None else self._status_code

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self._response_complete:
            self._disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._status_code = message.get("status", 0)
            header = self._middleware._header_name
            if header is not None:
                message = _with_header(message, header, self._request_id.encode("latin-1"))
        elif kind in _BODY_MESSAGES and not message.get("more_body", False):
            self._response_complete = True
            self._response_ended_at = time.perf_counter()
            if self._telemetry is not None:
                # FastAPI's own telemetry ends its server span while this message is sent.
                self._telemetry.response_ready(self._status_code)
        try:
            await self._send(message)
        except OSError:
            if not self._response_complete:
                self._disconnected = True
            raise


_BODY_MESSAGES = frozenset(
    ("http.response.body", "http.response.pathsend", "http.response.zerocopysend")
)


class _HeadersGetter(Getter[Scope]):
    """Reads propagation headers (``traceparent`` ...) from an ASGI scope."""

    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [
            value.decode("latin-1") for k, value in carrier.get("headers", ()) if k.lower() == name
        ]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        return [key.decode("latin-1") for key, _ in carrier.get("headers", ())]


_HEADERS_GETTER = _HeadersGetter()


def _describe(scope: Scope) -> IncomingRequest:
    """The request as the server span started here needs it."""
    host = None
    for key, value in scope.get("headers", ()):
        if key.lower() == b"host":
            host = value.decode("latin-1")
            break
    server = scope.get("server")
    return IncomingRequest(
        method=scope.get("method", ""),
        scheme=scope.get("scheme", "http"),
        path=scope.get("path", ""),
        host=host,
        server=(server[0], server[1]) if server else None,
        protocol_version=scope.get("http_version"),
        carrier=scope,
        getter=_HEADERS_GETTER,
    )


def _with_header(message: Message, name: bytes, value: bytes) -> Message:
    headers: list[Any] = list(message.get("headers", ()))
    for key, _ in headers:
        if key.lower() == name:
            return message
    headers.append((name, value))
    return {**message, "headers": headers}


def _route_template(scope: Scope, entry_root_path: str) -> str | None:
    """The route template the framework matched (Starlette/FastAPI set ``scope["route"]``)."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    root_path = scope.get("root_path", "")
    mount_prefix = root_path[len(entry_root_path) :] if isinstance(root_path, str) else ""
    return mount_prefix + template


def _is_cancellation(error: BaseException | None) -> bool:
    return error is not None and isinstance(error, anyio.get_cancelled_exc_class())
