"""Checkpoints of a SQLite file's write-ahead log on a thread of their own, off the write path.

In WAL mode a commit appends the pages it changed to the ``-wal`` file, and a checkpoint copies
them into the database file and syncs it (with ``synchronous=NORMAL`` the only sync). SQLite runs
one in the committing connection each time the WAL has grown by 1,000 pages
(``wal_autocheckpoint``): in the benchmark up to a fifth of the wall time of a write, waiting for
``fsync``. The sink's connections turn that off, and ``WalCheckpointer`` runs a ``PASSIVE``
checkpoint (which waits for no reader or writer, and holds up none) on a connection and a daemon
thread of its own, each time about ``every`` more pages were committed (an estimate the writer
makes: SQLite's own count is in a hook Python's ``sqlite3`` does not offer).

The WAL starts over from its beginning when a write transaction begins after a checkpoint has
copied all of it; under a steady stream of writes that may not happen by itself. So the WAL is
bounded: once a checkpoint finds more than ``limit_frames`` pages in it, the next writer
checkpoints itself after its commit, as SQLite would have, which lets its next transaction start
the WAL over (unless a reader still reads an old snapshot, which holds up SQLite's own
checkpoints as well).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

_CHECKPOINT: Final = "PRAGMA wal_checkpoint(PASSIVE)"


class WalCheckpointer:
    """Runs the WAL checkpoints of one SQLite file for one process (see the module docstring).

    ``wrote`` is called after each commit, from any thread; it never raises (a checkpoint that
    fails is logged at DEBUG and tried again later: no data depends on it, only the WAL's size).
    The thread starts on the first checkpoint due, ends after ``idle_s`` without one, and
    ``close`` ends it and waits for it. After ``fork`` the child needs a new ``WalCheckpointer``:
    the parent's thread does not exist there, and its connection must not be touched.
    """

    def __init__(
        self,
        path: Path,
        *,
        every: int,
        limit_frames: int,
        busy_timeout_s: float,
        idle_s: float = 30.0,
    ) -> None:
        self.path = path
        self.every = every
        self.limit_frames = limit_frames
        self._busy_timeout_s = busy_timeout_s
        self._idle_s = idle_s
        #: Guards the fields below it; the thread waits on it for work.
        self._wake = threading.Condition(threading.Lock())
        self._pages = 0  # committed (as estimated) since the last checkpoint was asked for
        self._due = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._idled: threading.Thread | None = None  # a thread that ended for want of work
        #: Held while a checkpoint of this process runs (SQLite lets one run at a time), and while
        #: the thread opens or closes its connection: whenever it is inside SQLite (see _FORKS).
        self._running = threading.Lock()
        #: Whether the last checkpoint found the WAL over ``limit_frames`` and could not copy it all.
        self._over_limit = False
        _FORKS.add(self)

    # --- the write path ---------------------------------------------------------------------------

    def wrote(self, pages: int, connection: Callable[[], sqlite3.Connection]) -> None:
        """Count ``pages`` just committed by ``connection()``; checkpoint now if the WAL is over
        its limit, and wake the thread when a checkpoint is due."""
        if self._over_limit:
            self._checkpoint_here(connection)
        with self._wake:
            self._pages += pages
            if self._pages < self.every:
                return
            self._pages = 0
            self._due = True
            if self._thread is not None and self._thread.is_alive():
                self._wake.notify()
                return
            thread = threading.Thread(
                target=self._run, name="upstream-ops-sqlite-checkpoint", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:  # at interpreter shutdown: no new threads, so checkpoint here
                self._due = False
                self._thread = None
            else:
                self._thread = thread
                return
        self._checkpoint_here(connection)

    def close(self) -> None:
        """End the thread after the checkpoint it runs, if any; a later ``wrote`` starts it anew."""
        with self._wake:
            threads, self._stopping = (self._thread, self._idled), True
            self._wake.notify()
        for thread in threads:
            if thread is not None:
                thread.join()
        with self._wake:
            self._thread = self._idled = None
            self._stopping, self._due, self._pages = False, False, 0

    # --- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while self._next():
                if connection is None:
                    with self._running:
                        connection = self._connect()
                if connection is not None and not self._checkpoint(connection, by_writer=False):
                    connection.close()  # a fresh one next time
                    connection = None
        except Exception:  # a bug: log it, and let the next ``wrote`` start a new thread
            logger.warning(
                "upstream_ops: the checkpoint thread of %s failed", self.path, exc_info=True
            )
            with self._wake:
                if self._thread is threading.current_thread():
                    self._thread, self._idled = None, self._thread
        finally:
            if connection is not None:
                with self._running, contextlib.suppress(sqlite3.Error):
                    connection.close()

    def _next(self) -> bool:
        """Wait for a checkpoint to be due: true when one is, false when the thread should end."""
        with self._wake:
            if not self._due and not self._stopping:
                self._wake.wait(self._idle_s)
            if self._due and not self._stopping:
                self._due = False
                return True
            if self._thread is threading.current_thread():
                # idle: ``wrote`` starts a new thread, ``close`` still waits for this one
                self._thread, self._idled = None, self._thread
            return False

    def _connect(self) -> sqlite3.Connection | None:
        try:
            # mode=rw: never create the file (it may have been moved or deleted since).
            return sqlite3.connect(
                f"{self.path.absolute().as_uri()}?mode=rw",
                uri=True,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error:
            logger.debug("upstream_ops: cannot open %s to checkpoint it", self.path, exc_info=True)
            return None

    # --- both -------------------------------------------------------------------------------------

    def _checkpoint_here(self, connection: Callable[[], sqlite3.Connection]) -> None:
        try:
            opened = connection()
        except Exception:
            logger.debug("upstream_ops: cannot checkpoint %s", self.path, exc_info=True)
            return
        self._checkpoint(opened, by_writer=True)

    def _checkpoint(self, connection: sqlite3.Connection, *, by_writer: bool) -> bool:
        """A ``PASSIVE`` checkpoint on ``connection``; whether it ran without an error.

        A checkpoint copies the WAL as it was when it began: on the thread, while the writer goes
        on, the WAL has grown by then, and (if over the limit) the writer should checkpoint
        itself. The writer's own, between its transactions, copies all of it unless a reader
        still uses an old snapshot: its next transaction starts the WAL over.
        """
        try:
            with self._running:
                busy, frames, copied = connection.execute(_CHECKPOINT).fetchone()
        except Exception:  # only the WAL's size depends on it: never raise
            logger.debug("upstream_ops: checkpoint of %s failed", self.path, exc_info=True)
            return False
        # busy: another process's checkpoint runs (frames and copied are -1); that one counts.
        if not busy:
            self._over_limit = frames > self.limit_frames and (copied < frames or not by_writer)
        return True


class _ForkGuard:
    """No checkpoint thread is inside SQLite while the process forks.

    A thread inside SQLite may hold one of its process-wide mutexes (its memory allocator's, for
    one); the child gets the mutex locked and no thread to unlock it, and its first SQLite call
    waits forever (seen in the tests: a child's ``sqlite3.connect`` hung while the parent's
    checkpoint ran). Before ``fork`` every live checkpointer's ``_running`` is taken, which waits
    for a checkpoint under way (a PASSIVE one waits for no lock of the database); both processes
    release it after.
    """

    def __init__(self) -> None:
        self._checkpointers: weakref.WeakSet[WalCheckpointer] = weakref.WeakSet()
        self._held: list[WalCheckpointer] = []

    def add(self, checkpointer: WalCheckpointer) -> None:
        self._checkpointers.add(checkpointer)

    def before(self) -> None:
        for checkpointer in list(self._checkpointers):
            checkpointer._running.acquire()
            self._held.append(checkpointer)

    def after(self) -> None:
        while self._held:
            self._held.pop()._running.release()


_FORKS: Final = _ForkGuard()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_FORKS.before, after_in_parent=_FORKS.after, after_in_child=_FORKS.after
    )
