"""WSGI middleware (Flask, Django via WSGI, any PEP 3333 app): one record per request.

The record is finished when the server closes the response iterable, so a streamed response is recorded
with its final state. A ``wsgi.file_wrapper`` response is returned as is (servers may send it with
``sendfile``); only its ``close`` is wrapped.
"""

from __future__ import annotations

import contextvars
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.propagators.textmap import Getter

from upstream_ops.collector import Collector, _current
from upstream_ops.defaults import MAX_EVENTS_PER_REQUEST, REQUEST_ID_HEADER, SPOOL_MAX_BYTES
from upstream_ops.dispatcher import Dispatcher
from upstream_ops.recorder import (
    Recorder,
    RecordFilter,
    RecordHook,
    RequestFacts,
    default_should_record,
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

__all__ = ["UpstreamOpsWSGIMiddleware"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIEnvironment = dict[str, Any]
WSGIApplication = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]

#: Keys the integrations set in the WSGI environ.
ENVIRON_COLLECTOR = "upstream_ops.collector"
ENVIRON_ROUTE = "upstream_ops.route"
ENVIRON_ERROR = "upstream_ops.error"
ENVIRON_TELEMETRY = "upstream_ops.telemetry"

CLIENT_CLOSED_REQUEST = 499
#: What OpenTelemetry's instrumentations (Flask's among them) set on an app they instrumented.
INSTRUMENTED_FLAG = "_is_instrumented_by_opentelemetry"

_perf_counter = time.perf_counter


class UpstreamOpsWSGIMiddleware:
    """The WSGI twin of ``UpstreamOpsMiddleware``; same options, same record."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        sink: Sink | str | None = None,
        dispatcher: Dispatcher | None = None,
        service: str = "",
        request_id_header: str | None = REQUEST_ID_HEADER,
        echo_request_id: bool = False,
        should_record: RecordFilter | None = None,
        before_flush: RecordHook | None = None,
        max_events: int = MAX_EVENTS_PER_REQUEST,
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
        #: Set by an integration whose framework instrumentation starts the server span inside the
        #: app (Flask's): the app, on which OpenTelemetry's instrumentation sets ``INSTRUMENTED_FLAG``.
        #: While that is True the middleware adopts the app's span instead of starting one.
        self._instrumented_app: object | None = None
        #: Set by an integration that can tell the matched route template after the app ran
        #: (Flask's URL rule): the environ key of what it reads the route from, kept when the
        #: response starts (the app's request may be gone by the end), and the function that reads
        #: it from the environ and that value; asked only for a request that gets a record or a span.
        self._route_key: str | None = None
        self._route_of: Callable[[WSGIEnvironment, object], str | None] | None = None
        self._environ_key = (
            "HTTP_" + request_id_header.upper().replace("-", "_") if request_id_header else None
        )
        self._echo_header = request_id_header if echo_request_id else None
        self._live = self.telemetry.live
        #: The default record rule, which refuses a healthy request's record: then a request with
        #: no upstream trouble ends without asking the recorder.
        self._default_rule = self.recorder.should_record is default_should_record

    @property
    def dispatcher(self) -> Dispatcher:
        return self.recorder.dispatcher

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if _c_call is not None:
            return _c_call(self, environ, start_response)
        return self._serve(environ, start_response)

    def wsgi_callable(self) -> WSGIApplication:
        """The cheapest callable that serves a request through this middleware, for an integration
        that installs it in a framework (Flask's ``app.wsgi_app``): the C call bound to it where
        the extension was built (no Python frame at all), else the bound ``__call__``."""
        if _c_call is not None:
            return functools.partial(_c_call, self)
        return self.__call__

    def _serve(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """A request, in Python. With the C extension, ``_wsgi_recording.call`` serves a request
        OpenTelemetry does not want (the same steps, in C) and hands any other to this method
        before it has done anything.

        The happy path runs for every request: each step is kept to a few bytecodes, and what a
        record needs (the route, the status as a number, timestamps in ms) is worked out in
        ``finish`` only for a request that gets one."""
        started = _perf_counter()
        key = self._environ_key
        incoming = None if key is None else environ.get(key)
        collector = Collector(  # with no valid incoming id, one is made if it is ever read
            None
            if incoming is None
            else self.recorder.valid_request_id(incoming if isinstance(incoming, str) else None),
            self.recorder.max_events,
        )
        environ[ENVIRON_COLLECTOR] = collector
        # ServerTelemetry.start's own first test, inline: with OpenTelemetry idle (no provider, no
        # instrumented app, nothing attached to its context) no call is made.
        live = self._live
        if live.unset:
            live.refresh()
        instrumented = self._instrumented_app
        by_app = (
            instrumented is not None and getattr(instrumented, INSTRUMENTED_FLAG, False) is True
        )
        telemetry = (
            self.telemetry.start(collector, _describe, environ, by_app)
            if live.tracing
            or live.metrics
            or by_app
            or (get_context() is not EMPTY_CONTEXT and has_current_span())
            else None
        )
        token = _current.set(collector)
        recording: _RecordingSteps
        if _new_c_recording is not None:
            recording = _new_c_recording(
                _WSGIRequestRecording,
                self,
                environ,
                start_response,
                collector,
                telemetry,
                started,
                _current,
                token,
                self._route_key,
                self._echo_header is None,
                self._default_rule,
            )
        else:
            recording = _new_recording()
            recording.middleware = self
            recording.environ = environ
            recording._start_response = start_response
            recording.collector = collector
            recording.telemetry = telemetry
            recording.started = started
            recording.status = ""
            recording.route_source = None
            recording.iteration_started = False
            recording.ended = 0.0
            recording.error = None
            recording.finished = False
            recording.token = token
        if telemetry is None:
            try:
                result = self.app(environ, recording.start_response)
            except BaseException as exc:
                recording.fail(exc)
                raise
        else:
            environ[ENVIRON_TELEMETRY] = telemetry
            otel_token = telemetry.activate()
            try:
                result = self.app(environ, recording.start_response)
            except BaseException as exc:
                recording.fail(exc)
                raise
            finally:
                # Current only while the app runs: a server may close the body in another context.
                telemetry.deactivate(otel_token)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if (
            file_wrapper is not None
            and isinstance(file_wrapper, type)
            and isinstance(result, file_wrapper)
        ):
            return recording.wrap_close_of(result)
        recording.result = result
        return recording


class _RecordingSteps:
    """What both kinds of a request's object do alike: the steps only some requests take (a
    start_response with the request id to echo or a span to tell, an app that raised, a file
    wrapper, a request that may get a record)."""

    if not TYPE_CHECKING:  # the subclasses' slots hold the state (mypy would see none of them)
        __slots__ = ()

    middleware: UpstreamOpsWSGIMiddleware
    environ: WSGIEnvironment
    _start_response: StartResponse
    collector: Collector
    telemetry: RequestTelemetry | None
    token: contextvars.Token[Collector | None]
    started: float
    result: Iterable[bytes]
    status: str  # the status line given to start_response ("" before)
    route_source: object  # what the integration reads the route from (see ``_route_key``)
    iteration_started: bool
    ended: float  # when the iteration ended; 0.0 while it has not
    error: BaseException | None
    finished: bool

    if TYPE_CHECKING:  # each kind has its own

        def __iter__(self) -> Iterator[bytes]: ...
        def close(self) -> None: ...
        def finish(self) -> None: ...

    def _start_response_slow(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        """Notes the status (and echoes the request id) on the way to the server's start_response."""
        self.status = status
        middleware = self.middleware
        if middleware._route_key is not None:
            # What the route is read from may be gone by the end (Flask's request object).
            self.route_source = self.environ.get(middleware._route_key)
        header = middleware._echo_header
        if header is not None:
            name = header.lower()
            if not any(k.lower() == name for k, _ in headers):
                headers = [*headers, (header, self.collector.request_id)]
        if self.telemetry is not None:
            # Flask's server span ends with the request context, before the body is sent.
            self.telemetry.response_ready(_status_code(status))
        if exc_info is not None:
            return self._start_response(status, headers, exc_info)
        return self._start_response(status, headers)

    start_response = _start_response_slow  # the C kind has its own, which calls the one above

    def fail(self, error: BaseException) -> None:
        """The app raised instead of returning a response iterable."""
        self.error = error
        self.finish()

    def wrap_close_of(self, result: Iterable[bytes]) -> Iterable[bytes]:
        """A ``wsgi.file_wrapper`` goes back as is (servers may ``sendfile`` it): hook its close."""
        original_close = getattr(result, "close", None)

        def close() -> None:
            try:
                if callable(original_close):
                    original_close()
            finally:
                self.finish()

        try:
            result.close = close  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            self.finish()  # cannot hook the end: record what is known now
        return result

    def _finish_slow(self, error: BaseException | None) -> None:
        """A request that may get a record, or has telemetry: describe it in full."""
        status_code = _status_code(self.status)
        if error is not None and not status_code:
            status_code = 500
        elif self.iteration_started and not self.ended and error is None:
            status_code = CLIENT_CLOSED_REQUEST  # the server stopped reading: the client went away
        telemetry = self.telemetry
        recorder = self.middleware.recorder
        route = span_context = None
        if telemetry is not None:
            route = self._route()
            telemetry.end(status_code=status_code, route=route, error=error)
            span_context = telemetry.span_context
        if recorder.finish_if_healthy(self.collector, status_code, error):
            return
        if telemetry is None:
            route = self._route()
        environ = self.environ
        now = _perf_counter()
        recorder._record(  # finish_if_healthy has said no
            self.collector,
            RequestFacts(
                method=str(environ.get("REQUEST_METHOD", "")),
                path=str(environ.get("PATH_INFO", "")),
                route=route,
                status_code=status_code,
                started_at_ms=now_ms() - round((now - self.started) * 1000.0),
                duration_ms=((self.ended or now) - self.started) * 1000.0,
                error=error,
                span_context=span_context,
            ),
        )

    def _route(self) -> str | None:
        """The route template: set in the environ (``upstream_ops.route``) or told by the integration."""
        route = self.environ.get(ENVIRON_ROUTE)
        if isinstance(route, str):
            return route
        route_of = self.middleware._route_of
        if route_of is None:
            return None
        try:
            route = route_of(self.environ, self.route_source)
        except Exception:
            return None
        return route if isinstance(route, str) else None


class _PyWSGIRequestRecording(_RecordingSteps):
    """One WSGI request: its collector, what ``start_response`` told, and the response iterable.

    It is what the middleware returns to the server: iterating it iterates the app's response and
    notes errors and completion; ``close`` closes the app's response and finishes the record, once.
    The middleware fills it in (it has no ``__init__``: calling one costs a request more than the
    stores themselves).
    """

    __slots__ = (
        "_start_response",
        "collector",
        "ended",
        "environ",
        "error",
        "finished",
        "iteration_started",
        "middleware",
        "result",
        "route_source",
        "started",
        "status",
        "telemetry",
        "token",
    )

    def __iter__(self) -> Iterator[bytes]:
        self.iteration_started = True
        try:
            yield from self.result
        except GeneratorExit:
            raise  # the server stopped iterating early; close() will tell
        except BaseException as exc:
            self.error = exc
            self.ended = _perf_counter()
            raise
        self.ended = _perf_counter()

    def close(self) -> None:
        try:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()
        finally:
            if not self.finished:
                self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            _current.reset(self.token)
        except ValueError:  # closed in another context than the one the app ran in
            _current.set(None)
        error = self.error
        if error is None:
            error = self.environ.get(ENVIRON_ERROR)
            if error is not None and not isinstance(error, BaseException):
                error = None
        # A status line below "5" has a code below 500 (or none): healthy under the default rule
        # whether or not the body was sent in full (499), so its number is not needed.
        # ``Recorder.finish_if_healthy`` without its call: a quiet collector (closed here either
        # way) under the default rule gets no record.
        if (
            error is None
            and self.telemetry is None
            and self.status < "5"
            and self.middleware._default_rule
            and self.collector.close()
        ):
            return
        self._finish_slow(error)


# The same object in C where a compiler built upstream_ops._wsgi_recording: its start_response,
# iteration, close and finish run the steps every request takes without a Python call, and leave
# the others to the methods above. ``_new_c_recording`` makes and fills one in one call, and
# ``_c_call`` serves a whole request without telemetry (it hands any other to ``_serve``).
_new_c_recording: Callable[..., _RecordingSteps] | None = None
_c_call: (
    Callable[[UpstreamOpsWSGIMiddleware, WSGIEnvironment, StartResponse], Iterable[bytes]] | None
) = None
_WSGIRequestRecording: type[_RecordingSteps] = _PyWSGIRequestRecording
try:
    from upstream_ops import _wsgi_recording
except ImportError:  # pragma: no cover - depends on the build
    pass
else:

    class _CWSGIRequestRecording(_wsgi_recording.Recording, _RecordingSteps):
        """One WSGI request, its common steps in C (see ``_PyWSGIRequestRecording``)."""

        __slots__ = ()

    _wsgi_recording.setup(
        _perf_counter,
        ENVIRON_ERROR,
        UpstreamOpsWSGIMiddleware,
        _CWSGIRequestRecording,
        Collector,
        _current,
        get_context,
        EMPTY_CONTEXT,
        has_current_span,
        INSTRUMENTED_FLAG,
        ENVIRON_COLLECTOR,
        provider_globals(),
    )
    _WSGIRequestRecording = _CWSGIRequestRecording
    _new_c_recording = _wsgi_recording.new_recording
    _c_call = _wsgi_recording.call


def _status_code(status: str) -> int:
    """The code of a status line; 0 when it does not start with one."""
    try:
        return int(status[:3])
    except ValueError:
        return 0


_new_recording = functools.partial(object.__new__, _PyWSGIRequestRecording)


class _EnvironGetter(Getter[WSGIEnvironment]):
    """Reads propagation headers (``traceparent`` ...) from a WSGI environ."""

    def get(self, carrier: WSGIEnvironment, key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: WSGIEnvironment) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


_ENVIRON_GETTER = _EnvironGetter()


def _describe(environ: WSGIEnvironment) -> IncomingRequest:
    """The request as the server span started here needs it."""
    try:
        server: tuple[str, int | None] | None = (
            str(environ["SERVER_NAME"]),
            int(environ.get("SERVER_PORT") or 0) or None,
        )
    except (KeyError, ValueError):
        server = None
    protocol = str(environ.get("SERVER_PROTOCOL", ""))
    return IncomingRequest(
        method=str(environ.get("REQUEST_METHOD", "")),
        scheme=str(environ.get("wsgi.url_scheme", "http")),
        path=str(environ.get("PATH_INFO", "")),
        host=environ.get("HTTP_HOST"),
        server=server,
        protocol_version=protocol.partition("/")[2] or None,
        carrier=environ,
        getter=_ENVIRON_GETTER,
    )
