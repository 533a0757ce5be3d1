"""The metrics: upstream errors by class, records by outcome, the dispatcher's queue.

Instruments are made once, from an explicit meter provider or the global one (the API's proxy meter
forwards to a provider set later). Recording never raises: a metric must not break what it counts.
"""

from __future__ import annotations

import logging
from typing import Final

from opentelemetry import metrics

from upstream_ops._version import __version__
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.telemetry._attributes import (
    ERRORS_METRIC,
    OUTCOME,
    QUEUE_METRIC,
    RECORDS_METRIC,
    SCHEMA_URL,
    SCOPE_NAME,
    error_metric_attributes,
)

__all__ = ["OUTCOMES", "DispatcherMetrics", "UpstreamErrorMetrics"]

logger = logging.getLogger("upstream_ops")

#: What became of a record: written by the sink, dropped (queue full), failed (the sink gave up),
#: spooled (kept on disk for a later write; counted ``written`` again once replayed), evicted (a
#: spooled record deleted unreplayed because the spool was full).
WRITTEN: Final = "written"
DROPPED: Final = "dropped"
FAILED: Final = "failed"
SPOOLED: Final = "spooled"
EVICTED: Final = "evicted"
OUTCOMES: Final = (WRITTEN, DROPPED, FAILED, SPOOLED, EVICTED)

_OUTCOME_ATTRIBUTES: Final = {outcome: {OUTCOME: outcome} for outcome in OUTCOMES}


def _meter(provider: metrics.MeterProvider | None) -> metrics.Meter:
    provider = provider if provider is not None else metrics.get_meter_provider()
    return provider.get_meter(SCOPE_NAME, __version__, schema_url=SCHEMA_URL)


class UpstreamErrorMetrics:
    """``upstream_ops.upstream.errors``: one per appended event."""

    __slots__ = ("_errors",)

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self._errors = _meter(meter_provider).create_counter(
            ERRORS_METRIC,
            unit="{error}",
            description="Failed upstream attempts recorded by upstream-ops.",
        )

    def record(self, event: UpstreamErrorEvent) -> None:
        try:
            self._errors.add(1, error_metric_attributes(event))
        except Exception:
            logger.exception("upstream_ops: could not count an upstream error")


class DispatcherMetrics:
    """``upstream_ops.records`` by outcome and ``upstream_ops.dispatcher.queued``."""

    __slots__ = ("_queued", "_records")

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = _meter(meter_provider)
        self._records = meter.create_counter(
            RECORDS_METRIC,
            unit="{record}",
            description="Request records by outcome: written, dropped, failed, spooled, evicted.",
        )
        self._queued = meter.create_up_down_counter(
            QUEUE_METRIC,
            unit="{record}",
            description="Records accepted by the dispatcher and not yet handed to the sink.",
        )

    def count(self, outcome: str, records: int = 1) -> None:
        """Count ``records`` that reached ``outcome`` (one of :data:`OUTCOMES`)."""
        if not records:
            return
        try:
            attributes = _OUTCOME_ATTRIBUTES.get(outcome) or {OUTCOME: outcome}
            self._records.add(records, attributes)
        except Exception:
            logger.exception("upstream_ops: could not count records")

    def queued(self, delta: int) -> None:
        """Records entered (positive) or left (negative) the queue."""
        try:
            self._queued.add(delta)
        except Exception:
            logger.exception("upstream_ops: could not count the queue")
