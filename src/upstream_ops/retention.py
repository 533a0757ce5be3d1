"""Retention: deleting old records so a store does not grow without bound.

The Go reference design never deleted anything, and a growing database was its most reported
problem. A store that can delete implements ``Purgeable``; ``upstream-ops purge --older-than 30d``
calls it once, and a dispatcher with ``retention=`` calls it periodically. Ages are ``timedelta``
values or short strings such as ``"30d"``, ``"12h"``, ``"90m"``, ``"45s"`` or ``"2w"``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from datetime import timedelta
from threading import Event
from typing import Final, Protocol, runtime_checkable

from upstream_ops.defaults import PURGE_BATCH_SIZE

__all__ = ["Purgeable", "cutoff_ms", "parse_duration", "purge_in_batches", "purge_periodically"]

logger = logging.getLogger("upstream_ops")

#: Progress callback of ``purge``: called after each batch with the number deleted so far.
PurgeProgress = Callable[[int], None]

_DURATION_RE: Final = re.compile(r"\s*(\d+)\s*([smhdw])\s*", re.IGNORECASE)
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@runtime_checkable
class Purgeable(Protocol):
    """A store that deletes records started more than ``older_than`` ago, with their events.

    Deletes run in transactions of at most ``batch_size`` records, so a large purge never holds
    locks for long and can run while the store is being written. Returns how many records went.
    A bad argument raises ``ValueError`` naming it.
    """

    def purge(
        self,
        older_than: timedelta | str,
        *,
        batch_size: int = PURGE_BATCH_SIZE,
        progress: PurgeProgress | None = None,
    ) -> int: ...


def parse_duration(value: timedelta | str, name: str = "older_than") -> timedelta:
    """A positive ``timedelta`` from itself or from ``"<n><s|m|h|d|w>"``; else ``ValueError``."""
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value)):
        duration = timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2].lower()])
    else:
        expected = "a duration" if isinstance(value, str) else "a timedelta or a duration"
        raise ValueError(
            f"{name} must be {expected} like '30d', '12h', '90m', '45s' or '2w', got {value!r:.60}"
        )
    if duration <= timedelta(0):
        raise ValueError(f"{name} must be a positive duration, got {value!r:.60}")
    return duration


def cutoff_ms(older_than: timedelta | str) -> int:
    """Unix milliseconds before which a record is older than ``older_than``."""
    age = parse_duration(older_than)
    return time.time_ns() // 1_000_000 - int(age.total_seconds() * 1000)


def purge_in_batches(
    delete_batch: Callable[[int], int], batch_size: object, progress: PurgeProgress | None
) -> int:
    """Call ``delete_batch(batch_size)`` until it deletes fewer than ``batch_size``; the total."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r:.60}")
    if progress is not None and not callable(progress):
        raise ValueError("progress must be a callable taking the number of records deleted")
    total = 0
    while True:
        deleted = delete_batch(batch_size)
        total += deleted
        if progress is not None and deleted:
            progress(total)
        if deleted < batch_size:
            return total


def purge_periodically(
    purge: Callable[[timedelta], int], older_than: timedelta, interval: float, stop: Event
) -> None:
    """Call ``purge(older_than)`` soon after start, then every ``interval`` seconds, until ``stop``.

    Soon after start because processes restart more often than an hourly interval; jittered so
    that the workers of one server do not all purge at once. A failing purge is logged and tried
    again at the next interval.
    """
    delay = random.uniform(0.0, min(interval, 60.0))
    while not stop.wait(delay):
        delay = interval * random.uniform(0.9, 1.1)
        try:
            deleted = purge(older_than)
        except Exception as exc:
            logger.warning("upstream_ops: retention purge failed: %r", exc)
            continue
        if deleted:
            logger.info(
                "upstream_ops: retention purged %d records older than %s", deleted, older_than
            )
