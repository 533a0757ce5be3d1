"""A sink and store on one SQLite file (stdlib ``sqlite3``): the default home of records."""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

from upstream_ops.defaults import PURGE_BATCH_SIZE, QUERY_LIMIT
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.retention import PurgeProgress, cutoff_ms, purge_in_batches
from upstream_ops.sinks import _search
from upstream_ops.sinks._query import (
    EVENTS_TABLE,
    IDS_PER_STATEMENT,
    RECORDS_TABLE,
    SCHEMA_TABLE_DDL,
    SCHEMA_VERSION,
    SELECT_SCHEMA_VERSION,
    SET_SCHEMA_VERSION,
    event_from_row,
    events_select,
    insert_event_sql,
    insert_record_sql,
    record_rows,
    records_from_rows,
    records_select,
    schema_2_ddl,
    schema_3_sqlite_ddl,
    schema_ddl,
    validate_query,
)
from upstream_ops.sinks._sqlite_checkpoint import WalCheckpointer
from upstream_ops.sinks._sqlite_rows import BatchRows, insert_rows
from upstream_ops.sinks.base import RejectedRecords

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_TYPES: Final = {
    "text": "TEXT",
    "bigint": "INTEGER",
    "double": "REAL",
    "bool": "INTEGER",
    "json": "TEXT",
}
#: Statements that bring the schema from version ``n - 1`` to ``n``. Append, never edit.
_MIGRATIONS: Final = {1: schema_ddl(_TYPES), 2: schema_2_ddl(), 3: schema_3_sqlite_ddl()}

# One purge batch: the oldest records (the same ones for both statements: the write lock is held).
_OLDEST: Final = (
    f"SELECT id FROM {RECORDS_TABLE} WHERE started_at_ms < ? "  # noqa: S608 (constants only)
    "ORDER BY started_at_ms, id LIMIT ?"
)
_PURGE_EVENTS: Final = f"DELETE FROM {EVENTS_TABLE} WHERE record_id IN ({_OLDEST})"  # noqa: S608
_PURGE_RECORDS: Final = f"DELETE FROM {RECORDS_TABLE} WHERE id IN ({_OLDEST})"  # noqa: S608

# Which ids of a batch are stored already (``IDS_PER_STATEMENT`` at a time).
_STORED_IDS: Final = f"SELECT id FROM {RECORDS_TABLE} WHERE id IN"  # noqa: S608 (constants only)

#: The page size of a new file: twice SQLite's default, because a batch appends rows of about
#: 800 bytes (an event with its JSON) to a few b-trees; fewer, fuller pages cost a write about a
#: tenth less CPU time.
_PAGE_SIZE: Final = 8192
#: The page cache of each connection, in KiB.
_CACHE_KIB: Final = 32 * 1024

#: Pages committed between two checkpoints of the WAL, which a thread of their own runs (see
#: ``WalCheckpointer``): about as often as SQLite's own (every 1,000 pages) would ...
_CHECKPOINT_EVERY: Final = 1024
#: ... as estimated from what was written: a page for each of the seven b-trees a commit inserts
#: into (or deletes from), and one more per record (the bench's batches of 256 write 130 to 200,
#: more as the file grows: the request ids' index takes them at random places).
_PAGES_PER_COMMIT: Final = 7
#: The WAL's pages beyond which the writer checkpoints itself (32 MiB with 8 KiB pages) ...
_WAL_LIMIT_FRAMES: Final = 4096
#: ... and the size, in bytes, its file is cut back to when it starts over.
_WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024

#: How long one statement waits for another connection's lock (SQLite's busy handler) ...
_BUSY_TIMEOUT_S: Final = 5.0
#: ... and how often an operation that still found the database locked is tried in all.
_LOCKED_ATTEMPTS: Final = 4

#: Errors caused by one record's values (a type or an int SQLite cannot bind, a lone surrogate, a
#: NULL id ...). Anything else (locked, disk full, I/O, a closed connection) is the database's.
_RECORD_ERRORS: Final = (
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    OverflowError,
    UnicodeError,
    TypeError,
    ValueError,
)


