"""Search, pagination and statistics SQL shared by the database stores: the ops read side.

Like ``_query``, everything that decides a result lives here once. A store passes a ``Dialect``
(its placeholder, how it sorts ids bytewise, its case-insensitive ``LIKE``, its integer division)
and a ``run(sql, params) -> rows`` callable; the functions here build the statements, run them and
turn rows into the ``upstream_ops.store`` types. Every value from a caller is a bound parameter;
the only literals in the SQL are this module's own constants (class names, status codes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from upstream_ops.classify import ERROR_CLASSES, error_class_for_status
from upstream_ops.defaults import (
    QUERY_LIMIT,
    QUERY_LIMIT_MAX,
    STATS_MAX_BUCKETS,
    STATS_TOP_MESSAGES,
)
from upstream_ops.events import REQUEST_ERROR
from upstream_ops.record import RequestRecord
from upstream_ops.sinks._query import (
    EVENTS_TABLE,
    RECORD_SELECT_COLUMNS,
    RECORDS_TABLE,
    event_from_row,
    records_from_rows,
)
from upstream_ops.store import (
    GROUP_BY,
    EventKey,
    EventPage,
    GroupBy,
    MessageCount,
    QueryFilter,
    RecordKey,
    RecordPage,
    Stats,
    StatsBucket,
    StatsGroup,
    StoredEvent,
)

#: Runs one statement with its parameters and returns all rows.
Run = Callable[[str, Sequence[Any]], Sequence[Sequence[Any]]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the engines for these queries.

    ``text_order`` follows an id in ``ORDER BY`` and keyset comparisons so ids compare bytewise
    (PostgreSQL: ``' COLLATE "C"'``). ``like`` is the case-insensitive ``LIKE`` (SQLite's ``LIKE``
    already folds ASCII; PostgreSQL has ``ILIKE``). ``int_div`` divides two integer expressions
    truncating (both engines' ``/`` on integers does).
    """

    placeholder: str
    text_order: str = ""
    like: str = "LIKE"
    int_div: str = "({a} / {b})"


SQLITE: Final = Dialect("?")
POSTGRES: Final = Dialect("%s", text_order=' COLLATE "C"', like="ILIKE")

_RECORD_COLUMNS: Final = ", ".join(f"r.{name}" for name in RECORD_SELECT_COLUMNS)


class _Where:
    """``AND``-ed conditions and their parameters; ``{}`` in a condition is a placeholder."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.conditions: list[str] = []
        self.params: list[Any] = []

    def add(self, condition: str, *params: Any) -> None:
        self.conditions.append(condition.format(*(self.dialect.placeholder for _ in params)))
        self.params.extend(params)

    def marks(self, n: int) -> str:
        """``{}, {}, ...`` for an ``IN`` list of ``n`` values."""
        return ", ".join("{}" for _ in range(n))

    def sql(self) -> str:
        return " AND ".join(self.conditions) if self.conditions else "1 = 1"


def _pattern(text: str) -> str:
    """A ``LIKE ... ESCAPE '\\'`` pattern matching ``text`` anywhere, wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _event_exists(w: _Where, condition: str, *params: Any) -> None:
    """Some event of record ``r`` satisfies ``condition`` (over alias ``e``)."""
    w.add(
        f"EXISTS (SELECT 1 FROM {EVENTS_TABLE} e WHERE e.record_id = r.id AND ({condition}))",  # noqa: S608
        *params,
    )


def _record_where(filters: QueryFilter, dialect: Dialect) -> _Where:
    """Conditions over record ``r`` (see ``Store`` for what each filter tests)."""
    w = _Where(dialect)
    w.add("r.started_at_ms >= {}", filters.start_ms)
    w.add("r.started_at_ms < {}", filters.end_ms)
    if codes := filters.status_codes:
        marks = w.marks(len(codes))
        w.add(
            f"(r.upstream_status_code IN ({marks}) OR EXISTS (SELECT 1 FROM {EVENTS_TABLE} e "  # noqa: S608
            f"WHERE e.record_id = r.id AND e.upstream_status_code IN ({marks})))",
            *codes,
            *codes,
        )
    for column in ("platform", "kind", "account_id"):
        value = getattr(filters, column)
        if value is not None:
            _event_exists(w, f"e.{column} = {{}}", value)
    if filters.route is not None:
        w.add("r.route = {}", filters.route)
    if filters.recovered is not None:
        w.add("r.recovered = {}", filters.recovered)
    if filters.q is not None:
        like = f"{dialect.like} {{}} ESCAPE '\\'"
        pattern = _pattern(filters.q)
        w.add(
            f"(r.request_id {like} OR r.upstream_error_message {like} OR EXISTS (SELECT 1 FROM "  # noqa: S608
            f"{EVENTS_TABLE} e WHERE e.record_id = r.id AND (e.message {like} OR "
            f"e.upstream_request_id {like})))",
            *([pattern] * 4),
        )
    return w


