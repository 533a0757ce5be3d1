"""What the ASGI and WSGI middleware share: request ids, the record rule, building and enqueueing.

The middleware classes only adapt a protocol; every decision about a request's record lives here, so
the two integrations cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import SpanContext

from upstream_ops._ids import ordered_uuid7_hex
from upstream_ops.collector import Collector, new_request_id
from upstream_ops.defaults import (
    DEFAULT_SINK_URL,
    MAX_EVENTS_PER_REQUEST,
    REQUEST_ID_HEADER,
    REQUEST_ID_MAX_LENGTH,
    SINK_ENV_VAR,
    SPOOL_MAX_BYTES,
)
from upstream_ops.dispatcher import Dispatcher
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sanitize import (
    LABEL_TEXT,
    MESSAGE_TEXT,
    get_default_sanitizer,
    sanitize_label,
    sanitize_message,
)
from upstream_ops.sinks.base import Sink
from upstream_ops.telemetry._providers import has_current_span

__all__ = [
    "RecordFilter",
    "RecordHook",
    "Recorder",
    "default_should_record",
    "new_record_id",
    "new_request_id",
]

logger = logging.getLogger("upstream_ops")

RecordFilter = Callable[[RequestRecord], bool]
RecordHook = Callable[[RequestRecord], "RequestRecord | None"]

_REQUEST_ID_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{REQUEST_ID_MAX_LENGTH}}}")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def default_should_record(record: RequestRecord) -> bool:
    """Record a request that saw upstream trouble, failed with 5xx, or raised."""
    return bool(
        record.upstream_errors
        or record.dropped_events
        or record.upstream_status_code is not None
        or record.upstream_error_message
        or record.upstream_error_detail
        or record.status_code >= 500
        or record.error
    )


def had_upstream_trouble(
    collector: Collector, events: list[UpstreamErrorEvent] | None = None
) -> bool:
    """The request recorded upstream events (kept or dropped) or an upstream failure summary.

    ``events``: the collector's events when the caller already has them (saves a copy).
    """
    if collector.upstream_status_code or collector.dropped_events:
        return True
    return collector.has_events() if events is None else bool(events)


def is_recovered(had_trouble: bool, status_code: int) -> bool:
    """The client got a status below 400 although upstream trouble was recorded."""
    return had_trouble and 0 < status_code < 400


def resolve_sink(sink: Sink | str | None) -> Sink:
    """A sink object, a sink URL, or ``None`` for ``$UPSTREAM_OPS_SINK`` or the SQLite default."""
    from upstream_ops.sinks.url import sink_from_url

    if sink is None:
        sink = os.environ.get(SINK_ENV_VAR) or DEFAULT_SINK_URL
    if isinstance(sink, str):
        return sink_from_url(sink)
    if not callable(getattr(sink, "write", None)):
        raise ValueError(f"sink must have a write(records) method, got {type(sink).__name__}")
    return sink


@dataclass(slots=True)
class RequestFacts:
    """What the protocol adapter learned about the request and its response."""

    method: str
    path: str
    route: str | None
    status_code: int
    started_at_ms: int
    duration_ms: float
    error: BaseException | None = None
    #: The request's server span, whose ids go on the record (default: the span current at finish).
    span_context: SpanContext | None = None


class Recorder:
    """Configuration of one middleware instance; holds no per-request state."""

    def __init__(
        self,
        *,
        sink: Sink | str | None = None,
        dispatcher: Dispatcher | None = None,
        service: str = "",
        request_id_header: str | None = REQUEST_ID_HEADER,
        echo_request_id: bool = False,
        should_record: RecordFilter | None = None,
        before_flush: RecordHook | None = None,
        max_events: int = MAX_EVENTS_PER_REQUEST,
        meter_provider: MeterProvider | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = SPOOL_MAX_BYTES,
        retention: timedelta | str | None = None,
    ) -> None:
        if request_id_header is not None and not _HEADER_NAME_RE.fullmatch(request_id_header):
            raise ValueError(f"request_id_header is not a valid header name: {request_id_header!r}")
        if not isinstance(echo_request_id, bool):
            raise ValueError(f"echo_request_id must be True or False, got {echo_request_id!r}")
        if echo_request_id and request_id_header is None:
            raise ValueError("echo_request_id needs a request_id_header to send the id in")
        if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 1:
            raise ValueError(f"max_events must be a positive integer, got {max_events!r}")
        if dispatcher is not None and sink is not None:
            raise ValueError("pass either sink or dispatcher, not both")
        if should_record is not None and not callable(should_record):
            raise ValueError("should_record must be a callable taking a RequestRecord")
        if before_flush is not None and not callable(before_flush):
            raise ValueError("before_flush must be a callable taking a RequestRecord")
        if dispatcher is not None and (spool_dir is not None or retention is not None):
            raise ValueError("spool_dir and retention are options of the dispatcher you pass")
        self.dispatcher = (
            dispatcher
            if dispatcher is not None
            else Dispatcher(
                resolve_sink(sink),
                meter_provider=meter_provider,
                spool_dir=spool_dir,
                spool_max_bytes=spool_max_bytes,
                retention=retention,
            )
        )
        self.service = sanitize_label(service)
        self.request_id_header = request_id_header
        self.echo_request_id = echo_request_id
        self.should_record = should_record or default_should_record
        self._default_rule = self.should_record is default_should_record
        self.before_flush = before_flush
        self.max_events = max_events

    @staticmethod
    def valid_request_id(incoming: str | None) -> str | None:
        """The incoming id when it is 1..128 chars of ``[A-Za-z0-9._:-]``, else ``None`` (for a
        ``Collector``, which then makes one when its id is first read)."""
        if incoming and _REQUEST_ID_RE.fullmatch(incoming):
            return incoming
        return None

    def finish(self, collector: Collector, facts: RequestFacts) -> RequestRecord | None:
        """Build the record, apply the rule and the hook, enqueue. Never raises into the app."""
        try:
            if self.finish_if_healthy(collector, facts.status_code, facts.error):
                return None
        except Exception:
            logger.exception("upstream_ops: could not record the request")
            return None
        return self._record(collector, facts)

    def _record(self, collector: Collector, facts: RequestFacts) -> RequestRecord | None:
        """:meth:`finish` after :meth:`finish_if_healthy` said no: for the adapters, which ask it
        themselves before they describe the request (asked again, it costs 1,100 instructions)."""
        try:
            record = self._build(collector, facts)
            if not self.should_record(record):
                return None
            if self.before_flush is not None:
                hooked = self.before_flush(record)
                if hooked is None:
                    return None
                record = hooked
            self.dispatcher.submit(record)
            return record
        except Exception:
            logger.exception("upstream_ops: could not record the request")
            return None

    def finish_if_healthy(
        self, collector: Collector, status_code: int, error: BaseException | None
    ) -> bool:
        """Close ``collector``; True when the default rule is sure to refuse the request's record.

        The happy path's shortcut: a healthy request under ``default_should_record`` gets no record,
        so the adapters ask this before they describe the request to :meth:`finish`.
        """
        quiet = collector.close()
        return quiet and self._default_rule and status_code < 500 and error is None

    def _build(self, collector: Collector, facts: RequestFacts) -> RequestRecord:
        events = collector.events
        request_id = collector._request_id  # the property's call only when it must make one
        if request_id is None:
            request_id = collector.request_id
        status_code = facts.status_code
        duration = facts.duration_ms
        # is_recovered(had_upstream_trouble(collector, events), status_code), without the calls
        recovered = 0 < status_code < 400 and bool(
            events or collector.upstream_status_code or collector.dropped_events
        )
        trace_id = span_id = None
        span_context = facts.span_context
        if span_context is None and has_current_span():  # skips four calls when no span is current
            span_context = trace.get_current_span().get_span_context()
        if span_context is not None and span_context.is_valid:
            trace_id = format(span_context.trace_id, "032x")
            span_id = format(span_context.span_id, "016x")
        error = facts.error
        route = facts.route
        # The method, path and route are mostly texts the sanitizer has kept the results of: looked
        # up here, 3,000 instructions less than the two calls each of sanitize_label/_message.
        kept = get_default_sanitizer().cached_results()
        labels = kept[LABEL_TEXT]
        # Positional, in field order: a class called with keywords gets them as a dict, which costs
        # CPython 3.11 about 9,000 instructions more for these 18 fields.
        return RequestRecord(
            new_record_id(),  # id
            request_id,  # request_id
            self.service,  # service
            (labels.get(facts.method) or sanitize_label(facts.method)).upper(),  # method
            kept[MESSAGE_TEXT].get(facts.path) or sanitize_message(facts.path),  # path
            # A route is a template the app repeats on every request: a label (one line, cached).
            (labels.get(route) or sanitize_label(route)) if route else None,  # route
            status_code,  # status_code
            # To the µs: round(d, 3) formats the float's digits (2,600 instructions); a finite
            # duration (any a clock gives) is scaled and rounded to an int instead (200).
            round(duration * 1000.0) / 1000.0 if -1e15 < duration < 1e15 else duration,
            facts.started_at_ms,  # started_at_ms
            collector.upstream_status_code,  # upstream_status_code
            collector.upstream_error_message,  # upstream_error_message
            collector.upstream_error_detail,  # upstream_error_detail
            events,  # upstream_errors
            collector.dropped_events,  # dropped_events
            sanitize_label(_qualified_name(error)) if error is not None else None,  # error
            recovered,  # recovered
            trace_id,  # trace_id
            span_id,  # span_id
        )


#: A new record id: a UUIDv7 in hex (``_ids.ordered_uuid7_hex``), time-ordered so that the stores' indexes on
#: record ids grow at their end instead of dirtying a random page per record.
new_record_id: Final = ordered_uuid7_hex


def _qualified_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return (
        cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000
