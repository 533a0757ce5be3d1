"""ASGI middleware (FastAPI, Starlette, any ASGI app): one collector and one record per HTTP request.

Shaped like Starlette's ``GZipMiddleware``: the middleware holds configuration only; each request gets
its own ``_HTTPRequestRecording`` that wraps ``receive`` and ``send`` and owns that request's state.
Where a C compiler built ``upstream_ops._asgi_recording``, one object of it (``_CHTTPRequestCall``)
takes the same steps for an HTTP request, and calls the Python methods here for the rarer ones.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
from opentelemetry import metrics, trace
from opentelemetry.propagators.textmap import Getter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from upstream_ops.collector import Collector, _current
from upstream_ops.defaults import (
    FLUSH_TIMEOUT_S,
    MAX_EVENTS_PER_REQUEST,
    REQUEST_ID_HEADER,
    SPOOL_MAX_BYTES,
)
from upstream_ops.dispatcher import Dispatcher
from upstream_ops.recorder import (
    Recorder,
    RecordFilter,
    RecordHook,
    RequestFacts,
    now_ms,
)
from upstream_ops.sinks.base import Sink
from upstream_ops.telemetry._providers import (
    EMPTY_CONTEXT,
    get_context,
    has_current_span,
    provider_globals,
)
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
        echo_request_id: bool = False,
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
            echo_request_id=echo_request_id,
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
        self._live = self.telemetry.live
        self.shutdown_timeout = shutdown_timeout
        header = request_id_header.lower().encode("latin-1") if request_id_header else None
        self._incoming_header_name = header
        self._header_name = header if echo_request_id else None  # the response header, if echoed

    @property
    def dispatcher(self) -> Dispatcher:
        return self.recorder.dispatcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._lifespan_send(send)
            await self.app(scope, receive, send)
            return
        if _new_c_call is not None:
            # The same steps in C (upstream_ops._asgi_recording), where the extension was built.
            await _new_c_call(_CHTTPRequestCall, self, scope, receive, send)
            return
        # The happy path runs for every request: each step here is kept to a few bytecodes, and
        # everything a record needs is worked out in ``_finish`` only for a request that gets one.
        started = time.perf_counter()
        recorder = self.recorder
        request_id = None  # then the collector makes one if it is ever read
        name = self._incoming_header_name
        if name is not None:
            for key, value in scope.get("headers", ()):
                # ASGI servers lower-case header names (Starlette's ``Headers`` relies on it too).
                if key == name:
                    request_id = recorder.valid_request_id(_decode(value))
                    break
        collector = Collector(request_id, recorder.max_events)
        state = scope.get("state")
        if state is None:
            scope["state"] = {"upstream_ops": collector}
        elif isinstance(state, dict):
            state["upstream_ops"] = collector
        # ServerTelemetry.start's own first test, inline: with OpenTelemetry idle (no provider,
        # nothing attached to its context) no call is made.
        live = self._live
        if live.unset:
            live.refresh()
        telemetry = (
            self.telemetry.start(collector, _describe, scope)
            if live.tracing
            or live.metrics
            or (get_context() is not EMPTY_CONTEXT and has_current_span())
            else None
        )
        recording = _HTTPRequestRecording(self, scope, collector, telemetry, receive, send)
        otel_token = telemetry.activate() if telemetry is not None else None
        token = _current.set(collector)
        error: BaseException | None = None
        try:
            await self.app(scope, recording.receive, recording.send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                _current.reset(token)
            except ValueError:  # the app left another context current: none of ours stays
                _current.set(None)
            if recording.response_complete and error is None and telemetry is None:
                # Healthy unless the collector says otherwise: no record to describe
                # (``Recorder.finish_if_healthy`` without its call; the collector is closed either
                # way).
                quiet = collector.close()
                if not (quiet and recorder._default_rule and recording.status_code < 500):
                    self._finish(scope, collector, recording, started, None, None, None, True)
            else:
                self._finish(
                    scope, collector, recording, started, error, telemetry, otel_token, False
                )

    def _finish(
        self,
        scope: Scope,
        collector: Collector,
        recording: _RecordingFacts,
        started: float,
        error: BaseException | None,
        telemetry: RequestTelemetry | None,
        otel_token: object | None,
        known_unhealthy: bool,
    ) -> None:
        """The request is over: end its telemetry, and describe it to the recorder if it needs a record.

        ``known_unhealthy``: the caller has had ``Recorder.finish_if_healthy`` say no already.
        """
        recorder = self.recorder
        now = time.perf_counter()
        ended = recording.response_ended_at or now
        status_code = recording.final_status(error)
        app_error = None if _is_cancellation(error) else error
        root_path = recording.root_path
        route = span_context = None
        if telemetry is not None:
            route = _route_template(scope, root_path)
            telemetry.end(status_code=status_code, route=route, error=app_error)
            telemetry.deactivate(otel_token)
            span_context = telemetry.span_context
        if not known_unhealthy and recorder.finish_if_healthy(collector, status_code, app_error):
            return
        duration_ms = (ended - started) * 1000.0
        recorder._record(  # finish_if_healthy has said no
            collector,
            RequestFacts(  # positional (cheaper than keywords for a class), in field order
                scope.get("method", ""),  # method
                scope.get("path", ""),  # path
                route if telemetry is not None else _route_template(scope, root_path),  # route
                status_code,  # status_code
                now_ms() - round((now - started) * 1000.0),  # started_at_ms
                duration_ms,  # duration_ms
                app_error,  # error
                span_context,  # span_context
            ),
        )

    def _lifespan_send(self, send: Send) -> Send:
        async def send_after_draining(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await anyio.to_thread.run_sync(self.dispatcher.drain, self.shutdown_timeout)
            await send(message)

        return send_after_draining


class _RecordingFacts:
    """What the end of a request reads of its recording, in Python or in C (``_CHTTPRequestCall``)."""

    __slots__ = ()

    status_code: int
    response_complete: bool
    response_ended_at: float
    disconnected: bool
    root_path: str

    def final_status(self, error: BaseException | None) -> int:
        if self.response_complete:
            return self.status_code
        if self.disconnected or _is_cancellation(error):
            return CLIENT_CLOSED_REQUEST
        if self.status_code:
            return self.status_code
        return 500 if error is not None else self.status_code


class _HTTPRequestRecording(_RecordingFacts):
    """What one HTTP request's ``send`` and ``receive`` tell: status, completion, disconnect."""

    __slots__ = (
        "_header",
        "_receive",
        "_send",
        "_telemetry",
        "disconnected",
        "response_complete",
        "response_ended_at",
        "root_path",
        "status_code",
    )

    def __init__(
        self,
        middleware: UpstreamOpsMiddleware,
        scope: Scope,
        collector: Collector,
        telemetry: RequestTelemetry | None,
        receive: Receive,
        send: Send,
    ) -> None:
        name = middleware._header_name
        # The response header, ready to append (None: the option is off).
        self._header = None if name is None else (name, collector.request_id.encode("latin-1"))
        self._telemetry = telemetry
        self._receive = receive
        self._send = send
        self.status_code = 0
        self.response_complete = False
        self.response_ended_at = 0.0
        self.disconnected = False
        # Before a Starlette ``Mount`` adds its prefix (the route template is relative to it).
        self.root_path = scope.get("root_path", "")

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.response_complete:
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status_code = message.get("status", 0)
            header = self._header
            if header is not None:
                message = _with_header(message, header)
        elif kind in _BODY_MESSAGES and not message.get("more_body", False):
            self.response_complete = True
            self.response_ended_at = time.perf_counter()
            if self._telemetry is not None:
                # FastAPI's own telemetry ends its server span while this message is sent.
                self._telemetry.response_ready(self.status_code)
        try:
            await self._send(message)
        except OSError:
            if not self.response_complete:
                self.disconnected = True
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