def _event_where(filters: QueryFilter, dialect: Dialect) -> _Where:
    """Conditions over event ``e`` (see ``Store`` for what each filter tests)."""
    w = _Where(dialect)
    w.add("e.at_unix_ms >= {}", filters.start_ms)
    w.add("e.at_unix_ms < {}", filters.end_ms)
    if codes := filters.status_codes:
        w.add(f"e.upstream_status_code IN ({w.marks(len(codes))})", *codes)
    for column in ("platform", "kind", "account_id"):
        value = getattr(filters, column)
        if value is not None:
            w.add(f"e.{column} = {{}}", value)
    record_conditions = []
    record_params: list[Any] = []
    if filters.route is not None:
        record_conditions.append("r.route = {}")
        record_params.append(filters.route)
    if filters.recovered is not None:
        record_conditions.append("r.recovered = {}")
        record_params.append(filters.recovered)
    if record_conditions:
        w.add(
            f"EXISTS (SELECT 1 FROM {RECORDS_TABLE} r WHERE r.id = e.record_id AND "  # noqa: S608
            f"{' AND '.join(record_conditions)})",
            *record_params,
        )
    if filters.q is not None:
        like = f"{dialect.like} {{}} ESCAPE '\\'"
        w.add(
            f"(e.message {like} OR e.upstream_request_id {like} OR e.request_id {like})",
            *([_pattern(filters.q)] * 3),
        )
    return w


def _limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= QUERY_LIMIT_MAX:
        raise ValueError(f"limit must be an integer from 1 to {QUERY_LIMIT_MAX}, got {limit!r:.60}")
    return limit


def _check_key(after: object, types: tuple[type, ...], shape: str) -> None:
    if not (
        isinstance(after, tuple)
        and len(after) == len(types)
        and all(
            isinstance(v, t) and not isinstance(v, bool) for v, t in zip(after, types, strict=True)
        )
    ):
        raise ValueError(f"after must be None or a tuple {shape}, got {after!r:.80}")


# --- records and events -----------------------------------------------------------------------


def search_records(
    run: Run,
    dialect: Dialect,
    filters: QueryFilter,
    *,
    limit: int,
    after: RecordKey | None,
) -> RecordPage:
    """``Store.search_records``: one page, newest first, keyed on ``(started_at_ms, id)``."""
    limit = _limit(limit)
    w = _record_where(filters, dialect)
    order = dialect.text_order
    if after is not None:
        _check_key(after, (int, str), "(started_at_ms, id)")
        w.add(
            f"(r.started_at_ms < {{}} OR (r.started_at_ms = {{}} AND r.id{order} < {{}}))",
            after[0],
            after[0],
            after[1],
        )
    p = dialect.placeholder
    sql = (
        f"SELECT {_RECORD_COLUMNS} FROM {RECORDS_TABLE} r WHERE {w.sql()} "  # noqa: S608
        f"ORDER BY r.started_at_ms DESC, r.id{order} DESC LIMIT {p}"
    )
    rows = run(sql, [*w.params, limit + 1])
    records = records_from_rows(rows[:limit], run, dialect.placeholder)
    more = len(rows) > limit
    return RecordPage(records, (records[-1].started_at_ms, records[-1].id) if more else None)


def search_events(
    run: Run,
    dialect: Dialect,
    filters: QueryFilter,
    *,
    limit: int,
    after: EventKey | None,
) -> EventPage:
    """``Store.search_events``: one page, newest first, keyed on ``(at_unix_ms, record_id, seq)``."""
    limit = _limit(limit)
    w = _event_where(filters, dialect)
    order = dialect.text_order
    if after is not None:
        _check_key(after, (int, str, int), "(at_unix_ms, record_id, seq)")
        at, record_id, seq = after
        w.add(
            f"(e.at_unix_ms < {{}} OR (e.at_unix_ms = {{}} AND (e.record_id{order} < {{}} OR "
            f"(e.record_id = {{}} AND e.seq < {{}}))))",
            at,
            at,
            record_id,
            record_id,
            seq,
        )
    p = dialect.placeholder
    sql = (
        f"SELECT e.record_id, e.seq, e.request_id, e.event FROM {EVENTS_TABLE} e "  # noqa: S608
        f"WHERE {w.sql()} ORDER BY e.at_unix_ms DESC, e.record_id{order} DESC, e.seq DESC "
        f"LIMIT {p}"
    )
    rows = run(sql, [*w.params, limit + 1])
    events = [
        StoredEvent(row[0], int(row[1]), row[2], event_from_row(row[3:])) for row in rows[:limit]
    ]
    more = len(rows) > limit
    return EventPage(events, events[-1].key if more else None)


