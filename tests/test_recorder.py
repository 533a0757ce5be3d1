"""Ids: ``new_record_id`` makes UUIDv7s (as ``new_request_id`` does), increasing within a process,
unique across threads and forked processes, in C and in Python; and the span ids a record is built
with."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from tests.speedups import require_extension
from upstream_ops import _ids
from upstream_ops.recorder import new_record_id


@pytest.fixture(params=["c-extension", "python"])
def make_record_id(request: pytest.FixtureRequest) -> Callable[[], str]:
    """A record id maker: the C extension's (what ``new_record_id`` is where it was built), and the
    Python fallback."""
    if request.param == "python":
        return _ids._ordered_uuid7_hex
    require_extension(_ids._speedups)
    return _ids._speedups.ordered_uuid7_hex


@pytest.fixture(params=["c-extension", "python"])
def make_request_id(request: pytest.FixtureRequest) -> Callable[[], str]:
    """A request id maker, in C and in Python, as ``make_record_id``."""
    if request.param == "python":
        return _ids._uuid7_hex
    require_extension(_ids._speedups)
    return _ids._speedups.uuid7_hex


def test_the_record_and_request_ids_are_the_c_extensions_where_it_was_built() -> None:
    from upstream_ops.collector import new_request_id

    require_extension(_ids._speedups)
    assert new_record_id is _ids._speedups.ordered_uuid7_hex
    assert new_request_id is _ids._speedups.uuid7_hex


def test_a_record_id_is_a_uuid7_in_hex_with_the_time_in_ms(
    make_record_id: Callable[[], str],
) -> None:
    before = time.time_ns() // 1_000_000
    record_id = make_record_id()
    after = time.time_ns() // 1_000_000
    assert len(record_id) == 32
    assert record_id == record_id.lower()
    parsed = uuid.UUID(hex=record_id)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert parsed.hex == record_id
    # a few ms of slack: a burst of more than 4096 ids in one ms borrows the next ms
    assert before <= int(record_id[:12], 16) <= after + 5


def test_a_request_id_is_a_uuid7_in_hex_with_the_time_in_ms(
    make_request_id: Callable[[], str],
) -> None:
    before = time.time_ns() // 1_000_000
    made = [make_request_id() for _ in range(5_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(made)) == len(made)
    in_ms = [int(request_id[:12], 16) for request_id in made]
    assert in_ms == sorted(in_ms)  # ordered by the ms, not within one
    assert before <= in_ms[0] and in_ms[-1] <= after
    for request_id in made[:50]:
        parsed = uuid.UUID(hex=request_id)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert parsed.hex == request_id


def test_ids_increase_and_never_repeat_within_a_process(make_record_id: Callable[[], str]) -> None:
    ids = [make_record_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_keep_increasing_when_the_clock_steps_back_or_one_ms_overflows(
    monkeypatch: pytest.MonkeyPatch, make_record_id: Callable[[], str]
) -> None:
    last = make_record_id()
    now = [int(last[:12], 16) * 1_000_000 - 5_000_000_000]  # 5 s in the past
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    ids = [make_record_id() for _ in range(5_000)]  # more than one ms's 4096 counter values
    assert [last, *ids] == sorted([last, *ids])
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(hex=i).version == 7 for i in ids)


def test_threads_never_get_the_same_id(make_record_id: Callable[[], str]) -> None:
    found: list[list[str]] = []

    def make() -> None:
        found.append([make_record_id() for _ in range(5_000)])

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for ids in found for i in ids]
    assert len(set(everything)) == len(everything) == 20_000
    assert all(ids == sorted(ids) for ids in found)


def _ids_made_in_a_forked_child(make: Callable[[], str], count: int = 100) -> list[str]:
    """``count`` ids made by ``make`` in a child forked after ``make`` filled its pool here."""
    make()  # the pool holds random bits the child must not reuse
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.write(write, "".join(make() for _ in range(count)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return [text[i : i + 32] for i in range(0, len(text), 32)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_other_random_bits_than_its_parent(
    make_record_id: Callable[[], str],
) -> None:
    child = _ids_made_in_a_forked_child(make_record_id)
    parent = [make_record_id() for _ in range(100)]
    assert len(child) == 100

    def tails(ids: list[str]) -> set[str]:
        return {i[16:] for i in ids}  # the variant bits and the 62 random ones

    assert not tails(child) & tails(parent)


def test_a_record_takes_the_ids_of_the_span_current_at_finish_when_none_is_given() -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from upstream_ops.collector import Collector
    from upstream_ops.recorder import Recorder, RequestFacts
    from upstream_ops.sinks import MemorySink

    recorder = Recorder(sink=MemorySink())
    facts = RequestFacts("GET", "/x", None, 502, 1, 1.0)
    try:
        assert recorder._build(Collector("r"), facts).trace_id is None  # no span is current
        context = SpanContext(0xAB, 0xCD, is_remote=False, trace_flags=TraceFlags(1))
        with trace.use_span(NonRecordingSpan(context)):
            record = recorder._build(Collector("r"), facts)
        assert (record.trace_id, record.span_id) == (f"{0xAB:032x}", f"{0xCD:016x}")
    finally:
        recorder.dispatcher.close()


def test_every_field_of_a_built_record_comes_from_its_source() -> None:
    # _build passes the fields positionally (cheaper): a field out of order must show here.
    from opentelemetry.trace import SpanContext, TraceFlags

    from upstream_ops.collector import Collector
    from upstream_ops.events import UpstreamErrorEvent
    from upstream_ops.record import RECORD_FIELDS
    from upstream_ops.recorder import Recorder, RequestFacts
    from upstream_ops.sinks import MemorySink

    recorder = Recorder(sink=MemorySink(), service="svc", max_events=1)
    collector = Collector("req-1", max_events=1)
    for status in (502, 503):
        collector.append(UpstreamErrorEvent(upstream_status_code=status, message=f"m{status}"))
    collector.set_summary(504, "summary message", "summary detail")
    context = SpanContext(0xAB, 0xCD, is_remote=False, trace_flags=TraceFlags(1))
    facts = RequestFacts(
        "post", "/p", "/r/{id}", 200, 1234, 5.6789, error=KeyError("k"), span_context=context
    )
    try:
        record = recorder._build(collector, facts)
    finally:
        recorder.dispatcher.close()
    expected = {
        "request_id": "req-1",
        "service": "svc",
        "method": "POST",
        "path": "/p",
        "route": "/r/{id}",
        "status_code": 200,
        "duration_ms": 5.679,
        "started_at_ms": 1234,
        "upstream_status_code": 504,
        "upstream_error_message": "summary message",
        "upstream_error_detail": "summary detail",
        "upstream_errors": collector.events,
        "dropped_events": 1,
        "error": "KeyError",
        "recovered": True,
        "trace_id": f"{0xAB:032x}",
        "span_id": f"{0xCD:016x}",
    }
    assert set(expected) | {"id"} == set(RECORD_FIELDS)
    assert {name: getattr(record, name) for name in expected} == expected
    assert len(record.id) == 32 and int(record.id, 16)


@pytest.mark.parametrize("status_code", [0, 200, 399, 400, 500])
@pytest.mark.parametrize(
    ("events", "summary_status", "dropped"),
    [(0, None, 0), (1, None, 0), (0, 504, 0), (0, None, 2), (2, 429, 1)],
)
def test_a_records_recovered_flag_is_the_rule_the_server_span_uses(
    status_code: int, events: int, summary_status: int | None, dropped: int
) -> None:
    # _build applies is_recovered(had_upstream_trouble(...)) inline (two calls fewer a record);
    # the OpenTelemetry server span calls them: both must say the same.
    from upstream_ops.collector import Collector
    from upstream_ops.events import UpstreamErrorEvent
    from upstream_ops.recorder import Recorder, RequestFacts, had_upstream_trouble, is_recovered
    from upstream_ops.sinks import MemorySink

    collector = Collector("r")
    for i in range(events):
        collector.append(UpstreamErrorEvent(upstream_status_code=502, message=f"m{i}"))
    if summary_status is not None:
        collector.set_summary(summary_status)
    collector.dropped_events = dropped
    recorder = Recorder(sink=MemorySink())
    try:
        record = recorder._build(collector, RequestFacts("GET", "/x", None, status_code, 1, 1.0))
    finally:
        recorder.dispatcher.close()
    expected = is_recovered(had_upstream_trouble(collector, collector.events), status_code)
    assert record.recovered is expected


@pytest.mark.parametrize(
    ("duration", "stored"),
    [(5.6789, 5.679), (0.0004, 0.0), (1e16, 1e16), (float("inf"), float("inf"))],
)
def test_a_records_duration_is_kept_to_the_microsecond(duration: float, stored: float) -> None:
    from upstream_ops.collector import Collector
    from upstream_ops.recorder import Recorder, RequestFacts
    from upstream_ops.sinks import MemorySink

    recorder = Recorder(sink=MemorySink())
    try:
        record = recorder._build(Collector("r"), RequestFacts("GET", "/x", None, 502, 1, duration))
    finally:
        recorder.dispatcher.close()
    assert record.duration_ms == stored


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_other_request_ids_than_its_parent(
    make_request_id: Callable[[], str],
) -> None:
    made = _ids_made_in_a_forked_child(make_request_id)
    child = {request_id[12:] for request_id in made}  # the tails, after the ms
    parent = {make_request_id()[12:] for _ in range(100)}
    assert len(child) == len(parent) == 100
    assert not child & parent
    for request_id in (made[0], make_request_id()):
        parsed = uuid.UUID(hex=request_id)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_a_records_method_path_and_route_are_sanitized_whether_kept_or_not() -> None:
    # _build looks the three texts up in the sanitizer's kept results before it calls it.
    from upstream_ops.collector import Collector
    from upstream_ops.recorder import Recorder, RequestFacts
    from upstream_ops.sanitize import (
        REDACTED,
        Sanitizer,
        get_default_sanitizer,
        set_default_sanitizer,
    )
    from upstream_ops.sinks import MemorySink

    class Marking(Sanitizer):
        def label(self, text: str | bytes | None, max_bytes: int = 512) -> str:
            return "L:" + super().label(text, max_bytes)

        def message(self, text: str | bytes | None, max_bytes: int = 1024) -> str:
            return "M:" + super().message(text, max_bytes)

    recorder = Recorder(sink=MemorySink())
    facts = RequestFacts("get\n", "/x?token=abc123", "/r/{id}\tz", 502, 1, 1.0)
    before = get_default_sanitizer()
    try:
        for sanitizer, label, message in ((before, "", ""), (Marking(), "L:", "M:")):
            set_default_sanitizer(sanitizer)
            for _ in range(2):  # the second time from the kept results (none for a subclass)
                record = recorder._build(Collector("r"), facts)
                assert record.method == f"{label}GET".upper()
                assert record.path == f"{message}/x?token={REDACTED}"
                assert record.route == f"{label}/r/{{id}} z"
    finally:
        set_default_sanitizer(before)
        recorder.dispatcher.close()
