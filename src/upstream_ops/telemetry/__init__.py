"""OpenTelemetry for upstream failures: spans, span events and metrics, exported over OTLP.

The middleware needs nothing from this module: it records on whatever tracer and meter providers are
configured (the global ones unless given), and costs next to nothing when none is. ``configure`` is for
apps that do not set OpenTelemetry up themselves: one call, OTLP/HTTP export (Jaeger, an OpenTelemetry
Collector, any OTLP backend). ``docs/opentelemetry.md`` lists every span, event, attribute and metric.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace

from upstream_ops.telemetry._metrics import OUTCOMES
from upstream_ops.telemetry._providers import global_meter_provider_set, global_tracer_provider_set

__all__ = ["OUTCOMES", "TelemetryProviders", "configure"]

logger = logging.getLogger("upstream_ops")


@dataclass(frozen=True, slots=True)
class TelemetryProviders:
    """The providers ``configure`` set up (``None`` for a signal it left alone or turned off)."""

    tracer_provider: Any = None
    meter_provider: Any = None

    def force_flush(self, timeout_millis: int = 10_000) -> None:
        """Export what is buffered now (tests, scripts about to exit)."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop the exporters (also done at interpreter exit)."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()


def configure(service_name: str, endpoint: str | None = None) -> TelemetryProviders:
    """Set the global tracer and meter providers, exporting in batches over OTLP/HTTP.

    ``endpoint`` is the collector's base URL (``http://localhost:4318``; ``/v1/traces`` and
    ``/v1/metrics`` are appended). Without it the exporters read ``OTEL_EXPORTER_OTLP_ENDPOINT`` and
    the per-signal variables, then default to ``http://localhost:4318``. The other standard variables
    apply as the SDK reads them: ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
    ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_EXPORTER_OTLP_HEADERS`` ...;
    ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_METRICS_EXPORTER=none`` turns a signal off and
    ``OTEL_SDK_DISABLED=true`` both. A signal whose global provider is already set is left as it is
    (with a warning): the API never replaces one. Needs the ``[otlp]`` extra.
    """
    if _env_is("OTEL_SDK_DISABLED", "true"):
        return TelemetryProviders()
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ImportError(
            "upstream_ops.telemetry.configure needs the OTLP exporter: "
            "pip install 'upstream-ops[otlp]'"
        ) from exc

    resource = Resource.create({SERVICE_NAME: service_name})
    base = endpoint.rstrip("/") if endpoint else None
    tracer_provider = meter_provider = None
    if _env_is("OTEL_TRACES_EXPORTER", "none"):
        pass
    elif global_tracer_provider_set():
        logger.warning("upstream_ops: a tracer provider is already set; configure() keeps it")
    else:
        tracer_provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces" if base else None)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
    if _env_is("OTEL_METRICS_EXPORTER", "none"):
        pass
    elif global_meter_provider_set():
        logger.warning("upstream_ops: a meter provider is already set; configure() keeps it")
    else:
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics" if base else None)
        )
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
    return TelemetryProviders(tracer_provider, meter_provider)


def _env_is(name: str, value: str) -> bool:
    return os.environ.get(name, "").strip().lower() == value
