"""A sink that appends one JSON line per record to a file, rotating it by size."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from upstream_ops.defaults import JSONL_BACKUPS, JSONL_MAX_BYTES
from upstream_ops.record import RequestRecord

logger = logging.getLogger(__name__)


class JsonlSink:
    """Appends ``record.to_dict()`` as one JSON line per record and flushes after each batch.

    Before a line would push the file past ``max_bytes`` the file is rotated like ``logging``'s
    ``RotatingFileHandler``: ``path`` becomes ``path.1``, ``path.1`` becomes ``path.2`` ... and
    ``path.{backups}`` is deleted (``backups=0`` keeps no old file). A single line longer than
    ``max_bytes`` still gets written, alone in its file.

    The file and its parent directories are created on the first write, not here. A file cannot
    ignore a line it already holds, so a batch the dispatcher retries after a partial write may
    leave duplicate lines: readers deduplicate by ``id``. One process per file (rotation is not
    coordinated between processes). A write after ``close()`` reopens the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = JSONL_MAX_BYTES,
        backups: int = JSONL_BACKUPS,
    ) -> None:
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise ValueError(f"path must be a non-empty file path, got {path!r:.60}")
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r:.60}")
        if not isinstance(backups, int) or isinstance(backups, bool) or backups < 0:
            raise ValueError(f"backups must be an integer >= 0, got {backups!r:.60}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0
        self._lock = threading.Lock()

    def write(self, records: Sequence[RequestRecord], /) -> None:
        if not records:
            return
        lines = _lines(records)
        with self._lock:
            try:
                file = self._open()
                # The lines of a file go in one write call: each call lets go of the interpreter
                # lock, and behind busy app threads every one of them costs a switch interval (5 ms)
                # to get it back.
                start = 0
                for i, line in enumerate(lines):
                    if self._size and self._size + len(line) > self.max_bytes:
                        if i > start:
                            file.write(b"".join(lines[start:i]))
                        file = self._rotate()
                        start = i
                    self._size += len(line)
                file.write(b"".join(lines[start:]))
                file.flush()
            except BaseException:
                with contextlib.suppress(OSError):  # the next write reopens and re-measures
                    self._close()
                raise

    def close(self) -> None:
        with self._lock:
            self._close()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = os.fstat(self._file.fileno()).st_size
        return self._file

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _rotate(self) -> BinaryIO:
        self._close()
        if self.backups:
            for n in range(self.backups - 1, 0, -1):
                older = self._backup(n)
                if older.exists():
                    older.replace(self._backup(n + 1))
            with contextlib.suppress(FileNotFoundError):  # removed by someone else meanwhile
                self.path.replace(self._backup(1))
        else:
            self.path.unlink(missing_ok=True)
        return self._open()

    def _backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")


def _lines(records: Sequence[RequestRecord]) -> list[bytes]:
    """The batch as UTF-8 JSON lines, made before anything is written so a failure writes nothing.

    A record that cannot be serialized (a value of a type JSON lacks) is logged with its ``repr``
    and skipped, so it does not cost the rest of the batch; if no record can be serialized, the
    first error is raised. A lone surrogate becomes its ``\\udXXX`` JSON escape: valid UTF-8, and
    nothing is lost.
    """
    lines: list[bytes] = []
    first_error: Exception | None = None
    for record in records:
        try:
            text = json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            first_error = first_error or exc
            logger.error(
                "upstream_ops: JsonlSink skipped a record it cannot serialize (%s): %r", exc, record
            )
            continue
        lines.append((text + "\n").encode("utf-8", "backslashreplace"))
    if first_error is not None and not lines:
        raise first_error
    return lines
