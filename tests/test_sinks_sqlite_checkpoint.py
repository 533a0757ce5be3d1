"""The SQLite sink's WAL checkpoints run on a thread of their own, and the WAL stays bounded."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sink_records import bare_record
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import SQLiteSink
from upstream_ops.sinks import _sqlite_checkpoint as checkpoint_module
from upstream_ops.sinks import sqlite as sqlite_module

ALL_TIME = (0, 2**62)
THREAD = "upstream-ops-sqlite-checkpoint"
#: Small enough that a test's few hundred records go through many checkpoints and WAL restarts.
EVERY = 20
LIMIT_FRAMES = 40


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ops.db"


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "_CHECKPOINT_EVERY", EVERY)
    monkeypatch.setattr(sqlite_module, "_WAL_LIMIT_FRAMES", LIMIT_FRAMES)


@pytest.fixture
def sink(db: Path, small: None) -> Iterator[SQLiteSink]:
    s = SQLiteSink(db)
    yield s
    s.close()


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    return errors


def batch(start: int, size: int = 10) -> list[RequestRecord]:
    """Small records: a batch adds about 7 pages to the WAL."""
    event = UpstreamErrorEvent(at_unix_ms=start, platform="rix", upstream_status_code=502)
    return [
        bare_record(f"r{i:06d}", i, upstream_errors=[event]) for i in range(start, start + size)
    ]


def write_batches(sink: SQLiteSink, batches: int, start: int = 0, size: int = 10) -> int:
    for n in range(batches):
        sink.write(batch(start + size * n, size))
    return start + size * batches


def checkpoint_thread(sink: SQLiteSink) -> threading.Thread | None:
    thread = sink._checkpointer._thread
    assert thread is None or thread.name == THREAD
    return thread


def wal_frames(db: Path) -> int:
    """The pages in the WAL since it last started over, read without a lock from the header of
    the WAL index (``mxFrame`` in the ``-shm`` file), so as not to checkpoint anything."""
    frames: int = struct.unpack("=I", Path(f"{db}-shm").read_bytes()[16:20])[0]
    return frames


def frames_while_writing(sink: SQLiteSink, db: Path, batches: int, start: int = 0) -> list[int]:
    seen = []
    for n in range(batches):
        sink.write(batch(start + 10 * n))
        seen.append(wal_frames(db))
    return seen


def restarts(frames: list[int]) -> int:
    return sum(after < before for before, after in itertools.pairwise(frames))


def stored(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        n = connection.execute("SELECT COUNT(*) FROM ops_error_logs").fetchone()[0]
    assert isinstance(n, int)
    return n


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_connections_leave_checkpoints_to_the_thread(sink: SQLiteSink) -> None:
    sink.write(batch(0))
    connection = sink._connection()
    assert connection.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    assert connection.execute("PRAGMA journal_size_limit").fetchone() == (
        sqlite_module._WAL_SIZE_LIMIT,
    )


def test_the_thread_starts_when_a_checkpoint_is_due_and_close_joins_it(
    sink: SQLiteSink, db: Path, thread_errors: list[threading.ExceptHookArgs]
) -> None:
    sink.write(batch(0))  # 10 records: none due yet
    assert checkpoint_thread(sink) is None
    write_batches(sink, 2, start=10)
    thread = checkpoint_thread(sink)
    assert thread is not None
    sink.close()
    assert not thread.is_alive()
    assert checkpoint_thread(sink) is None
    assert not Path(f"{db}-wal").exists()  # the last connection closed copied it all
    write_batches(sink, 2, start=100)  # a later write starts it again
    again = checkpoint_thread(sink)
    assert again is not None
    assert again.is_alive()
    sink.close()
    assert not again.is_alive()
    assert stored(db) == 50
    assert thread_errors == []


def test_the_wal_starts_over_under_a_steady_stream_of_writes(sink: SQLiteSink, db: Path) -> None:
    """Without checkpoints the WAL only grows (the test below); here it starts over again and
    again. How often depends on how fast the thread's checkpoints are (``fsync``), so the test
    writes until it has seen three restarts, which takes far fewer batches than this."""
    frames: list[int] = []
    end = 0
    while restarts(frames) < 3 and end < 10_000:
        end = write_batches(sink, 1, start=end)
        frames.append(wal_frames(db))
    assert restarts(frames) == 3
    sink.close()
    reopened = SQLiteSink(db)
    assert reopened.query_records(*ALL_TIME, limit=1)[0].id == f"r{end - 1:06d}"
    reopened.close()
    assert stored(db) == end


def test_the_wal_starts_over_with_batches_of_one_record(sink: SQLiteSink, db: Path) -> None:
    """A batch of one writes a page to each b-tree: the checkpoints count commits, not records."""
    frames: list[int] = []
    end = 0
    while restarts(frames) < 3 and end < 10_000:
        end = write_batches(sink, 1, start=end, size=1)
        frames.append(wal_frames(db))
    assert restarts(frames) == 3
    assert stored(db) == end


def test_without_checkpoints_the_wal_would_only_grow(db: Path, small: None) -> None:
    sink = SQLiteSink(db)
    sink._checkpointer.every = sink._checkpointer.limit_frames = 10**9
    frames = frames_while_writing(sink, db, 120)
    assert restarts(frames) == 0
    assert frames[-1] > 100 * LIMIT_FRAMES / 10
    sink.close()


def test_a_reader_holding_a_snapshot_lets_the_wal_grow_until_it_is_done(
    sink: SQLiteSink, db: Path
) -> None:
    end = write_batches(sink, 3)
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM ops_error_logs").fetchone() == (30,)
    frames = frames_while_writing(sink, db, 60, start=end)  # no error, though little is copied
    end += 600
    assert reader.execute("SELECT COUNT(*) FROM ops_error_logs").fetchone() == (30,)
    assert restarts(frames) == 0
    assert frames[-1] > 5 * LIMIT_FRAMES
    reader.execute("COMMIT")
    reader.close()
    for _ in range(100):
        end = write_batches(sink, 1, start=end)
        if wal_frames(db) < frames[-1]:
            break  # started over
    else:
        pytest.fail("the WAL never started over")
    assert stored(db) == end


def test_records_survive_close_and_reopen_with_checkpoints_between(
    sink: SQLiteSink, db: Path
) -> None:
    end = write_batches(sink, 30)
    sink.close()
    again = SQLiteSink(db)
    end = write_batches(again, 30, start=end)
    again.close()
    with contextlib.closing(sqlite3.connect(db)) as connection:
        ids = [key for (key,) in connection.execute("SELECT id FROM ops_error_logs ORDER BY id")]
        events = connection.execute("SELECT COUNT(*) FROM ops_upstream_error_events").fetchone()
    assert ids == [f"r{i:06d}" for i in range(end)]
    assert events == (end,)


def test_purge_counts_towards_checkpoints(sink: SQLiteSink, db: Path) -> None:
    sink.write(batch(0, size=60))
    sink.close()  # so that only the purge can start a thread
    assert sink.purge("1d", batch_size=25) == 60
    assert checkpoint_thread(sink) is not None
    assert stored(db) == 0


def test_a_failing_checkpoint_is_logged_and_writing_goes_on(
    sink: SQLiteSink,
    db: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[threading.ExceptHookArgs],
) -> None:
    monkeypatch.setattr(checkpoint_module, "_CHECKPOINT", "PRAGMA wal_checkpoint(NO_SUCH_MODE")
    with caplog.at_level(logging.DEBUG, logger=checkpoint_module.__name__):
        end = write_batches(sink, 20)  # the writer's own checkpoints fail too, once over the limit
        wait_for(lambda: "checkpoint of" in caplog.text)
    assert stored(db) == end
    assert thread_errors == []


def test_a_file_gone_from_under_the_sink_is_not_created_again(
    sink: SQLiteSink,
    db: Path,
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[threading.ExceptHookArgs],
) -> None:
    checkpointer = sink._checkpointer
    write_batches(sink, 1)
    moved = db.with_name("moved.db")
    for suffix in ("", "-wal", "-shm"):
        os.replace(f"{db}{suffix}", f"{moved}{suffix}")
    with caplog.at_level(logging.DEBUG, logger=checkpoint_module.__name__):
        checkpointer.wrote(EVERY, sink._connection)  # the thread opens the file by its old name
        wait_for(lambda: "cannot open" in caplog.text)
    checkpointer.close()
    assert not db.exists()
    assert thread_errors == []


def test_at_interpreter_shutdown_the_writer_checkpoints_itself(
    sink: SQLiteSink, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    frames = frames_while_writing(sink, db, 60)
    assert checkpoint_thread(sink) is None
    # every 2 batches, so the WAL starts over at the next one: exactly bounded
    assert restarts(frames) >= 25
    assert max(frames) < 3 * frames[0]
    assert stored(db) == 600


def test_an_idle_thread_ends_and_a_new_one_starts_later(db: Path) -> None:
    checkpointer = checkpoint_module.WalCheckpointer(
        db, every=1, limit_frames=10, busy_timeout_s=1.0, idle_s=0.05
    )
    connection = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA wal_autocheckpoint = 0")
    connection.execute("CREATE TABLE t (x)")
    checkpointer.wrote(1, lambda: connection)
    first = checkpointer._thread
    assert first is not None
    first.join(timeout=5)
    assert not first.is_alive()
    assert checkpointer._thread is None
    connection.execute("INSERT INTO t VALUES (1)")
    checkpointer.wrote(1, lambda: connection)
    second = checkpointer._thread
    assert second is not None
    assert second is not first
    checkpointer.close()
    assert not second.is_alive()
    connection.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_waits_for_a_checkpoint_under_way(tmp_path: Path) -> None:
    # A thread inside SQLite at the fork may hold one of its process-wide mutexes: the child would
    # wait for it forever. The fork waits until the checkpoint (here: its lock, held 0.3 s) is over.
    checkpointer = checkpoint_module.WalCheckpointer(
        tmp_path / "x.db", every=1, limit_frames=10, busy_timeout_s=1.0
    )
    inside, done = threading.Event(), threading.Event()

    def checkpoint() -> None:
        with checkpointer._running:
            inside.set()
            time.sleep(0.3)
            done.set()

    thread = threading.Thread(target=checkpoint)
    thread.start()
    assert inside.wait(5)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if done.is_set() else 1)  # the child's copy: was the checkpoint over?
    _, status = os.waitpid(pid, 0)
    thread.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert checkpointer._running.acquire(blocking=False)  # released again in the parent
    checkpointer._running.release()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_checkpoints_with_a_thread_of_its_own(sink: SQLiteSink, db: Path) -> None:
    end = write_batches(sink, 5)
    parents = checkpoint_thread(sink)
    assert parents is not None  # a thread the child does not have
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            write_batches(sink, 20, start=10_000)
            childs = checkpoint_thread(sink)
            code = 0 if childs is not None and childs is not parents and childs.is_alive() else 2
            sink.close()
            code = code or (3 if childs is None or childs.is_alive() else 0)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    end = write_batches(sink, 5, start=end)
    assert checkpoint_thread(sink) is parents
    assert stored(db) == end + 200
    sink.close()
    assert not parents.is_alive()


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tests.sink_records import full_record
    from upstream_ops.sinks import sqlite

    sqlite._CHECKPOINT_EVERY, sqlite._WAL_LIMIT_FRAMES = 20, 40
    db, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    sink = sqlite.SQLiteSink(db)
    while not go.exists():
        time.sleep(0.005)
    for n in range(40):
        sink.write([full_record(f"{name}-{n}-{i}") for i in range(10)])
    sink.close()
    """
)


def test_processes_writing_one_file_checkpoint_it_together(tmp_path: Path, db: Path) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db), name, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for name in ("p1", "p2", "p3")
    ]
    time.sleep(0.2)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert err == b""
    assert stored(db) == 1200
    assert not Path(f"{db}-wal").exists()  # the last one to close copied it all