class SQLiteSink(_search.SearchMixin):
    """Writes records to a SQLite file and answers ``Store`` queries over it.

    The file (and its directory) is opened on the first write or query. It runs in WAL mode with
    ``synchronous=NORMAL`` and a busy timeout, so readers never block the writer and several
    processes can write one file; an operation that still finds the database locked is retried.
    Connections are per thread (``sqlite3`` requires it); ``close()`` closes them all, and a later
    call opens new ones. Call ``close()`` when no write or query is running. The WAL is
    checkpointed by a daemon thread of the sink's (see ``WalCheckpointer``), not by the writes.

    Each batch is one transaction: its records, then their events, in a few many-row ``INSERT``
    statements (``_sqlite_rows.insert_rows``).
    An id already stored is left out with its events (looked up first; and ``ON CONFLICT (id) DO
    NOTHING``, see ``insert_record_sql``), so a retried batch is harmless. A batch with a record the
    database rejects (see ``_RECORD_ERRORS``) is written again with a savepoint per record: that
    record is rolled back alone, logged at ERROR with its full JSON so its data is not lost, and
    the rest of the batch is committed. If no record of the batch could be stored, ``write``
    raises as well, because that looks like a problem with the database or the code rather than
    with one record, and the dispatcher should retry and report it. Database errors (locked, disk
    full, I/O) roll back the whole batch and raise: the retried batch then finds nothing
    half-written.
    """

    _dialect = _search.SQLITE

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise ValueError(f"path must be a non-empty file path, got {path!r:.60}")
        if os.fspath(path) == ":memory:" or os.fspath(path).startswith("file:"):
            raise ValueError(
                "path must be a file path: an in-memory or URI database is private to one "
                "connection and SQLiteSink uses one per thread (use MemorySink, or a file in a "
                "temporary directory)"
            )
        self.path = Path(path)
        self._insert_record = insert_record_sql("?")
        self._insert_event = insert_event_sql("?")
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._abandoned: list[sqlite3.Connection] = []
        self._generation = 0
        self._pid = os.getpid()
        self._schema_ready = False
        self._rejected = RejectedRecords("SQLiteSink", logger)
        self._checkpointer = self._new_checkpointer()

    def __repr__(self) -> str:
        return f"SQLiteSink({str(self.path)!r})"

    # --- Sink -------------------------------------------------------------------------------------

    def write(self, records: Sequence[RequestRecord], /) -> None:
        if not records:
            return
        failures = self._retrying(lambda: self._insert(records))
        self._checkpointer.wrote(_PAGES_PER_COMMIT + len(records), self._connection)
        if not failures:
            return
        for record, error in failures:
            self._rejected.report(record, error)
        if len(failures) == len(records):
            error = failures[0][1]
            error.add_note(f"SQLiteSink stored none of the {len(records)} records of this batch")
            raise error

    def close(self) -> None:
        """Close every connection this sink opened, after its checkpoint thread has ended; a later
        write or query opens new ones."""
        if os.getpid() != self._pid:
            self._after_fork()
        self._checkpointer.close()
        with self._lock:
            self._generation += 1
            connections, self._connections = self._connections, []
        for _, connection in connections:
            connection.close()

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
        """Records with ``start_ms <= started_at_ms < end_ms``, newest first (see ``Store``).

        ``status_code`` matches the record's summary status or any event's; ``platform`` and
        ``kind`` each match when any event of the record has them.
        """
        query = validate_query(start_ms, end_ms, platform, status_code, kind, limit)
        sql, params = records_select(query, "?")
        return records_from_rows(self._select(sql, params), self._select, "?")

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
        sql, params = events_select(query, "?")
        rows = self._retrying(lambda: self._connection().execute(sql, params).fetchall())
        return [event_from_row(row) for row in rows]

    def _select(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self._retrying(lambda: self._connection().execute(sql, params).fetchall())

    # --- maintenance ------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema now (it also happens on first use); the version in place."""
        self._retrying(self._connection)
        row = self._retrying(lambda: self._connection().execute(SELECT_SCHEMA_VERSION).fetchone())
        return int(row[0] or 0)

    def purge(
        self,
        older_than: timedelta | str,
        *,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: PurgeProgress | None = None,
    ) -> int:
        """Delete records started more than ``older_than`` ago, with their events (``Purgeable``).

        Each batch is one short write transaction, so writers wait at most one batch.
        """
        cutoff = cutoff_ms(older_than)

        def delete_batch(limit: int) -> int:
            connection = self._connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(_PURGE_EVENTS, (cutoff, limit))
                deleted = connection.execute(_PURGE_RECORDS, (cutoff, limit)).rowcount
                connection.execute("COMMIT")
            except BaseException:
                _rollback(connection)
                raise
            self._checkpointer.wrote(_PAGES_PER_COMMIT + int(deleted), self._connection)
            return int(deleted)

        return purge_in_batches(
            lambda limit: self._retrying(lambda: delete_batch(limit)), batch_size, progress
        )

    # --- writing ----------------------------------------------------------------------------------

    def _insert(self, records: Sequence[RequestRecord]) -> list[tuple[RequestRecord, Exception]]:
        """One transaction for the batch; returns the records the database rejected."""
        connection = self._connection()
        created_at_ms = time.time_ns() // 1_000_000
        failures: list[tuple[RequestRecord, Exception]] = []
        connection.execute("BEGIN IMMEDIATE")
        try:
            try:
                self._insert_all(connection, records, created_at_ms)
            except _RECORD_ERRORS:
                # A record the database rejects: the batch again, each record in a savepoint of its
                # own (twice the statements, so only when needed), to store all the others.
                connection.execute("ROLLBACK")
                connection.execute("BEGIN IMMEDIATE")
                for record in records:
                    error = self._insert_one(connection, record, created_at_ms)
                    if error is not None:
                        failures.append((record, error))
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
        return failures

    def _insert_all(
        self, connection: sqlite3.Connection, records: Sequence[RequestRecord], created_at_ms: int
    ) -> None:
        """The common case: every record of the batch is storable; raises at the first that is not.

        A few many-row statements per shape of record and of event (see ``BatchRows`` and
        ``insert_rows``) instead of statements per record: the ids already stored (a retried
        batch) are looked up first, under the write lock, and left out with their events, as is
        every repeat of an id inside the batch (the first one wins).
        """
        batch = BatchRows(created_at_ms)
        for record in records:
            batch.add(record)  # each event serialized once
        stored = self._stored_ids(connection, list(batch.records))
        if stored:
            batch.leave_out(stored)
        for sql, rows in batch.statements():
            insert_rows(connection, sql, rows)

    @staticmethod
    def _stored_ids(connection: sqlite3.Connection, ids: list[str]) -> set[str]:
        """Which of ``ids`` the records table holds already."""
        stored: set[str] = set()
        for start in range(0, len(ids), IDS_PER_STATEMENT):
            chunk = ids[start : start + IDS_PER_STATEMENT]
            marks = ", ".join("?" * len(chunk))
            cursor = connection.execute(f"{_STORED_IDS} ({marks})", chunk)
            stored.update(key for (key,) in cursor)
        return stored

    def _insert_one(
        self, connection: sqlite3.Connection, record: RequestRecord, created_at_ms: int
    ) -> Exception | None:
        try:
            row, events = record_rows(record, created_at_ms)
        except _RECORD_ERRORS as exc:
            return exc
        connection.execute("SAVEPOINT upstream_ops_record")
        try:
            # rowcount 0: the id is already stored (a retried batch), and so are its events.
            if connection.execute(self._insert_record, row).rowcount == 1 and events:
                connection.executemany(self._insert_event, events)
        except _RECORD_ERRORS as exc:
            connection.execute("ROLLBACK TO upstream_ops_record")
            connection.execute("RELEASE upstream_ops_record")
            return exc
        connection.execute("RELEASE upstream_ops_record")
        return None

    # --- connections ------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema created) on first use."""
        if os.getpid() != self._pid:
            self._after_fork()
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == self._generation:
            connection: sqlite3.Connection = held[1]
            return connection
        connection = self._open()
        with self._lock:
            generation = self._generation
            alive = []
            for thread, other in self._connections:
                if thread.is_alive():
                    alive.append((thread, other))
                else:
                    other.close()  # its thread ended: nobody else uses it
            alive.append((threading.current_thread(), connection))
            self._connections = alive
        self._local.held = (generation, connection)
        return connection

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions, ``write`` says BEGIN and COMMIT itself.
        # check_same_thread=False only so that ``close()`` may close other threads' connections.
        connection = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("PRAGMA synchronous = NORMAL")
            # The WAL is checkpointed by ``WalCheckpointer``, not by the connection that commits.
            connection.execute("PRAGMA wal_autocheckpoint = 0")
            connection.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
            # A batch inserts into seven b-trees, one (the request ids') at random places: a page
            # cache bigger than SQLite's default 2 MiB keeps them in memory.
            connection.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            # A batch's many-row INSERTs keep a statement journal: in memory, not a temporary file.
            connection.execute("PRAGMA temp_store = MEMORY")
            if not self._schema_ready:
                self._ensure_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _ensure_schema(self, connection: sqlite3.Connection) -> None:
        """Switch the file to WAL and apply missing migrations, once per sink and process."""
        # Only a new, empty file takes it (an existing one keeps its page size).
        connection.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("upstream_ops: %s could not switch to WAL (mode %s)", self.path, mode)
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute(SCHEMA_TABLE_DDL)
            current = int(connection.execute(SELECT_SCHEMA_VERSION).fetchone()[0] or 0)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    connection.execute(statement)
            if current < SCHEMA_VERSION:
                for statement in SET_SCHEMA_VERSION:
                    connection.execute(statement)
            connection.execute("COMMIT")
        except BaseException:
            _rollback(connection)
            raise
        if current > SCHEMA_VERSION:
            logger.warning(
                "upstream_ops: %s has schema version %d, newer than this version's %d",
                self.path,
                current,
                SCHEMA_VERSION,
            )
        self._schema_ready = True

    def _after_fork(self) -> None:
        """In a forked child, forget the parent's connections without touching them (SQLite forbids
        using a connection across ``fork``; closing it could disturb the parent's WAL)."""
        self._abandoned.extend(connection for _, connection in self._connections)
        self._connections = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._checkpointer = self._new_checkpointer()  # the parent's thread is not in the child
        self._pid = os.getpid()

    def _new_checkpointer(self) -> WalCheckpointer:
        return WalCheckpointer(
            self.path,
            every=_CHECKPOINT_EVERY,
            limit_frames=_WAL_LIMIT_FRAMES,
            busy_timeout_s=_BUSY_TIMEOUT_S,
        )

    def _retrying(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation``, again after a short pause while the database stays locked."""
        for attempt in range(1, _LOCKED_ATTEMPTS + 1):
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if attempt == _LOCKED_ATTEMPTS or not _is_locked(exc):
                    raise
            time.sleep(0.05 * 2**attempt * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")


def _is_locked(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back if a transaction is open; never mask the error that got us here."""
    try:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
    except sqlite3.Error:
        logger.debug("upstream_ops: rollback failed", exc_info=True)
