"""A sink that keeps records in a list: for tests and for trying the library out."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from upstream_ops.record import RequestRecord


class MemorySink:
    """Appends every written record to ``records``, in write order, duplicates included.

    A retried batch therefore shows up twice, which is what a test of the retry path wants to see.
    Writing and ``clear()`` are thread-safe; read ``records`` once the writer is idle (after a
    flush).
    """

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()

    def write(self, records: Sequence[RequestRecord], /) -> None:
        with self._lock:
            self.records.extend(records)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()

    def __repr__(self) -> str:
        return f"MemorySink({len(self.records)} records)"
