"""The circuit between the dispatcher and a failing sink: stop hammering it, probe it, resume.

Closed, batches are written as they come. A batch that fails after its retries opens it: the
dispatcher then spools everything and only *probes* the sink with the oldest spooled records, at
most every ``CIRCUIT_PROBE_MIN_S`` to ``CIRCUIT_PROBE_MAX_S`` (doubling, jittered so a fleet does
not probe in step). The first accepted write closes it. The probe's size halves on each failure,
down to one record, so a record the sink rejects can be told apart from a sink that is down, and
doubles on each success, back to a full batch.
"""

from __future__ import annotations

import random
import time
from typing import Final

from upstream_ops.defaults import CIRCUIT_PROBE_MAX_S, CIRCUIT_PROBE_MIN_S, DROP_WARNING_INTERVAL_S

__all__ = ["Circuit"]

_JITTER: Final = (0.75, 1.25)


class Circuit:
    """The state; changed by the writer thread (under the dispatcher's lock), read by others."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.is_open = False
        self.probe_at = 0.0  # monotonic time of the next probe; 0 while closed
        self.probe_size = batch_size
        self._delay = CIRCUIT_PROBE_MIN_S
        self._last_warning = -DROP_WARNING_INTERVAL_S

    def due(self, now: float) -> bool:
        """Whether the spool may be written now."""
        return now >= self.probe_at

    def failed(self, *, shrink: bool = False, back_off: bool = True) -> bool:
        """A write or probe failed: open, schedule the next probe. ``True`` when worth a warning.

        ``shrink`` halves the next probe; ``back_off=False`` keeps the delay (while halving).
        """
        now = time.monotonic()
        if not self.is_open:
            self.is_open = True
            self._delay = CIRCUIT_PROBE_MIN_S
        elif back_off:
            self._delay = min(CIRCUIT_PROBE_MAX_S, self._delay * 2)
        if shrink:
            self.probe_size = max(1, self.probe_size // 2)
        self.probe_at = now + self._delay * random.uniform(*_JITTER)
        warn = now - self._last_warning >= DROP_WARNING_INTERVAL_S
        if warn:
            self._last_warning = now
        return warn

    def succeeded(self) -> bool:
        """A write was accepted: close, grow the probe back. ``True`` if it was open."""
        was_open = self.is_open
        self.is_open = False
        self.probe_at = 0.0
        self._delay = CIRCUIT_PROBE_MIN_S
        self.probe_size = min(self.batch_size, self.probe_size * 2)
        return was_open
