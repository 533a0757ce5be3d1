"""What only PostgresSink has: the pool, JSONB, schemas, migrations across processes, bad text.

The behaviour both stores share (round trips, idempotency, queries, purge) is in test_stores.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import psycopg
import pytest

from tests.conftest import pg_rows
from tests.sink_records import (
    BAD_RECORDS,
    bare_record,
    full_event,
    full_record,
    schema_1_rows,
)
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RECORD_FIELDS
from upstream_ops.sinks import postgres as postgres_module
from upstream_ops.sinks import sink_from_url
from upstream_ops.sinks._query import (
    EVENT_COLUMNS,
    SCHEMA_TABLE_DDL,
    SCHEMA_VERSION,
    UNUSED_INDEXES,
    insert_event_sql,
    insert_record_sql,
)
from upstream_ops.sinks.postgres import PostgresSink
from upstream_ops.store import QueryFilter

ALL_TIME = (0, 2**62)


# --- construction (no server needed) -------------------------------------------------------------


def test_no_io_at_construction_even_for_an_unreachable_server() -> None:
    sink = PostgresSink("postgresql://nobody:secret@127.0.0.1:1/nowhere", schema="ops")
    assert sink._pool is None
    assert "secret" not in repr(sink) and "schema='ops'" in repr(sink)
    sink.close()


def test_reachable_by_url_with_a_schema() -> None:
    sink = sink_from_url("postgresql://u:secret@db.example:5433/ops?schema=gateway&sslmode=disable")
    assert isinstance(sink, PostgresSink)
    assert sink.schema == "gateway" and sink._pool is None
    assert "sslmode=disable" in repr(sink) and "secret" not in repr(sink)


@pytest.mark.parametrize(
    ("dsn", "kwargs", "name"),
    [
        ("", {}, "dsn"),
        (5, {}, "dsn"),
        ("nonsense_option=1", {}, "dsn"),
        ("postgresql://db/x", {"schema": "1starts_with_a_digit"}, "schema"),
        ("postgresql://db/x", {"schema": 'x"; DROP TABLE y; --'}, "schema"),
        ("postgresql://db/x", {"schema": "a" * 64}, "schema"),
        ("postgresql://db/x?schema=one", {"schema": "two"}, "schema"),
        ("postgresql://db/x", {"min_size": 0}, "min_size"),
        ("postgresql://db/x", {"max_size": True}, "max_size"),
        ("postgresql://db/x", {"min_size": 3, "max_size": 2}, "max_size"),
        ("postgresql://db/x", {"timeout": 0}, "timeout"),
        ("postgresql://db/x", {"connect_timeout": 0.5}, "connect_timeout"),
    ],
)
def test_bad_options_raise_value_error_naming_them(
    dsn: object, kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        PostgresSink(dsn, **kwargs)  # type: ignore[arg-type]


def test_an_unreachable_server_raises_with_its_reason_within_the_timeout() -> None:
    sink = PostgresSink("postgresql://postgres@127.0.0.1:1/test", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        sink.write([full_record()])
    assert time.monotonic() - started < 3
    sink.close()


# --- schema and migrations -----------------------------------------------------------------------

POSTGRES = pytest.mark.postgres


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    return pg_dsn


def columns(dsn: str, schema: str, table: str) -> list[tuple[str, str, str]]:
    return [
        (str(name), str(kind), str(nullable))
        for name, kind, nullable in pg_rows(
            dsn,
            schema,
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            schema,
            table,
        )
    ]


@POSTGRES
def test_schema_tables_types_indexes_and_version(
    pg_sink: PostgresSink, dsn: str, pg_schema: str
) -> None:
    pg_sink.write([full_record()])
    tables = pg_rows(
        dsn,
        pg_schema,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
        "ORDER BY table_name",
        pg_schema,
    )
    assert tables == [("ops_error_logs",), ("ops_upstream_error_events",), ("upstream_ops_schema",)]
    records = columns(dsn, pg_schema, "ops_error_logs")
    assert [c[0] for c in records] == [*RECORD_FIELDS, "created_at_ms"]
    kinds = {name: kind for name, kind, _ in records}
    assert kinds["upstream_errors"] == "jsonb" and kinds["started_at_ms"] == "bigint"
    assert kinds["recovered"] == "boolean" and kinds["duration_ms"] == "double precision"
    events = columns(dsn, pg_schema, "ops_upstream_error_events")
    assert [c[0] for c in events] == [c.name for c in EVENT_COLUMNS]
    assert dict((n, k) for n, k, _ in events)["event"] == "jsonb"
    indexes = {
        str(name)
        for (name,) in pg_rows(
            dsn, pg_schema, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", pg_schema
        )
    }
    assert {
        "ops_error_logs_pkey",
        "ops_error_logs_started_at_idx",
        "ops_error_logs_request_id_idx",
        "ops_upstream_error_events_pkey",
        "ops_upstream_error_events_at_idx",
        "ops_upstream_error_events_platform_at_idx",
        "ops_upstream_error_events_kind_at_idx",
        "ops_upstream_error_events_status_at_idx",
    } == indexes
    assert pg_rows(dsn, pg_schema, "SELECT version FROM upstream_ops_schema") == [(SCHEMA_VERSION,)]


@POSTGRES
def test_migrate_ahead_of_time_and_concurrently(dsn: str, pg_schema: str) -> None:
    sinks = [PostgresSink(dsn, schema=pg_schema) for _ in range(6)]
    errors: list[BaseException] = []

    def first_use(sink: PostgresSink) -> None:
        try:
            assert sink.migrate() == SCHEMA_VERSION
            sink.write([bare_record(f"from-{id(sink)}", 1)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(s,)) for s in sinks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pg_rows(dsn, pg_schema, "SELECT version FROM upstream_ops_schema") == [(SCHEMA_VERSION,)]
    assert pg_rows(dsn, pg_schema, "SELECT count(*) FROM ops_error_logs") == [(6,)]
    for s in sinks:
        s.close()


@POSTGRES
def test_newer_schema_version_warns_and_still_works(
    dsn: str, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = PostgresSink(dsn, schema=pg_schema)
    first.write([bare_record("a", 1)])
    first.close()
    pg_rows(dsn, pg_schema, "UPDATE upstream_ops_schema SET version = 99 RETURNING version")
    later = PostgresSink(dsn, schema=pg_schema)
    with caplog.at_level(logging.WARNING, logger="upstream_ops.sinks.postgres"):
        assert [r.id for r in later.query_records(*ALL_TIME)] == ["a"]
    later.close()
    assert "schema version 99" in caplog.text


@POSTGRES
def test_schemas_keep_stores_apart(dsn: str, pg_schema: str) -> None:
    one = PostgresSink(f"{dsn}?schema={pg_schema}")
    two = PostgresSink(dsn, schema=pg_schema + "_b")
    try:
        one.write([bare_record("in-one", 1)])
        two.write([bare_record("in-two", 1)])
        assert [r.id for r in one.query_records(*ALL_TIME)] == ["in-one"]
        assert [r.id for r in two.query_records(*ALL_TIME)] == ["in-two"]
    finally:
        one.close()
        two.close()
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}_b" CASCADE')


# --- rows ----------------------------------------------------------------------------------------


@POSTGRES
def test_event_rows_hold_the_full_json_and_null_for_empty_fields(
    pg_sink: PostgresSink, dsn: str, pg_schema: str
) -> None:
    full = full_event(at_unix_ms=5)
    sparse = UpstreamErrorEvent(at_unix_ms=6, kind="request_error", message="connect failed")
    pg_sink.write([full_record("r", events=[full, sparse])])
    rows = pg_rows(
        dsn,
        pg_schema,
        "SELECT seq, request_id, platform, account_id, model, upstream_status_code, "
        "upstream_request_id, kind, error_class, message, detail, event "
        "FROM ops_upstream_error_events WHERE record_id = %s ORDER BY seq",
        "r",
    )
    assert rows[0][:11] == (
        0, "req-r", "openai", 42, "gpt-4o", 502, "up-req-1", "http_error",
        "httpx.ReadTimeout", full.message, full.detail,
    )  # fmt: skip
    assert rows[0][11] == full.to_dict()  # JSONB: the server parsed it
    assert rows[1][:11] == (1, "req-r", None, None, None, None, None, "request_error", None,
                            "connect failed", None)  # fmt: skip
    assert rows[1][11] == sparse.to_dict()
    # each event's JSON is stored once: the record row leaves its array to the events table
    assert pg_rows(dsn, pg_schema, "SELECT upstream_errors FROM ops_error_logs") == [(None,)]
    assert [r.upstream_errors for r in pg_sink.query_records(*ALL_TIME)] == [[full, sparse]]
    # JSON operators work on the stored events
    assert pg_rows(
        dsn,
        pg_schema,
        "SELECT DISTINCT record_id FROM ops_upstream_error_events "
        'WHERE event @> \'{"kind": "request_error"}\'',
    ) == [("r",)]


@POSTGRES
def test_a_schema_1_database_is_migrated_and_its_records_read_as_before(
    dsn: str, pg_schema: str
) -> None:
    old = full_record(
        "old", started_at_ms=1, events=[full_event(at_unix_ms=1), full_event(at_unix_ms=2)]
    )
    old_bare = bare_record("old-bare", 2)
    with psycopg.connect(dsn) as connection:  # what version 1 of the sink made and wrote
        connection.execute(f'CREATE SCHEMA "{pg_schema}"')
        connection.execute(f'SET search_path TO "{pg_schema}"')
        for statement in [SCHEMA_TABLE_DDL, *postgres_module._MIGRATIONS[1]]:
            connection.execute(statement)
        connection.execute("INSERT INTO upstream_ops_schema (version) VALUES (1)")
        for record in (old, old_bare):
            row, events = schema_1_rows(record)
            connection.execute(insert_record_sql("%s"), row)
            connection.cursor().executemany(insert_event_sql("%s"), events)
    new = full_record("new", started_at_ms=3, events=[full_event(at_unix_ms=3)])
    sink = PostgresSink(dsn, schema=pg_schema)
    try:
        sink.write([new, old])  # "old" again: still stored once
        assert pg_rows(dsn, pg_schema, "SELECT version FROM upstream_ops_schema") == [
            (SCHEMA_VERSION,)
        ]
        assert pg_rows(
            dsn, pg_schema, "SELECT indexname FROM pg_indexes WHERE schemaname = %s "
            "AND indexname = ANY(%s)", pg_schema, list(UNUSED_INDEXES),
        ) == []  # fmt: skip
        assert sink.query_records(*ALL_TIME) == [new, old_bare, old]
        assert sink.search_records(QueryFilter(*ALL_TIME), limit=2).records == [new, old_bare]
        assert (sink.get_record("req-old"), sink.get_record("req-new")) == (old, new)
        assert sink.query_events(*ALL_TIME) == [
            *new.upstream_errors, *reversed(old.upstream_errors)
        ]  # fmt: skip
        assert pg_rows(dsn, pg_schema, "SELECT count(*) FROM ops_upstream_error_events") == [(3,)]
    finally:
        sink.close()


# --- bad data ------------------------------------------------------------------------------------

HOSTILE = [
    "'); DROP TABLE ops_error_logs;--",
    "$$; DELETE FROM ops_upstream_error_events; $$",
    "\\x00\\\\ E'\\\\' %s %(x)s ? :name",
    "COPY ops_error_logs FROM PROGRAM 'id'",
    "a\tb\nc\r\\N\\.",  # COPY's own escapes
]


@POSTGRES
def test_bad_text_is_stored_intact_or_bounded_as_documented(
    pg_sink: PostgresSink, caplog: pytest.LogCaptureFixture
) -> None:
    binary = bytes(range(256))
    records = [
        full_record(
            f"hostile-{i}",
            started_at_ms=100 + i,
            error=text,
            events=[full_event(message=text, detail=text)],
        )
        for i, text in enumerate(HOSTILE)
    ]
    control = "".join(chr(c) for c in range(1, 32)) + "\x7f\x85\u202e"
    records.append(full_record("control", started_at_ms=200, error=control))
    records.append(
        full_record(
            "nul-and-surrogates",
            started_at_ms=300,
            path="/a\x00b",
            error="lone \udc80 and split \ud83d\ude80 pair",
            events=[full_event(message="nul \x00 here", detail=binary.decode("latin-1"))],
        )
    )
    records.append(  # bytes become text (invalid UTF-8 as U+FFFD) when the event is built
        full_record("binary", started_at_ms=400, events=[full_event(detail=binary)])  # type: ignore[arg-type]
    )
    records.append(  # bad text in an event field only (the record's own text is clean)
        full_record(
            "event-only",
            started_at_ms=450,
            events=[full_event(), full_event(upstream_request_id="lone \udc80", platform="p\x00")],
        )
    )
    huge = "ü" * 5_000_000  # 10 MB of UTF-8
    records.append(full_record("huge", started_at_ms=500, upstream_error_detail=huge))
    with caplog.at_level(logging.ERROR):
        pg_sink.write(records)
    assert caplog.records == []
    stored = {r.id: r for r in pg_sink.query_records(*ALL_TIME, limit=500)}
    for record in records:
        back = stored[record.id]
        if record.id == "binary":  # NUL is the one byte PostgreSQL text cannot hold
            detail = binary.decode("utf-8", "replace").replace("\x00", "\ufffd")
            assert back.upstream_errors[0].detail == detail
            assert back.upstream_errors[1:] == record.upstream_errors[1:]
        elif record.id == "nul-and-surrogates":
            assert back.path == "/a\ufffdb"
            assert back.error == "lone \ufffd and split \U0001f680 pair"
            assert back.upstream_errors[0].message == "nul \ufffd here"
            assert back.upstream_errors[0].detail == "\ufffd" + binary[1:].decode("latin-1")
        elif record.id == "event-only":
            assert back.upstream_errors[0] == record.upstream_errors[0]
            assert back.upstream_errors[1].upstream_request_id == "lone \ufffd"
            assert back.upstream_errors[1].platform == "p\ufffd"
        else:
            assert back == record  # intact
    # The tables are still there, and hold what was written.
    assert len(pg_sink.query_events(*ALL_TIME, limit=500)) == sum(
        len(r.upstream_errors) for r in records
    )


@POSTGRES
@pytest.mark.parametrize(
    "bad",
    [
        *BAD_RECORDS.values(),
        bare_record("nan", 10, upstream_errors=[UpstreamErrorEvent(duration_ms=float("nan"))]),
        bare_record("big-event", 10, upstream_errors=[UpstreamErrorEvent(account_id=2**64)]),
    ],
    ids=[*BAD_RECORDS.keys(), "NaN event duration", "event int too large"],
)
def test_one_bad_record_costs_only_itself(pg_sink: PostgresSink, bad: object) -> None:
    good = [full_record(f"good-{i}", started_at_ms=100 + i) for i in range(3)]
    pg_sink.write([good[0], bad, good[1], good[2]])  # type: ignore[list-item]
    ids = {r.id for r in pg_sink.query_records(*ALL_TIME)}
    assert {"good-0", "good-1", "good-2"} <= ids


@POSTGRES
def test_a_record_only_the_database_rejects_falls_back_to_one_by_one(
    pg_sink: PostgresSink, dsn: str, pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    pg_sink.migrate()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            f'ALTER TABLE "{pg_schema}".ops_error_logs ADD CONSTRAINT no_evil '
            "CHECK (path <> '/evil')"
        )
    batch = [full_record(f"r{i}", started_at_ms=i) for i in range(5)]
    batch.insert(2, full_record("evil", path="/evil"))
    with caplog.at_level(logging.ERROR, logger="upstream_ops.sinks.postgres"):
        pg_sink.write(batch)
    assert sorted(r.id for r in pg_sink.query_records(*ALL_TIME)) == [f"r{i}" for i in range(5)]
    assert len(pg_sink.query_events(*ALL_TIME)) == 10
    [message] = [r.getMessage() for r in caplog.records]
    assert "could not store record evil" in message and "CheckViolation" in message
    assert json.loads(message.split("the record: ", 1)[1])["path"] == "/evil"


@POSTGRES
def test_a_batch_of_only_bad_records_raises_and_logs_once(
    pg_sink: PostgresSink, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [BAD_RECORDS["int too large for SQLite"], BAD_RECORDS["NULL id"]]
    with caplog.at_level(logging.ERROR, logger="upstream_ops.sinks.postgres"):
        for _ in range(3):  # the dispatcher's retries
            with pytest.raises(ValueError) as info:
                pg_sink.write(bad)
    assert "stored none of the 2 records" in " ".join(info.value.__notes__)
    assert len(caplog.records) == 2
    pg_sink.write([full_record("after")])
    assert [r.id for r in pg_sink.query_records(*ALL_TIME)] == ["after"]


@POSTGRES
def test_a_database_reset_behind_its_back_is_recreated_on_the_retry(
    pg_sink: PostgresSink, dsn: str, pg_schema: str
) -> None:
    pg_sink.write([full_record("before")])
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA "{pg_schema}" CASCADE')
    with pytest.raises(psycopg.errors.UndefinedTable):
        pg_sink.write([full_record("again")])
    pg_sink.write([full_record("again")])  # the dispatcher's retry
    assert [r.id for r in pg_sink.query_records(*ALL_TIME)] == ["again"]


# --- connections ---------------------------------------------------------------------------------


@POSTGRES
def test_close_then_use_again_and_query_from_many_threads(pg_sink: PostgresSink) -> None:
    pg_sink.write([full_record("a")])
    pg_sink.close()
    assert pg_sink._pool is None
    pg_sink.write([full_record("b", started_at_ms=1)])
    results: list[int] = []

    def query() -> None:
        results.append(len(pg_sink.query_records(*ALL_TIME)))

    threads = [threading.Thread(target=query) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2] * 12  # twelve threads shared a pool of at most four


@POSTGRES
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_pool(pg_sink: PostgresSink) -> None:
    pg_sink.write([full_record("parent")])
    pid = os.fork()
    if pid == 0:  # child: must not use the parent's sockets
        code = 1
        try:
            pg_sink.write([full_record("child", started_at_ms=1)])
            code = 0 if len(pg_sink.query_records(*ALL_TIME)) == 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.id for r in pg_sink.query_records(*ALL_TIME)] == ["parent", "child"]
