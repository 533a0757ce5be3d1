"""The request's server span: the one its record links to and its ``upstream.error`` events go on.

When an instrumentation (OpenTelemetry ASGI/WSGI/FastAPI/Flask, FastAPI's own telemetry) already made
the SERVER span, the middleware enriches that span and makes none of its own; otherwise it starts one
following the stable HTTP semantic conventions, with its parent extracted from the incoming headers.
The protocol adapters (``asgi.py``, ``wsgi.py``) describe the request; this module knows OpenTelemetry
and no framework. With no SDK configured, :meth:`ServerTelemetry.start` returns ``None`` after a few
hundred nanoseconds and nothing else runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanContext, SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

from upstream_ops._version import __version__
from upstream_ops.collector import Collector
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.recorder import _qualified_name, had_upstream_trouble, is_recovered
from upstream_ops.sanitize import sanitize_label, sanitize_message
from upstream_ops.telemetry._attributes import (
    ERROR_TYPE,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    KNOWN_METHODS,
    SCHEMA_URL,
    SCOPE_NAME,
    UPSTREAM_ERROR_COUNT,
    UPSTREAM_ERROR_EVENT,
    UPSTREAM_OPS_REQUEST_ID,
    UPSTREAM_RECOVERED,
    event_attributes,
)
from upstream_ops.telemetry._metrics import UpstreamErrorMetrics
from upstream_ops.telemetry._providers import (
    ProviderLiveness,
    has_current_span,
)

__all__ = ["IncomingRequest", "RequestTelemetry", "ServerTelemetry"]

logger = logging.getLogger("upstream_ops")

S = TypeVar("S")

# A Host header that is only a host name or IP literal and a port; anything else is not exported.
_HOST_RE = re.compile(
    r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252})(?::([0-9]{1,5}))?"
)


@dataclass(slots=True)
class IncomingRequest:
    """What a protocol adapter tells about a request, for the span the middleware starts."""

    method: str
    scheme: str
    path: str
    host: str | None  # the Host header (HTTP/2 :authority)
    server: tuple[str, int | None] | None  # the local address, when there is no usable Host
    protocol_version: str | None
    carrier: Any
    getter: Getter[Any]


class ServerTelemetry:
    """One middleware's tracer, errors counter and options; holds no per-request state."""

    __slots__ = ("_errors", "_tracer", "create_server_span", "live")

    def __init__(
        self,
        *,
        create_server_span: bool = True,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.create_server_span = create_server_span
        #: Whether spans and measurements would be recorded; a protocol adapter may read it to skip
        #: :meth:`start` on a request that it would return ``None`` for (see ``wsgi.py``).
        self.live = ProviderLiveness(tracer_provider, meter_provider)
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            SCOPE_NAME, __version__, schema_url=SCHEMA_URL
        )
        self._errors = UpstreamErrorMetrics(meter_provider)

    def start(
        self,
        collector: Collector,
        describe: Callable[[S], IncomingRequest],
        source: S,
        span_started_by_app: bool = False,
    ) -> RequestTelemetry | None:
        """Find or start the request's server span and listen to ``collector``'s events.

        ``describe(source)`` is called only when a span is started here. ``span_started_by_app``
        says the app's own instrumentation starts the server span later (Flask's), so the middleware
        waits for it (:meth:`RequestTelemetry.adopt_current_span`) instead of making one.
        Returns ``None`` when there is nothing to record: no span, no metrics.
        """
        try:
            live = self.live
            if live.unset:
                live.refresh()
            if not (live.tracing or live.metrics or span_started_by_app or has_current_span()):
                return None  # OpenTelemetry is not set up and no instrumentation made a span
            current = trace.get_current_span()
            span: Span | None = None
            owned: tuple[Context, str] | None = None
            pending = False
            if current.is_recording() and _is_server_span(current):
                span = current
            elif span_started_by_app:
                pending = True
            elif live.tracing and self.create_server_span:
                span, owned = self._start_span(describe(source))
            elif not live.metrics:
                return None
            request = RequestTelemetry(self, collector, span, owned, pending, live.metrics)
            collector.listeners.append(request.on_event)
            return request
        except Exception:
            logger.exception("upstream_ops: could not start the request's telemetry")
            return None

    def _start_span(self, request: IncomingRequest) -> tuple[Span, tuple[Context, str]]:
        """A SERVER span, its context to make current, and its name before the route is known."""
        parent = propagate.extract(request.carrier, getter=request.getter)
        method = request.method if request.method in KNOWN_METHODS else "_OTHER"
        attributes: dict[str, AttributeValue] = {
            HTTP_REQUEST_METHOD: method,
            "url.scheme": request.scheme,
            "url.path": sanitize_message(request.path),
        }
        if method == "_OTHER":
            attributes["http.request.method_original"] = sanitize_label(request.method)
        attributes.update(_server_attributes(request))
        if request.protocol_version:
            attributes["network.protocol.version"] = request.protocol_version
        name = "HTTP" if method == "_OTHER" else method
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        return span, (trace.set_span_in_context(span, parent), name)


