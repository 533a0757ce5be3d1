"""Is OpenTelemetry set up? Answered in tens of nanoseconds, so the default no-op setup costs nothing.

``trace.get_tracer_provider()`` looks up an environment variable on every call while no provider is
set (about 1 µs). The API keeps the provider in a module global that is set once and never replaced,
so reading that global, and remembering a positive answer, is enough. Should a future API drop the
global, the public call is used instead: slower, still right.
"""

from __future__ import annotations

import contextvars
import importlib
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

_metrics_api: Any = importlib.import_module("opentelemetry.metrics._internal")
_context_api: Any = importlib.import_module("opentelemetry.context")
_SPAN_KEY: Any = getattr(
    importlib.import_module("opentelemetry.trace.propagation"), "_SPAN_KEY", None
)

_NOOP_TRACER_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_NOOP_METER_PROVIDERS: tuple[type, ...] = (
    type(getattr(_metrics_api, "_PROXY_METER_PROVIDER", metrics.NoOpMeterProvider())),
    metrics.NoOpMeterProvider,
)


def is_noop_tracer_provider(provider: trace.TracerProvider) -> bool:
    return isinstance(provider, _NOOP_TRACER_PROVIDERS)


def is_noop_meter_provider(provider: metrics.MeterProvider) -> bool:
    return isinstance(provider, _NOOP_METER_PROVIDERS)


_READ_GLOBALS = hasattr(trace, "_TRACER_PROVIDER") and hasattr(_metrics_api, "_METER_PROVIDER")


def provider_globals() -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The namespaces of the API's two global providers (``_TRACER_PROVIDER``,
    ``_METER_PROVIDER``), for code in C that makes :meth:`ProviderLiveness.refresh`'s first test
    without calling it; ``None`` where this API keeps them elsewhere."""
    return (vars(trace), vars(_metrics_api)) if _READ_GLOBALS else None


def global_tracer_provider_set() -> bool:
    """Whether a real (SDK or vendor) global tracer provider is set."""
    provider = trace._TRACER_PROVIDER if _READ_GLOBALS else trace.get_tracer_provider()
    return provider is not None and not isinstance(provider, _NOOP_TRACER_PROVIDERS)


def global_meter_provider_set() -> bool:
    """Whether a real (SDK or vendor) global meter provider is set."""
    provider = _metrics_api._METER_PROVIDER if _READ_GLOBALS else metrics.get_meter_provider()
    return provider is not None and not isinstance(provider, _NOOP_METER_PROVIDERS)


class ProviderLiveness:
    """Whether spans and measurements would be recorded, for one pair of (optional) providers.

    ``tracing`` and ``metrics`` are plain attributes, read on every request. An explicit provider is
    decided once; while a global one is unset, :meth:`refresh` looks again (the request path calls
    it when ``unset`` is true), and once set it is remembered: the
    API never replaces it.
    """

    __slots__ = ("_meter_global", "_tracer_global", "metrics", "tracing", "unset")

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        if tracer_provider is None:
            # Loads a provider named by OTEL_PYTHON_TRACER_PROVIDER, which the API does lazily.
            trace.get_tracer_provider()
        if meter_provider is None:
            metrics.get_meter_provider()
        self._tracer_global = tracer_provider is None
        self._meter_global = meter_provider is None
        self.tracing = tracer_provider is not None and not is_noop_tracer_provider(tracer_provider)
        self.metrics = meter_provider is not None and not is_noop_meter_provider(meter_provider)
        self.unset = True
        self.refresh()

    def refresh(self) -> None:
        # The request path calls this on every request while ``unset``: while neither global
        # provider has been set, two module globals are read and nothing else is done.
        if (
            _READ_GLOBALS
            and trace._TRACER_PROVIDER is None
            and _metrics_api._METER_PROVIDER is None
        ):
            return
        unset = False
        if self._tracer_global and not self.tracing:
            self.tracing = global_tracer_provider_set()
            unset = not self.tracing
        if self._meter_global and not self.metrics:
            self.metrics = global_meter_provider_set()
            unset = unset or not self.metrics
        self.unset = unset


def _context_var() -> Any:
    """The ContextVar behind the API's default runtime context, or None for another runtime context
    (chosen with ``OTEL_PYTHON_CONTEXT``) or an API version without these private names."""
    runtime = getattr(_context_api, "_RUNTIME_CONTEXT", None)
    if type(runtime) is not ContextVarsRuntimeContext or not isinstance(_SPAN_KEY, str):
        return None
    variable = getattr(runtime, "_current_context", None)
    return variable if isinstance(variable, contextvars.ContextVar) else None


_CONTEXT_VAR = _context_var()


def _no_context() -> None:
    return None


#: ``get_context() is EMPTY_CONTEXT`` (one C call) tells that nothing is attached to the API's
#: context, so no span is current: the ContextVar's default, which it returns again once every
#: attach was detached. Under another runtime context ``get_context`` returns ``None``, which is
#: never ``EMPTY_CONTEXT``: ask :func:`has_current_span` then.
get_context: Callable[[], object] = _CONTEXT_VAR.get if _CONTEXT_VAR is not None else _no_context
EMPTY_CONTEXT: object = (
    contextvars.Context().run(_CONTEXT_VAR.get) if _CONTEXT_VAR is not None else object()
)


def has_current_span() -> bool:
    """Whether a span, recording or not, is current: one ContextVar read, and one dict lookup
    when something is attached.

    ``trace.get_current_span()`` answers the same through four calls; with no instrumentation at
    all (the common case this is asked for) the context is the variable's empty default. Another
    runtime context (set by ``OTEL_PYTHON_CONTEXT``) takes the public call.
    """
    if _CONTEXT_VAR is None:
        return trace.get_current_span() is not trace.INVALID_SPAN
    context = _CONTEXT_VAR.get()
    return context is not EMPTY_CONTEXT and context.get(_SPAN_KEY) is not None
