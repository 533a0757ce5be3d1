"""The read side: what every queryable sink (SQLite, PostgreSQL) offers operators."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord


@runtime_checkable
class Store(Protocol):
    """Time-range queries over stored records and events, newest first.

    The window is half-open, ``start_ms <= t < end_ms``, on ``RequestRecord.started_at_ms`` for records
    and ``UpstreamErrorEvent.at_unix_ms`` for events. ``status_code`` matches an upstream status (an
    event's or the record's summary); ``platform`` and ``kind`` match when any event of the record has them.
    A bad argument raises ``ValueError`` naming it.
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
