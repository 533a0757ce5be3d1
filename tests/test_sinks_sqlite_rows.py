"""The SQLite sink's fast rows store exactly what the shared row mapping (``record_rows``) stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sink_records import full_event, full_record
from tests.speedups import with_and_without
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import SQLiteSink, _sqlite_rows
from upstream_ops.sinks._query import (
    EVENT_COLUMNS,
    EVENTS_TABLE,
    RECORDS_TABLE,
    event_json,
    insert_event_sql,
    insert_record_sql,
    record_rows,
)

# Every test here runs with the C event key and with the writer's Python passes alone.
event_keys = with_and_without(_sqlite_rows, "_event_key")


def _tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(db) as connection:
        return {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in (RECORDS_TABLE, EVENTS_TABLE)
        }


def _reference(db: Path, records: list[RequestRecord]) -> dict[str, list[tuple[Any, ...]]]:
    """The tables the shared row mapping makes: one plain INSERT per row."""
    sink = SQLiteSink(db)
    sink.migrate()
    sink.close()
    with sqlite3.connect(db) as connection:
        for record in records:
            row, events = record_rows(record, 7)
            if connection.execute(insert_record_sql("?"), row).rowcount:
                connection.executemany(insert_event_sql("?"), events)
    return _tables(db)


def _events() -> list[UpstreamErrorEvent]:
    odd = full_event(message="a bool where an int goes")
    odd.attempt = True  # not its declared type: Python writes this one's JSON
    return [
        odd,
        full_event(),
        full_event(retryable=None, account_id=0, platform="", detail=""),
        full_event(
            retryable=True, duration_ms=-0.0, message='quote " back \\ nul \x00 é \U0001f600'
        ),
        UpstreamErrorEvent(at_unix_ms=0),
        UpstreamErrorEvent(at_unix_ms=6, kind="request_error", message="connect failed"),
        UpstreamErrorEvent(at_unix_ms=7, duration_ms=float("nan"), attempt=-1),
    ]


_text = st.text(max_size=12)
_int = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        UpstreamErrorEvent,
        at_unix_ms=_int,
        platform=_text,
        account_id=st.sampled_from([0, 1, -5]),
        upstream_status_code=st.sampled_from([0, 429, 503]),
        message=_text,
        detail=_text,
        duration_ms=st.floats(),
        retryable=st.sampled_from([None, False, True]),
        retry_after_ms=st.sampled_from([0, 1200]),
        origin=_text,
    )
)
def test_sqlite_writes_the_event_json_python_writes_on_any_event(event: UpstreamErrorEvent) -> None:
    assert _sqlite_rows.sqlite_writes_event_json()
    names = ", ".join(c.name for c in EVENT_COLUMNS)
    with sqlite3.connect(":memory:") as connection:
        connection.execute(f"CREATE TEMP TABLE {EVENTS_TABLE} ({names})")
        connection.execute(*_sqlite_rows._event_row(("r", 0, "q", 0), event, json_in_sqlite=True))
        [(text,)] = connection.execute(f"SELECT event FROM {EVENTS_TABLE}").fetchall()
    assert text == event_json(event)


def test_a_batch_of_every_shape_stores_the_rows_of_the_shared_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("upstream_ops.sinks.sqlite.time.time_ns", lambda: 7_000_000)
    records = [
        full_record("a", events=_events()),
        RequestRecord(id="b", request_id="req-b", started_at_ms=10),
        full_record("c", route=None, error=None, trace_id=None, recovered=False),
        full_record("d", upstream_status_code=None, span_id=None, recovered=True, events=[]),
        full_record("a", service="a repeated id: the first one wins"),
        RequestRecord(id="e", request_id="req-e", started_at_ms=11, status_code=0, recovered=True),
    ]
    sink = SQLiteSink(tmp_path / "fast.db")
    sink.write(records)
    sink.close()
    assert _tables(tmp_path / "fast.db") == _reference(tmp_path / "plain.db", records)


def test_batches_of_many_rows_of_each_shape_store_the_rows_of_the_shared_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("upstream_ops.sinks.sqlite.time.time_ns", lambda: 7_000_000)
    events = _events()
    many = 71  # of one shape of record and of event
    records = [full_record(f"r{i:03}", events=[events[0], events[4]]) for i in range(many)]
    records += [
        full_record(
            f"v{i:03}",
            route=None if i % 3 else "/v1/{name}",
            trace_id=None if i % 5 else "t",
            events=[events[(i + k) % len(events)] for k in range(i % 4)],
        )
        for i in range(30)
    ]
    sink = SQLiteSink(tmp_path / "fast.db")
    sink.write(records[:50])
    sink.write(records[50:])
    sink.close()
    assert _tables(tmp_path / "fast.db") == _reference(tmp_path / "plain.db", records)


def test_a_batch_is_a_few_statements_and_stores_what_one_row_a_statement_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sqlite3 module lets go of the interpreter lock around each step: with one step a row, a
    # writer competing with busy app threads waited a switch interval for every row.
    monkeypatch.setattr("upstream_ops.sinks.sqlite.time.time_ns", lambda: 7_000_000)
    events = _events()
    records = [full_record(f"r{i:03}", events=events[:3]) for i in range(300)]  # 256 + 2x16 + 3x4
    sink = SQLiteSink(tmp_path / "fast.db")
    sink.migrate()
    steps: list[str] = []
    sink._connection().set_trace_callback(steps.append)
    sink.write(records)
    sink.close()
    inserts = [sql for sql in steps if sql.startswith("INSERT")]
    # One shape of record and three of event, 300 rows each: 256 + 16 + 16 + 4 + 4 + 4 rows a
    # statement (one row a step would be 1,200 steps).
    assert len(inserts) == 4 * 6
    assert _tables(tmp_path / "fast.db") == _reference(tmp_path / "plain.db", records)


def test_many_row_statements_keep_under_sqlites_parameter_limit(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "limit.db")
    connection.execute("CREATE TABLE t (a, b, c)")
    connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 10)  # 3 rows of 3 at most
    rows = [(i, f"?{i}", None) for i in range(11)]
    _sqlite_rows.insert_rows(
        connection, "INSERT INTO t (a, b, c) VALUES (?1, ?2, NULLIF(?3, 0))", rows
    )
    assert connection.execute("SELECT * FROM t ORDER BY a").fetchall() == rows
    assert _sqlite_rows._multi_row_sql(
        "INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO NOTHING", 2, 1
    ) == ("INSERT INTO t (a) VALUES (?), (?) ON CONFLICT (a) DO NOTHING")


def test_numbered_parameters_become_columns_of_a_values_table(tmp_path: Path) -> None:
    # A parameter used twice (a column and the event's JSON) is one value of its row; braces and
    # an ON CONFLICT clause are kept.
    sql = (
        "INSERT INTO t (a, b) VALUES (?1, json_object('{x}', ?2, 'a', ?1))"
        " ON CONFLICT (a) DO NOTHING"
    )
    many = _sqlite_rows._multi_row_sql.__wrapped__(sql, 3, 2)
    assert many == (
        "INSERT INTO t (a, b) SELECT column1, json_object('{x}', column2, 'a', column1) "
        "FROM (VALUES (?, ?), (?, ?), (?, ?)) WHERE true ON CONFLICT (a) DO NOTHING"
    )
    connection = sqlite3.connect(tmp_path / "values.db")
    connection.execute("CREATE TABLE t (a PRIMARY KEY, b)")
    connection.execute(many, [1, "p", 2, "q", 1, "r"])  # the third row conflicts with the first
    assert connection.execute("SELECT a, b FROM t ORDER BY a").fetchall() == [
        (1, '{"{x}":"p","a":1}'),
        (2, '{"{x}":"q","a":2}'),
    ]
    with pytest.raises(ValueError, match="parameters"):
        _sqlite_rows._multi_row_sql.__wrapped__("INSERT INTO t (a) VALUES (?3)", 2, 2)


def test_shapes_beyond_the_cache_still_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite_rows, "_RECORD_SHAPES", {})
    monkeypatch.setattr(_sqlite_rows, "_EVENT_SHAPES", {})
    monkeypatch.setattr(_sqlite_rows, "_SHAPES_BY_KEY", {})
    monkeypatch.setattr(_sqlite_rows, "_SHAPES_MAX", 0)
    records = [full_record("x"), full_record("y", route=None, error=None)]
    sink = SQLiteSink(tmp_path / "fast.db")
    sink.write(records)
    sink.close()
    assert _sqlite_rows._RECORD_SHAPES == _sqlite_rows._EVENT_SHAPES == {}
    assert _sqlite_rows._SHAPES_BY_KEY == {}
    assert [r.id for r in SQLiteSink(tmp_path / "fast.db").query_records(0, 2**62)] == ["y", "x"]


def test_this_sqlite_writes_the_event_json() -> None:
    assert _sqlite_rows.sqlite_writes_event_json()


def test_a_sqlite_without_json_functions_leaves_the_json_to_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("no such function: json_object")

    monkeypatch.setattr(_sqlite_rows.sqlite3, "connect", broken)
    _sqlite_rows.sqlite_writes_event_json.cache_clear()
    try:
        assert not _sqlite_rows.sqlite_writes_event_json()
    finally:
        monkeypatch.undo()
        _sqlite_rows.sqlite_writes_event_json.cache_clear()
    monkeypatch.setattr("upstream_ops.sinks.sqlite.time.time_ns", lambda: 7_000_000)
    monkeypatch.setattr(_sqlite_rows, "sqlite_writes_event_json", lambda: False)
    records = [full_record(f"r{i:02}", events=_events()) for i in range(40)]
    sink = SQLiteSink(tmp_path / "fast.db")
    sink.write(records)
    sink.close()
    assert _tables(tmp_path / "fast.db") == _reference(tmp_path / "plain.db", records)


def test_an_int_only_the_json_holds_beyond_64_bits_is_stored_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("upstream_ops.sinks.sqlite.time.time_ns", lambda: 7_000_000)
    records = [full_record("big", events=[full_event(attempt=2**70)]), full_record("fine")]
    sink = SQLiteSink(tmp_path / "fast.db")
    sink.write(records)  # SQLite cannot bind it: the batch again, a record at a time
    sink.close()
    assert _tables(tmp_path / "fast.db") == _reference(tmp_path / "plain.db", records)