def _with_header(message: Message, header: tuple[bytes, bytes]) -> Message:
    """``message`` with ``header`` appended, unless the app set that header (lower-cased, as ASGI has it)."""
    headers = message.get("headers", ())
    name = header[0]
    for key, _ in headers:
        if key == name:
            return message
    return {**message, "headers": [*headers, header]}


def _decode(value: bytes) -> str | None:
    try:
        return value.decode("latin-1")
    except (AttributeError, UnicodeDecodeError):
        return None


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
    if error is None:
        return False
    try:
        cancelled = anyio.get_cancelled_exc_class()
    except Exception:  # no event loop runs: a request closed by the garbage collector, say
        cancelled = asyncio.CancelledError
    return isinstance(error, cancelled)


# One request's steps in C where a compiler built upstream_ops._asgi_recording: ``_new_c_call``
# begins the request and calls the app, awaiting the ``Call`` it returns drives the app, and its
# ``send_message``/``receive_message`` are the app's send and receive. What is rarer (a span, an
# echoed id, a record) it leaves to the methods below.
_new_c_call: Callable[..., Awaitable[None]] | None = None
try:
    from upstream_ops import _asgi_recording
except ImportError:  # pragma: no cover - depends on the build
    pass
else:

    class _CHTTPRequestCall(_asgi_recording.Call, _RecordingFacts):
        """One HTTP request, its common steps in C (see ``UpstreamOpsMiddleware.__call__``)."""

        __slots__ = ()

        def _request_id_from(self, value: bytes) -> str | None:
            middleware: UpstreamOpsMiddleware = self.middleware
            return middleware.recorder.valid_request_id(_decode(value))

        def _begin_slow(self, telemetry_wanted: bool) -> None:
            """The telemetry's start and the echoed header, as the Python path makes them."""
            middleware: UpstreamOpsMiddleware = self.middleware
            collector = self.collector
            telemetry = (
                middleware.telemetry.start(collector, _describe, self.scope)
                if telemetry_wanted
                else None
            )
            name = middleware._header_name
            if name is not None:
                self._header = (name, collector.request_id.encode("latin-1"))
            if telemetry is not None:
                self.telemetry = telemetry
                self.otel_token = telemetry.activate()

        def _finish_slow(self, error: BaseException | None, known_unhealthy: bool) -> None:
            self.middleware._finish(
                self.scope,
                self.collector,
                self,
                self.started,
                error,
                self.telemetry,
                self.otel_token,
                known_unhealthy,
            )

    _asgi_recording.setup(
        time.perf_counter,
        Collector,
        _current,
        get_context,
        EMPTY_CONTEXT,
        has_current_span,
        _with_header,
        provider_globals(),
    )
    _new_c_call = _asgi_recording.new_call
