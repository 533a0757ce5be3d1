"""The SQL shared by the database sinks: schema, row mapping, query validation and query text.

SQLite and PostgreSQL must return identical results for identical data, so everything that decides
a result lives here once: the column lists, how a record becomes rows and a row becomes a record,
the argument rules and the ``SELECT`` statements. A store supplies only its placeholder (``?`` or
``%s``), its type names and its connection handling. The SQL is deliberately plain (no JSON
operators, no dialect functions) so both engines run it unchanged. Table and column names come from
the constants here; every value is a bound parameter.

Two portability notes for a second store: ``ORDER BY ... id DESC`` compares ids bytewise in SQLite,
so PostgreSQL must order with ``COLLATE "C"`` (the ``text_order`` argument); and booleans are passed
as Python ``bool`` and read back with ``bool()``, which both drivers handle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, NamedTuple

from upstream_ops.defaults import QUERY_LIMIT_MAX
from upstream_ops.events import UpstreamErrorEvent, unmarshal_upstream_errors
from upstream_ops.record import RECORD_FIELDS, RequestRecord

RECORDS_TABLE: Final = "ops_error_logs"
EVENTS_TABLE: Final = "ops_upstream_error_events"
SCHEMA_TABLE: Final = "upstream_ops_schema"
#: The schema this code writes; a store records it in ``SCHEMA_TABLE`` and migrates older ones up.
#: 1: the tables and indexes of ``schema_ddl``. 2: ``UNUSED_INDEXES`` are gone, and a record row
#: written from now on leaves ``upstream_errors`` NULL: its events are stored once, in the events
#: table (see ``records_from_rows``). 3: in SQLite, ``SQLITE_UNSERVED_INDEXES`` are gone too
#: (PostgreSQL keeps them: nothing changes there).
SCHEMA_VERSION: Final = 3
SCHEMA_TABLE_DDL: Final = f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version INTEGER NOT NULL)"
SELECT_SCHEMA_VERSION: Final = f"SELECT MAX(version) FROM {SCHEMA_TABLE}"  # noqa: S608 (constants)
#: Run after the migrations, in their transaction: the table holds one row, the current version.
SET_SCHEMA_VERSION: Final = (
    f"DELETE FROM {SCHEMA_TABLE}",  # noqa: S608 (constants only)
    f"INSERT INTO {SCHEMA_TABLE} (version) VALUES ({SCHEMA_VERSION})",  # noqa: S608 (constants only)
)

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


class Column(NamedTuple):
    """A column with a portable type: ``text``, ``bigint``, ``double``, ``bool`` or ``json``.

    ``json`` holds JSON text: ``TEXT`` in SQLite, ``JSONB`` in PostgreSQL (read back as text).
    """

    name: str
    type: str
    not_null: bool = False


#: ``ops_error_logs``: every ``RequestRecord`` field in its declared order, then the write time.
RECORD_COLUMNS: Final = (
    Column("id", "text", not_null=True),
    Column("request_id", "text", not_null=True),
    Column("service", "text"),
    Column("method", "text"),
    Column("path", "text"),
    Column("route", "text"),
    Column("status_code", "bigint"),
    Column("duration_ms", "double"),
    Column("started_at_ms", "bigint", not_null=True),
    Column("upstream_status_code", "bigint"),
    Column("upstream_error_message", "text"),
    Column("upstream_error_detail", "text"),
    # Schema 1: marshal_upstream_errors(), a JSON array, NULL when none. From schema 2 on, NULL:
    # the events are in EVENTS_TABLE only (records_from_rows puts them back).
    Column("upstream_errors", "json"),
    Column("dropped_events", "bigint"),
    Column("error", "text"),
    Column("recovered", "bool"),
    Column("trace_id", "text"),
    Column("span_id", "text"),
    Column("created_at_ms", "bigint", not_null=True),
)
RECORD_PRIMARY_KEY: Final = ("id",)
#: The columns ``record_from_row`` reads, in ``RequestRecord`` field order.
RECORD_SELECT_COLUMNS: Final = RECORD_FIELDS

#: ``ops_upstream_error_events``: one row per event; ``event`` keeps the full JSON so no field is
#: lost. The scalar columns exist for filtering and hold NULL where the event field is empty.
EVENT_COLUMNS: Final = (
    Column("record_id", "text", not_null=True),
    Column("seq", "bigint", not_null=True),
    Column("request_id", "text", not_null=True),
    Column("at_unix_ms", "bigint", not_null=True),
    Column("platform", "text"),
    Column("account_id", "bigint"),
    Column("model", "text"),
    Column("upstream_status_code", "bigint"),
    Column("upstream_request_id", "text"),
    Column("kind", "text"),
    Column("error_class", "text"),
    Column("message", "text"),
    Column("detail", "text"),
    Column("event", "json", not_null=True),
    Column("created_at_ms", "bigint", not_null=True),
)
EVENT_PRIMARY_KEY: Final = ("record_id", "seq")

#: Index name -> (table, columns) of schema 1, chosen for the time-window queries below; schema 2
#: drops ``UNUSED_INDEXES``.
INDEXES: Final = {
    "ops_error_logs_started_at_idx": (RECORDS_TABLE, ("started_at_ms",)),
    "ops_error_logs_request_id_idx": (RECORDS_TABLE, ("request_id",)),
    "ops_error_logs_status_started_idx": (RECORDS_TABLE, ("upstream_status_code", "started_at_ms")),
    "ops_upstream_error_events_at_idx": (EVENTS_TABLE, ("at_unix_ms",)),
    "ops_upstream_error_events_platform_at_idx": (EVENTS_TABLE, ("platform", "at_unix_ms")),
    "ops_upstream_error_events_kind_at_idx": (EVENTS_TABLE, ("kind", "at_unix_ms")),
    "ops_upstream_error_events_status_at_idx": (
        EVENTS_TABLE,
        ("upstream_status_code", "at_unix_ms"),
    ),
    "ops_upstream_error_events_request_id_idx": (EVENTS_TABLE, ("request_id",)),
}
#: Indexes no query uses, which cost every write an insert (a random-place one for the first): an
#: event's ``request_id`` is only searched with ``LIKE '%...%'``, which no b-tree serves, and a
#: record's ``upstream_status_code`` only in ``... OR EXISTS (events)``, which no index serves.
UNUSED_INDEXES: Final = (
    "ops_upstream_error_events_request_id_idx",
    "ops_error_logs_status_started_idx",
)


#: Indexes that cost a SQLite write more than they serve its reads: three b-tree inserts per event
#: (a quarter of the CPU time of a write), for filtered event lists only. Without statistics, SQLite
#: also picks them for the ``EXISTS`` that filters records by their events (``e.record_id = r.id AND
#: e.platform = ?``), scanning every event of that platform for each record: a records search
#: filtered on a common platform grew with records x events (2 s at 30,000 records, 2 ms without).
#: Without them, a filtered event list reads the window through ``at_unix_ms`` instead (about 0.2
#: µs per event of the window). PostgreSQL plans with statistics and keeps them.
SQLITE_UNSERVED_INDEXES: Final = (
    "ops_upstream_error_events_platform_at_idx",
    "ops_upstream_error_events_kind_at_idx",
    "ops_upstream_error_events_status_at_idx",
)


def schema_ddl(type_names: Mapping[str, str]) -> list[str]:
    """``CREATE ... IF NOT EXISTS`` statements for both tables and their indexes.

    ``type_names`` maps the portable types to the engine's, e.g. ``{"bool": "BOOLEAN", ...}``.
    """
    statements = [
        _table_ddl(RECORDS_TABLE, RECORD_COLUMNS, RECORD_PRIMARY_KEY, type_names),
        _table_ddl(EVENTS_TABLE, EVENT_COLUMNS, EVENT_PRIMARY_KEY, type_names),
    ]
    for name, (table, columns) in INDEXES.items():
        statements.append(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({', '.join(columns)})")
    return statements


def schema_2_ddl() -> list[str]:
    """Schema 1 to 2: drop ``UNUSED_INDEXES``. (Rows keep their ``upstream_errors``; new ones do
    not write it, which needs no DDL.)"""
    return [f"DROP INDEX IF EXISTS {name}" for name in UNUSED_INDEXES]


def schema_3_sqlite_ddl() -> list[str]:
    """Schema 2 to 3 in SQLite: drop ``SQLITE_UNSERVED_INDEXES``."""
    return [f"DROP INDEX IF EXISTS {name}" for name in SQLITE_UNSERVED_INDEXES]


def _table_ddl(
    table: str,
    columns: Sequence[Column],
    primary_key: Sequence[str],
    type_names: Mapping[str, str],
) -> str:
    parts = [f"{c.name} {type_names[c.type]}{' NOT NULL' if c.not_null else ''}" for c in columns]
    parts.append(f"PRIMARY KEY ({', '.join(primary_key)})")
    return f"CREATE TABLE IF NOT EXISTS {table} (\n    " + ",\n    ".join(parts) + "\n)"


def insert_record_sql(placeholder: str) -> str:
    """Insert one record row unless its id is stored already (a retried batch).

    ``ON CONFLICT (id) DO NOTHING`` (SQLite 3.24+, PostgreSQL 9.5+) rather than SQLite's ``INSERT OR
    IGNORE``: the latter also swallows NOT NULL violations, so a record with a NULL id or time would
    vanish without an error. Here only the duplicate id is ignored; the row count tells which.
    """
    return _insert_sql(RECORDS_TABLE, RECORD_COLUMNS, placeholder) + " ON CONFLICT (id) DO NOTHING"


def insert_event_sql(placeholder: str) -> str:
    """Insert one event row (only ever for a record row inserted in the same transaction)."""
    return _insert_sql(EVENTS_TABLE, EVENT_COLUMNS, placeholder)


def _insert_sql(table: str, columns: Sequence[Column], placeholder: str) -> str:
    names = ", ".join(c.name for c in columns)
    marks = ", ".join(placeholder for _ in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({marks})"  # noqa: S608 (constants only)


# --- rows <-> records -----------------------------------------------------------------------------


def event_rows(record: RequestRecord, created_at_ms: int) -> list[tuple[Any, ...]]:
    """The ``EVENT_COLUMNS`` values of each event of one record, ``seq`` being its position."""
    return [
        (
            record.id,
            seq,
            record.request_id,
            event.at_unix_ms,
            event.platform or None,
            event.account_id or None,
            event.model or None,
            event.upstream_status_code or None,
            event.upstream_request_id or None,
            event.kind or None,
            event.error_class or None,
            event.message or None,
            event.detail or None,
            event_json(event),
            created_at_ms,
        )
        for seq, event in enumerate(record.upstream_errors)
    ]


def record_rows(
    record: RequestRecord, created_at_ms: int
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """The ``RECORD_COLUMNS`` values of one record and ``event_rows``.

    ``upstream_errors`` is NULL in the record row: each event's JSON is stored once, in its event
    row (schema 2). Writing it twice cost a third of the bytes of a record.
    """
    values = list(_RECORD_VALUES(record))  # RECORD_COLUMNS are the fields, then created_at_ms
    values[_ROW_UPSTREAM_ERRORS] = None
    values[_ROW_RECOVERED] = bool(values[_ROW_RECOVERED])
    values.append(created_at_ms)
    return tuple(values), event_rows(record, created_at_ms)


_RECORD_VALUES: Final = attrgetter(*RECORD_FIELDS)
_ROW_UPSTREAM_ERRORS: Final = RECORD_FIELDS.index("upstream_errors")
_ROW_RECOVERED: Final = RECORD_FIELDS.index("recovered")
if tuple(c.name for c in RECORD_COLUMNS) != (*RECORD_FIELDS, "created_at_ms"):
    raise AssertionError("RECORD_COLUMNS must be the RequestRecord fields, then created_at_ms")


def event_json(event: UpstreamErrorEvent) -> str:
    """One event as compact JSON, the same shape as an item of ``marshal_upstream_errors``."""
    return _EVENT_ENCODER(event.to_dict())


#: ``json.dumps`` with these options, without building an encoder for every event.
_EVENT_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


#: Where ``RECORD_SELECT_COLUMNS`` puts the id and the events' array.
_ID_INDEX: Final = RECORD_SELECT_COLUMNS.index("id")
_UPSTREAM_ERRORS_INDEX: Final = RECORD_SELECT_COLUMNS.index("upstream_errors")
#: The events of some records, ``{}`` standing for the placeholders of their ids.
_EVENTS_OF_RECORDS: Final = (
    f"SELECT record_id, event FROM {EVENTS_TABLE} WHERE record_id IN ({{}}) "  # noqa: S608
    "ORDER BY record_id, seq"
)
#: Ids per ``IN (...)`` list of a statement (SQLite before 3.32 allows 999 parameters).
IDS_PER_STATEMENT: Final = 500


def records_from_rows(
    rows: Sequence[Sequence[Any]],
    run: Callable[[str, Sequence[Any]], Sequence[Sequence[Any]]],
    placeholder: str,
) -> list[RequestRecord]:
    """Rebuild records from rows selected as ``RECORD_SELECT_COLUMNS``, with their events.

    A row written with schema 1 holds its events' array; a later one holds NULL, and its events
    come from the events table: one more statement (``run(sql, params) -> rows``) for all such rows
    of a page, joined into the very array schema 1 stored. A record without events is NULL either
    way and finds none.
    """
    missing = [row[_ID_INDEX] for row in rows if row[_UPSTREAM_ERRORS_INDEX] is None]
    events: dict[str, list[str]] = {}
    for start in range(0, len(missing), IDS_PER_STATEMENT):
        ids = missing[start : start + IDS_PER_STATEMENT]
        sql = _EVENTS_OF_RECORDS.format(", ".join(placeholder for _ in ids))
        for record_id, event in run(sql, ids):
            events.setdefault(record_id, []).append(event)
    records = []
    for row in rows:
        found = events.get(row[_ID_INDEX]) if row[_UPSTREAM_ERRORS_INDEX] is None else None
        if found:
            row = list(row)
            row[_UPSTREAM_ERRORS_INDEX] = "[" + ",".join(found) + "]"
        records.append(record_from_row(row))
    return records


def record_from_row(row: Sequence[Any]) -> RequestRecord:
    """Rebuild a record from a row selected as ``RECORD_SELECT_COLUMNS``."""
    values = dict(zip(RECORD_SELECT_COLUMNS, row, strict=True))
    values["upstream_errors"] = unmarshal_upstream_errors(values["upstream_errors"])
    values["recovered"] = bool(values["recovered"])
    return RequestRecord(**values)


def event_from_row(row: Sequence[Any]) -> UpstreamErrorEvent:
    """Rebuild an event from a row selected as ``(event,)``."""
    return UpstreamErrorEvent.from_dict(json.loads(row[0]))


# --- queries --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """Validated arguments of ``Store.query_records`` / ``Store.query_events``."""

    start_ms: int
    end_ms: int
    platform: str | None
    status_code: int | None
    kind: str | None
    limit: int


def validate_query(
    start_ms: object,
    end_ms: object,
    platform: object,
    status_code: object,
    kind: object,
    limit: object,
) -> Query:
    """Check the arguments of a query; a bad one raises ``ValueError`` naming it.

    Times are 64-bit integers (Unix milliseconds) with ``start_ms <= end_ms``; ``platform`` and
    ``kind`` are non-empty strings or ``None``; ``status_code`` is a positive integer or ``None`` (0
    means "no status" in an event, so it filters nothing); ``1 <= limit <= QUERY_LIMIT_MAX``. A
    ``bool`` is not an integer here.
    """
    time = "a 64-bit integer (Unix milliseconds)"
    start = _int("start_ms", start_ms, _INT64_MIN, _INT64_MAX, time)
    end = _int("end_ms", end_ms, _INT64_MIN, _INT64_MAX, time)
    if start > end:
        raise ValueError(f"start_ms must be <= end_ms, got start_ms={start} > end_ms={end}")
    if status_code is not None:
        status_code = _int("status_code", status_code, 1, _INT64_MAX, "a positive integer or None")
    return Query(
        start_ms=start,
        end_ms=end,
        platform=_label("platform", platform),
        status_code=status_code,
        kind=_label("kind", kind),
        limit=_int("limit", limit, 1, QUERY_LIMIT_MAX, f"an integer from 1 to {QUERY_LIMIT_MAX}"),
    )


def _int(name: str, value: object, low: int, high: int, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be {expected}, got {value!r:.60}")
    return value


def _label(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string or None, got {value!r:.60}")
    return value


def records_select(query: Query, placeholder: str, text_order: str = "") -> tuple[str, list[Any]]:
    """SQL and parameters for ``query_records``: newest first, window on ``started_at_ms``.

    ``status_code`` matches the record's summary status or any of its events' statuses; ``platform``
    and ``kind`` each match when any event of the record has them (not necessarily the same event).
    ``text_order`` is appended to the ``id`` sort key (PostgreSQL: ``' COLLATE "C"'``).
    """
    p = placeholder
    where = [f"r.started_at_ms >= {p}", f"r.started_at_ms < {p}"]
    params: list[Any] = [query.start_ms, query.end_ms]
    if query.status_code is not None:
        where.append(f"(r.upstream_status_code = {p} OR {_any_event('upstream_status_code', p)})")
        params += [query.status_code, query.status_code]
    if query.platform is not None:
        where.append(_any_event("platform", p))
        params.append(query.platform)
    if query.kind is not None:
        where.append(_any_event("kind", p))
        params.append(query.kind)
    columns = ", ".join(f"r.{name}" for name in RECORD_SELECT_COLUMNS)
    sql = (
        f"SELECT {columns} FROM {RECORDS_TABLE} r WHERE {' AND '.join(where)} "  # noqa: S608
        f"ORDER BY r.started_at_ms DESC, r.id{text_order} DESC LIMIT {p}"
    )
    params.append(query.limit)
    return sql, params


def _any_event(column: str, placeholder: str) -> str:
    """A condition true when some event of record ``r`` has ``column = placeholder``."""
    return (
        f"EXISTS (SELECT 1 FROM {EVENTS_TABLE} e "  # noqa: S608
        f"WHERE e.record_id = r.id AND e.{column} = {placeholder})"
    )


def events_select(query: Query, placeholder: str, text_order: str = "") -> tuple[str, list[Any]]:
    """SQL and parameters for ``query_events``: events newest first, window on ``at_unix_ms``.

    Every filter applies to the event itself (``status_code`` is the event's own upstream status).
    Ties on time are ordered by ``record_id`` then ``seq``, both descending.
    """
    p = placeholder
    where = [f"e.at_unix_ms >= {p}", f"e.at_unix_ms < {p}"]
    params: list[Any] = [query.start_ms, query.end_ms]
    for column, value in (
        ("platform", query.platform),
        ("upstream_status_code", query.status_code),
        ("kind", query.kind),
    ):
        if value is not None:
            where.append(f"e.{column} = {p}")
            params.append(value)
    sql = (
        f"SELECT e.event FROM {EVENTS_TABLE} e WHERE {' AND '.join(where)} "  # noqa: S608
        f"ORDER BY e.at_unix_ms DESC, e.record_id{text_order} DESC, e.seq DESC LIMIT {p}"
    )
    params.append(query.limit)
    return sql, params
