from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence

import pytest

from upstream_ops import RequestRecord, UpstreamErrorEvent, flush
from upstream_ops.dispatcher import Dispatcher
from upstream_ops.sinks import MemorySink


def make_record(i: int) -> RequestRecord:
    return RequestRecord(id=f"id-{i}", request_id=f"req-{i}", status_code=200)


class FlakySink:
    """Fails the first ``failures`` writes, then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.records: list[RequestRecord] = []

    def write(self, records: Sequence[RequestRecord]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("sink down")
        self.records.extend(records)


class BlockingSink:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.records: list[RequestRecord] = []

    def write(self, records: Sequence[RequestRecord]) -> None:
        self.release.wait(10)
        self.records.extend(records)


def test_records_are_batched_and_flush_drains(memory_sink: MemorySink) -> None:
    d = Dispatcher(memory_sink, batch_size=10, batch_interval=5.0)
    for i in range(25):
        assert d.submit(make_record(i))
    assert d.flush(timeout=5)
    assert [r.id for r in memory_sink.records] == [f"id-{i}" for i in range(25)]
    stats = d.stats()
    assert (stats.enqueued, stats.written, stats.dropped, stats.failed, stats.queued) == (
        25,
        25,
        0,
        0,
        0,
    )
    d.close()


def test_partial_batch_is_written_after_the_interval(memory_sink: MemorySink) -> None:
    d = Dispatcher(memory_sink, batch_size=100, batch_interval=0.05)
    d.submit(make_record(1))
    deadline = time.monotonic() + 5
    while not memory_sink.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(memory_sink.records) == 1
    d.close()


class BatchLog:
    """Remembers the size of each batch it is given."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.written = threading.Event()

    def write(self, records: Sequence[RequestRecord]) -> None:
        self.sizes.append(len(records))
        self.written.set()


def test_a_full_batch_is_written_without_waiting_for_the_interval() -> None:
    sink = BatchLog()
    d = Dispatcher(sink, batch_size=5, batch_interval=60.0)
    for i in range(5):
        d.submit(make_record(i))
    assert sink.written.wait(10)  # submit woke the intake thread for the full batch
    assert sink.sizes == [5]
    d.close()


def test_records_arriving_while_a_batch_gathers_go_into_that_batch() -> None:
    sink = BatchLog()
    d = Dispatcher(sink, batch_size=100, batch_interval=0.5)
    for i in range(20):
        d.submit(make_record(i))
        time.sleep(0.005)
    assert sink.written.wait(10)
    assert d.flush(5)
    assert sum(sink.sizes) == 20 and sink.sizes[0] > 1  # not one batch per record
    d.close()


def test_failing_write_is_retried_then_succeeds() -> None:
    sink = FlakySink(failures=2)
    d = Dispatcher(sink, write_attempts=3, batch_interval=0.01)
    d.submit(make_record(1))
    assert d.flush(timeout=10)
    assert [r.id for r in sink.records] == ["id-1"]
    assert sink.calls == 3
    assert d.stats().failed == 0
    d.close()


def test_write_that_keeps_failing_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(failures=100)
    d = Dispatcher(sink, write_attempts=2, batch_interval=0.01)
    with caplog.at_level(logging.ERROR, logger="upstream_ops"):
        d.submit(make_record(1))
        d.submit(make_record(2))
        assert d.flush(timeout=10)
    assert d.stats().failed == 2
    assert d.stats().written == 0
    assert "FlakySink failed to write" in caplog.text
    d.close()


def test_full_queue_drops_new_records_counts_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = BlockingSink()
    d = Dispatcher(sink, queue_size=5, batch_size=1, batch_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="upstream_ops"):
        results = [d.submit(make_record(i)) for i in range(50)]
    assert results.count(False) >= 40  # one in the worker's hands, five queued
    assert d.stats().dropped == results.count(False)
    assert caplog.text.count("record queue full") == 1
    sink.release.set()
    assert d.flush(timeout=10)
    assert len(sink.records) == results.count(True)
    d.close()


def test_submit_never_blocks_on_a_slow_sink() -> None:
    sink = BlockingSink()
    d = Dispatcher(sink, batch_interval=0.01)
    started = time.perf_counter()
    for i in range(1000):
        d.submit(make_record(i))
    assert time.perf_counter() - started < 1.0
    assert not d.flush(timeout=0.05)  # the sink is still blocked: flush reports the timeout
    sink.release.set()
    assert d.flush(timeout=10)
    assert len(sink.records) == 1000
    d.close()


