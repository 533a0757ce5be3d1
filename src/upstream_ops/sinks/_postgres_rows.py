"""Records as rows PostgreSQL takes: what it cannot hold is replaced, what would fail a batch is
caught first.

PostgreSQL text cannot hold NUL, and UTF-8 cannot hold a lone surrogate: both become U+FFFD, in the
columns and in the JSON alike (JSONB also refuses ``\\u0000``, and ``NaN`` in a number). A value of
the wrong type or an integer beyond 64 bits is rejected here, naming the field, so that a COPY of the
batch never fails because of one record.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Final

from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sinks._query import EVENT_COLUMNS, RECORD_COLUMNS, Column, record_rows

__all__ = ["Staged", "stage"]

_INT64: Final = (-(2**63), 2**63 - 1)

#: A record with its row and its events' rows.
Staged = tuple[RequestRecord, tuple[Any, ...], list[tuple[Any, ...]]]


def stage(
    records: Sequence[RequestRecord], created_at_ms: int
) -> tuple[list[Staged], list[tuple[RequestRecord, Exception]]]:
    """Rows for the records that can be stored, first of each id; the others with their error."""
    staged: list[Staged] = []
    failures: list[tuple[RequestRecord, Exception]] = []
    seen: set[str] = set()
    for record in records:
        try:
            row, events = record_rows(record, created_at_ms)
            if _unstorable_text(row) or any(_unstorable_text(event) for event in events):
                row, events = record_rows(_storable(record), created_at_ms)  # rare: cleaned
            _check_row(row, RECORD_COLUMNS, "RequestRecord")
            for event in events:
                _check_row(event, EVENT_COLUMNS, "UpstreamErrorEvent")
        except (TypeError, ValueError, OverflowError) as exc:
            failures.append((record, exc))
            continue
        if row[0] in seen:
            continue  # like ON CONFLICT: the first of a duplicated id wins
        seen.add(row[0])
        staged.append((record, row, events))
    return staged, failures


def _unstorable_text(row: Sequence[Any]) -> bool:
    """Whether a record or event row holds text PostgreSQL refuses: NUL, a lone surrogate, or in
    an event's JSON (which holds every event string) ``\\u0000`` or a non-finite number. A false
    alarm only costs the slow path."""
    for value in row:
        if type(value) is str and (
            "\x00" in value
            or "\\u0000" in value
            or "NaN" in value
            or "Infinity" in value
            or (not value.isascii() and not _is_utf8(value))
        ):
            return True
    return False


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable(record: RequestRecord) -> RequestRecord:
    """``record`` with the text PostgreSQL cannot hold replaced; the same object when clean."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, str) and (clean := _storable_text(value)) is not value:
            changes[field.name] = clean
    events = []
    for position, event in enumerate(record.upstream_errors):
        if not isinstance(event, UpstreamErrorEvent):
            raise TypeError(f"upstream_errors[{position}] must be an UpstreamErrorEvent")
        if not math.isfinite(event.duration_ms):
            raise ValueError(
                f"upstream_errors[{position}].duration_ms must be finite for JSONB, "
                f"got {event.duration_ms!r}"
            )
        event_changes: dict[str, Any] = {}
        for field in dataclasses.fields(event):
            value = getattr(event, field.name)
            if isinstance(value, str) and (clean := _storable_text(value)) is not value:
                event_changes[field.name] = clean
        events.append(dataclasses.replace(event, **event_changes) if event_changes else event)
    if any(new is not old for new, old in zip(events, record.upstream_errors, strict=True)):
        changes["upstream_errors"] = events
    return dataclasses.replace(record, **changes) if changes else record


def _storable_text(text: str) -> str:
    """NUL (PostgreSQL text cannot hold it) and lone surrogates (not UTF-8) become U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # UTF-16 joins a split surrogate pair back into its character; lone halves become U+FFFD.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _column_types(columns: Sequence[Column]) -> tuple[tuple[type, ...], ...]:
    """For each column, the exact value types it takes (a NULL where allowed)."""
    kinds = {
        "text": (str,),
        "json": (str,),
        "bigint": (int,),
        "double": (float, int),
        "bool": (bool,),
    }
    return tuple(kinds[c.type] + (() if c.not_null else (type(None),)) for c in columns)


_RECORD_TYPES: Final = _column_types(RECORD_COLUMNS)
_EVENT_TYPES: Final = _column_types(EVENT_COLUMNS)


def _check_row(row: Sequence[Any], columns: Sequence[Column], what: str) -> None:
    """Reject a value its column cannot take, naming the field, before it can fail a batch."""
    types = _RECORD_TYPES if columns is RECORD_COLUMNS else _EVENT_TYPES
    for value, allowed, column in zip(row, types, columns, strict=True):
        kind = type(value)
        if kind not in allowed:
            if value is None:
                raise ValueError(f"{what}.{column.name} must not be None")
            if not (isinstance(value, allowed) and not isinstance(value, bool)) or kind is bool:
                raise TypeError(
                    f"{what}.{column.name} must be {column.type}, got {kind.__name__} {value!r:.60}"
                )
        if kind is int and not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"{what}.{column.name} does not fit 64 bits: {value}")
