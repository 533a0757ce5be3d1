from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.speedups import with_and_without
from upstream_ops import (
    UpstreamErrorEvent,
    append_upstream_error,
    current_collector,
    get_upstream_errors,
    set_upstream_error,
    wrap_context,
)
from upstream_ops import collector as collector_module
from upstream_ops.collector import Collector, _activate, _deactivate

SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"

# Every test here runs with the C pass over an event's fields and with the Python loop alone.
fields_pass = with_and_without(collector_module, "_event_pass")


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector("req-1", max_events=4)
    token = _activate(c)
    yield c
    _deactivate(token)


def test_outside_a_request_everything_is_a_silent_no_op() -> None:
    assert current_collector() is None
    assert append_upstream_error(upstream_status_code=504, message="x") is None
    set_upstream_error(504, "x")
    assert get_upstream_errors() == []


def test_append_fills_time_trims_and_sanitizes_message_and_detail(collector: Collector) -> None:
    before = time.time_ns() // 1_000_000
    stored = append_upstream_error(
        platform="  openai ",
        upstream_status_code=401,
        kind="http_error",
        message=f"  bad key {SECRET}  ",
        detail=f'{{"error": "invalid", "api_key": "{SECRET}"}}',
        upstream_url=f"https://user:pw@api.example.com/v1?key={SECRET}&max_tokens=5",
        method="post",
    )
    assert stored is not None
    assert stored.at_unix_ms >= before
    assert stored.platform == "openai"
    assert stored.method == "POST"
    assert SECRET not in stored.message and stored.message.startswith("bad key")
    assert SECRET not in stored.detail and "invalid" in stored.detail
    assert SECRET not in stored.upstream_url and "pw" not in stored.upstream_url
    assert "max_tokens=5" in stored.upstream_url
    assert get_upstream_errors() == [stored]


def test_event_object_is_copied_not_mutated(collector: Collector) -> None:
    event = UpstreamErrorEvent(upstream_status_code=500, message=f" {SECRET} ")
    stored = append_upstream_error(event, kind="http_error")
    assert stored is not None and stored is not event
    assert event.message == f" {SECRET} " and event.kind == ""
    assert stored.kind == "http_error"


def test_keywords_override_an_event_and_are_checked_and_cleaned(collector: Collector) -> None:
    event = UpstreamErrorEvent(upstream_status_code=500, kind="http_error", attempt=1)
    stored = append_upstream_error(event, message=f" {SECRET} ", attempt="2", method=b"get")
    assert stored is not None
    assert (stored.kind, stored.attempt, stored.method) == ("http_error", 2, "GET")
    assert SECRET not in stored.message
    assert (event.attempt, event.message) == (1, "")


def test_labels_fill_empty_fields_sanitized(collector: Collector) -> None:
    from upstream_ops import upstream

    with upstream(platform=" openai\t", account_id=7, model=f"key={SECRET}"):
        stored = append_upstream_error(upstream_status_code=502, platform="", model="gpt-4o")
    assert stored is not None
    assert (stored.platform, stored.account_id, stored.model) == ("openai", 7, "gpt-4o")
    with upstream(model=f"key={SECRET}"):
        stored = append_upstream_error(upstream_status_code=502)
    assert stored is not None and SECRET not in stored.model and stored.model.startswith("key=")


def test_empty_events_are_dropped(collector: Collector) -> None:
    assert append_upstream_error(kind="retry", platform="x", message="   ") is None
    assert get_upstream_errors() == []


def test_keeps_the_last_n_and_counts_the_dropped(collector: Collector) -> None:
    for i in range(10):
        append_upstream_error(upstream_status_code=500, message=f"m{i}")
    assert [e.message for e in get_upstream_errors()] == ["m6", "m7", "m8", "m9"]
    assert collector.dropped_events == 6


def test_invalid_field_is_logged_not_raised(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="upstream_ops"):
        assert append_upstream_error(upstream_status_code="abc") is None
        assert append_upstream_error(no_such_field=1) is None
        ok = UpstreamErrorEvent(upstream_status_code=500)
        assert append_upstream_error(ok, bogus=1) is None
    assert "upstream_status_code" in caplog.text
    assert "no_such_field" in caplog.text
    assert "bogus" in caplog.text
    assert get_upstream_errors() == []


def test_set_upstream_error_ignores_non_positive_status_and_blanks(collector: Collector) -> None:
    set_upstream_error(0, "   ", "")
    assert collector.upstream_status_code is None
    assert collector.upstream_error_message is None
    set_upstream_error(504, f" timeout {SECRET} ", f"Authorization: Bearer {SECRET}")
    assert collector.upstream_status_code == 504
    assert collector.upstream_error_message is not None
    assert collector.upstream_error_message.startswith("timeout")
    assert SECRET not in collector.upstream_error_message
    assert SECRET not in (collector.upstream_error_detail or "")
    set_upstream_error(-1, "", "")
    assert collector.upstream_status_code == 504


