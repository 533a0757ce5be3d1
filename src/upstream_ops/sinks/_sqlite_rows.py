"""A batch as SQLite rows, built for ``executemany`` with as little per-value work as possible.

The rows hold exactly what ``_query.record_rows`` makes (the tests compare them through the
database), but Python builds them with a few C calls per record instead of work per field, and
binds no ``None`` and no ``bool``: the ``sqlite3`` module in CPython 3.11 runs its adapter lookup for
any value that is not exactly an int, float, str or bytearray, and that lookup raises and clears an
``AttributeError`` every time (about 2,000 instructions, 18 values a record). An event's empty
fields are bound as they are and turned into NULL by the statement (``NULLIF``); a record's
``None`` fields become a ``NULL`` in the text of a statement made for that shape of record. An
event's JSON is written by SQLite's ``json_object`` from the values bound anyway (encoding it in
Python was a third of the CPU time of a write), in a statement made for that shape of event.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from operator import attrgetter, itemgetter, truth
from typing import Any, Final

from upstream_ops.events import EVENT_FIELDS, FIELD_TYPES, UpstreamErrorEvent, field_values
from upstream_ops.record import RECORD_FIELDS, RequestRecord
from upstream_ops.sinks._query import (
    EVENT_COLUMNS,
    EVENTS_TABLE,
    RECORD_COLUMNS,
    RECORDS_TABLE,
    event_json,
)

__all__ = ["BatchRows", "insert_events_sql", "insert_rows"]

Row = tuple[Any, ...]
Picker = Callable[[Sequence[Any]], Row]


def _picker(positions: Sequence[int]) -> Picker:
    """``itemgetter(*positions)``, always returning a tuple."""
    if len(positions) > 1:
        return itemgetter(*positions)
    return lambda values: tuple(values[i] for i in positions)


_RETRYABLE: Final = EVENT_FIELDS.index("retryable")


# --- event rows -----------------------------------------------------------------------------------

#: The event columns between ``request_id`` and ``event`` copy these event fields.
_COPIED: Final = EVENT_COLUMNS[3:-2]
if [c.name for c in EVENT_COLUMNS[:3]] != ["record_id", "seq", "request_id"] or [
    c.name for c in EVENT_COLUMNS[-2:]
] != ["event", "created_at_ms"]:
    raise AssertionError("EVENT_COLUMNS changed: _sqlite_rows builds its rows by position")
_COPIED_AT: Final = tuple(EVENT_FIELDS.index(c.name) for c in _COPIED)
_copied: Final = _picker(_COPIED_AT)
#: An event row binds ``(record_id, seq, request_id, created_at_ms, *copied fields, *more)``: the
#: parameter number of the first copied field and of the first of ``more``.
_FIRST_COPIED: Final = 5
_FIRST_MORE: Final = _FIRST_COPIED + len(_COPIED)


def insert_events_sql(event_sql: str = f"?{_FIRST_MORE}") -> str:
    """Insert one event row made by ``BatchRows`` (its empty fields bound as ``''`` or 0, stored as
    NULL like ``event_rows`` stores them), its JSON being ``event_sql``."""
    values = ["?1", "?2", "?3"]
    for number, column in enumerate(_COPIED, _FIRST_COPIED):
        if column.not_null:
            values.append(f"?{number}")
        else:
            values.append(f"NULLIF(?{number}, {'' if column.type == 'text' else 0!r})")
    values += [event_sql, "?4"]
    names = ", ".join(c.name for c in EVENT_COLUMNS)
    return f"INSERT INTO {EVENTS_TABLE} ({names}) VALUES ({', '.join(values)})"  # noqa: S608


#: The statement of an event whose JSON is made in Python (``more`` is that JSON).
_PYTHON_JSON: Final = insert_events_sql()
_TYPES: Final = tuple(FIELD_TYPES[name] for name in EVENT_FIELDS)
#: The type signatures of an event whose fields hold their declared types, ``retryable`` being
#: ``None`` or a ``bool``. Only those are left to ``json_object``: a ``bool`` in an int field, say,
#: would be 1 there and ``true`` in Python.
_PLAIN_TYPES: Final = frozenset(
    tuple(retryable if i == _RETRYABLE else kind for i, kind in enumerate(_TYPES))
    for retryable in (bool, type(None))
)


class _EventShape:
    """The statement for events with the same fields set (and the same ``retryable``) that has
    SQLite write their JSON: the fields in order, each from the parameter bound for its column or
    one of ``more``; the float (``duration_ms``) is bound last as Python's ``repr`` and taken as a
    JSON number by ``json()`` (SQLite's own text of a float keeps 15 digits, Python's 17)."""

    def __init__(self, key: tuple[tuple[bool, ...], object]) -> None:
        is_set, retryable = key
        more = [
            i
            for i, kind in enumerate(_TYPES)
            if is_set[i] and i not in _COPIED_AT and i != _RETRYABLE and kind is not float
        ]
        floats = [i for i, kind in enumerate(_TYPES) if is_set[i] and kind is float]
        number = {i: _FIRST_COPIED + n for n, i in enumerate(_COPIED_AT)}
        number.update({i: _FIRST_MORE + n for n, i in enumerate(more + floats)})
        pairs = []
        for i, name in enumerate(EVENT_FIELDS):
            if i == _RETRYABLE:
                if retryable is not None:
                    pairs.append(f"'{name}', json('{'true' if retryable else 'false'}')")
            elif is_set[i]:
                value = f"?{number[i]}"
                pairs.append(f"'{name}', {f'json({value})' if i in floats else value}")
        self.sql = insert_events_sql(f"json_object({', '.join(pairs)})")
        #: The values bound after the first four: the copied fields, then ``more``.
        self.pick = _picker(_COPIED_AT + tuple(more))
        self.float_at = floats[0] if floats else None


#: Event shapes seen, by which fields are set (as ``to_dict`` decides: a value's truth, but
#: ``retryable`` is set unless ``None``) and the value of ``retryable``: a handful in practice.
_EVENT_SHAPES: dict[tuple[tuple[bool, ...], object], _EventShape] = {}
_SHAPES_MAX: Final = 256


def _event_shape(values: Sequence[Any]) -> _EventShape:
    key = (tuple(map(truth, values)), values[_RETRYABLE])
    shape = _EVENT_SHAPES.get(key)
    if shape is None:
        shape = _EventShape(key)
        if len(_EVENT_SHAPES) < _SHAPES_MAX:
            _EVENT_SHAPES[key] = shape
    return shape


# Where a compiler built upstream_ops._speedups, one call tells what the two passes above tell (the
# plain types, and which fields are set): an int, -1 for types that are not plain, that keys the
# same shapes.
_event_key: Callable[[tuple[Any, ...], tuple[type, ...], int], int] | None
try:
    from upstream_ops._speedups import event_key as _event_key
except ImportError:  # pragma: no cover - depends on the build
    _event_key = None
_SHAPES_BY_KEY: dict[int, _EventShape] = {}


def _plain_event_shape(values: tuple[Any, ...]) -> _EventShape | None:
    """The shape of an event whose ``values`` have plain types; ``None`` for other types."""
    if _event_key is None:
        return _event_shape(values) if tuple(map(type, values)) in _PLAIN_TYPES else None
    key = _event_key(values, _TYPES, _RETRYABLE)
    shape = _SHAPES_BY_KEY.get(key)
    if shape is None:
        if key < 0:
            return None
        shape = _event_shape(values)
        if len(_SHAPES_BY_KEY) < _SHAPES_MAX:
            _SHAPES_BY_KEY[key] = shape
    return shape


def _event_row(head: Row, event: UpstreamErrorEvent, json_in_sqlite: bool) -> tuple[str, Row]:
    """The statement and the values of one event's row (``head``: record id, seq, request id and
    the write time)."""
    values = field_values(event)
    shape = _plain_event_shape(values) if json_in_sqlite else None
    if shape is not None:
        if shape.float_at is None:
            return shape.sql, (*head, *shape.pick(values))
        number = float.__repr__(values[shape.float_at])
        if number[-1].isdigit():  # not nan or inf, which JSON (and json()) cannot take
            return shape.sql, (*head, *shape.pick(values), number)
    return _PYTHON_JSON, (*head, *_copied(values), event_json(event))


@functools.cache
def sqlite_writes_event_json() -> bool:
    """Whether this SQLite has ``json_object`` and writes the very text ``event_json`` writes (it
    does since 3.38, where the JSON functions became part of every build); else Python does."""
    event = UpstreamErrorEvent(
        at_unix_ms=-1,
        message='\x00\x01\x1f\x7f "q" \\ / \b\f\n\r\t \u00e9 \u2028 \U0001f600',
        duration_ms=0.1 + 0.2,
        attempt=2**62,
        retryable=False,
    )
    names = ", ".join(c.name for c in EVENT_COLUMNS)
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as connection:
            connection.execute(f"CREATE TEMP TABLE {EVENTS_TABLE} ({names})")
            connection.execute(*_event_row(("r", 0, "q", 0), event, json_in_sqlite=True))
            [(text,)] = connection.execute(f"SELECT event FROM {EVENTS_TABLE}").fetchall()  # noqa: S608
    except Exception:
        return False
    return bool(text == event_json(event))


# --- record rows ----------------------------------------------------------------------------------

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


class _RecordShape:
    """The statement for records whose ``None`` fields are at the same places, and how to pick the
    other values of such a row."""

    def __init__(self, types: tuple[type, ...]) -> None:
        kept = [i for i, kind in enumerate(types) if kind is not _NONE]
        marks = ["NULL" if kind is _NONE else "?" for kind in types]
        marks.insert(_UPSTREAM_ERRORS, "NULL")
        self.sql = (
            f"INSERT INTO {RECORDS_TABLE} ({', '.join(_COLUMN_NAMES)}) "  # noqa: S608
            f"VALUES ({', '.join(marks)}) ON CONFLICT (id) DO NOTHING"
        )
        self.pick = None if len(kept) == len(types) else _picker(kept)


#: Record shapes seen (type signature -> shape): a handful in practice, bounded anyway.
_RECORD_SHAPES: dict[tuple[type, ...], _RecordShape] = {}


def _record_shape(row: Row) -> _RecordShape:
    types = tuple(map(type, row))
    shape = _RECORD_SHAPES.get(types)
    if shape is None:
        shape = _RecordShape(types)
        if len(_RECORD_SHAPES) < _SHAPES_MAX:
            _RECORD_SHAPES[types] = shape
    return shape


# --- a batch --------------------------------------------------------------------------------------


class BatchRows:
    """A batch's rows: for each record (the first of each id) its row and its events' rows, each
    with the statement that inserts it.

    ``add`` raises what building a record's rows raises (a value JSON cannot hold ...); the rows
    of earlier records stay.
    """

    def __init__(self, created_at_ms: int) -> None:
        self.created_at_ms = created_at_ms
        #: Record id -> (statement, values) of its row and of each of its events' rows.
        self.records: dict[str, list[tuple[str, Row]]] = {}
        self._json_in_sqlite = sqlite_writes_event_json()

    def add(self, record: RequestRecord) -> None:
        created = self.created_at_ms
        row = (
            *_head(record),
            *_middle(record),
            1 if record.recovered else 0,
            *_tail(record),
            created,
        )
        shape = _record_shape(row)
        key, request_id, json_in_sqlite = record.id, record.request_id, self._json_in_sqlite
        rows = [(shape.sql, row if shape.pick is None else shape.pick(row))]
        rows += [
            _event_row((key, seq, request_id, created), event, json_in_sqlite)
            for seq, event in enumerate(record.upstream_errors)
        ]
        if key not in self.records:
            self.records[key] = rows

    def leave_out(self, ids: set[str]) -> None:
        """Forget the records with these ids (stored already) and their events."""
        for key in ids:
            self.records.pop(key, None)

    def statements(self) -> Iterator[tuple[str, list[Row]]]:
        """Each one-row statement with the values of every row it inserts (records' first); see
        ``insert_rows`` for how they are run."""
        by_sql: dict[str, list[Row]] = {}
        for rows in self.records.values():
            for sql, values in rows:
                same = by_sql.get(sql)
                if same is None:
                    by_sql[sql] = [values]
                else:
                    same.append(values)
        return iter(by_sql.items())


# --- running the statements -----------------------------------------------------------------------

#: At most this many rows in one ``INSERT``; ``insert_rows`` also keeps under SQLite's limit on
#: bound parameters.
ROWS_PER_STATEMENT: Final = 256
_NUMBERED_PARAMETER = re.compile(r"\?(\d+)")


def insert_rows(connection: sqlite3.Connection, sql: str, rows: Sequence[Row]) -> None:
    """Insert ``rows`` with the one-row statement ``sql``, many rows a statement.

    ``executemany`` steps once a row, and the ``sqlite3`` module lets go of the interpreter lock
    around every step: while the app's threads keep the lock busy, the writer waits a switch
    interval (5 ms) to get it back after each row, and a batch of 256 records with 3 events each
    took seconds. A statement of many rows is one step. (It keeps a statement journal, as it may
    fail half-way; the sink's connections hold that in memory, ``PRAGMA temp_store = MEMORY``.)
    The sizes of the statements are powers of four, so that a few texts serve every batch from the
    statement cache.
    """
    if not rows:
        return
    width = len(rows[0])
    limit = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // max(width, 1)
    size = min(ROWS_PER_STATEMENT, max(limit, 1))
    done = 0
    while done < len(rows):
        left = len(rows) - done
        while size > left:
            size //= 4
        size = max(size, 1)
        if size == 1:
            connection.executemany(sql, rows[done:])
            return
        chunk = rows[done : done + size]
        connection.execute(_multi_row_sql(sql, size, width), list(chain.from_iterable(chunk)))
        done += size


@functools.lru_cache(maxsize=64)
def _multi_row_sql(sql: str, rows: int, width: int) -> str:
    """``sql`` (``INSERT ... VALUES (...)`` with an optional ``ON CONFLICT`` clause) for ``rows``
    rows of ``width`` parameters each, bound row after row.

    With anonymous parameters (``?``) the row is repeated. With numbered ones (``?3``, which an
    event's statement uses twice: in its column and in its JSON) the rows become a ``VALUES`` table
    of anonymous parameters that the row's expressions read by column (``?3`` is ``column3``): the
    same rows, but SQLite looks every numbered parameter up in a list of those it has seen, so a
    256-row statement numbered row by row took 50-60 ms to prepare (170 ms for the first batch of
    three shapes of event, on every new connection), and this one 2 ms; its batches also ran a
    quarter faster.
    """
    start = sql.index(" VALUES (") + len(" VALUES ")
    conflict = sql.find(" ON CONFLICT ", start)
    end = len(sql) if conflict < 0 else conflict
    values = sql[start:end]
    if not _NUMBERED_PARAMETER.search(values):  # anonymous "?": numbered in order of appearance
        return sql[:start] + ", ".join([values] * rows) + sql[end:]
    numbers = {int(number) for number in _NUMBERED_PARAMETER.findall(values)}
    if not numbers <= set(range(1, width + 1)):
        raise ValueError(f"parameters {sorted(numbers)} of a {width}-value row in {sql!r}")
    expressions = _NUMBERED_PARAMETER.sub(r"column\1", values.strip()[1:-1])
    row = f"({', '.join(['?'] * width)})"
    # "WHERE true" keeps an ON CONFLICT clause from being read as a join's (SQLite's docs).
    head = sql[: start - len(" VALUES ")]  # INSERT INTO table (columns)
    table = ", ".join([row] * rows)
    tail = "" if conflict < 0 else f" WHERE true{sql[conflict:]}"
    return f"{head} SELECT {expressions} FROM (VALUES {table}){tail}"  # noqa: S608 - our own text
