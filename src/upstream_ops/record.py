"""The record of one request: what a sink stores, built once when the response is finished."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from upstream_ops.events import UpstreamErrorEvent


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
