from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sink_records import BAD_RECORDS, full_event, full_record, schema_1_rows
from upstream_ops.defaults import QUERY_LIMIT_MAX
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RECORD_FIELDS, RequestRecord
from upstream_ops.sinks import SQLiteSink
from upstream_ops.sinks import sqlite as sqlite_module
from upstream_ops.sinks._query import (
    EVENT_COLUMNS,
    RECORD_COLUMNS,
    SCHEMA_TABLE_DDL,
    SCHEMA_VERSION,
    SQLITE_UNSERVED_INDEXES,
    UNUSED_INDEXES,
    insert_event_sql,
    insert_record_sql,
    record_rows,
)
from upstream_ops.sinks.base import Sink
from upstream_ops.store import QueryFilter, Store

ALL_TIME = (0, 2**62)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ops.db"


@pytest.fixture
def sink(db: Path) -> Iterator[SQLiteSink]:
    s = SQLiteSink(db)
    yield s
    s.close()


def raw(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def count(db: Path, table: str) -> int:
    [(n,)] = raw(db, f"SELECT COUNT(*) FROM {table}")
    assert isinstance(n, int)
    return n


# --- construction -----------------------------------------------------------------------------


def test_is_a_sink_and_a_store(sink: SQLiteSink) -> None:
    assert isinstance(sink, Sink)
    assert isinstance(sink, Store)


def test_no_io_until_first_use(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "ops.db"
    s = SQLiteSink(path)
    assert not path.parent.exists()
    s.write([full_record()])
    assert path.exists()
    s.close()


def test_query_on_a_fresh_file_creates_the_schema(db: Path) -> None:
    s = SQLiteSink(db)
    assert s.query_records(*ALL_TIME) == []
    assert s.query_events(*ALL_TIME) == []
    s.close()


@pytest.mark.parametrize("path", ["", ":memory:", "file:ops.db?mode=memory", 123, None])
def test_bad_path(path: object) -> None:
    with pytest.raises(ValueError, match="path"):
        SQLiteSink(path)  # type: ignore[arg-type]


# --- schema -----------------------------------------------------------------------------------


def test_schema_tables_indexes_version_and_pragmas(sink: SQLiteSink, db: Path) -> None:
    sink.write([full_record()])
    tables = {name for (name,) in raw(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"ops_error_logs", "ops_upstream_error_events", "upstream_ops_schema"}
    indexes = {
        name
        for (name,) in raw(
            db, "SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
        )
    }
    assert indexes == {
        "ops_error_logs_started_at_idx",
        "ops_error_logs_request_id_idx",
        "ops_upstream_error_events_at_idx",
    }
    assert raw(db, "SELECT version FROM upstream_ops_schema") == [(SCHEMA_VERSION,)]
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]
    assert raw(db, "PRAGMA page_size") == [(sqlite_module._PAGE_SIZE,)]
    record_cols = [row[1] for row in raw(db, "PRAGMA table_info(ops_error_logs)")]
    assert record_cols == [*RECORD_FIELDS, "created_at_ms"]
    event_cols = [row[1] for row in raw(db, "PRAGMA table_info(ops_upstream_error_events)")]
    assert event_cols == [c.name for c in EVENT_COLUMNS]
    pk = [row[1] for row in raw(db, "PRAGMA table_info(ops_upstream_error_events)") if row[5]]
    assert pk == ["record_id", "seq"]


def test_shared_column_list_follows_the_record_model() -> None:
    assert tuple(c.name for c in RECORD_COLUMNS) == (*RECORD_FIELDS, "created_at_ms")


def test_reopening_an_existing_file_keeps_one_version_row(db: Path) -> None:
    for i in range(3):
        s = SQLiteSink(db)
        s.write([full_record(f"rec-{i}")])
        s.close()
    assert raw(db, "SELECT version FROM upstream_ops_schema") == [(SCHEMA_VERSION,)]
    assert count(db, "ops_error_logs") == 3


def test_newer_schema_version_warns_and_still_works(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = SQLiteSink(db)
    first.write([full_record("a")])
    first.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE upstream_ops_schema SET version = 99")
    later = SQLiteSink(db)
    with caplog.at_level(logging.WARNING, logger="upstream_ops.sinks.sqlite"):
        assert [r.id for r in later.query_records(*ALL_TIME)] == ["a"]
    later.close()
    assert "schema version 99" in caplog.text


def test_a_schema_1_file_is_migrated_and_its_records_read_as_before(db: Path) -> None:
    old = full_record(
        "old", started_at_ms=1, events=[full_event(at_unix_ms=1), full_event(at_unix_ms=2)]
    )
    old_bare = RequestRecord(id="old-bare", request_id="req-old-bare", started_at_ms=2)
    with sqlite3.connect(db) as conn:  # what version 1 of the sink made and wrote
        for statement in [SCHEMA_TABLE_DDL, *sqlite_module._MIGRATIONS[1]]:
            conn.execute(statement)
        conn.execute("INSERT INTO upstream_ops_schema (version) VALUES (1)")
        for record in (old, old_bare):
            row, events = schema_1_rows(record)
            conn.execute(insert_record_sql("?"), row)
            conn.executemany(insert_event_sql("?"), events)
    new = full_record("new", started_at_ms=3, events=[full_event(at_unix_ms=3)])
    sink = SQLiteSink(db)
    sink.write([new, old])  # "old" again: still stored once
    assert raw(db, "SELECT version FROM upstream_ops_schema") == [(SCHEMA_VERSION,)]
    dropped = (*UNUSED_INDEXES, *SQLITE_UNSERVED_INDEXES)
    assert [n for (n,) in raw(db, "SELECT name FROM sqlite_master") if n in dropped] == []
    assert sink.query_records(*ALL_TIME) == [new, old_bare, old]
    assert sink.search_records(QueryFilter(*ALL_TIME), limit=2).records == [new, old_bare]
    assert (sink.get_record("req-old"), sink.get_record("req-new")) == (old, new)
    assert sink.query_events(*ALL_TIME) == [*new.upstream_errors, *reversed(old.upstream_errors)]
    assert count(db, "ops_upstream_error_events") == 3
    sink.close()


def test_a_schema_2_file_is_migrated_and_every_query_answers_as_before(db: Path) -> None:
    records = [
        full_record(
            "a", started_at_ms=1, events=[full_event(at_unix_ms=1), full_event(at_unix_ms=2)]
        ),
        full_record("b", started_at_ms=2, events=[full_event(at_unix_ms=3, platform="other")]),
        RequestRecord(id="c", request_id="req-c", started_at_ms=3),
    ]
    with sqlite3.connect(db) as conn:  # what version 2 of the sink made and wrote
        for statement in [SCHEMA_TABLE_DDL, *sqlite_module._MIGRATIONS[1]]:
            conn.execute(statement)
        for statement in sqlite_module._MIGRATIONS[2]:
            conn.execute(statement)
        conn.execute("INSERT INTO upstream_ops_schema (version) VALUES (2)")
        for record in records[:2]:
            row, events = record_rows(record, 5)
            conn.execute(insert_record_sql("?"), row)
            conn.executemany(insert_event_sql("?"), events)
    assert {n for (n,) in raw(db, "SELECT name FROM sqlite_master")} >= set(SQLITE_UNSERVED_INDEXES)
    page_size = raw(db, "PRAGMA page_size")
    filters = [
        QueryFilter(0, 10),
        QueryFilter(0, 10, platform="other"),
        QueryFilter(0, 10, kind=records[0].upstream_errors[0].kind),
        QueryFilter(0, 10, status_codes=(records[0].upstream_errors[0].upstream_status_code,)),
    ]

    def answers(sink: SQLiteSink) -> list[Any]:
        found: list[Any] = [sink.query_records(*ALL_TIME), sink.query_events(*ALL_TIME)]
        for f in filters:
            found += [sink.search_records(f), sink.search_events(f, limit=1)]
            found.append(sink.stats(f, bucket_ms=2, group_by="platform"))
        return [*found, sink.get_record("req-a")]

    sink = SQLiteSink(db)
    sink._schema_ready = True  # read the version 2 file as it is, for the answers before
    before = answers(sink)
    sink.close()
    assert before[5].records == [records[1]]  # platform="other"
    sink = SQLiteSink(db)
    sink.write([records[2], records[0]])  # "a" again: still stored once
    assert raw(db, "SELECT version FROM upstream_ops_schema") == [(SCHEMA_VERSION,)]
    assert raw(db, "PRAGMA page_size") == page_size  # an existing file keeps its own
    names = {n for (n,) in raw(db, "SELECT name FROM sqlite_master")}
    assert not names & {*UNUSED_INDEXES, *SQLITE_UNSERVED_INDEXES}
    after = answers(sink)
    assert after[0] == [records[2], *before[0]]  # the new record "c", then the same as before
    sink.close()
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM ops_error_logs WHERE id = 'c'")
    sink = SQLiteSink(db)
    assert answers(sink) == before
    sink.close()


# --- round trip -------------------------------------------------------------------------------


def test_event_rows_hold_the_full_json_and_null_for_empty_fields(
    sink: SQLiteSink, db: Path
) -> None:
    full = full_event(at_unix_ms=5)
    sparse = UpstreamErrorEvent(at_unix_ms=6, kind="request_error", message="connect failed")
    sink.write([full_record("r", events=[full, sparse])])
    rows = raw(
        db,
        "SELECT seq, request_id, platform, account_id, model, upstream_status_code, "
        "upstream_request_id, kind, error_class, message, detail, event "
        "FROM ops_upstream_error_events WHERE record_id = ? ORDER BY seq",
        "r",
    )
    assert rows[0][:11] == (
        0, "req-r", "openai", 42, "gpt-4o", 502, "up-req-1", "http_error",
        "httpx.ReadTimeout", full.message, full.detail,
    )  # fmt: skip
    assert json.loads(str(rows[0][11])) == full.to_dict()
    assert rows[1][:11] == (1, "req-r", None, None, None, None, None, "request_error", None,
                            "connect failed", None)  # fmt: skip
    assert json.loads(str(rows[1][11])) == sparse.to_dict()
    # each event's JSON is stored once: the record row leaves its array to the events table
    assert raw(db, "SELECT upstream_errors FROM ops_error_logs WHERE id = 'r'") == [(None,)]
    assert [r.upstream_errors for r in sink.query_records(*ALL_TIME)] == [[full, sparse]]


def test_record_without_events_and_optional_fields(sink: SQLiteSink, db: Path) -> None:
    record = RequestRecord(id="plain", request_id="req", started_at_ms=10)
    sink.write([record])
    assert sink.query_records(*ALL_TIME) == [record]
    assert raw(db, "SELECT upstream_errors, recovered, route FROM ops_error_logs") == [
        (None, 0, None)
    ]
    assert count(db, "ops_upstream_error_events") == 0


def test_empty_batch_is_a_no_op_without_io(db: Path) -> None:
    s = SQLiteSink(db)
    s.write([])
    assert not db.exists()


# --- bad records ------------------------------------------------------------------------------


def test_a_batch_of_only_bad_records_raises_and_logs_once(
    sink: SQLiteSink, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [BAD_RECORDS["int too large for SQLite"], BAD_RECORDS["lone surrogate"]]
    with caplog.at_level(logging.ERROR, logger="upstream_ops.sinks.sqlite"):
        for _ in range(3):  # the dispatcher's retries
            with pytest.raises(OverflowError) as info:
                sink.write(bad)
    assert "stored none of the 2 records" in " ".join(info.value.__notes__)
    assert len(caplog.records) == 2  # each bad record logged once, not once per retry
    assert count(db, "ops_error_logs") == 0
    sink.write([full_record("after")])  # the sink still works
    assert count(db, "ops_error_logs") == 1


# --- threads and processes --------------------------------------------------------------------


def test_worker_thread_writes_while_main_thread_queries(sink: SQLiteSink, db: Path) -> None:
    small: dict[str, Any] = {"upstream_error_detail": "d", "events": [full_event(detail="d")] * 2}
    batches = [
        [full_record(f"t{b:02d}-{i:02d}", started_at_ms=b * 100 + i, **small) for i in range(20)]
        for b in range(30)
    ]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for batch in batches:
                sink.write(batch)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    queries = 0
    while thread.is_alive() or queries == 0:
        records = sink.query_records(*ALL_TIME, limit=20)
        times = [r.started_at_ms for r in records]
        assert times == sorted(times, reverse=True)
        assert all(len(r.upstream_errors) == 2 for r in records)
        sink.query_events(*ALL_TIME, platform="openai", limit=10)
        queries += 1
    thread.join()
    assert errors == []
    assert count(db, "ops_error_logs") == 600
    assert sink.query_records(*ALL_TIME, limit=1)[0].id == "t29-19"


def test_connections_are_per_thread_and_closed(sink: SQLiteSink) -> None:
    sink.write([full_record()])

    def query() -> None:
        assert len(sink.query_records(*ALL_TIME)) == 1

    for _ in range(5):
        t = threading.Thread(target=query)
        t.start()
        t.join()
    # connections of ended threads are closed when the next one opens: no leak per thread
    assert len(sink._connections) <= 2
    sink.close()
    assert sink._connections == []
    sink.write([full_record("after-close")])  # reopens
    assert len(sink.query_records(*ALL_TIME)) == 2


def test_waits_for_another_connections_write_lock(sink: SQLiteSink, db: Path) -> None:
    sink.query_records(*ALL_TIME)  # schema exists
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.3, other.execute, ("COMMIT",))
    timer.start()
    sink.write([full_record()])
    timer.join()
    other.close()
    assert count(db, "ops_error_logs") == 1


def test_retries_when_the_busy_timeout_runs_out(
    sink: SQLiteSink, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "_BUSY_TIMEOUT_S", 0.01)
    sink.query_records(*ALL_TIME)
    sink.close()  # reopen with the short timeout
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.15, other.execute, ("COMMIT",))
    timer.start()
    started = time.monotonic()
    sink.write([full_record()])
    assert time.monotonic() - started >= 0.1
    timer.join()
    other.close()
    assert count(db, "ops_error_logs") == 1


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from upstream_ops.record import RequestRecord
    from upstream_ops.events import UpstreamErrorEvent, marshal_upstream_errors
    from upstream_ops.sinks.sqlite import SQLiteSink

    db, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    sink = SQLiteSink(db)
    while not go.exists():
        time.sleep(0.005)
    for i in range(500):
        event = UpstreamErrorEvent(at_unix_ms=i, platform=name, upstream_status_code=502)
        sink.write([RequestRecord(id=f"{name}-{i}", request_id=f"req-{i}", started_at_ms=i,
                                  upstream_errors=[event])])
    sink.close()
    """
)


def test_two_processes_write_one_file(tmp_path: Path, db: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(db), name, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("p1", "p2")
    ]
    time.sleep(0.2)  # let both start up and wait, so that their writes interleave
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert err == b""
    assert count(db, "ops_error_logs") == 1000
    assert count(db, "ops_upstream_error_events") == 1000
    s = SQLiteSink(db)
    assert len(s.query_events(*ALL_TIME, platform="p1", limit=QUERY_LIMIT_MAX)) == 500
    s.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(sink: SQLiteSink, db: Path) -> None:
    sink.write([full_record("parent")])  # the parent holds an open connection
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's connection
        code = 1
        try:
            sink.write([full_record("child")])
            code = 0 if len(sink.query_records(*ALL_TIME)) == 2 else 2
            sink.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.id for r in sink.query_records(*ALL_TIME)] == ["parent", "child"]
