"""The dispatcher with a spool: nothing lost while the sink is down, slow, or the process stops."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import OTel, wait_for
from tests.sink_records import bare_record
from upstream_ops.dispatcher import Dispatcher
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import MemorySink, SQLiteSink
from upstream_ops.spool import Spool


def rec(i: int) -> RequestRecord:
    return RequestRecord(id=f"id-{i:06d}", request_id=f"req-{i}", started_at_ms=i, status_code=200)


class SwitchableSink:
    """Raises ConnectionError while ``down``; remembers every record and every call."""

    def __init__(self, down: bool = False, delay: float = 0.0) -> None:
        self.down = down
        self.delay = delay
        self.calls = 0
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()

    def write(self, records: Sequence[RequestRecord]) -> None:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise ConnectionError("database unreachable")
        with self._lock:
            self.records.extend(records)

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [r.id for r in self.records]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def dispatchers() -> Iterator[list[Dispatcher]]:
    made: list[Dispatcher] = []
    yield made
    for d in made:
        d.close(timeout=2)


def make(
    dispatchers: list[Dispatcher], sink: object, spool_dir: Path, **options: object
) -> Dispatcher:
    settings: dict[str, object] = {"batch_interval": 0.01, "write_attempts": 2, **options}
    d = Dispatcher(sink, spool_dir=spool_dir, **settings)  # type: ignore[arg-type]
    dispatchers.append(d)
    return d


def test_an_outage_spools_then_replays_every_record_once_in_order(
    spool_dir: Path, dispatchers: list[Dispatcher], caplog: pytest.LogCaptureFixture
) -> None:
    sink = SwitchableSink(down=True)
    d = make(dispatchers, sink, spool_dir, batch_size=50)
    with caplog.at_level(logging.WARNING, logger="upstream_ops"):
        for i in range(2000):
            assert d.submit(rec(i))
        # nothing is left only in memory; the sink refuses, so flush does not wait for it
        assert d.flush(timeout=10)
        stats = d.stats()
        assert (stats.spooled, stats.in_spool, stats.written, stats.queued) == (2000, 2000, 0, 0)
        calls_during_outage = sink.calls
        time.sleep(1.0)
        # the circuit: a few probes, not write_attempts per batch for 40 batches
        assert sink.calls - calls_during_outage <= 4
        sink.down = False
        assert wait_for(lambda: d.stats().in_spool == 0, timeout=15)
        assert d.flush(timeout=5)
    assert sink.ids == [rec(i).id for i in range(2000)]
    stats = d.stats()
    assert (stats.written, stats.replayed, stats.failed, stats.dropped) == (2000, 2000, 0, 0)
    assert "spooling records to" in caplog.text and "accepts writes again" in caplog.text
    assert list(spool_dir.glob("*/*.jsonl")) == []


def test_records_after_recovery_go_straight_to_the_sink_again(
    spool_dir: Path, dispatchers: list[Dispatcher]
) -> None:
    sink = SwitchableSink(down=True)
    d = make(dispatchers, sink, spool_dir)
    d.submit(rec(0))
    assert d.flush(timeout=10) and d.stats().spooled == 1
    sink.down = False
    assert wait_for(lambda: d.stats().in_spool == 0, timeout=10)
    for i in range(1, 101):
        d.submit(rec(i))
    assert d.flush(timeout=5)
    assert d.stats().spooled == 1  # the later records were not spooled
    assert sink.ids == [rec(i).id for i in range(101)]


def test_memory_stays_flat_however_long_the_outage(
    spool_dir: Path, dispatchers: list[Dispatcher]
) -> None:
    sink = SwitchableSink(down=True)
    d = make(dispatchers, sink, spool_dir, queue_size=2000)
    wave = [bare_record(f"warm-{i}", i, path="/" + "p" * 500) for i in range(2000)]
    for record in wave:
        d.submit(record)
    assert d.flush(timeout=10)  # the circuit is open now
    del wave

    def outage_wave(name: str) -> None:
        for i in range(2000):
            assert d.submit(bare_record(f"{name}-{i}", i, path="/" + "p" * 500))
        assert d.flush(timeout=10)

    tracemalloc.start()
    try:
        for n in range(3):
            outage_wave(f"early{n}")
        settled = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for n in range(10):  # 20,000 more records of ~1 KB: 20 MB if anything kept them
            outage_wave(f"late{n}")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.stats().in_spool == 28_000 and d.stats().dropped == 0
    assert current - settled < 500_000, (settled, current)  # flat: nothing grows per record
    assert peak - settled < 8_000_000, (settled, peak)  # at most about one queue's worth


def test_a_slow_sink_spills_to_the_spool_instead_of_dropping(
    spool_dir: Path, dispatchers: list[Dispatcher]
) -> None:
    sink = SwitchableSink(delay=0.1)
    d = make(dispatchers, sink, spool_dir, queue_size=1000, batch_size=20)
    for i in range(3000):
        assert d.submit(rec(i)), i
        if i % 20 == 0:
            time.sleep(0.001)  # requests take time; a tight loop would outrun any disk
    assert d.stats().dropped == 0
    assert wait_for(lambda: d.stats().spooled > 0, timeout=5)
    sink.delay = 0.0
    assert wait_for(lambda: d.flush(0.1) and d.stats().in_spool == 0, timeout=20)
    assert sorted(sink.ids) == [rec(i).id for i in range(3000)]
    assert len(set(sink.ids)) == 3000


def test_a_record_the_sink_rejects_as_data_is_not_spooled(
    spool_dir: Path, dispatchers: list[Dispatcher], tmp_path: Path
) -> None:
    sink = SQLiteSink(tmp_path / "ops.db")
    d = make(dispatchers, sink, spool_dir)
    d.submit(bare_record("huge-int", 1, status_code=2**70))  # SQLite raises OverflowError
    assert d.flush(timeout=10)
    stats = d.stats()
    assert (stats.failed, stats.spooled, stats.in_spool) == (1, 0, 0)
    d.submit(bare_record("fine", 2))
    assert d.flush(timeout=5)
    assert [r.id for r in sink.query_records(0, 10)] == ["fine"]


def test_a_poison_record_in_the_spool_is_given_up_after_others_pass(
    spool_dir: Path, dispatchers: list[Dispatcher], caplog: pytest.LogCaptureFixture
) -> None:
    class PickySink(SwitchableSink):
        """Stores nothing of a batch holding the poison record, with a non-data error."""

        def write(self, records: Sequence[RequestRecord]) -> None:
            if any(r.id == "poison" for r in records):
                raise RuntimeError("server rejected the batch")
            super().write(records)

    sink = PickySink()
    d = make(dispatchers, sink, spool_dir, batch_size=10)
    with caplog.at_level(logging.ERROR, logger="upstream_ops"):
        for i in range(5):
            d.submit(rec(i))
        d.submit(bare_record("poison", 99))
        for i in range(5, 40):
            d.submit(rec(i))
        assert wait_for(lambda: d.flush(0.1) and d.stats().in_spool == 0, timeout=20)
    assert sorted(sink.ids) == [rec(i).id for i in range(40)]
    assert d.stats().failed == 1
    assert "rejected spooled record poison" in caplog.text
    assert '"id":"poison"' in caplog.text  # its data is in the log


def test_a_new_dispatcher_adopts_and_replays_a_stopped_ones_spool(spool_dir: Path) -> None:
    down = SwitchableSink(down=True)
    first = Dispatcher(down, spool_dir=spool_dir, batch_interval=0.01, write_attempts=1)
    for i in range(300):
        first.submit(rec(i))
    assert first.close(timeout=5)
    assert len(list(spool_dir.iterdir())) == 1  # left for the next process

    sink = MemorySink()
    second = Dispatcher(sink, spool_dir=spool_dir, batch_interval=0.01)
    try:
        assert second.flush(timeout=10)
        assert [r.id for r in sink.records] == [rec(i).id for i in range(300)]
        stats = second.stats()
        assert (stats.enqueued, stats.written, stats.replayed) == (0, 300, 300)
    finally:
        second.close()
    assert list(spool_dir.iterdir()) == []


def test_close_spools_what_a_hung_sink_has_not_taken(spool_dir: Path) -> None:
    release = threading.Event()

    class HungSink(SwitchableSink):
        def write(self, records: Sequence[RequestRecord]) -> None:
            self.calls += 1
            release.wait(30)
            self.records.extend(records)

    sink = HungSink()
    d = Dispatcher(sink, spool_dir=spool_dir, batch_interval=0.01, batch_size=10)
    for i in range(500):
        d.submit(rec(i))
    assert wait_for(lambda: sink.calls == 1)
    started = time.monotonic()
    drained = d.close(timeout=1.0)
    assert time.monotonic() - started < 2.5
    # Only the batch inside the hung write is still in memory: the documented loss window.
    assert not drained and d.stats().queued == 10
    assert d.stats().spooled == 490
    release.set()
    assert wait_for(lambda: len(sink.records) == 10)
    adopted = Spool(spool_dir)
    assert adopted.open() == 490
    chunk = adopted.read(1000)
    assert chunk is not None and [r.id for r in chunk.records] == [
        rec(i).id for i in range(10, 500)
    ]
    adopted.commit(chunk)
    adopted.close()


def test_retention_purges_periodically(tmp_path: Path, dispatchers: list[Dispatcher]) -> None:
    sink = SQLiteSink(tmp_path / "ops.db")
    old_ms = time.time_ns() // 1_000_000 - 3 * 86_400_000
    sink.write([bare_record(f"old-{i}", old_ms + i) for i in range(30)])
    d = Dispatcher(sink, retention=timedelta(days=1), retention_interval=0.05, batch_interval=0.01)
    dispatchers.append(d)
    d.submit(bare_record("new", time.time_ns() // 1_000_000))
    assert d.flush(timeout=5)
    assert wait_for(lambda: [r.id for r in sink.query_records(0, 2**62)] == ["new"], timeout=5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"spool_dir": ""}, "spool_dir"),
        ({"spool_dir": "x", "spool_max_bytes": 1}, "spool_max_bytes"),
        ({"retention": "3 parsecs"}, "retention"),
        ({"retention": timedelta(0)}, "retention"),
        ({"retention": 30}, "retention"),
        ({"retention_interval": 0}, "retention_interval"),
    ],
)
def test_bad_options_raise_value_error_naming_them(
    tmp_path: Path, kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        Dispatcher(SQLiteSink(tmp_path / "ops.db"), **kwargs)  # type: ignore[arg-type]


def test_retention_needs_a_sink_that_can_purge() -> None:
    with pytest.raises(ValueError, match="retention needs a sink that can purge"):
        Dispatcher(MemorySink(), retention="30d")


def test_a_handler_someone_installed_is_left_alone() -> None:
    def theirs(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, theirs)
    try:
        d = Dispatcher(MemorySink())
        assert signal.getsignal(signal.SIGTERM) is theirs
        d.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


_SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time
    from upstream_ops import defaults
    from upstream_ops.dispatcher import Dispatcher
    from upstream_ops.record import RequestRecord
    from upstream_ops.sinks import SQLiteSink

    defaults.FLUSH_TIMEOUT_S = 1.5  # the SIGTERM drain's deadline: keep the test short

    class SlowSink(SQLiteSink):
        def write(self, records):
            time.sleep(0.05)
            super().write(records)

    d = Dispatcher(SlowSink(sys.argv[1]), spool_dir=sys.argv[2], batch_size=10,
                   batch_interval=0.01)
    for i in range(2000):
        d.submit(RequestRecord(id=f"id-{i:06d}", request_id="r", started_at_ms=i))
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigterm_drains_to_the_sink_and_the_spool_then_dies_of_sigterm(tmp_path: Path) -> None:
    db, spool_dir = tmp_path / "ops.db", tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_CHILD, str(db), str(spool_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=20)
    assert child.returncode == -signal.SIGTERM, err  # the default action, as without us
    with sqlite3.connect(db) as connection:
        written = {row[0] for row in connection.execute("SELECT id FROM ops_error_logs")}
    spool = Spool(spool_dir)
    spooled = spool.open()
    ids: list[str] = []
    while (chunk := spool.read(1000)) is not None:
        ids += [r.id for r in chunk.records]
        spool.commit(chunk)
    spool.close()
    assert spooled == len(ids) > 0 and written  # some reached the sink, the rest the disk
    assert written | set(ids) == {rec(i).id for i in range(2000)}
    assert not written & set(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_spool_and_never_adopts_its_parents(
    spool_dir: Path, tmp_path: Path
) -> None:
    sink = SwitchableSink(down=True)
    d = Dispatcher(sink, spool_dir=spool_dir, batch_interval=0.01, write_attempts=1)
    d.submit(rec(0))
    assert d.flush(timeout=5) and d.stats().in_spool == 1
    out = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            d.submit(rec(1))
            ok = d.flush(5)
            out.write_text(f"{ok} {d.stats().in_spool} {d.spool.directory}")  # type: ignore[union-attr]
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ok, in_spool, directory = out.read_text().split()
    assert (ok, in_spool) == ("True", "1")  # its own record only: the parent's dir is locked
    assert directory != str(d.spool.directory)  # type: ignore[union-attr]
    assert d.stats().in_spool == 1
    sink.down = False
    assert wait_for(lambda: d.stats().in_spool == 0, timeout=10)
    d.close()


def test_the_middlewares_and_flask_pass_the_options_through(tmp_path: Path) -> None:
    from flask import Flask

    from upstream_ops import UpstreamOpsMiddleware, UpstreamOpsWSGIMiddleware
    from upstream_ops.flask import UpstreamOps

    async def asgi_app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    options = {"spool_max_bytes": 1 << 20, "retention": "7d"}
    built = [
        UpstreamOpsMiddleware(
            asgi_app, sink=f"sqlite:///{tmp_path}/a.db", spool_dir=tmp_path / "a", **options
        ).dispatcher,
        UpstreamOpsWSGIMiddleware(
            lambda environ, start: [],
            sink=SQLiteSink(tmp_path / "b.db"),
            spool_dir=tmp_path / "b",
            **options,
        ).dispatcher,
    ]
    flask_ext = UpstreamOps(
        Flask("t"), sink=SQLiteSink(tmp_path / "c.db"), spool_dir=tmp_path / "c", **options
    )
    assert flask_ext.middleware is not None
    built.append(flask_ext.middleware.dispatcher)
    for d, name in zip(built, "abc", strict=True):
        assert d.spool is not None and d.spool.root == tmp_path / name
        assert d.spool.max_bytes == 1 << 20 and d.retention == timedelta(days=7)
        d.close(timeout=2)
    with pytest.raises(ValueError, match="spool_dir and retention"):
        UpstreamOpsMiddleware(asgi_app, dispatcher=built[0], spool_dir=tmp_path)


def test_the_records_metric_counts_spooled_then_written(
    spool_dir: Path, dispatchers: list[Dispatcher], otel: OTel
) -> None:
    sink = SwitchableSink(down=True)
    d = make(dispatchers, sink, spool_dir, meter_provider=otel.meter_provider)
    for i in range(300):
        d.submit(rec(i))
    assert d.flush(timeout=10)

    def outcomes() -> dict[str, int]:
        points = otel.metric_points("upstream_ops.records")
        return {attributes["outcome"]: value for attributes, value in points}

    assert outcomes() == {"spooled": 300}
    assert [value for _, value in otel.metric_points("upstream_ops.dispatcher.queued")] == [0]
    sink.down = False
    assert wait_for(lambda: d.stats().in_spool == 0, timeout=10)
    assert outcomes() == {"spooled": 300, "written": 300}  # written once it reached the sink
