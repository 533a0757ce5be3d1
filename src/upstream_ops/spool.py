"""The on-disk spool: records wait here, in order, while the sink cannot take them.

Layout under ``spool_dir``: one sub-directory per process (``p<pid>-<random>``) holding ``lock``
(``flock``-ed for as long as the process uses the spool), numbered segment files
(``000000000001.jsonl``: one record per line, ``RequestRecord.to_dict()`` as ASCII JSON, so any
string round-trips) and ``cursor`` (how far the oldest segment has been replayed). Every append is
``fsync``-ed before it returns, so a record the spool accepted survives the process being killed,
and a power cut. Replay reads from the oldest segment and deletes a segment once it is written.

A process that dies leaves its directory behind with the lock released (the kernel drops ``flock``
locks with the process). The next spool opened on the same ``spool_dir`` takes the lock, moves the
segments into its own directory and replays them; two processes never adopt the same directory.
The cursor is saved after each replayed chunk but not synced, so after a crash a chunk may be
replayed again: sinks ignore ids they hold, so that costs time, not duplicates.

The spool is bounded: past ``max_bytes`` the oldest segments are deleted and their records counted
as evicted. A line that cannot be read back (a torn write after a power cut) is skipped and counted.
POSIX only (``fcntl.flock``); use a local disk, not NFS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from upstream_ops.defaults import DROP_WARNING_INTERVAL_S, SPOOL_MAX_BYTES, SPOOL_SEGMENT_BYTES
from upstream_ops.record import RequestRecord

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Spool", "SpoolChunk"]

logger = logging.getLogger("upstream_ops")

_SEGMENT_SUFFIX: Final = ".jsonl"
_LOCK: Final = "lock"
_CURSOR: Final = "cursor"
_NEW_PREFIX: Final = ".new-"
_READ_BLOCK: Final = 1024 * 1024
_SMALLEST_SEGMENT: Final = 4096


@dataclass(eq=False)
class _Segment:
    """One segment file: ``end`` bytes of complete lines, of which ``done`` were replayed."""

    path: Path
    end: int = 0
    lines: int = 0
    done: int = 0
    done_lines: int = 0
    disk_bytes: int = 0  # what it costs against max_bytes (a torn tail included)

    @property
    def pending(self) -> int:
        return self.lines - self.done_lines


@dataclass(frozen=True, slots=True)
class SpoolChunk:
    """The oldest spooled records, read but not yet committed.

    ``unreadable`` counts lines that could not be turned back into records (they were logged).
    """

    records: list[RequestRecord]
    unreadable: int
    _parts: tuple[tuple[_Segment, int, int, int], ...] = field(repr=False)


class Spool:
    """An fsync'd, bounded, ordered on-disk queue of records for one process (see the module doc).

    Thread-safe. Nothing touches the disk until the first ``open``, ``append`` or ``read``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = SPOOL_MAX_BYTES,
        segment_bytes: int = SPOOL_SEGMENT_BYTES,
    ) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            raise ValueError("spool_dir needs a POSIX system (fcntl.flock)")
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
            raise ValueError(f"spool_dir must be a non-empty directory path, got {directory!r:.60}")
        for name, value in (("spool_max_bytes", max_bytes), ("segment_bytes", segment_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < _SMALLEST_SEGMENT:
                raise ValueError(f"{name} must be an integer >= {_SMALLEST_SEGMENT}, got {value!r}")
        self.root = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max(_SMALLEST_SEGMENT, max_bytes // 4))
        self._lock = threading.Lock()
        self._forget()

    def _forget(self) -> None:
        self.directory: Path | None = None
        self._lock_fd: int | None = None
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._active_fd: int | None = None
        self._next_number = 1
        self._bytes = 0
        self._pending = 0
        self._evicted = 0
        self._last_eviction_warning = -DROP_WARNING_INTERVAL_S

    # --- counters (read without the lock: single ints) -------------------------------------------

    @property
    def pending(self) -> int:
        """Records spooled and not yet replayed."""
        return self._pending

    @property
    def size_bytes(self) -> int:
        """Bytes the spool's segments take on disk."""
        return self._bytes

    @property
    def evicted(self) -> int:
        """Records deleted unreplayed because the spool reached ``max_bytes``."""
        return self._evicted

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self) -> int:
        """Create this process's directory and adopt dead processes' spools; records adopted."""
        with self._lock:
            if self.directory is not None:
                return 0
            self._open_directory()
            return self._adopt_orphans()

    def adopt_orphans(self) -> int:
        """Adopt spools whose process died since the last look; the records adopted."""
        with self._lock:
            if self.directory is None:
                self._open_directory()
            return self._adopt_orphans()

    def close(self) -> None:
        """Release the lock. An empty directory is removed; one with records is left to adopt."""
        with self._lock:
            directory, lock_fd = self.directory, self._lock_fd
            if directory is None or lock_fd is None:
                return
            self._close_active()
            if self._pending == 0:
                for segment in self._segments:
                    segment.path.unlink(missing_ok=True)
                for name in (_CURSOR, _LOCK):
                    (directory / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    directory.rmdir()
            os.close(lock_fd)  # releases the flock
            evicted = self._evicted
            self._forget()
            self._evicted = evicted

    def after_fork(self) -> None:
        """In a forked child: drop the parent's state without unlocking the parent's directory."""
        self._lock = threading.Lock()
        for fd in (self._lock_fd, self._active_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # the parent's descriptor still holds the lock
        self._forget()

    # --- writing ---------------------------------------------------------------------------------

    def append(self, records: Sequence[RequestRecord]) -> list[RequestRecord]:
        """Spool ``records`` durably (written and fsync'd) in order.

        Returns the records that cannot be serialized (logged, not spooled). Raises ``OSError``
        when the disk refuses the write; then nothing of this call is in the spool.
        """
        lines: list[bytes] = []
        rejected: list[RequestRecord] = []
        for record in records:
            try:
                text = json.dumps(record.to_dict(), ensure_ascii=True, separators=(",", ":"))
            except (TypeError, ValueError, RecursionError) as exc:
                rejected.append(record)
                logger.error("upstream_ops: cannot spool a record (%s): %r", exc, record)
                continue
            lines.append(text.encode("ascii") + b"\n")
        if not lines:
            return rejected
        with self._lock:
            if self.directory is None:
                self._open_directory()
                self._adopt_orphans()
            lines = self._make_room(lines)
            if lines:
                self._write(lines)
        return rejected

    def _write(self, lines: list[bytes]) -> None:
        segment, fd = self._writable_segment()
        data = b"".join(lines)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            # Leave no partial line behind: the next append starts a fresh segment.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, segment.end)
            self._close_active()
            raise
        segment.end += len(data)
        segment.disk_bytes = segment.end
        segment.lines += len(lines)
        self._bytes += len(data)
        self._pending += len(lines)

    def _writable_segment(self) -> tuple[_Segment, int]:
        if self._active is not None and self._active.end >= self.segment_bytes:
            self._close_active()
        if self._active is None or self._active_fd is None:
            assert self.directory is not None
            path = self.directory / self._next_name()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC)
            _fsync_directory(self.directory)
            self._active = _Segment(path)
            self._active_fd = fd
            self._segments.append(self._active)
        return self._active, self._active_fd

    def _close_active(self) -> None:
        fd, self._active_fd, self._active = self._active_fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _make_room(self, lines: list[bytes]) -> list[bytes]:
        """Evict the oldest segments (and, for a batch larger than the bound, its oldest lines)."""
        incoming = sum(len(line) for line in lines)
        evicted = 0
        while self._segments and self._bytes + incoming > self.max_bytes:
            segment = self._segments.pop(0)
            if segment is self._active:
                self._close_active()
            segment.path.unlink(missing_ok=True)
            self._bytes -= segment.disk_bytes
            self._pending -= segment.pending
            evicted += segment.pending
        while lines and incoming > self.max_bytes:
            incoming -= len(lines.pop(0))
            evicted += 1
        if evicted:
            self._evicted += evicted
            now = time.monotonic()
            if now - self._last_eviction_warning >= DROP_WARNING_INTERVAL_S:
                self._last_eviction_warning = now
                logger.warning(
                    "upstream_ops: spool %s is full (%d bytes); evicted the %d oldest records "
                    "(%d evicted so far)",
                    self.directory,
                    self.max_bytes,
                    evicted,
                    self._evicted,
                )
            self._save_cursor()
        return lines

    # --- replaying -------------------------------------------------------------------------------

    def read(self, limit: int) -> SpoolChunk | None:
        """The oldest ``limit`` spooled lines as records, or ``None`` when the spool is empty."""
        with self._lock:
            if self.directory is None:
                self._open_directory()
                self._adopt_orphans()
            plan = [(s, s.done, s.end) for s in self._segments if s.done < s.end][:limit]
        if not plan:
            return None
        records: list[RequestRecord] = []
        unreadable = 0
        parts: list[tuple[_Segment, int, int, int]] = []
        taken = 0
        for segment, start, end in plan:
            if taken >= limit:
                break
            try:
                file = segment.path.open("rb")
            except FileNotFoundError:
                continue  # evicted meanwhile
            position, lines = start, 0
            with file:
                file.seek(start)
                while position < end and taken < limit:
                    line = file.readline()
                    if not line.endswith(b"\n"):
                        break  # cannot happen below ``end``; be safe
                    position += len(line)
                    lines += 1
                    taken += 1
                    try:
                        records.append(RequestRecord.from_dict(json.loads(line)))
                    except (ValueError, TypeError) as exc:
                        unreadable += 1
                        logger.error(
                            "upstream_ops: skipped an unreadable spooled record in %s (%s): %.2000r",
                            segment.path,
                            exc,
                            line,
                        )
            parts.append((segment, start, position, lines))
        return SpoolChunk(records, unreadable, tuple(parts))

    def commit(self, chunk: SpoolChunk) -> None:
        """Forget ``chunk``'s records (they are in the sink); delete segments replayed in full."""
        with self._lock:
            for segment, start, end, lines in chunk._parts:
                if segment.done != start or segment not in self._segments:
                    continue  # evicted, or committed already
                segment.done, segment.done_lines = end, segment.done_lines + lines
                self._pending -= lines
                if segment.done >= segment.end and segment.pending <= 0:
                    if segment is self._active:
                        self._close_active()
                    self._segments.remove(segment)
                    segment.path.unlink(missing_ok=True)
                    self._bytes -= segment.disk_bytes
            self._save_cursor()

    def _save_cursor(self) -> None:
        """Note how far the oldest segment was replayed (unsynced: losing it costs a re-replay)."""
        if self.directory is None:
            return
        cursor = self.directory / _CURSOR
        head = self._segments[0] if self._segments else None
        if head is None or head.done == 0:
            cursor.unlink(missing_ok=True)
            return
        temporary = cursor.with_suffix(".tmp")
        temporary.write_text(f"{head.path.name} {head.done}\n", encoding="ascii")
        os.replace(temporary, cursor)

    # --- directories and adoption ----------------------------------------------------------------

    def _open_directory(self) -> None:
        """Create and lock ``p<pid>-<random>``: built under a dot-name, so nobody adopts it early."""
        assert fcntl is not None
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"p{os.getpid()}-{secrets.token_hex(4)}"
        building = self.root / f"{_NEW_PREFIX}{name}"
        building.mkdir()
        fd = os.open(building / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            directory = self.root / name
            os.rename(building, directory)
            _fsync_directory(self.root)
        except BaseException:
            os.close(fd)
            raise
        self.directory, self._lock_fd = directory, fd

    def _adopt_orphans(self) -> int:
        assert fcntl is not None and self.directory is not None
        adopted = 0
        try:
            entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.path == os.fspath(self.directory) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(Path(entry.path) / _LOCK, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # not a spool directory, or being removed
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its process is alive
            try:
                adopted += self._adopt(Path(entry.path))
            except OSError:
                logger.exception("upstream_ops: could not adopt the spool %s", entry.path)
            finally:
                os.close(fd)
        if adopted:
            self._make_room([])
            logger.warning(
                "upstream_ops: adopted %d spooled records left by a process that stopped", adopted
            )
        return adopted

    def _adopt(self, orphan: Path) -> int:
        """Move an unlocked directory's segments behind ours, keeping their order and cursor."""
        assert self.directory is not None
        cursor_name, cursor_offset = _read_cursor(orphan / _CURSOR)
        self._close_active()  # adopted segments come after ours; new appends after them
        adopted = 0
        for path in sorted(orphan.glob(f"*{_SEGMENT_SUFFIX}")):
            target = self.directory / self._next_name()
            os.rename(path, target)
            done = cursor_offset if path.name == cursor_name else 0
            segment = _scan_segment(target, done)
            if segment.pending <= 0:
                target.unlink(missing_ok=True)
                continue
            self._segments.append(segment)
            self._bytes += segment.disk_bytes
            self._pending += segment.pending
            adopted += segment.pending
        _fsync_directory(self.directory)
        for name in (_CURSOR, f"{_CURSOR}.tmp", _LOCK):
            (orphan / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            orphan.rmdir()
        self._save_cursor()
        return adopted

    def _next_name(self) -> str:
        name = f"{self._next_number:012d}{_SEGMENT_SUFFIX}"
        self._next_number += 1
        return name


def _scan_segment(path: Path, done: int) -> _Segment:
    """Measure a segment written by another process: complete lines, and those before ``done``."""
    disk_bytes = path.stat().st_size
    lines = done_lines = 0
    end = 0
    position = 0
    with path.open("rb") as file:
        while block := file.read(_READ_BLOCK):
            newlines = block.count(b"\n")
            if newlines:
                end = position + block.rindex(b"\n") + 1
                lines += newlines
                if position < done:
                    done_lines += block[: max(0, done - position)].count(b"\n")
            position += len(block)
    if end < disk_bytes:
        logger.warning(
            "upstream_ops: ignored %d bytes of an incomplete write at the end of %s",
            disk_bytes - end,
            path,
        )
    done = min(done, end)
    return _Segment(path, end, lines, done, done_lines, disk_bytes)


def _read_cursor(path: Path) -> tuple[str, int]:
    try:
        name, offset = path.read_text(encoding="ascii").split()
        return name, max(0, int(offset))
    except (OSError, ValueError, UnicodeError):
        return "", 0


def _fsync_directory(path: Path) -> None:
    """Make a created or renamed entry durable (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