def _event_records(start: int, count: int) -> list[RequestRecord]:
    return [
        RequestRecord(
            id=f"id-{i}",
            request_id=f"req-{i}",
            upstream_errors=[UpstreamErrorEvent(upstream_status_code=504, attempt=i)],
        )
        for i in range(start, start + count)
    ]


class TimedSink(MemorySink):
    """Takes ``seconds`` a record to write, and blocks while ``release`` is not set."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.release = threading.Event()
        self.release.set()

    def write(self, records: Sequence[RequestRecord], /) -> None:
        self.release.wait(10)
        time.sleep(self.seconds * len(records))
        super().write(records)


def _fill_behind(d: Dispatcher, sink: TimedSink, start: int, count: int) -> list[RequestRecord]:
    """Submit ``count`` records while the sink is blocked; returns them."""
    sink.release.clear()
    records = _event_records(start, count)
    for record in records:
        assert d.submit(record)
    return records


def test_records_waiting_behind_a_slow_sink_are_packed_and_written_unchanged() -> None:
    sink = TimedSink(0.1)  # 100 ms a record: 5 records queued wait _PACK_WAIT_S
    d = Dispatcher(sink, batch_size=4, batch_interval=0.01)
    assert d.submit(make_record(-1)) and d.flush(timeout=10)  # the sink's speed is known
    records = _fill_behind(d, sink, 0, 100)
    queued = list(d._queue)
    # Behind two full batches, records wait as flat tuples the garbage collector does not track.
    assert len(queued) >= 80
    assert sum(type(item) is tuple for item in queued) >= len(queued) - 8
    gc.collect()
    assert not any(gc.is_tracked(item) for item in queued if type(item) is tuple)
    sink.seconds = 0.0
    sink.release.set()
    assert d.flush(timeout=10)
    assert sink.records[1:] == records
    d.close()


def test_records_a_fast_sink_will_take_soon_are_not_packed() -> None:
    """Packing costs the request about 2 µs; a burst in front of a fast sink is not worth it."""
    sink = TimedSink(0.0)
    d = Dispatcher(sink, batch_size=4, batch_interval=0.01)
    # Before the sink's first write its speed is unknown: records behind two batches are packed.
    first = _fill_behind(d, sink, 0, 40)
    assert any(type(item) is tuple for item in d._queue)
    sink.release.set()
    assert d.flush(timeout=10)
    burst = _fill_behind(d, sink, 40, 100)
    assert len(d._queue) >= 80
    assert not any(type(item) is tuple for item in d._queue)
    sink.release.set()
    assert d.flush(timeout=10)
    assert sink.records == first + burst
    d.close()


def test_module_flush_drains_every_dispatcher() -> None:
    sinks = [MemorySink(), MemorySink()]
    ds = [Dispatcher(s, batch_interval=10) for s in sinks]
    for d in ds:
        d.submit(make_record(1))
    assert flush(timeout=5)
    assert [len(s.records) for s in sinks] == [1, 1]
    for d in ds:
        d.close()


def test_close_stops_the_worker_and_closes_the_sink() -> None:
    class ClosingSink(MemorySink):
        closed = False

        def close(self) -> None:
            self.closed = True

    sink = ClosingSink()
    d = Dispatcher(sink)
    d.submit(make_record(1))
    assert d.close(timeout=5)
    assert sink.closed and len(sink.records) == 1
    # a later record starts the worker again instead of being lost
    d.submit(make_record(2))
    assert d.flush(timeout=5)
    assert len(sink.records) == 2
    d.close()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"queue_size": 0}, "queue_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"batch_interval": 0}, "batch_interval"),
        ({"write_attempts": 0}, "write_attempts"),
    ],
)
def test_bad_options_raise_value_error_naming_them(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Dispatcher(MemorySink(), **kwargs)  # type: ignore[arg-type]


def test_sink_without_write_is_rejected() -> None:
    with pytest.raises(ValueError, match="write"):
        Dispatcher(object())  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_restarts_the_worker(tmp_path: object) -> None:
    import json
    import pathlib

    out = pathlib.Path(str(tmp_path)) / "child.json"
    sink = MemorySink()
    d = Dispatcher(sink, batch_interval=0.01)
    d.submit(make_record(0))
    assert d.flush(5)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            sink.records.clear()
            d.submit(make_record(1))
            ok = d.flush(5)
            out.write_text(
                json.dumps(
                    {"ok": ok, "ids": [r.id for r in sink.records], "enqueued": d.stats().enqueued}
                )
            )
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(out.read_text()) == {"ok": True, "ids": ["id-1"], "enqueued": 1}
    d.close()
    assert sys.platform  # parent still fine
