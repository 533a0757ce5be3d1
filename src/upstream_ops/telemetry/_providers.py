"""Is OpenTelemetry set up? Answered in tens of nanoseconds, so the default no-op setup costs nothing.

``trace.get_tracer_provider()`` looks up an environment variable on every call while no provider is
set (about 1 µs). The API keeps the provider in a module global that is set once and never replaced,
so reading that global, and remembering a positive answer, is enough. Should a future API drop the
global, the public call is used instead: slower, still right.
"""

from __future__ import annotations

import importlib
from typing import Any

from opentelemetry import metrics, trace

_MISSING = object()
_metrics_api: Any = importlib.import_module("opentelemetry.metrics._internal")

_NOOP_TRACER_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
_NOOP_METER_PROVIDERS: tuple[type, ...] = (
    type(getattr(_metrics_api, "_PROXY_METER_PROVIDER", metrics.NoOpMeterProvider())),
    metrics.NoOpMeterProvider,
)


def is_noop_tracer_provider(provider: trace.TracerProvider) -> bool:
    return isinstance(provider, _NOOP_TRACER_PROVIDERS)


def is_noop_meter_provider(provider: metrics.MeterProvider) -> bool:
    return isinstance(provider, _NOOP_METER_PROVIDERS)


def global_tracer_provider_set() -> bool:
    """Whether a real (SDK or vendor) global tracer provider is set."""
    provider = getattr(trace, "_TRACER_PROVIDER", _MISSING)
    if provider is _MISSING:
        provider = trace.get_tracer_provider()
    return provider is not None and not isinstance(provider, _NOOP_TRACER_PROVIDERS)


def global_meter_provider_set() -> bool:
    """Whether a real (SDK or vendor) global meter provider is set."""
    provider = getattr(_metrics_api, "_METER_PROVIDER", _MISSING)
    if provider is _MISSING:
        provider = metrics.get_meter_provider()
    return provider is not None and not isinstance(provider, _NOOP_METER_PROVIDERS)


class ProviderLiveness:
    """Whether spans and measurements would be recorded, for one pair of (optional) providers.

    An explicit provider is decided once; a global one is re-checked until it is set, then
    remembered (the API refuses to replace a global provider).
    """

    __slots__ = ("_meter_global", "_metrics", "_tracer_global", "_tracing")

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
        self._tracing = tracer_provider is not None and not is_noop_tracer_provider(tracer_provider)
        self._metrics = meter_provider is not None and not is_noop_meter_provider(meter_provider)

    @property
    def tracing(self) -> bool:
        if not self._tracing and self._tracer_global and global_tracer_provider_set():
            self._tracing = True
        return self._tracing

    @property
    def metrics(self) -> bool:
        if not self._metrics and self._meter_global and global_meter_provider_set():
            self._metrics = True
        return self._metrics