def test_thread_safe_appends(collector: Collector) -> None:
    big = Collector("req-2", max_events=10_000)
    token = _activate(big)
    try:

        def work(n: int) -> None:
            for i in range(200):
                append_upstream_error(upstream_status_code=500, message=f"{n}-{i}")

        threads = [threading.Thread(target=wrap_context(work), args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({e.message for e in big.events}) == 1600
    finally:
        _deactivate(token)


def test_wrap_context_carries_the_collector_into_a_thread_pool(collector: Collector) -> None:
    def fail(i: int) -> str | None:
        stored = append_upstream_error(upstream_status_code=502, message=f"attempt {i}")
        return stored.message if stored else None

    with ThreadPoolExecutor(4) as pool:
        plain = list(pool.map(fail, range(2)))
        wrapped = list(pool.map(wrap_context(fail), range(2, 4)))
    assert plain == [None, None]
    assert wrapped == ["attempt 2", "attempt 3"]
    assert [e.message for e in get_upstream_errors()] == ["attempt 2", "attempt 3"]


def test_an_event_object_is_cleaned_as_its_fields_would_be(collector: Collector) -> None:
    fields = {
        "platform": "  openai ",
        "upstream_status_code": 401,
        "kind": "http_error",
        "message": f"  bad key {SECRET}  ",
        "detail": f'{{"error": "invalid", "api_key": "{SECRET}"}}',
        "upstream_url": f"https://user:pw@api.example.com/v1?key={SECRET}&max_tokens=5",
        "method": "post",
        "at_unix_ms": 1,
    }
    event = UpstreamErrorEvent(**fields)  # type: ignore[arg-type]
    by_object = collector.append(event)
    by_fields = append_upstream_error(**fields)
    assert by_object is not None and by_object is not event
    assert by_object == by_fields
    assert event.message == fields["message"]  # the caller's object is not changed


def test_the_capture_integrations_own_events_are_kept_without_a_copy(collector: Collector) -> None:
    event = UpstreamErrorEvent(upstream_status_code=429, message=f"quota {SECRET}", at_unix_ms=1)
    stored = collector._append_own(event)
    assert stored is event
    assert SECRET not in event.message and event.message.startswith("quota")
    assert collector.events == [event]
    collector.finish()
    assert collector._append_own(UpstreamErrorEvent(upstream_status_code=500)) is None


def test_finished_collector_ignores_late_appends(collector: Collector) -> None:
    collector.finish()
    assert append_upstream_error(upstream_status_code=500) is None
    assert collector.events == []


def test_listeners_see_stored_events_and_failures_are_contained(collector: Collector) -> None:
    seen: list[UpstreamErrorEvent] = []

    def broken(event: UpstreamErrorEvent) -> None:
        raise RuntimeError("listener bug")

    collector.listeners.extend([broken, seen.append])
    stored = append_upstream_error(upstream_status_code=500)
    assert seen == [stored]


def test_next_attempt_counts_from_one(collector: Collector) -> None:
    assert [collector.next_attempt() for _ in range(3)] == [1, 2, 3]


def test_max_events_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_events"):
        Collector(max_events=0)


def test_a_collector_without_an_id_makes_one_at_the_first_read_and_keeps_it() -> None:
    import re

    collector = Collector(None)
    first = collector.request_id
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert collector.request_id == first
    assert Collector(None).request_id != first
    assert Collector().request_id == ""  # an empty id given stays empty
    collector.request_id = "set-later"
    assert collector.request_id == "set-later"
    collector.request_id = None
    assert re.fullmatch(r"[0-9a-f]{32}", collector.request_id)
    assert collector.request_id not in (first, "set-later")


def test_a_request_id_made_here_is_a_time_ordered_uuid7() -> None:
    import uuid

    made = [Collector(None).request_id for _ in range(5_000)]
    assert len(set(made)) == len(made)
    in_ms = [int(request_id[:12], 16) for request_id in made]  # ordered by the ms, not within one
    assert in_ms == sorted(in_ms)
    for request_id in (made[0], made[-1]):
        parsed = uuid.UUID(hex=request_id)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert abs(int(request_id[:12], 16) - time.time_ns() // 1_000_000) < 60_000


def test_threads_reading_a_new_id_first_all_see_the_same_one() -> None:
    for _ in range(50):
        collector = Collector(None)
        barrier = threading.Barrier(4)

        def read(
            _: int, collector: Collector = collector, barrier: threading.Barrier = barrier
        ) -> str:
            barrier.wait()
            return collector.request_id

        with ThreadPoolExecutor(4) as pool:
            seen = set(pool.map(read, range(4)))
        assert seen == {collector.request_id}


def test_a_healthy_request_makes_no_request_id() -> None:
    import asyncio

    from upstream_ops import UpstreamOpsMiddleware
    from upstream_ops.sinks import MemorySink

    seen: list[Collector] = []

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        seen.append(scope["state"]["upstream_ops"])
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    async def send(message: object) -> None:
        pass

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    middleware = UpstreamOpsMiddleware(app, sink=MemorySink())
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    try:
        asyncio.run(middleware(scope, receive, send))
    finally:
        middleware.dispatcher.close()
    assert seen[0]._request_id is None  # nobody asked, so none was made
    assert len(seen[0].request_id) == 32
