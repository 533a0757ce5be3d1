"""The read side: what every queryable sink (SQLite, PostgreSQL) offers operators.

``query_records`` / ``query_events`` are the plain time-range queries of the reference design. The
``search_*`` methods, ``get_record`` and ``stats`` are what the ops API, the dashboard and the CLI
need: more filters (``QueryFilter``), keyset pagination and aggregates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, TypeAlias, get_args, runtime_checkable

from upstream_ops.defaults import QUERY_LIMIT, QUERY_TEXT_MAX, STATS_TOP_MESSAGES
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord

__all__ = [
    "CATEGORIES",
    "GROUP_BY",
    "EventKey",
    "EventPage",
    "GroupBy",
    "MessageCount",
    "QueryFilter",
    "RecordKey",
    "RecordPage",
    "Stats",
    "StatsBucket",
    "StatsGroup",
    "Store",
    "StoredEvent",
]

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

#: What ``Store.stats`` can count events by. ``error_class`` is the event's own class, else the one
#: its upstream status implies (``classify.error_class_for_status``); ``category`` folds classes into
#: the coarse split of the dashboard's trend chart (``CATEGORIES``).
GroupBy: TypeAlias = Literal["platform", "status_code", "kind", "error_class", "category"]
GROUP_BY: Final[tuple[str, ...]] = get_args(GroupBy)

#: ``category`` values, in the order the dashboard stacks them: ``rate_limited`` (429),
#: ``overloaded`` (503, 529), ``server_error`` (other 5xx), ``client_error`` (other 4xx, auth),
#: ``transport`` (no HTTP answer: DNS, connect, TLS, timeouts, a ``request_error`` event) and
#: ``other`` (anything else: a retry note, an open circuit, a status below 400).
CATEGORIES: Final = (
    "rate_limited",
    "overloaded",
    "server_error",
    "client_error",
    "transport",
    "other",
)

#: Keyset cursors: ``(started_at_ms, id)`` of the last record of a page, ``(at_unix_ms, record_id,
#: seq)`` of the last event. Pass one back as ``after`` to get the next, older page.
RecordKey: TypeAlias = tuple[int, str]
EventKey: TypeAlias = tuple[int, str, int]
#: A group of ``Stats``: a platform, kind or class name, a status code, or ``None`` (not set).
StatsGroup: TypeAlias = str | int | None


@dataclass(frozen=True, slots=True)
class QueryFilter:
    """What operators narrow a search by; construction validates and raises ``ValueError`` naming
    the field.

    The window is half-open, ``start_ms <= t < end_ms`` (Unix milliseconds). ``status_codes`` matches
    any of the given upstream statuses; ``q`` is a case-insensitive substring of an upstream message
    or a request id (SQLite folds ASCII letters only). ``None`` and ``()`` filter nothing. Which
    time and which fields each filter tests depends on what is searched: see ``Store``.
    """

    start_ms: int
    end_ms: int
    platform: str | None = None
    status_codes: tuple[int, ...] = field(default=())
    kind: str | None = None
    account_id: int | None = None
    route: str | None = None
    recovered: bool | None = None
    q: str | None = None

    def __post_init__(self) -> None:
        time = "a 64-bit integer (Unix milliseconds)"
        start = _int("start_ms", self.start_ms, _INT64_MIN, _INT64_MAX, time)
        end = _int("end_ms", self.end_ms, _INT64_MIN, _INT64_MAX, time)
        if start > end:
            raise ValueError(f"start_ms must be <= end_ms, got start_ms={start} > end_ms={end}")
        for name in ("platform", "kind", "route"):
            _text(name, getattr(self, name), 1 << 16)
        _text("q", self.q, QUERY_TEXT_MAX)
        if self.account_id is not None:
            _int("account_id", self.account_id, 1, _INT64_MAX, "a positive integer or None")
        if self.recovered is not None and not isinstance(self.recovered, bool):
            raise ValueError(f"recovered must be a bool or None, got {self.recovered!r:.60}")
        object.__setattr__(self, "status_codes", _status_codes(self.status_codes))


def _int(name: str, value: object, low: int, high: int, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be {expected}, got {value!r:.60}")
    return value


def _text(name: str, value: object, max_length: int) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValueError(
            f"{name} must be a non-empty string of at most {max_length} characters or None, "
            f"got {value!r:.60}"
        )


def _status_codes(value: object) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"status_codes must be a sequence of integers, got {value!r:.60}")
    codes = [_int("status_codes", v, 1, _INT64_MAX, "positive integers") for v in value]
    return tuple(sorted(set(codes)))


@dataclass(frozen=True, slots=True)
class RecordPage:
    """One page of records, newest first; ``next_key`` is ``None`` on the last page."""

    records: list[RequestRecord]
    next_key: RecordKey | None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event with where it is stored: its record's id and request id, and its position there."""

    record_id: str
    seq: int
    request_id: str
    event: UpstreamErrorEvent

    @property
    def key(self) -> EventKey:
        return (self.event.at_unix_ms, self.record_id, self.seq)


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of events, newest first; ``next_key`` is ``None`` on the last page."""

    events: list[StoredEvent]
    next_key: EventKey | None


@dataclass(frozen=True, slots=True)
class StatsBucket:
    """Event counts of one time bucket ``[start_ms, start_ms + bucket_ms)`` by group, largest
    first (then by name)."""

    start_ms: int
    counts: dict[StatsGroup, int]


@dataclass(frozen=True, slots=True)
class MessageCount:
    """An upstream message, how many events in the window carried it, and the newest one's time."""

    message: str
    count: int
    last_at_ms: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Aggregates over a window: events by time bucket and group, records and recovered ones.

    ``buckets`` covers the whole window oldest first, empty buckets included, aligned to multiples of
    ``bucket_ms`` since the epoch (so hourly buckets start on the hour, UTC). ``groups`` are the
    totals per group, largest first. ``records`` and ``recovered_records`` count requests (window on
    their start), the rest counts events (window on their time).
    """

    start_ms: int
    end_ms: int
    bucket_ms: int
    group_by: GroupBy
    buckets: list[StatsBucket]
    groups: dict[StatsGroup, int]
    events: int
    records: int
    recovered_records: int
    top_messages: list[MessageCount]

    @property
    def recovered_ratio(self) -> float | None:
        """The share of records whose client got a success despite upstream errors; ``None`` if
        there are no records."""
        return self.recovered_records / self.records if self.records else None


@runtime_checkable
class Store(Protocol):
    """Queries over stored records and events, newest first.

    Windows are half-open, ``start_ms <= t < end_ms``, on ``RequestRecord.started_at_ms`` for records
    and ``UpstreamErrorEvent.at_unix_ms`` for events. A bad argument raises ``ValueError`` naming it.

    Records: ``status_code(s)`` match the record's summary upstream status or any event's;
    ``platform``, ``kind`` and ``account_id`` each match when any event of the record has them (not
    necessarily the same event); ``route`` and ``recovered`` test the record; ``q`` searches the
    request id, the summary message and the events' messages and upstream request ids.

    Events: every filter tests the event itself, except ``route`` and ``recovered`` (its record's);
    ``q`` searches the event's message, upstream request id and its record's request id.
    """

    def query_records(
        self,
        start_ms: int,
        end_ms: int,
        *,
        platform: str | None = None,
        status_code: int | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[RequestRecord]: ...

    def query_events(
        self,
        start_ms: int,
        end_ms: int,
        *,
        platform: str | None = None,
        status_code: int | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[UpstreamErrorEvent]: ...

    def search_records(
        self, filters: QueryFilter, *, limit: int = QUERY_LIMIT, after: RecordKey | None = None
    ) -> RecordPage:
        """Records matching ``filters``, newest first, at most ``limit``, older than ``after``."""
        ...

    def search_events(
        self, filters: QueryFilter, *, limit: int = QUERY_LIMIT, after: EventKey | None = None
    ) -> EventPage:
        """Events matching ``filters``, newest first, at most ``limit``, older than ``after``."""
        ...

    def get_record(self, request_id: str) -> RequestRecord | None:
        """The newest record with this request id, or ``None``."""
        ...

    def stats(
        self,
        filters: QueryFilter,
        *,
        bucket_ms: int,
        group_by: GroupBy,
        top_messages: int = STATS_TOP_MESSAGES,
    ) -> Stats:
        """Events per bucket and group, record totals and the most frequent upstream messages."""
        ...