class RequestTelemetry:
    """One request's server span (found, awaited or owned) and the listener for its events."""

    __slots__ = ("_collector", "_measuring", "_owned", "_pending", "_telemetry", "span")

    def __init__(
        self,
        telemetry: ServerTelemetry,
        collector: Collector,
        span: Span | None,
        owned: tuple[Context, str] | None,
        pending: bool,
        measuring: bool,
    ) -> None:
        self._telemetry = telemetry
        self._collector = collector
        self.span = span
        self._owned = owned  # for a span started here (the one to end): its context and name
        self._pending = pending
        self._measuring = measuring

    @property
    def owns_span(self) -> bool:
        return self._owned is not None

    @property
    def span_context(self) -> SpanContext | None:
        """The server span's context (its trace and span id go on the record), if there is one."""
        span = self.span
        if span is None:
            return None
        span_context = span.get_span_context()
        return span_context if span_context.is_valid else None

    def on_event(self, event: UpstreamErrorEvent) -> None:
        """The collector's listener: count the event and add it to the server span."""
        if self._measuring:
            self._telemetry._errors.record(event)
        span = self.span
        if span is not None and span.is_recording():
            _add_event(span, event)

    def adopt_current_span(self) -> None:
        """Take the current server span, started by the app's instrumentation, as the request's.

        Events appended before it existed are added to it then, with their own timestamps.
        """
        if not self._pending:
            return
        try:
            current = trace.get_current_span()
            if not _is_server_span(current):
                return
            self._pending = False
            self.span = current
            for event in self._collector.events:
                _add_event(current, event)
        except Exception:
            logger.exception("upstream_ops: could not adopt the server span")

    def activate(self) -> object | None:
        """Make the span started here current (so client spans become its children)."""
        if self._owned is None:
            return None
        return otel_context.attach(self._owned[0])

    def deactivate(self, token: object | None) -> None:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def response_ready(self, status_code: int) -> None:
        """The response is about to complete, and a framework's span may end with it.

        FastAPI's own telemetry ends its span when the last body chunk is sent, Flask's at the end
        of the request context: what is known now goes on the span now. :meth:`end` refreshes it
        if the span is still open then.
        """
        if self._owned is not None:
            return  # a span started here ends in end()
        try:
            self.adopt_current_span()
            span = self.span
            if span is not None and span.is_recording():
                attributes = self._upstream_attributes(status_code)
                if attributes:
                    span.set_attributes(attributes)
        except Exception:
            logger.exception("upstream_ops: could not annotate the server span")

    def end(self, *, status_code: int, route: str | None, error: BaseException | None) -> None:
        """The request is over: final attributes, and the status and end of a span started here."""
        with contextlib.suppress(ValueError):  # the record is built next: no more events
            self._collector.listeners.remove(self.on_event)
        span = self.span
        if span is None:
            return
        try:
            if span.is_recording():
                attributes = self._upstream_attributes(status_code)
                if self._owned is not None:
                    _end_owned_span(span, self._owned[1], attributes, status_code, route, error)
                elif attributes:
                    span.set_attributes(attributes)
        except Exception:
            logger.exception("upstream_ops: could not annotate the server span")
        finally:
            if self._owned is not None:
                span.end()

    def _upstream_attributes(self, status_code: int) -> dict[str, AttributeValue]:
        """``upstream.error_count`` and ``upstream.recovered``; none without upstream trouble."""
        collector = self._collector
        events = collector.events
        if not had_upstream_trouble(collector, events):
            return {}
        return {
            UPSTREAM_ERROR_COUNT: len(events) + collector.dropped_events,
            UPSTREAM_RECOVERED: is_recovered(True, status_code),
            UPSTREAM_OPS_REQUEST_ID: collector.request_id,
        }


def _is_server_span(span: Span) -> bool:
    # A span without a kind (a vendor's wrapper) counts as the server span when it is recording.
    return span.is_recording() and getattr(span, "kind", SpanKind.SERVER) is SpanKind.SERVER


def _add_event(span: Span, event: UpstreamErrorEvent) -> None:
    span.add_event(
        UPSTREAM_ERROR_EVENT, event_attributes(event), timestamp=event.at_unix_ms * 1_000_000
    )


def _server_attributes(request: IncomingRequest) -> dict[str, AttributeValue]:
    """``server.address`` and ``server.port`` from the Host header, else the local address."""
    match = _HOST_RE.fullmatch(request.host) if request.host else None
    if match is not None:
        address, port_text = match.group(1), match.group(2)
        port = int(port_text) if port_text else {"http": 80, "https": 443}.get(request.scheme)
    elif request.server is not None:
        address, port = request.server
    else:
        return {}
    attributes: dict[str, AttributeValue] = {"server.address": address}
    if port is not None:
        attributes["server.port"] = port
    return attributes


def _end_owned_span(
    span: Span,
    name: str,
    attributes: dict[str, AttributeValue],
    status_code: int,
    route: str | None,
    error: BaseException | None,
) -> None:
    """Semconv for a span started here: ``{method} {route}``, status code, ``error.type``, ERROR.

    A 4xx, and a recovered upstream failure, are not errors of this operation: status stays unset.
    """
    if route:
        attributes["http.route"] = route
        span.update_name(f"{name} {route}")
    if status_code > 0:
        attributes[HTTP_RESPONSE_STATUS_CODE] = status_code
    failed = error is not None or status_code >= 500
    if error is not None:
        attributes[ERROR_TYPE] = sanitize_label(_qualified_name(error))
    elif failed:
        attributes[ERROR_TYPE] = str(status_code)
    span.set_attributes(attributes)
    if failed:
        span.set_status(StatusCode.ERROR)
