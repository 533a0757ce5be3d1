"""Records with every field set, shared by the sink tests (test_sinks_*.py)."""

from __future__ import annotations

from typing import Any

from upstream_ops.events import UpstreamErrorEvent, marshal_upstream_errors
from upstream_ops.record import RequestRecord
from upstream_ops.sinks._query import RECORD_COLUMNS, record_rows

#: Strings a store must keep byte for byte.
NASTY = "München 東京 🚀 it's \"quoted\" back\\slash '); DROP TABLE ops_error_logs;-- \t\n%s ? :x"
LONG = "x" * 50_000 + "ü"


def full_event(**overrides: Any) -> UpstreamErrorEvent:
    """An event with every field set to a non-empty value."""
    values: dict[str, Any] = {
        "at_unix_ms": 1_700_000_000_123,
        "platform": "openai",
        "account_id": 42,
        "upstream_status_code": 502,
        "upstream_request_id": "up-req-1",
        "kind": "http_error",
        "message": NASTY,
        "detail": LONG,
        "account_name": "acct 'main'",
        "model": "gpt-4o",
        "method": "POST",
        "upstream_url": "https://api.example.com/v1/chat?x='1'",
        "attempt": 2,
        "duration_ms": 12.5,
        "error_class": "httpx.ReadTimeout",
        "error_type": "timeout",
        "phase": "read",
        "retryable": False,
        "retry_after_ms": 1500,
        "provider_error_type": "server_error",
        "provider_error_code": "overloaded",
        "origin": "upstream",
    }
    values.update(overrides)
    return UpstreamErrorEvent(**values)


def full_record(
    id: str = "rec-1",
    *,
    started_at_ms: int = 1_700_000_000_000,
    events: list[UpstreamErrorEvent] | None = None,
    **overrides: Any,
) -> RequestRecord:
    """A record with every field set; ``events`` defaults to two full events."""
    values: dict[str, Any] = {
        "id": id,
        "request_id": f"req-{id}",
        "service": "gateway",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "/v1/{name}",
        "status_code": 200,
        "duration_ms": 1234.5,
        "started_at_ms": started_at_ms,
        "upstream_status_code": 502,
        "upstream_error_message": NASTY,
        "upstream_error_detail": LONG,
        "upstream_errors": [full_event(), full_event(kind="retry", retryable=True, attempt=3)]
        if events is None
        else events,
        "dropped_events": 3,
        "error": "ReadTimeout: '); DROP TABLE ops_upstream_error_events;--",
        "recovered": True,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
    }
    values.update(overrides)
    return RequestRecord(**values)


def bare_record(id: str, started_at_ms: int, **fields: Any) -> RequestRecord:
    """A record with only what a query test needs."""
    return RequestRecord(id=id, request_id=f"req-{id}", started_at_ms=started_at_ms, **fields)


#: Records a database cannot store as they are; each must cost only itself, never its batch.
BAD_RECORDS = {
    "int too large for SQLite": bare_record("bad-int", 10, status_code=2**70),
    "unsupported type": bare_record("bad-type", 10, route={"not": "a string"}),
    "lone surrogate": bare_record("bad-text", 10, error="broken \udc80 text"),
    "NULL id": RequestRecord(id=None, request_id="req", started_at_ms=10),  # type: ignore[arg-type]
    "NULL start time": RequestRecord(id="no-time", request_id="req", started_at_ms=None),  # type: ignore[arg-type]
}


def schema_1_rows(record: RequestRecord) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """A record's rows as schema 1 wrote them: the events' array in the record row as well."""
    row, events = record_rows(record, 0)
    position = [c.name for c in RECORD_COLUMNS].index("upstream_errors")
    array = marshal_upstream_errors(record.upstream_errors)
    return (*row[:position], array, *row[position + 1 :]), events
