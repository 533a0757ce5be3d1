"""One suite, two stores: SQLite and PostgreSQL write, deduplicate, reject bad records, query and
purge alike, with identical results for identical data.

Everything here runs against each of ``conftest.STORES`` (PostgreSQL: the machine's server, one
schema per test). The search, pagination and stats side is in test_store.py; what only one store
has (pragmas, JSONB, pools) is in its own module.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias

import pytest

from tests.conftest import STORE_PARAMS, STORES
from tests.sink_records import BAD_RECORDS, bare_record, full_event, full_record
from upstream_ops.defaults import QUERY_LIMIT_MAX
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.retention import Purgeable
from upstream_ops.sinks.base import Sink
from upstream_ops.store import Store

ALL_TIME = (0, 2**62)
DAY_MS = 86_400_000
AnyStore: TypeAlias = Any  # SQLiteSink | PostgresSink (psycopg is optional for the type checker)


@pytest.fixture(params=STORE_PARAMS)
def fresh_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[AnyStore, Callable[[], bool]]]:
    """A store and a check that it has not touched its database yet."""
    with STORES[request.param](request, tmp_path) as built:
        s: AnyStore = built
        if request.param == "sqlite":
            yield s, lambda: s.path.exists()
        else:
            yield s, lambda: s._pool is not None


def all_records(store: AnyStore) -> list[RequestRecord]:
    records: list[RequestRecord] = store.query_records(*ALL_TIME, limit=QUERY_LIMIT_MAX)
    return records


def all_events(store: AnyStore) -> list[UpstreamErrorEvent]:
    events: list[UpstreamErrorEvent] = store.query_events(*ALL_TIME, limit=QUERY_LIMIT_MAX)
    return events


# --- contract ---------------------------------------------------------------------------------


def test_is_a_sink_a_store_and_purgeable(store: AnyStore) -> None:
    assert isinstance(store, Sink)
    assert isinstance(store, Store)
    assert isinstance(store, Purgeable)


def test_empty_batch_is_a_no_op_without_io(
    fresh_store: tuple[AnyStore, Callable[[], bool]],
) -> None:
    store, touched = fresh_store
    store.write([])
    assert not touched()


def test_query_on_a_fresh_store_creates_the_schema(store: AnyStore) -> None:
    assert store.query_records(*ALL_TIME) == []
    assert store.query_events(*ALL_TIME) == []


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_every_field(store: AnyStore) -> None:
    record = full_record()
    store.write([record])
    [back] = store.query_records(*ALL_TIME)
    assert back == record  # the SQL fragments in it are stored as text
    assert back.to_dict() == record.to_dict()
    # both events have the same time: the later position comes first
    assert store.query_events(*ALL_TIME) == list(reversed(record.upstream_errors))


def test_record_without_events_and_optional_fields(store: AnyStore) -> None:
    record = RequestRecord(id="plain", request_id="req", started_at_ms=10)
    store.write([record])
    assert store.query_records(*ALL_TIME) == [record]
    assert all_events(store) == []


def test_huge_and_control_character_text_round_trips(store: AnyStore) -> None:
    control = "".join(chr(c) for c in range(1, 32)) + "\x7f\x85\u202e"
    huge = "détail " * 300_000  # ~2.4 MB, far beyond the sanitizer's bounds
    event = full_event(message=control, detail=huge)
    record = full_record("huge", upstream_error_detail=huge, error=control, events=[event])
    store.write([record, bare_record("next", 1)])
    assert all_records(store) == [record, bare_record("next", 1)]
    assert all_events(store) == [event]


# --- idempotency ------------------------------------------------------------------------------


def test_writing_a_batch_twice_leaves_one_row_each(store: AnyStore) -> None:
    batch = [full_record(f"rec-{i}", started_at_ms=1000 + i) for i in range(5)]
    store.write(batch)
    store.write(batch)
    store.write(batch[2:] + batch[:1])
    assert all_records(store) == list(reversed(batch))
    assert len(all_events(store)) == 10


def test_a_batch_mixing_stored_and_new_records_adds_only_the_new(store: AnyStore) -> None:
    first = [full_record(f"rec-{i}", started_at_ms=i) for i in range(3)]
    store.write(first[:2])
    store.write([first[1], first[2], first[0]])  # a retry that also carries a new record
    assert all_records(store) == list(reversed(first))
    assert len(all_events(store)) == 6


def test_duplicate_id_inside_one_batch_keeps_the_first(store: AnyStore) -> None:
    first = full_record("same", path="/first")
    second = full_record("same", path="/second", events=[full_event(kind="failover")])
    store.write([first, second])
    assert all_records(store) == [first]
    assert len(all_events(store)) == 2


def test_a_batch_of_stored_duplicates_does_not_raise(store: AnyStore) -> None:
    store.write([full_record("a")])
    store.write([full_record("a")])  # nothing new, but nothing failed either


# --- bad records ------------------------------------------------------------------------------

#: What each store does with a record it cannot store as is: ``None`` leaves it out (logged in
#: full), a string is what the store keeps instead. PostgreSQL text cannot hold a lone surrogate,
#: so it keeps U+FFFD as the sanitizer would have; SQLite rejects the record.
KEPT_INSTEAD: dict[str, dict[str, str | None]] = {
    "lone surrogate": {"sqlite": None, "postgres": "broken \ufffd text"},
}


@pytest.mark.parametrize("name", BAD_RECORDS.keys())
def test_one_bad_record_does_not_cost_the_batch(
    request: pytest.FixtureRequest, store: AnyStore, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = BAD_RECORDS[name]
    kept = KEPT_INSTEAD.get(name, {}).get(request.node.callspec.params["store"])
    good = [full_record(f"good-{i}", started_at_ms=100 + i) for i in range(3)]
    with caplog.at_level(logging.ERROR, logger=type(store).__module__):
        store.write([good[0], bad, good[1], good[2]])
    stored = {r.id: r for r in all_records(store)}
    assert [stored.pop(f"good-{i}") for i in (2, 1, 0)] == list(reversed(good))
    assert len(all_events(store)) == 6  # no half-written bad record
    if kept is not None:
        assert [r.error for r in stored.values()] == [kept]
        assert caplog.records == []
        return
    assert stored == {}
    [message] = [r.getMessage() for r in caplog.records]
    assert f"could not store record {bad.id}" in message
    logged = json.loads(message.split("the record: ", 1)[1])  # the data is in the log
    assert logged["request_id"] == bad.request_id


# --- queries ----------------------------------------------------------------------------------


def ev(
    at: int, platform: str = "", status: int = 0, kind: str = "http_error"
) -> UpstreamErrorEvent:
    return UpstreamErrorEvent(
        at_unix_ms=at, platform=platform, upstream_status_code=status, kind=kind
    )


DATASET = [
    bare_record(
        "r1",
        1000,
        upstream_status_code=502,
        upstream_errors=[ev(1000, "openai", 429), ev(1001, "anthropic", 502, "failover")],
    ),
    bare_record(
        "r2",
        2000,
        upstream_status_code=504,
        upstream_errors=[ev(2000, "openai", 0, "request_error")],
    ),
    bare_record("r3", 3000, status_code=500),
    bare_record("r4", 3000, upstream_errors=[ev(3000, "gemini", 500)]),
    bare_record(
        "r5",
        4000,
        upstream_status_code=503,
        upstream_errors=[
            ev(3999, "openai", 500, "retry"),
            ev(4000, "openai", 503, "retry_exhausted"),
        ],
    ),
]


@pytest.fixture
def loaded(store: AnyStore) -> AnyStore:
    store.write(DATASET[3:])  # two batches, out of time order
    store.write(DATASET[:3])
    return store


@pytest.mark.parametrize(
    ("window", "filters", "expected"),
    [
        (ALL_TIME, {}, ["r5", "r4", "r3", "r2", "r1"]),  # newest first, id DESC on ties
        ((1000, 3000), {}, ["r2", "r1"]),  # end is exclusive
        ((1000, 3001), {}, ["r4", "r3", "r2", "r1"]),
        ((1001, 4000), {}, ["r4", "r3", "r2"]),  # start is inclusive
        ((3000, 3000), {}, []),
        (ALL_TIME, {"limit": 2}, ["r5", "r4"]),
        (ALL_TIME, {"limit": 1}, ["r5"]),
        (ALL_TIME, {"platform": "openai"}, ["r5", "r2", "r1"]),
        (ALL_TIME, {"platform": "anthropic"}, ["r1"]),
        (ALL_TIME, {"platform": "nope"}, []),
        (ALL_TIME, {"status_code": 502}, ["r1"]),  # summary and event
        (ALL_TIME, {"status_code": 504}, ["r2"]),  # summary only
        (ALL_TIME, {"status_code": 429}, ["r1"]),  # event only
        (ALL_TIME, {"status_code": 500}, ["r5", "r4"]),  # events; r3's 500 is the client status
        (ALL_TIME, {"kind": "failover"}, ["r1"]),
        (ALL_TIME, {"kind": "http_error"}, ["r4", "r1"]),
        (ALL_TIME, {"platform": "openai", "status_code": 500}, ["r5"]),
        # each filter matches any event of the record, not necessarily the same one
        (ALL_TIME, {"platform": "openai", "kind": "failover"}, ["r1"]),
        ((0, 2000), {"platform": "openai", "kind": "http_error", "status_code": 502}, ["r1"]),
        ((1001, 5000), {"platform": "openai", "limit": 1}, ["r5"]),
    ],
)
def test_query_records(
    loaded: AnyStore, window: tuple[int, int], filters: dict[str, object], expected: list[str]
) -> None:
    records = loaded.query_records(*window, **filters)  # type: ignore[arg-type]
    assert [r.id for r in records] == expected
    by_id = {r.id: r for r in DATASET}
    assert records == [by_id[i] for i in expected]  # events come back too


@pytest.mark.parametrize(
    ("window", "filters", "expected"),
    [
        (ALL_TIME, {}, [4000, 3999, 3000, 2000, 1001, 1000]),
        ((1000, 1001), {}, [1000]),
        ((1001, 3000), {}, [2000, 1001]),
        ((3000, 3000), {}, []),
        (ALL_TIME, {"limit": 2}, [4000, 3999]),
        (ALL_TIME, {"platform": "openai"}, [4000, 3999, 2000, 1000]),
        (ALL_TIME, {"status_code": 500}, [3999, 3000]),
        (ALL_TIME, {"status_code": 504}, []),  # a record's summary is not an event's status
        (ALL_TIME, {"kind": "retry"}, [3999]),
        (ALL_TIME, {"platform": "openai", "kind": "http_error"}, [1000]),
        (ALL_TIME, {"platform": "openai", "status_code": 503, "kind": "retry_exhausted"}, [4000]),
    ],
)
def test_query_events(
    loaded: AnyStore, window: tuple[int, int], filters: dict[str, object], expected: list[int]
) -> None:
    events = loaded.query_events(*window, **filters)  # type: ignore[arg-type]
    assert [e.at_unix_ms for e in events] == expected
    by_time = {e.at_unix_ms: e for r in DATASET for e in r.upstream_errors}
    assert events == [by_time[t] for t in expected]


def test_query_events_ties_order_by_record_then_position(store: AnyStore) -> None:
    store.write(
        [
            bare_record("a", 1, upstream_errors=[ev(7, "p0"), ev(7, "p1")]),
            bare_record("b", 1, upstream_errors=[ev(7, "p2"), ev(7, "p3")]),
        ]
    )
    assert [e.platform for e in store.query_events(*ALL_TIME)] == ["p3", "p2", "p1", "p0"]


def test_query_limit_max_is_accepted(loaded: AnyStore) -> None:
    assert len(loaded.query_records(*ALL_TIME, limit=QUERY_LIMIT_MAX)) == 5
    assert len(loaded.query_events(*ALL_TIME, limit=QUERY_LIMIT_MAX)) == 6


BAD_ARGS = [
    ("start_ms", (True, 10), {}),
    ("start_ms", ("0", 10), {}),
    ("start_ms", (1.0, 10), {}),
    ("start_ms", (None, 10), {}),
    ("end_ms", (0, 2**63), {}),
    ("end_ms", (0, False), {}),
    ("start_ms", (10, 5), {}),  # start after end
    ("limit", (0, 10), {"limit": 0}),
    ("limit", (0, 10), {"limit": QUERY_LIMIT_MAX + 1}),
    ("limit", (0, 10), {"limit": True}),
    ("limit", (0, 10), {"limit": "5"}),
    ("status_code", (0, 10), {"status_code": 0}),
    ("status_code", (0, 10), {"status_code": -502}),
    ("status_code", (0, 10), {"status_code": "502"}),
    ("status_code", (0, 10), {"status_code": True}),
    ("platform", (0, 10), {"platform": ""}),
    ("platform", (0, 10), {"platform": 5}),
    ("kind", (0, 10), {"kind": ""}),
    ("kind", (0, 10), {"kind": ["retry"]}),
]


@pytest.mark.parametrize("method", ["query_records", "query_events"])
@pytest.mark.parametrize(("name", "args", "kwargs"), BAD_ARGS)
def test_bad_query_arguments(
    fresh_store: tuple[AnyStore, Callable[[], bool]],
    method: str,
    name: str,
    args: tuple[object, ...],
    kwargs: dict[str, object],
) -> None:
    store, touched = fresh_store
    with pytest.raises(ValueError, match=name):
        getattr(store, method)(*args, **kwargs)
    assert not touched()  # validated before any I/O


# --- retention ----------------------------------------------------------------------------------


def test_purge_deletes_old_records_with_their_events_in_batches(store: AnyStore) -> None:
    now = time.time_ns() // 1_000_000
    old = [full_record(f"old-{i}", started_at_ms=now - 10 * DAY_MS + i) for i in range(10)]
    recent = full_record("recent", started_at_ms=now - DAY_MS)
    store.write([*old[:5], recent, *old[5:]])
    seen: list[int] = []
    assert store.purge(timedelta(days=7), batch_size=3, progress=seen.append) == 10
    assert seen == [3, 6, 9, 10]
    assert all_records(store) == [recent]
    assert len(all_events(store)) == 2  # the recent record's, and no orphans
    assert store.purge("7d") == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        (("soon",), {}, "older_than"),
        ((timedelta(0),), {}, "older_than"),
        ((7,), {}, "older_than"),
        (("7d",), {"batch_size": 0}, "batch_size"),
        (("7d",), {"progress": "loud"}, "progress"),
    ],
)
def test_bad_purge_arguments(
    fresh_store: tuple[AnyStore, Callable[[], bool]],
    args: tuple[object, ...],
    kwargs: dict[str, object],
    name: str,
) -> None:
    store, touched = fresh_store
    with pytest.raises(ValueError, match=name):
        store.purge(*args, **kwargs)
    assert not touched()
