"""A batch as SQLite rows, built for ``executemany`` with as little per-value work as possible.

The rows hold exactly what ``_query.record_rows`` makes (the tests compare them through the
database), but Python builds them with a few C calls per record instead of work per field, and
binds no ``None`` and no ``bool``: the ``sqlite3`` module in CPython 3.11 runs its adapter lookup for
any value that is not exactly an int, float, str or bytearray, and that lookup raises and clears an
``AttributeError`` every time (about 2,000 instructions, 18 values a record). An event's empty
fields are bound as they are and turned into NULL by the statement (``NULLIF``); a record's
``None`` fields become a ``NULL`` in the text of a statement made for that shape of record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from itertools import compress
from operator import attrgetter, itemgetter, truth
from typing import Any, Final

from upstream_ops.events import EVENT_FIELDS, UpstreamErrorEvent, field_values
from upstream_ops.record import RECORD_FIELDS, RequestRecord
from upstream_ops.sinks._query import (
    EVENT_COLUMNS,
    EVENTS_TABLE,
    RECORD_COLUMNS,
    RECORDS_TABLE,
    Column,
)

__all__ = ["BatchRows", "event_json", "insert_events_sql"]

Row = tuple[Any, ...]

# --- events ---------------------------------------------------------------------------------------

#: The event columns between ``request_id`` and ``event`` copy these event fields.
_COPIED: Final = EVENT_COLUMNS[3:-2]
if [c.name for c in EVENT_COLUMNS[:3]] != ["record_id", "seq", "request_id"] or [
    c.name for c in EVENT_COLUMNS[-2:]
] != ["event", "created_at_ms"]:
    raise AssertionError("EVENT_COLUMNS changed: _sqlite_rows builds its rows by position")
_copied_values: Final = attrgetter(*(c.name for c in _COPIED))


def _bind(column: Column) -> str:
    """The value of ``column``: an event field stored as NULL when empty, as ``event_rows`` does."""
    if column.not_null or column not in _COPIED:
        return "?"
    return "NULLIF(?, '')" if column.type == "text" else "NULLIF(?, 0)"


def insert_events_sql() -> str:
    """Insert one event row made by ``BatchRows`` (its empty fields bound as ``''`` or 0)."""
    names = ", ".join(c.name for c in EVENT_COLUMNS)
    values = ", ".join(_bind(c) for c in EVENT_COLUMNS)
    return f"INSERT INTO {EVENTS_TABLE} ({names}) VALUES ({values})"  # noqa: S608 (constants only)


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_RETRYABLE: Final = EVENT_FIELDS.index("retryable")
#: ``json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode`` without the encoder
#: object its ``encode`` builds on every call (the C encoder when there is one).
_encode: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_c_encode = getattr(json.encoder, "c_make_encoder", None)
if _c_encode is not None:
    _c_encode = _c_encode(
        None, _not_serializable, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )


def event_json(event: UpstreamErrorEvent) -> str:
    """The text of ``_query.event_json(event)``: ``to_dict`` keeps a value unless it is ``None``,
    empty or zero (``retryable=False`` is kept), which is the value's truth except for
    ``retryable``; kept values are picked with ``compress`` rather than a loop in Python."""
    values = field_values(event)
    keep = list(map(truth, values))
    keep[_RETRYABLE] = values[_RETRYABLE] is not None
    fields = dict(compress(zip(EVENT_FIELDS, values, strict=True), keep))
    if _c_encode is None:
        return _encode(fields)
    return "".join(_c_encode(fields, 0))


# --- records --------------------------------------------------------------------------------------

_UPSTREAM_ERRORS: Final = RECORD_FIELDS.index("upstream_errors")
_RECOVERED: Final = RECORD_FIELDS.index("recovered")
_COLUMN_NAMES: Final = tuple(c.name for c in RECORD_COLUMNS)
if (*RECORD_FIELDS, "created_at_ms") != _COLUMN_NAMES or RECORD_FIELDS[-3] != "recovered":
    raise AssertionError("RECORD_COLUMNS changed: _sqlite_rows builds its rows by position")
#: The record's fields before ``upstream_errors`` (NULL from schema 2 on) and after it, up to
#: ``recovered``; the two after it.
_head: Final = attrgetter(*RECORD_FIELDS[:_UPSTREAM_ERRORS])
_middle: Final = attrgetter(*RECORD_FIELDS[_UPSTREAM_ERRORS + 1 : _RECOVERED])
_tail: Final = attrgetter(*RECORD_FIELDS[_RECOVERED + 1 :])
_NONE: Final = type(None)


class _Shape:
    """The statement for records whose ``None`` fields are at the same places, and how to pick the
    other values of such a row."""

    def __init__(self, types: tuple[type, ...]) -> None:
        kept = [i for i, kind in enumerate(types) if kind is not _NONE]
        marks = ["NULL" if kind is _NONE else "?" for kind in types]
        marks.insert(_UPSTREAM_ERRORS, "NULL")
        names = ", ".join(c.name for c in RECORD_COLUMNS)
        self.sql = (
            f"INSERT INTO {RECORDS_TABLE} ({names}) VALUES ({', '.join(marks)}) "  # noqa: S608
            "ON CONFLICT (id) DO NOTHING"
        )
        self.all = len(kept) == len(types)
        self.pick = (
            itemgetter(*kept) if len(kept) > 1 else (lambda row: tuple(row[i] for i in kept))
        )


#: Record shapes seen (type signature -> shape): a handful in practice, bounded anyway.
_SHAPES: dict[tuple[type, ...], _Shape] = {}
_SHAPES_MAX: Final = 256


def _shape(row: Row) -> _Shape:
    types = tuple(map(type, row))
    shape = _SHAPES.get(types)
    if shape is None:
        shape = _Shape(types)
        if len(_SHAPES) < _SHAPES_MAX:
            _SHAPES[types] = shape
    return shape


class BatchRows:
    """A batch's rows: each record's (the first of each id) by statement, and every event's.

    ``add`` raises what building a record's rows raises (a value JSON cannot hold ...); the rows
    of earlier records stay.
    """

    def __init__(self, created_at_ms: int) -> None:
        self.created_at_ms = created_at_ms
        #: Record id -> (statement, values to bind) of its row.
        self.records: dict[str, tuple[str, Row]] = {}
        #: Record id -> its event rows.
        self.events: dict[str, list[Row]] = {}

    def add(self, record: RequestRecord) -> None:
        created = self.created_at_ms
        row = (
            *_head(record),
            *_middle(record),
            1 if record.recovered else 0,
            *_tail(record),
            created,
        )
        shape = _shape(row)
        key, request_id = record.id, record.request_id
        events = [
            (key, seq, request_id, *_copied_values(event), event_json(event), created)
            for seq, event in enumerate(record.upstream_errors)
        ]
        if key not in self.records:
            self.records[key] = (shape.sql, row if shape.all else shape.pick(row))
            self.events[key] = events

    def leave_out(self, ids: set[str]) -> None:
        """Forget the records with these ids (stored already) and their events."""
        for key in ids:
            self.records.pop(key, None)
            self.events.pop(key, None)

    def record_rows(self) -> Iterator[tuple[str, Sequence[Row]]]:
        """(statement, rows) for each shape of record in the batch."""
        by_sql: dict[str, list[Row]] = {}
        for sql, row in self.records.values():
            rows = by_sql.get(sql)
            if rows is None:
                by_sql[sql] = [row]
            else:
                rows.append(row)
        return iter(by_sql.items())

    def event_rows(self) -> Iterator[Row]:
        for rows in self.events.values():
            yield from rows
