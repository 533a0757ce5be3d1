"""A sink and store on PostgreSQL (psycopg 3 with a connection pool), for many processes and hosts.

Same tables, columns and queries as ``SQLiteSink`` (all defined once in ``_query.py``), and its
indexes plus the three for filtered event lists that SQLite dropped in schema 3 (its planner has
statistics and uses them well: see ``SQLITE_UNSERVED_INDEXES``);
``upstream_errors`` and each event's ``event`` are ``JSONB``. Needs ``upstream-ops[postgres]``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool, PoolTimeout

from upstream_ops.defaults import (
    PG_CONNECT_TIMEOUT_S,
    PG_POOL_MAX_SIZE,
    PG_POOL_MIN_SIZE,
    PG_POOL_TIMEOUT_S,
    PURGE_BATCH_SIZE,
    QUERY_LIMIT,
)
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.retention import PurgeProgress, cutoff_ms, purge_in_batches
from upstream_ops.sinks import _search
from upstream_ops.sinks._postgres_rows import Staged, StagedBatch
from upstream_ops.sinks._query import (
    EVENT_COLUMNS,
    EVENTS_TABLE,
    RECORD_COLUMNS,
    RECORDS_TABLE,
    SCHEMA_TABLE_DDL,
    SCHEMA_VERSION,
    SELECT_SCHEMA_VERSION,
    SET_SCHEMA_VERSION,
    event_from_row,
    events_select,
    insert_event_sql,
    insert_record_sql,
    records_from_rows,
    records_select,
    schema_2_ddl,
    schema_ddl,
    validate_query,
)
from upstream_ops.sinks.base import RejectedRecords

__all__ = ["PostgresSink"]

logger = logging.getLogger(__name__)

_TYPES: Final = {
    "text": "TEXT",
    "bigint": "BIGINT",
    "double": "DOUBLE PRECISION",
    "bool": "BOOLEAN",
    "json": "JSONB",
}
#: Statements that bring the schema from version ``n - 1`` to ``n``. Append, never edit.
_MIGRATIONS: Final = {1: schema_ddl(_TYPES), 2: schema_2_ddl(), 3: []}  # 3: SQLite's alone
#: ``ORDER BY id`` compares bytes in SQLite; the same order here.
_TEXT_ORDER: Final = ' COLLATE "C"'
_SCHEMA_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# A batch is copied straight into the tables when all its ids are new (the usual case). If one is
# stored already (a retry, a replay), it is copied into session-local staging tables instead and
# moved with one INSERT ... SELECT that skips stored ids and inserts events only for new records.
_RECORD_NAMES: Final = ", ".join(c.name for c in RECORD_COLUMNS)
_EVENT_NAMES: Final = ", ".join(c.name for c in EVENT_COLUMNS)
_COPY_NEW_RECORDS: Final = f"COPY {RECORDS_TABLE} ({_RECORD_NAMES}) FROM STDIN"
_COPY_NEW_EVENTS: Final = f"COPY {EVENTS_TABLE} ({_EVENT_NAMES}) FROM STDIN"
_STAGE: Final = (
    f"CREATE TEMP TABLE IF NOT EXISTS upstream_ops_records_in (LIKE {RECORDS_TABLE}) "
    "ON COMMIT DELETE ROWS",
    f"CREATE TEMP TABLE IF NOT EXISTS upstream_ops_events_in (LIKE {EVENTS_TABLE}) "
    "ON COMMIT DELETE ROWS",
)
_COPY_RECORDS: Final = f"COPY pg_temp.upstream_ops_records_in ({_RECORD_NAMES}) FROM STDIN"
_COPY_EVENTS: Final = f"COPY pg_temp.upstream_ops_events_in ({_EVENT_NAMES}) FROM STDIN"
_MOVE: Final = (
    f"WITH new AS (INSERT INTO {RECORDS_TABLE} ({_RECORD_NAMES}) "  # noqa: S608 (constants)
    f"SELECT {_RECORD_NAMES} FROM pg_temp.upstream_ops_records_in "
    "ON CONFLICT (id) DO NOTHING RETURNING id) "
    f"INSERT INTO {EVENTS_TABLE} ({_EVENT_NAMES}) "
    f"SELECT {', '.join('e.' + c.name for c in EVENT_COLUMNS)} "
    "FROM pg_temp.upstream_ops_events_in e JOIN new ON e.record_id = new.id"
)
# One purge batch: the oldest records and their events, in one statement (so no event outlives its
# record); SKIP LOCKED lets the purges of several processes share the work.
_PURGE: Final = (
    f"WITH doomed AS (SELECT id FROM {RECORDS_TABLE} WHERE started_at_ms < %s "  # noqa: S608
    "ORDER BY started_at_ms LIMIT %s FOR UPDATE SKIP LOCKED), "
    f"gone AS (DELETE FROM {EVENTS_TABLE} e USING doomed d WHERE e.record_id = d.id) "
    f"DELETE FROM {RECORDS_TABLE} r USING doomed d WHERE r.id = d.id"
)
#: Errors that one record's values cause; a batch that hits one is retried record by record.
_RECORD_ERRORS: Final = (
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.ProgrammingError,
    TypeError,
    ValueError,
    OverflowError,
)
#: libpq settings applied unless the DSN sets them: find a dead peer instead of waiting forever.
_CONNECTION_DEFAULTS: Final = {
    "application_name": "upstream-ops",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


class PostgresSink(_search.SearchMixin):
    """Writes records to PostgreSQL and answers ``Store`` queries, like ``SQLiteSink``.

    ``dsn`` is a libpq connection string or URL (``postgresql://user@host:5432/db``); a URL may
    carry ``?schema=name``. ``schema`` puts the tables in that schema (created if missing) instead
    of the first one on the server's ``search_path``. Nothing connects until the first write or
    query; then a pool of ``min_size`` to ``max_size`` connections opens, and the schema is
    created or migrated (``migrate()`` does it ahead of time). A write or query waits at most
    ``timeout`` seconds for a connection, then raises; ``connect_timeout`` bounds one connection
    attempt.

    Each batch is one transaction: its events and then its records are copied (``COPY``) straight
    into the tables, each record's rows built as the ``COPY`` reads them. When an id is stored
    already (a retry, a replay from the spool), the batch goes through temporary tables and
    ``INSERT ... ON CONFLICT (id) DO NOTHING`` instead, so that record is skipped, and its events
    are inserted only with a new record. Text is
    stored intact except what PostgreSQL cannot hold: NUL characters and lone surrogates become
    U+FFFD (in columns and in the JSON alike). A record that still cannot be stored (a value of the
    wrong type, an integer beyond 64 bits, a non-finite event duration, a NULL id) is left out,
    logged at ERROR with its full JSON, and the rest of the batch is stored; if no record of the
    batch could be stored, ``write`` raises too (see ``SQLiteSink``). Connection errors raise, and
    the dispatcher retries or spools the batch.
    """

    _dialect = _search.POSTGRES

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_size: int = PG_POOL_MIN_SIZE,
        max_size: int = PG_POOL_MAX_SIZE,
        timeout: float = PG_POOL_TIMEOUT_S,
        connect_timeout: int = PG_CONNECT_TIMEOUT_S,
    ) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ValueError(
                "dsn must be a PostgreSQL connection string like "
                f"'postgresql://user@localhost:5432/db', got {dsn!r:.60}"
            )
        dsn, url_schema = _split_schema(dsn.strip())
        if schema is not None and url_schema is not None and schema != url_schema:
            raise ValueError(f"schema is given twice: {schema!r} and ?schema={url_schema!r}")
        schema = schema if schema is not None else url_schema
        if schema is not None and (
            not isinstance(schema, str) or not _SCHEMA_NAME_RE.fullmatch(schema)
        ):
            raise ValueError(
                "schema must be a name of letters, digits and underscores (not starting with a "
                f"digit, at most 63), got {schema!r:.60}"
            )
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"dsn is not a valid PostgreSQL connection string: {exc}") from None
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_size < min_size:
            raise ValueError(f"max_size must be >= min_size, got {max_size} < {min_size}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if (
            not isinstance(connect_timeout, int)
            or isinstance(connect_timeout, bool)
            or connect_timeout < 1
        ):
            raise ValueError(f"connect_timeout must be a positive integer, got {connect_timeout!r}")
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = float(timeout)
        self._conninfo = dsn
        self._shown = " ".join(f"{k}={v}" for k, v in params.items() if k != "password")
        self._kwargs: dict[str, Any] = {
            **{k: v for k, v in _CONNECTION_DEFAULTS.items() if k not in params},
            **({} if "connect_timeout" in params else {"connect_timeout": connect_timeout}),
        }
        self._insert_record = insert_record_sql("%s") + " RETURNING id"
        self._insert_event = insert_event_sql("%s")
        self._lock = threading.Lock()
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._abandoned: list[ConnectionPool[psycopg.Connection[Any]]] = []
        self._pid = os.getpid()
        self._schema_ready = False
        self._rejected = RejectedRecords("PostgresSink", logger)

    def __repr__(self) -> str:
        schema = f", schema={self.schema!r}" if self.schema else ""
        return f"PostgresSink({self._shown!r}{schema})"

    # --- Sink -------------------------------------------------------------------------------------

    def write(self, records: Sequence[RequestRecord], /) -> None:
        if not records:
            return
        batch = StagedBatch(records, time.time_ns() // 1_000_000)
        try:
            self._copy(batch)
        except psycopg.errors.UndefinedTable:
            self._schema_ready = False  # dropped behind our back: create it on the retry
            raise
        except _RECORD_ERRORS:
            self._insert_one_by_one(batch)
        failures = batch.failures
        if not failures:
            return
        for record, error in failures:
            self._rejected.report(record, error)
        if len(failures) == len(records):
            error = failures[0][1]
            error.add_note(f"PostgresSink stored none of the {len(records)} records of this batch")
            raise error

    def close(self) -> None:
        """Close the pool; a later write or query opens a new one."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and os.getpid() == self._pid:
            pool.close(timeout=self.timeout)

    # --- Store ------------------------------------------------------------------------------------

    def query_records(
        self,
        start_ms: int,
        end_ms: int,
        *,
        platform: str | None = None,
        status_code: int | None = None,
        kind: str | None = None,
        limit: int = QUERY_LIMIT,
    ) -> list[RequestRecord]:
        """Records with ``start_ms <= started_at_ms < end_ms``, newest first (see ``Store``)."""
        query = validate_query(start_ms, end_ms, platform, status_code, kind, limit)
        statement, params = records_select(query, "%s", _TEXT_ORDER)
        return records_from_rows(self._select(statement, params), self._select, "%s")

    def query_events(
        self,
        start_ms: int,
        end_ms: int,
        *,
        platform: str | None = None,
        status_code: int | None = None,
        kind: str | None = None,
        limit: int = QUERY_LIMIT,
    ) -> list[UpstreamErrorEvent]:
        """Events with ``start_ms <= at_unix_ms < end_ms``, newest first; filters test the event."""
        query = validate_query(start_ms, end_ms, platform, status_code, kind, limit)
        statement, params = events_select(query, "%s", _TEXT_ORDER)
        with self._connection() as connection:
            rows = connection.execute(statement, params).fetchall()
        return [event_from_row(row) for row in rows]

    def _select(self, statement: str, params: Sequence[Any]) -> list[Any]:
        with self._connection() as connection:
            return connection.execute(statement, params).fetchall()

    # --- maintenance ------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema now, on a connection of its own; the version in place."""
        with psycopg.connect(self._conninfo, **self._kwargs) as connection:
            self._configure(connection)
            return self._apply_migrations(connection)

    def purge(
        self,
        older_than: timedelta | str,
        *,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: PurgeProgress | None = None,
    ) -> int:
        """Delete records started more than ``older_than`` ago, with their events (``Purgeable``)."""
        cutoff = cutoff_ms(older_than)

        def delete_batch(limit: int) -> int:
            with self._connection() as connection:
                return connection.execute(_PURGE, (cutoff, limit)).rowcount

        return purge_in_batches(delete_batch, batch_size, progress)

    # --- writing ----------------------------------------------------------------------------------

    def _copy(self, batch: StagedBatch) -> None:
        """The batch in one transaction: its events first, each record staged as the ``COPY``
        reads it (the server parses the heavy JSONB while the next rows are built)."""
        with self._connection() as connection, connection.transaction():
            cursor = connection.cursor()
            try:
                with connection.transaction():  # a savepoint
                    with cursor.copy(_COPY_NEW_EVENTS) as copy:
                        for _, _, events in batch:
                            for event in events:
                                copy.write_row(event)
                    _copy_records(cursor, _COPY_NEW_RECORDS, batch.staged)
                return
            except psycopg.errors.UniqueViolation:
                pass  # some of these ids are stored already
            staged = batch.finish()
            for statement in _STAGE:
                cursor.execute(statement)
            _copy_records(cursor, _COPY_RECORDS, staged)
            with cursor.copy(_COPY_EVENTS) as copy:
                for _, _, events in staged:
                    for event in events:
                        copy.write_row(event)
            cursor.execute(_MOVE)

    def _insert_one_by_one(self, batch: StagedBatch) -> None:
        """The slow path, for a batch with a record the database rejects: a savepoint each; the
        rejected records join ``batch.failures``."""
        with self._connection() as connection, connection.transaction():
            cursor = connection.cursor()
            for record, row, events in batch.finish():
                try:
                    with connection.transaction():
                        cursor.execute(self._insert_record, row)
                        if cursor.fetchone() is not None and events:
                            cursor.executemany(self._insert_event, events)
                except _RECORD_ERRORS as exc:
                    batch.failures.append((record, exc))

    # --- connections ------------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (committed on success) with the schema in place."""
        pool = self._open_pool()
        try:
            connection = pool.getconn()
        except PoolTimeout as exc:
            raise PoolTimeout(f"{exc}: {self._why_no_connection()}") from None
        try:
            with connection:  # a pooled connection: commits or rolls back, stays open
                if not self._schema_ready:
                    self._apply_migrations(connection)
                yield connection
        finally:
            pool.putconn(connection)

    def _why_no_connection(self) -> str:
        """The pool only says it timed out; one direct attempt tells an operator why."""
        try:
            psycopg.connect(self._conninfo, **{**self._kwargs, "connect_timeout": 2}).close()
        except psycopg.Error as exc:
            return " ".join(str(exc).split())
        return f"all {self.max_size} connections were busy"

    def _open_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        if os.getpid() != self._pid:
            self._after_fork()
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                pool = ConnectionPool(
                    self._conninfo,
                    kwargs=self._kwargs,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.timeout,
                    # Give up a failing reconnection soon: the next request then tries at once,
                    # instead of waiting out an ever longer backoff after the database is back.
                    reconnect_timeout=max(2.0, self.timeout),
                    configure=self._configure,
                    check=ConnectionPool.check_connection,
                    name="upstream-ops",
                    open=False,
                )
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        """Every new connection: JSONB read back as the text ``_query`` parses, and the schema."""
        connection.adapters.register_loader("jsonb", TextLoader)
        if self.schema is not None:
            connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        connection.commit()

    def _apply_migrations(self, connection: psycopg.Connection[Any]) -> int:
        """Create the schema and apply missing migrations, serialized across processes."""
        key = zlib.crc32(f"upstream_ops:{self.schema or ''}".encode())
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            if self.schema is not None:
                connection.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
            connection.execute(SCHEMA_TABLE_DDL)
            row = connection.execute(SELECT_SCHEMA_VERSION).fetchone()
            current = int(row[0] or 0) if row else 0
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    connection.execute(statement)
            if current < SCHEMA_VERSION:
                for statement in SET_SCHEMA_VERSION:
                    connection.execute(statement)
        if current > SCHEMA_VERSION:
            logger.warning(
                "upstream_ops: %r has schema version %d, newer than this version's %d",
                self,
                current,
                SCHEMA_VERSION,
            )
        self._schema_ready = True
        return max(current, SCHEMA_VERSION)

    def _after_fork(self) -> None:
        """In a forked child, leave the parent's pool alone: its sockets are the parent's."""
        with self._lock:
            if self._pool is not None:
                self._abandoned.append(self._pool)
            self._pool = None
            self._pid = os.getpid()


# --- COPY -----------------------------------------------------------------------------------------


def _copy_records(cursor: psycopg.Cursor[Any], statement: str, staged: Sequence[Staged]) -> None:
    with cursor.copy(statement) as copy:
        for _, row, _ in staged:
            copy.write_row(row)


def _split_schema(dsn: str) -> tuple[str, str | None]:
    """Take ``?schema=`` out of a URL DSN (libpq rejects parameters it does not know)."""
    if not dsn.lower().startswith(("postgresql://", "postgres://")):
        return dsn, None
    parts = urlsplit(dsn)
    params = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in params if name == "schema"]
    if not schemas:
        return dsn, None
    rest = [(name, value) for name, value in params if name != "schema"]
    return urlunsplit(parts._replace(query=urlencode(rest))), schemas[-1]
