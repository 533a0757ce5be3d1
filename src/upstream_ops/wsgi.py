"""WSGI middleware (Flask, Django via WSGI, any PEP 3333 app): one record per request.

The record is finished when the server closes the response iterable, so a streamed response is recorded
with its final state. A ``wsgi.file_wrapper`` response is returned as is (servers may send it with
``sendfile``); only its ``close`` is wrapped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from types import TracebackType
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.propagators.textmap import Getter

from upstream_ops.collector import Collector, _activate, _deactivate
from upstream_ops.defaults import MAX_EVENTS_PER_REQUEST, REQUEST_ID_HEADER, SPOOL_MAX_BYTES
from upstream_ops.dispatcher import Dispatcher
from upstream_ops.recorder import Recorder, RecordFilter, RecordHook, RequestFacts, now_ms
from upstream_ops.sinks.base import Sink
from upstream_ops.telemetry._server import IncomingRequest, ServerTelemetry

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
        #: app (Flask's): then the middleware adopts that span instead of starting one.
        self._app_starts_server_span: Callable[[], bool] | None = None
        self._environ_key = (
            "HTTP_" + request_id_header.upper().replace("-", "_")
            if request_id_header
            else "HTTP_X_REQUEST_ID"
        )

    @property
    def dispatcher(self) -> Dispatcher:
        return self.recorder.dispatcher

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return _WSGIRequestRecording(self, environ).run(start_response)


class _WSGIRequestRecording:
    """The state of one WSGI request, finished exactly once."""

    def __init__(self, middleware: UpstreamOpsWSGIMiddleware, environ: WSGIEnvironment) -> None:
        self.middleware = middleware
        self.environ = environ
        self.status_code = 0
        self.started_at_ms = now_ms()
        self.started = time.perf_counter()
        self.ended = 0.0
        self.iteration_started = False
        self.iteration_done = False
        self.error: BaseException | None = None
        self.finished = False
        recorder = middleware.recorder
        incoming = environ.get(middleware._environ_key)
        self.request_id = recorder.request_id_for(incoming if isinstance(incoming, str) else None)
        self.collector: Collector = recorder.start(self.request_id)
        deferred = middleware._app_starts_server_span
        self.telemetry = middleware.telemetry.start(
            self.collector,
            _describe,
            environ,
            span_started_by_app=deferred is not None and deferred(),
        )
        self.token = _activate(self.collector)
        environ[ENVIRON_COLLECTOR] = self.collector
        environ[ENVIRON_TELEMETRY] = self.telemetry

    def run(self, start_response: StartResponse) -> Iterable[bytes]:
        header = self.middleware.recorder.request_id_header

        def recording_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            try:
                self.status_code = int(status[:3])
            except ValueError:
                self.status_code = 0
            if header is not None and not any(k.lower() == header.lower() for k, _ in headers):
                headers = [*headers, (header, self.request_id)]
            if self.telemetry is not None:
                # Flask's server span ends with the request context, before the body is sent.
                self.telemetry.response_ready(self.status_code)
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        otel_token = self.telemetry.activate() if self.telemetry is not None else None
        try:
            result = self.middleware.app(self.environ, recording_start_response)
        except BaseException as exc:
            self.error = exc
            self.finish()
            raise
        finally:
            # Current only while the app runs: a server may close the body in another context.
            if self.telemetry is not None:
                self.telemetry.deactivate(otel_token)
        file_wrapper = self.environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
            return self._wrap_close_of(result)
        return _RecordedBody(self, result)

    def _wrap_close_of(self, result: Iterable[bytes]) -> Iterable[bytes]:
        original_close = getattr(result, "close", None)

        def close() -> None:
            try:
                if callable(original_close):
                    original_close()
            finally:
                self.iteration_done = True
                self.finish()

        try:
            result.close = close  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            self.finish()  # cannot hook the end: record what is known now
        return result

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        ended = self.ended or time.perf_counter()
        _deactivate(self.token)
        error = self.error or self.environ.get(ENVIRON_ERROR)
        error = error if isinstance(error, BaseException) else None
        route = self.environ.get(ENVIRON_ROUTE)
        route = route if isinstance(route, str) else None
        status_code = self._final_status()
        span_context = None
        if self.telemetry is not None:
            self.telemetry.end(status_code=status_code, route=route, error=error)
            span_context = self.telemetry.span_context
        self.middleware.recorder.finish(
            self.collector,
            RequestFacts(
                method=str(self.environ.get("REQUEST_METHOD", "")),
                path=str(self.environ.get("PATH_INFO", "")),
                route=route,
                status_code=status_code,
                started_at_ms=self.started_at_ms,
                duration_ms=(ended - self.started) * 1000.0,
                error=error,
                span_context=span_context,
            ),
        )

    def _final_status(self) -> int:
        if self.error is not None and not self.status_code:
            return 500
        if self.iteration_started and not self.iteration_done and self.error is None:
            return CLIENT_CLOSED_REQUEST  # the server stopped reading: the client went away
        return self.status_code


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


class _RecordedBody:
    """Wraps the response iterable: notes errors and completion, finishes the record on ``close``."""

    __slots__ = ("_recording", "_result")

    def __init__(self, recording: _WSGIRequestRecording, result: Iterable[bytes]) -> None:
        self._recording = recording
        self._result = result

    def __iter__(self) -> Iterator[bytes]:
        recording = self._recording
        recording.iteration_started = True
        try:
            yield from self._result
        except GeneratorExit:
            raise  # the server stopped iterating early; close() will tell
        except BaseException as exc:
            recording.error = exc
            recording.iteration_done = True
            recording.ended = time.perf_counter()
            raise
        recording.iteration_done = True
        recording.ended = time.perf_counter()

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if callable(close):
                close()
        finally:
            self._recording.finish()
