"""CLIENT spans for the upstream attempts the capture transports make, one per attempt.

A span started here is a child of the span current where the call is made (the request's server span,
or one of the app's), follows the stable HTTP client semantic conventions, and its trace context is
injected into the outgoing request. While it is current, OpenTelemetry's HTTP instrumentations below it
(httpx's class-level wrapper, urllib3's) are suppressed, so an attempt never gets two CLIENT spans.
When such an instrumentation already made the attempt's CLIENT span (it is current when the transport
runs: ``HTTPXClientInstrumentor.instrument_client``, ``RequestsInstrumentor``), that span is enriched
instead: ``http.request.resend_count``, and ``url.full`` replaced by its sanitized form.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any, Final
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

from upstream_ops._version import __version__
from upstream_ops.classify import error_type_for
from upstream_ops.collector import Collector
from upstream_ops.sanitize import sanitize_label, sanitize_url
from upstream_ops.telemetry._attributes import (
    ERROR_TYPE,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    KNOWN_METHODS,
    SCHEMA_URL,
    SCOPE_NAME,
    URL_FULL,
)
from upstream_ops.telemetry._providers import ProviderLiveness, has_current_span

__all__ = ["ClientSpan", "ClientTelemetry", "default_client_telemetry"]

logger = logging.getLogger("upstream_ops")

HTTP_REQUEST_RESEND_COUNT: Final = "http.request.resend_count"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
#: Where an HTTP instrumentation puts the request's URL (stable and old semantic conventions).
_URL_ATTRIBUTES: Final = (URL_FULL, "http.url")
# The context key OpenTelemetry's HTTP instrumentations check before making a span (API-private).
_SUPPRESS_HTTP: Final = getattr(otel_context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None)


class ClientSpan:
    """The CLIENT span of one attempt: started here (``owned``) or the instrumentation's."""

    __slots__ = ("_token", "owned", "span")

    def __init__(self, span: Span, owned: bool, token: object | None) -> None:
        self.span = span
        self.owned = owned
        self._token = token

    def finish(self, *, status_code: int = 0, error: BaseException | None = None) -> None:
        """The attempt got ``status_code``, or raised ``error``: ERROR for >= 400 and any error.

        An instrumentation's span gets its status from that instrumentation; only a span started
        here is annotated and ended. Never raises.
        """
        if not self.owned:
            return
        span = self.span
        try:
            if self._token is not None:
                otel_context.detach(self._token)  # type: ignore[arg-type]
            if span.is_recording():
                attributes: dict[str, AttributeValue] = {}
                if status_code > 0:
                    attributes[HTTP_RESPONSE_STATUS_CODE] = status_code
                error_type = error_type_for(status_code or None, error)
                if error_type:
                    attributes[ERROR_TYPE] = sanitize_label(error_type)
                    span.set_attributes(attributes)
                    span.set_status(StatusCode.ERROR)
                elif attributes:
                    span.set_attributes(attributes)
        except Exception:
            logger.exception("upstream_ops: could not annotate a client span")
        finally:
            span.end()


class ClientTelemetry:
    """The tracer of the capture transports; holds no per-attempt state."""

    __slots__ = ("_live", "_provider", "_tracer")

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        # Only the tracer provider is watched: once a global one is set, no attempt looks again
        # (a global meter provider, which client spans never use, would keep it looking).
        self._live = ProviderLiveness(tracer_provider, metrics.NoOpMeterProvider())
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            SCOPE_NAME, __version__, schema_url=SCHEMA_URL
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # A pickled requests adapter carries its options: rebuild from the provider, not the tracer.
        if self._provider is None:
            return (default_client_telemetry, ())
        return (ClientTelemetry, (self._provider,))

    def start(
        self,
        collector: Collector,
        method: str,
        url: object,
        headers: MutableMapping[str, str],
    ) -> ClientSpan | None:
        """Before an attempt is sent: its CLIENT span, or ``None`` when nothing is traced.

        ``headers`` are the outgoing request's; the trace context is injected into them. Call
        :meth:`ClientSpan.finish` when the attempt got its response or raised, in the same context.
        """
        try:
            live = self._live
            if live.unset:
                live.refresh()
            if has_current_span():
                current = trace.get_current_span()
                if current.is_recording() and getattr(current, "kind", None) is SpanKind.CLIENT:
                    return _enrich(current, collector, method, str(url))
            if not live.tracing:
                return None  # no SDK and no span: nothing else is done, not even counting
            url_text = str(url)
            resend_count = collector.count_send(method, url_text)
            return self._start_span(method, url_text, resend_count, headers)
        except Exception:
            logger.exception("upstream_ops: could not start a client span")
            return None

    def _start_span(
        self, method: str, url: str, resend_count: int, headers: MutableMapping[str, str]
    ) -> ClientSpan:
        known = method if method in KNOWN_METHODS else "_OTHER"
        attributes: dict[str, AttributeValue] = {
            HTTP_REQUEST_METHOD: known,
            URL_FULL: sanitize_url(url),
        }
        if known == "_OTHER":
            attributes["http.request.method_original"] = sanitize_label(method)
        parts = urlsplit(url)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
            if port:
                attributes["server.port"] = port
        if resend_count:
            attributes[HTTP_REQUEST_RESEND_COUNT] = resend_count
        span = self._tracer.start_span(
            "HTTP" if known == "_OTHER" else known, kind=SpanKind.CLIENT, attributes=attributes
        )
        context = trace.set_span_in_context(span)
        propagate.inject(headers, context=context)
        if _SUPPRESS_HTTP is not None:
            context = otel_context.set_value(_SUPPRESS_HTTP, True, context)
        token = otel_context.attach(context)
        return ClientSpan(span, owned=True, token=token)


def _enrich(span: Span, collector: Collector, method: str, url: str) -> ClientSpan:
    """An instrumentation's CLIENT span, current for this attempt: its URL attribute (stable or old
    semconv name) is the unredacted URL, replaced by the sanitized one; the resend count is added."""
    resend_count = collector.count_send(method, url)
    existing = getattr(span, "attributes", None) or {}
    names = [name for name in _URL_ATTRIBUTES if name in existing] or [URL_FULL]
    attributes: dict[str, AttributeValue] = dict.fromkeys(names, sanitize_url(url))
    if resend_count:
        attributes[HTTP_REQUEST_RESEND_COUNT] = resend_count
    span.set_attributes(attributes)
    return ClientSpan(span, owned=False, token=None)


_default: ClientTelemetry | None = None


def default_client_telemetry() -> ClientTelemetry:
    """The capture transports' shared instance, on the global tracer provider."""
    global _default
    if _default is None:
        _default = ClientTelemetry()
    return _default
