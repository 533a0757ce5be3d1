"""The ops read side of the stores (``store.py``, ``sinks/_search.py``), run against every store in
``conftest.STORES`` with the known records of ``ops_records.py``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.ops_records import BASE_MS, MINUTE, XSS, ops_dataset
from upstream_ops.classify import error_class_for_status
from upstream_ops.defaults import QUERY_LIMIT_MAX, QUERY_TEXT_MAX, STATS_MAX_BUCKETS
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import _search
from upstream_ops.store import CATEGORIES, GROUP_BY, QueryFilter, Store

END_MS = BASE_MS + 5 * MINUTE
ALL = QueryFilter(BASE_MS, END_MS)
DATASET = ops_dataset()
#: Every event as "record:seq", newest first (r5's three share one millisecond).
ALL_EVENTS = ["r6:0", "r5:2", "r5:1", "r5:0", "r3:1", "r3:0", "r2:0", "r1:1", "r1:0"]


@pytest.fixture
def loaded(store: Store) -> Store:
    store.write(DATASET[3:])  # type: ignore[attr-defined]
    store.write(DATASET[:3])  # type: ignore[attr-defined]
    return store


def window(start_minute: float = 0, end_minute: float = 5, **filters: Any) -> QueryFilter:
    return QueryFilter(
        BASE_MS + int(start_minute * MINUTE), BASE_MS + int(end_minute * MINUTE), **filters
    )


def test_sinks_that_can_be_queried_are_stores(store: Store) -> None:
    assert isinstance(store, Store)


# --- records ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (window(), ["r6", "r5", "r4", "r3", "r2", "r1"]),  # newest first, id DESC on ties
        (window(1, 3), ["r4", "r3", "r2"]),  # half-open: minute 3 (r5) is out
        (window(2, 2), []),
        (window(platform="openai"), ["r5", "r2", "r1"]),
        (window(platform="anthropic"), ["r6", "r1"]),
        (window(platform="nope"), []),
        (window(status_codes=(429,)), ["r1"]),
        (window(status_codes=(504,)), ["r2"]),  # the record's summary status
        (window(status_codes=[504, 429]), ["r2", "r1"]),
        (window(status_codes=(529,)), ["r6", "r1"]),
        (window(status_codes=(500,)), ["r3"]),  # r4's 500 is the client status
        (window(kind="retry"), ["r5", "r3"]),
        (window(kind="failover"), ["r1"]),
        (window(account_id=2), ["r6", "r1"]),
        (window(account_id=3), ["r3"]),
        (window(route="/v1/images"), ["r4", "r3"]),
        (window(recovered=True), ["r6", "r5", "r3", "r1"]),
        (window(recovered=False), ["r4", "r2"]),
        (window(q="rate LIMIT"), ["r1"]),  # event message, any case
        (window(q="req-r2"), ["r2"]),  # request id
        (window(q="up_1"), ["r1"]),  # upstream request id
        (window(q="accounts failed"), ["r2"]),  # summary message
        (window(q="%"), ["r4"]),  # LIKE wildcards are literal
        (window(q="_"), ["r6", "r4", "r1"]),  # "window.__xss", "100%_done", "req_up_1"
        (window(q="window.__xss"), ["r6"]),
        (window(platform="openai", status_codes=(401,)), ["r5"]),
        (window(route="/v1/chat", recovered=False), ["r2"]),
        # each event filter matches any event of the record, not necessarily the same one
        (window(platform="anthropic", status_codes=(429,)), ["r1"]),
    ],
)
def test_search_records(loaded: Store, filters: QueryFilter, expected: list[str]) -> None:
    page = loaded.search_records(filters)
    assert [r.id for r in page.records] == expected
    assert page.next_key is None
    by_id = {r.id: r for r in DATASET}
    assert page.records == [by_id[i] for i in expected]  # full records, events included


@pytest.mark.parametrize("limit", [1, 2, 3, 5])
@pytest.mark.parametrize("filters", [window(), window(recovered=True), window(1, 4)])
def test_record_pages_follow_each_other(loaded: Store, filters: QueryFilter, limit: int) -> None:
    everything = [r.id for r in loaded.search_records(filters).records]
    seen: list[str] = []
    after = None
    for _ in range(10):
        page = loaded.search_records(filters, limit=limit, after=after)
        assert len(page.records) <= limit
        seen += [r.id for r in page.records]
        if page.next_key is None:
            break
        assert page.next_key == (page.records[-1].started_at_ms, page.records[-1].id)
        after = page.next_key
    assert seen == everything


def test_a_full_last_page_says_there_is_no_more(loaded: Store) -> None:
    page = loaded.search_records(window(), limit=6)
    assert len(page.records) == 6 and page.next_key is None
    page = loaded.search_records(window(), limit=5)
    assert [r.id for r in page.records] == ["r6", "r5", "r4", "r3", "r2"]
    assert page.next_key == (BASE_MS + MINUTE, "r2")
    assert [r.id for r in loaded.search_records(window(), after=page.next_key).records] == ["r1"]


def test_get_record(loaded: Store) -> None:
    assert loaded.get_record("req-r5") == DATASET[4]
    assert loaded.get_record("nope") is None
    # a request id seen twice (a client resending its X-Request-ID): the newest record wins
    older = RequestRecord(id="r0", request_id="req-r5", started_at_ms=BASE_MS - MINUTE)
    loaded.write([older])  # type: ignore[attr-defined]
    assert loaded.get_record("req-r5") == DATASET[4]


# --- events -----------------------------------------------------------------------------------


def labels(store: Store, filters: QueryFilter, **kwargs: Any) -> list[str]:
    page = store.search_events(filters, **kwargs)
    return [f"{e.record_id}:{e.seq}" for e in page.events]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (window(), ALL_EVENTS),
        (window(1, 3), ["r3:1", "r3:0", "r2:0"]),
        (window(platform="openai"), ["r5:2", "r5:1", "r5:0", "r2:0", "r1:0"]),
        (window(status_codes=(529,)), ["r6:0", "r1:1"]),
        (window(status_codes=(529, 401)), ["r6:0", "r5:1", "r1:1"]),
        (window(status_codes=(504,)), []),  # a record's summary is not an event's status
        (window(kind="request_error"), ["r5:2", "r2:0"]),
        (window(account_id=3), ["r3:1", "r3:0"]),
        (window(route="/v1/images"), ["r3:1", "r3:0"]),
        (window(recovered=False), ["r2:0"]),
        (window(route="/v1/chat", recovered=True, platform="anthropic"), ["r6:0", "r1:1"]),
        (window(q="req-r5"), ["r5:2", "r5:1", "r5:0"]),  # the record's request id
        (window(q="UNAUTHORIZED"), ["r5:1"]),
        (window(q="req_up"), ["r1:0"]),
        (window(q="%"), []),
    ],
)
def test_search_events(loaded: Store, filters: QueryFilter, expected: list[str]) -> None:
    assert labels(loaded, filters) == expected


def test_stored_events_carry_their_record_and_the_full_event(loaded: Store) -> None:
    [first] = loaded.search_events(window(4, 5)).events
    assert (first.record_id, first.seq, first.request_id) == ("r6", 0, "req-r6")
    assert first.event == DATASET[5].upstream_errors[0]
    assert first.key == (first.event.at_unix_ms, "r6", 0)


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_event_pages_follow_each_other_through_ties(loaded: Store, limit: int) -> None:
    seen: list[str] = []
    after = None
    while True:
        page = loaded.search_events(window(), limit=limit, after=after)
        seen += [f"{e.record_id}:{e.seq}" for e in page.events]
        if page.next_key is None:
            break
        after = page.next_key
    assert seen == ALL_EVENTS


# --- stats ------------------------------------------------------------------------------------


def test_stats_by_category(loaded: Store) -> None:
    stats = loaded.stats(window(), bucket_ms=MINUTE, group_by="category")
    assert [b.start_ms for b in stats.buckets] == [BASE_MS + i * MINUTE for i in range(5)]
    assert [b.counts for b in stats.buckets] == [
        {"rate_limited": 1, "overloaded": 1},
        {"transport": 1},
        {"server_error": 1, "other": 1},
        {"overloaded": 1, "client_error": 1, "transport": 1},
        {"overloaded": 1},
    ]
    assert stats.groups == {
        "overloaded": 3,
        "transport": 2,
        "client_error": 1,
        "other": 1,
        "rate_limited": 1,
        "server_error": 1,
    }
    assert list(stats.groups) == [  # largest first, then by name
        "overloaded",
        "transport",
        "client_error",
        "other",
        "rate_limited",
        "server_error",
    ]
    assert set(stats.groups) <= set(CATEGORIES)
    assert (stats.events, stats.records, stats.recovered_records) == (9, 6, 4)
    assert stats.recovered_ratio == pytest.approx(4 / 6)
    assert (stats.start_ms, stats.end_ms, stats.bucket_ms, stats.group_by) == (
        BASE_MS,
        END_MS,
        MINUTE,
        "category",
    )


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        ("platform", {"openai": 5, "anthropic": 2, "gemini": 2}),
        ("status_code", {None: 3, 529: 2, 401: 1, 429: 1, 500: 1, 503: 1}),
        ("kind", {"http_error": 4, "request_error": 2, "retry": 2, "failover": 1}),
        (
            "error_class",
            {
                "overloaded": 3,
                None: 2,
                "auth": 1,
                "connection_timeout": 1,
                "rate_limited": 1,
                "server_error": 1,
            },
        ),
    ],
)
def test_stats_groups(loaded: Store, group_by: Any, expected: dict[Any, int]) -> None:
    stats = loaded.stats(window(), bucket_ms=MINUTE, group_by=group_by)
    assert stats.groups == expected
    assert sum(sum(b.counts.values()) for b in stats.buckets) == stats.events == 9


def test_stats_apply_the_filters(loaded: Store) -> None:
    stats = loaded.stats(window(platform="openai"), bucket_ms=MINUTE, group_by="status_code")
    assert stats.groups == {None: 2, 401: 1, 429: 1, 503: 1}
    assert (stats.records, stats.recovered_records) == (3, 2)  # r1, r2, r5
    stats = loaded.stats(window(recovered=False), bucket_ms=MINUTE, group_by="kind")
    assert stats.groups == {"request_error": 1}
    assert (stats.records, stats.recovered_records, stats.recovered_ratio) == (2, 0, 0.0)


def test_top_messages(loaded: Store) -> None:
    stats = loaded.stats(window(), bucket_ms=MINUTE, group_by="kind", top_messages=3)
    top = [(m.message, m.count) for m in stats.top_messages]
    assert top[0] == ("Overloaded", 2)
    assert stats.top_messages[0].last_at_ms == BASE_MS + 3 * MINUTE + 100
    # equal counts: the newest first, then bytewise ("U" < "t")
    assert top[1:] == [(XSS, 1), ("Unauthorized", 1)]
    assert (
        loaded.stats(window(), bucket_ms=MINUTE, group_by="kind", top_messages=0).top_messages == []
    )


def test_buckets_align_to_the_epoch_and_cover_the_window(loaded: Store) -> None:
    stats = loaded.stats(window(0.5, 2.5), bucket_ms=MINUTE, group_by="platform")
    assert [b.start_ms for b in stats.buckets] == [BASE_MS, BASE_MS + MINUTE, BASE_MS + 2 * MINUTE]
    assert [b.counts for b in stats.buckets] == [
        {},
        {"openai": 1},
        {"gemini": 2},
    ]  # r1 at 0:00.1 is out
    hourly = loaded.stats(window(), bucket_ms=3_600_000, group_by="platform")
    assert [b.start_ms % 3_600_000 for b in hourly.buckets] == [0] * len(hourly.buckets)
    assert sum(b.counts.get("openai", 0) for b in hourly.buckets) == 5


def test_stats_of_an_empty_window(store: Store) -> None:
    stats = store.stats(window(), bucket_ms=MINUTE, group_by="category")
    assert len(stats.buckets) == 5 and all(b.counts == {} for b in stats.buckets)
    assert (stats.events, stats.records, stats.recovered_ratio, stats.top_messages) == (
        0,
        0,
        None,
        [],
    )
    assert store.stats(window(1, 1), bucket_ms=MINUTE, group_by="kind").buckets == []


def test_error_class_groups_follow_the_classifier_for_every_status(store: Store) -> None:
    statuses = range(100, 700)
    store.write(  # type: ignore[attr-defined]
        [
            RequestRecord(
                id=f"s{status}",
                request_id=f"s{status}",
                started_at_ms=BASE_MS,
                upstream_errors=[
                    UpstreamErrorEvent(at_unix_ms=BASE_MS + status, upstream_status_code=status)
                ],
            )
            for status in statuses
        ]
    )
    expected: dict[Any, int] = {}
    for status in statuses:
        name = error_class_for_status(status) or None
        expected[name] = expected.get(name, 0) + 1
    stats = store.stats(window(), bucket_ms=MINUTE, group_by="error_class")
    assert stats.groups == expected
    categories = store.stats(window(), bucket_ms=MINUTE, group_by="category").groups
    assert categories == {
        "client_error": 99,  # 4xx but 429 (auth included)
        "server_error": 98,  # 5xx but 503, 529
        "other": 400,  # 1xx-3xx, 6xx
        "overloaded": 2,
        "rate_limited": 1,
    }


def test_every_group_by_has_sql() -> None:
    assert set(_search._GROUP_SQL) == set(GROUP_BY)
    assert _search.CATEGORY_OF_CLASS["connection_refused"] == "transport"
    assert _search.CATEGORY_OF_CLASS["tls_certificate_error"] == "transport"
    assert "request_cancelled" not in _search.CATEGORY_OF_CLASS
    assert set(_search.CATEGORY_OF_CLASS.values()) <= set(CATEGORIES)


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("start_ms", {"start_ms": True, "end_ms": 1}),
        ("start_ms", {"start_ms": "0", "end_ms": 1}),
        ("end_ms", {"start_ms": 0, "end_ms": 2**63}),
        ("start_ms", {"start_ms": 5, "end_ms": 1}),
        ("platform", {"platform": ""}),
        ("kind", {"kind": 3}),
        ("route", {"route": ""}),
        ("q", {"q": "x" * (QUERY_TEXT_MAX + 1)}),
        ("q", {"q": ""}),
        ("account_id", {"account_id": 0}),
        ("account_id", {"account_id": "1"}),
        ("recovered", {"recovered": 1}),
        ("status_codes", {"status_codes": "429"}),
        ("status_codes", {"status_codes": (429, 0)}),
        ("status_codes", {"status_codes": 429}),
    ],
)
def test_bad_filters(name: str, kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {"start_ms": 0, "end_ms": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        QueryFilter(**values)


def test_status_codes_are_normalized() -> None:
    assert QueryFilter(0, 1, status_codes=[504, 429, 504]).status_codes == (429, 504)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda s: s.search_records(ALL, limit=0), "limit"),
        (lambda s: s.search_records(ALL, limit=QUERY_LIMIT_MAX + 1), "limit"),
        (lambda s: s.search_events(ALL, limit=True), "limit"),
        (lambda s: s.search_records(ALL, after=(1, 2)), "after"),
        (lambda s: s.search_records(ALL, after=[1, "a"]), "after"),
        (lambda s: s.search_events(ALL, after=(1, "a")), "after"),
        (lambda s: s.get_record(""), "request_id"),
        (lambda s: s.stats(ALL, bucket_ms=0, group_by="kind"), "bucket_ms"),
        (lambda s: s.stats(ALL, bucket_ms=MINUTE, group_by="nope"), "group_by"),
        (lambda s: s.stats(ALL, bucket_ms=MINUTE, group_by="kind", top_messages=-1), "top"),
        (
            lambda s: s.stats(
                QueryFilter(0, (STATS_MAX_BUCKETS + 1) * 1000), bucket_ms=1000, group_by="kind"
            ),
            "buckets",
        ),
    ],
)
def test_bad_search_arguments(store: Store, call: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call(store)


def test_values_are_bound_not_spliced(loaded: Store) -> None:
    hostile = "x' OR 1=1; DROP TABLE ops_error_logs;--"
    for filters in (window(q=hostile), window(platform=hostile), window(route=hostile)):
        assert loaded.search_records(filters).records == []
        assert loaded.search_events(filters).events == []
    assert len(loaded.search_records(window()).records) == 6