def get_record(run: Run, dialect: Dialect, request_id: str) -> RequestRecord | None:
    """``Store.get_record``: the newest record with ``request_id``."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r:.60}")
    p, order = dialect.placeholder, dialect.text_order
    sql = (
        f"SELECT {_RECORD_COLUMNS} FROM {RECORDS_TABLE} r WHERE r.request_id = {p} "  # noqa: S608
        f"ORDER BY r.started_at_ms DESC, r.id{order} DESC LIMIT 1"
    )
    rows = run(sql, [request_id])
    return records_from_rows(rows, run, p)[0] if rows else None


# --- stats --------------------------------------------------------------------------------------


def _literal(name: str) -> str:
    """A SQL string literal of one of this module's own names (never of caller data)."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise AssertionError(f"not a plain name: {name!r}")
    return f"'{name}'"


#: The class of a status in each hundred, unless ``error_class_for_status`` says otherwise.
_RANGE_CLASSES: Final = {4: "client_error", 5: "server_error"}


def _status_class_sql(status: str) -> str:
    """A ``CASE`` giving ``error_class_for_status(status)`` (``NULL`` where that is ``""``), built
    from that function so the SQL and the classifier cannot drift apart."""
    special: dict[str, list[int]] = {}
    for code in range(400, 600):
        error_class = error_class_for_status(code)
        if error_class != _RANGE_CLASSES[code // 100]:
            special.setdefault(error_class, []).append(code)
    whens = [
        f"WHEN {status} IN ({', '.join(map(str, codes))}) THEN {_literal(name)}"
        for name, codes in special.items()
    ]
    whens += [
        f"WHEN {status} >= {hundred * 100} AND {status} < {hundred * 100 + 100} THEN {_literal(name)}"
        for hundred, name in _RANGE_CLASSES.items()
    ]
    return f"CASE {' '.join(whens)} END"


#: ``error_class`` grouping: the event's own class, else the one its status implies.
_CLASS_SQL: Final = f"COALESCE(e.error_class, {_status_class_sql('e.upstream_status_code')})"

#: Error class -> ``category`` (``store.CATEGORIES``). The transport classes are the RFC 9209 ones of
#: ``classify.ERROR_CLASSES``; an event without a class is ``transport`` when its kind says the
#: request failed (``request_error``), else ``other``.
CATEGORY_OF_CLASS: Final = {
    "rate_limited": "rate_limited",
    "overloaded": "overloaded",
    "server_error": "server_error",
    "client_error": "client_error",
    "auth": "client_error",
    **{
        name: "transport"
        for name, applies_to, _ in ERROR_CLASSES
        if applies_to.endswith("(RFC 9209)")
    },
}
_CATEGORY_SQL: Final = (
    f"CASE {_CLASS_SQL} "
    + " ".join(f"WHEN {_literal(c)} THEN {_literal(cat)}" for c, cat in CATEGORY_OF_CLASS.items())
    + f" ELSE CASE WHEN e.kind = {_literal(REQUEST_ERROR)} THEN 'transport' ELSE 'other' END END"
)

_GROUP_SQL: Final[dict[str, str]] = {
    "platform": "e.platform",
    "status_code": "e.upstream_status_code",
    "kind": "e.kind",
    "error_class": _CLASS_SQL,
    "category": _CATEGORY_SQL,
}

_TOP_MESSAGES_MAX: Final = 100


def stats(
    run: Run,
    dialect: Dialect,
    filters: QueryFilter,
    *,
    bucket_ms: int,
    group_by: GroupBy,
    top_messages: int,
) -> Stats:
    """``Store.stats``: three aggregate queries (events by bucket and group, record totals, top
    messages); empty buckets are filled in here."""
    if isinstance(bucket_ms, bool) or not isinstance(bucket_ms, int) or bucket_ms < 1:
        raise ValueError(f"bucket_ms must be a positive integer, got {bucket_ms!r:.60}")
    if group_by not in _GROUP_SQL:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r:.60}")
    if (
        isinstance(top_messages, bool)
        or not isinstance(top_messages, int)
        or not 0 <= top_messages <= _TOP_MESSAGES_MAX
    ):
        raise ValueError(
            f"top_messages must be an integer from 0 to {_TOP_MESSAGES_MAX}, got {top_messages!r:.60}"
        )
    origin = filters.start_ms - filters.start_ms % bucket_ms
    count = -(-(filters.end_ms - origin) // bucket_ms) if filters.end_ms > filters.start_ms else 0
    if count > STATS_MAX_BUCKETS:
        raise ValueError(
            f"bucket_ms={bucket_ms} cuts this window into {count} buckets, more than "
            f"{STATS_MAX_BUCKETS}: choose a wider bucket or a shorter window"
        )
    p, order = dialect.placeholder, dialect.text_order

    w = _event_where(filters, dialect)
    offset = dialect.int_div.format(a=f"(e.at_unix_ms - {p})", b=p)
    sql = (
        f"SELECT bucket, grp, COUNT(*) FROM (SELECT {p} + {offset} * {p} AS bucket, "  # noqa: S608
        f"{_GROUP_SQL[group_by]} AS grp FROM {EVENTS_TABLE} e WHERE {w.sql()}) AS counted "
        "GROUP BY bucket, grp"
    )
    rows = run(sql, [origin, origin, bucket_ms, bucket_ms, *w.params])
    by_bucket: dict[int, dict[StatsGroup, int]] = {}
    groups: dict[StatsGroup, int] = {}
    for bucket, group, n in rows:
        by_bucket.setdefault(int(bucket), {})[group] = int(n)
        groups[group] = groups.get(group, 0) + int(n)

    rw = _record_where(filters, dialect)
    totals = run(
        f"SELECT COUNT(*), SUM(CASE WHEN r.recovered THEN 1 ELSE 0 END) FROM {RECORDS_TABLE} r "  # noqa: S608
        f"WHERE {rw.sql()}",
        rw.params,
    )
    records, recovered = totals[0] if totals else (0, 0)

    top: list[MessageCount] = []
    if top_messages:
        mw = _event_where(filters, dialect)
        mw.add("e.message IS NOT NULL")
        top = [
            MessageCount(str(message), int(n), int(last))
            for message, n, last in run(
                f"SELECT e.message, COUNT(*), MAX(e.at_unix_ms) FROM {EVENTS_TABLE} e "  # noqa: S608
                f"WHERE {mw.sql()} GROUP BY e.message "
                f"ORDER BY COUNT(*) DESC, MAX(e.at_unix_ms) DESC, e.message{order} LIMIT {p}",
                [*mw.params, top_messages],
            )
        ]
    return Stats(
        start_ms=filters.start_ms,
        end_ms=filters.end_ms,
        bucket_ms=bucket_ms,
        group_by=group_by,
        buckets=[
            StatsBucket(start, dict(sorted(by_bucket.get(start, {}).items(), key=_largest_first)))
            for start in range(origin, origin + count * bucket_ms, bucket_ms)
        ],
        groups=dict(sorted(groups.items(), key=_largest_first)),
        events=sum(groups.values()),
        records=int(records or 0),
        recovered_records=int(recovered or 0),
        top_messages=top,
    )


def _largest_first(item: tuple[StatsGroup, int]) -> tuple[int, bool, str]:
    group, n = item
    return (-n, group is None, str(group))


class SearchMixin:
    """The ops read side for a SQL store: it supplies ``_select`` and its ``_dialect``; this does the rest."""

    _dialect: Dialect
    _select: Run

    def search_records(
        self, filters: QueryFilter, *, limit: int = QUERY_LIMIT, after: RecordKey | None = None
    ) -> RecordPage:
        """Records matching ``filters``, newest first, one page (see ``Store``)."""
        return search_records(self._select, self._dialect, filters, limit=limit, after=after)

    def search_events(
        self, filters: QueryFilter, *, limit: int = QUERY_LIMIT, after: EventKey | None = None
    ) -> EventPage:
        """Events matching ``filters``, newest first, one page (see ``Store``)."""
        return search_events(self._select, self._dialect, filters, limit=limit, after=after)

    def get_record(self, request_id: str) -> RequestRecord | None:
        """The newest record with this request id, or ``None``."""
        return get_record(self._select, self._dialect, request_id)

    def stats(
        self,
        filters: QueryFilter,
        *,
        bucket_ms: int,
        group_by: GroupBy,
        top_messages: int = STATS_TOP_MESSAGES,
    ) -> Stats:
        """Events per time bucket and group, record totals and top messages (see ``Store``)."""
        return stats(
            self._select,
            self._dialect,
            filters,
            bucket_ms=bucket_ms,
            group_by=group_by,
            top_messages=top_messages,
        )
