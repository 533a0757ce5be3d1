"""The record of one request: what a sink stores, built once when the response is finished."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Final

from upstream_ops.events import EVENT_FIELDS, UpstreamErrorEvent, field_values


@dataclass(slots=True)
class RequestRecord:
    """One incoming request and every failed upstream attempt made while serving it.

    ``recovered`` marks the case this library exists for: the client got a status below 400 although
    upstream errors were recorded (the hidden 504 behind a 200). Strings here have been sanitized by
    the time a sink sees the record.
    """

    id: str
    request_id: str
    service: str = ""
    method: str = ""
    path: str = ""
    route: str | None = None
    status_code: int = 0
    duration_ms: float = 0.0
    started_at_ms: int = 0
    upstream_status_code: int | None = None
    upstream_error_message: str | None = None
    upstream_error_detail: str | None = None
    upstream_errors: list[UpstreamErrorEvent] = field(default_factory=list)
    dropped_events: int = 0
    error: str | None = None
    recovered: bool = False
    trace_id: str | None = None
    span_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every key present (stable for scripts); events omit empty fields."""
        out = {name: getattr(self, name) for name in RECORD_FIELDS}
        out["upstream_errors"] = [event.to_dict() for event in self.upstream_errors]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestRecord:
        """Rebuild a record from ``to_dict`` output; unknown keys are ignored."""
        values = {k: v for k, v in data.items() if k in _RECORD_FIELD_SET}
        events = values.get("upstream_errors") or []
        values["upstream_errors"] = [
            e if isinstance(e, UpstreamErrorEvent) else UpstreamErrorEvent.from_dict(e)
            for e in events
        ]
        for required in ("id", "request_id"):
            if not isinstance(values.get(required), str) or not values[required]:
                raise ValueError(f"RequestRecord.{required} must be a non-empty string")
        return cls(**values)


RECORD_FIELDS: Final = tuple(f.name for f in fields(RequestRecord))
_RECORD_FIELD_SET: Final = frozenset(RECORD_FIELDS)


#: A record as one flat tuple of plain values, see ``pack_record``.
PackedRecord = tuple[Any, ...]

_EVENTS_AT: Final = RECORD_FIELDS.index("upstream_errors")
_scalar_values: Final = attrgetter(*(n for n in RECORD_FIELDS if n != "upstream_errors"))
_SCALARS: Final = len(RECORD_FIELDS) - 1
_EVENT_WIDTH: Final = len(EVENT_FIELDS)
_new_record: Callable[..., RequestRecord] = RequestRecord  # positional, in field order


def pack_record(record: RequestRecord) -> PackedRecord | None:
    """``record`` as one flat tuple of strings and numbers, which the garbage collector stops tracking.

    A record waiting in a deep queue (a slow sink) lives long enough to reach the oldest
    generation; thousands of them there make every full collection, a pause of the whole
    process, tens of milliseconds longer. Packed, they cost the collector nothing. Flat, because
    the collector untracks a tuple only after the tuples it holds, one level per collection.
    ``None`` when ``record`` is not exactly a ``RequestRecord`` of ``UpstreamErrorEvent`` objects
    (a ``before_flush`` hook may return its own subclass, which packing would lose).
    """
    if type(record) is not RequestRecord:
        return None
    packed: tuple[Any, ...] = _scalar_values(record)
    for event in record.upstream_errors:
        if type(event) is not UpstreamErrorEvent:
            return None
        packed += field_values(event)
    return packed


def unpack_record(packed: PackedRecord) -> RequestRecord:
    """The record ``pack_record`` packed, equal to the original."""
    new_event = UpstreamErrorEvent._from_field_values
    events = [
        new_event(packed[at : at + _EVENT_WIDTH])
        for at in range(_SCALARS, len(packed), _EVENT_WIDTH)
    ]
    return _new_record(*packed[:_EVENTS_AT], events, *packed[_EVENTS_AT:_SCALARS])
