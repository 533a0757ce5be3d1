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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sinks._query import EVENT_COLUMNS, RECORD_COLUMNS, Column, record_rows

__all__ = ["Staged", "StagedBatch"]

_INT64: Final = (-(2**63), 2**63 - 1)

#: A record with its row and its events' rows.
Staged = tuple[RequestRecord, tuple[Any, ...], list[tuple[Any, ...]]]


class StagedBatch:
    """A batch's rows, made as they are consumed: iterating yields each record that can be stored
    (the first of each id) with its rows, so a ``COPY`` reading it has the server parse a row while
    the next one is built. ``staged`` and ``failures`` (records with the error that rules them
    out) grow as it goes; ``finish()`` stages the rest, e.g. after a ``COPY`` stopped half-way.
    """

    def __init__(self, records: Sequence[RequestRecord], created_at_ms: int) -> None:
        self.staged: list[Staged] = []
        self.failures: list[tuple[RequestRecord, Exception]] = []
        self._pending = iter(records)
        self._created_at_ms = created_at_ms
        self._seen: set[str] = set()

    def __iter__(self) -> Iterator[Staged]:
        for record in self._pending:  # shared: a second loop goes on where the first stopped
            try:
                row, events = _rows(record, self._created_at_ms)
            except (TypeError, ValueError, OverflowError) as exc:
                self.failures.append((record, exc))
                continue
            if row[0] in self._seen:
                continue  # like ON CONFLICT: the first of a duplicated id wins
            self._seen.add(row[0])
            staged = (record, row, events)
            self.staged.append(staged)
            yield staged

    def finish(self) -> list[Staged]:
        """Stage what is left; every staged record."""
        for _ in self:
            pass
        return self.staged


def _rows(
    record: RequestRecord, created_at_ms: int
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    row, events = record_rows(record, created_at_ms)
    if _unstorable_text(row, events):
        row, events = record_rows(
            _storable(record), created_at_ms
        )  # rare: rebuilt from a clean copy
    _check_row(row, RECORD_COLUMNS, "RequestRecord")
    for event in events:
        _check_row(event, EVENT_COLUMNS, "UpstreamErrorEvent")
    return row, events


def _unstorable_text(row: Sequence[Any], events: Iterable[Sequence[Any]]) -> bool:
    """Whether a record's rows hold text PostgreSQL refuses: NUL, a lone surrogate, or in an
    event's JSON (which holds every event string) ``\\u0000`` or a non-finite number. All the text
    is searched at once (a few scans in C instead of a loop over the values); a false alarm only
    costs the slow path. Of an event row, only the JSON is searched: its other text columns are
    copies of event strings (a NUL in one is ``\\u0000`` in the JSON, a lone surrogate is kept
    as it is) or of the record's ids."""
    text = "\n".join(
        [value for value in row if type(value) is str] + [event[_EVENT_JSON] for event in events]
    )
    return (
        "\x00" in text
        or "\\u0000" in text
        or "NaN" in text
        or "Infinity" in text
        or (not text.isascii() and not _is_utf8(text))
    )


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


_EVENT_JSON: Final = [c.name for c in EVENT_COLUMNS].index("event")
_RECORD_TYPES: Final = _column_types(RECORD_COLUMNS)
_EVENT_TYPES: Final = _column_types(EVENT_COLUMNS)


#: Per table, the type signatures of rows that passed ``_check_types`` -> where their ints are.
_RECORD_CHECKED: Final[dict[tuple[type, ...], tuple[int, ...]]] = {}
_EVENT_CHECKED: Final[dict[tuple[type, ...], tuple[int, ...]]] = {}
#: Signatures remembered per table (a handful in practice: which optional fields are empty).
_CHECKED_MAX: Final = 512


def _check_row(row: Sequence[Any], columns: Sequence[Column], what: str) -> None:
    """Reject a value its column cannot take, naming the field, before it can fail a batch.

    A row whose value types were accepted before only has its integers' range checked.
    """
    checked = _RECORD_CHECKED if columns is RECORD_COLUMNS else _EVENT_CHECKED
    signature = tuple(map(type, row))
    ints = checked.get(signature)
    if ints is None:
        _check_types(row, columns, what)
        ints = tuple(i for i, kind in enumerate(signature) if kind is int)
        if len(checked) < _CHECKED_MAX:
            checked[signature] = ints
    low, high = _INT64
    for i in ints:
        if not low <= row[i] <= high:
            raise ValueError(f"{what}.{columns[i].name} does not fit 64 bits: {row[i]}")


def _check_types(row: Sequence[Any], columns: Sequence[Column], what: str) -> None:
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
