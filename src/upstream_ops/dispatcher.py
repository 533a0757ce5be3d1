"""The dispatcher: gets records off the request path and into a sink, and keeps them when it cannot.

Like the OpenTelemetry SDK's batch processor, it owns the decisions (queue, batches, retries, spool,
drain) while the sink only writes. ``submit`` appends to a bounded queue: it never blocks, never
does I/O and never raises, so a slow or broken sink cannot hurt the request that produced the record.
Nor does it wake a thread for every record: waking one and handing it the GIL costs the request more
than everything else ``submit`` does, so the intake thread is woken only when it waits for a first
record, when a batch is full, or when ``flush`` asks; its batch timer does the rest.

Two threads share the work. The *intake* thread gathers batches from the queue and hands each to
the *writer* thread, which writes it to the sink. With a ``spool_dir`` the intake thread spools a
batch instead (on local disk, see ``spool.py``) when the sink is failing or so slow that the queue
passes half full, and the writer replays the spool, oldest first, once the sink takes writes again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from opentelemetry.metrics import MeterProvider

from upstream_ops import lifecycle
from upstream_ops._dispatcher_threads import _POLL_S, _DispatcherThreads  # the threads' side
from upstream_ops.defaults import (
    BATCH_INTERVAL_S,
    BATCH_SIZE,
    DROP_WARNING_INTERVAL_S,
    FLUSH_TIMEOUT_S,
    QUEUE_SIZE,
    RETENTION_INTERVAL_S,
    SPILL_AT_QUEUE_FRACTION,
    SPOOL_MAX_BYTES,
    WRITE_ATTEMPTS,
)
from upstream_ops.record import PackedRecord, RequestRecord, pack_record
from upstream_ops.retention import parse_duration, purge_periodically
from upstream_ops.sinks.base import Sink, close_sink
from upstream_ops.spool import Spool
from upstream_ops.telemetry._metrics import DROPPED, DispatcherMetrics

__all__ = ["Dispatcher", "DispatcherStats", "flush"]

logger = logging.getLogger("upstream_ops")

#: Records submitted behind this many full batches are packed while they wait (see pack_record),
#: if the sink's last write says they will wait _PACK_WAIT_S or longer. Packing costs a record about
#: 2 µs on the request path and 3 µs more on the dispatcher's; records the sink takes within half a
#: second (a burst in front of a fast sink) are gone before they slow the garbage collector down.
_PACK_AT_BATCHES = 2
_PACK_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class DispatcherStats:
    """Counters since the dispatcher started (or since the process forked).

    ``written`` counts records the sink accepted, replays included; ``replayed`` those of them that
    came from the spool (a spool adopted from a dead process included, so ``written`` may exceed
    ``enqueued``); ``spooled`` records put in the spool; ``evicted`` spooled records deleted
    unreplayed because the spool was full; ``in_spool`` records waiting in the spool now.
    """

    enqueued: int
    written: int
    dropped: int
    failed: int
    queued: int
    spooled: int = 0
    replayed: int = 0
    evicted: int = 0
    in_spool: int = 0


class Dispatcher(_DispatcherThreads):
    """A bounded queue, batches, one sink, and optionally an on-disk spool for what the sink refuses.

    A batch is written when it has ``batch_size`` records or its first record has waited
    ``batch_interval`` seconds. A failing write is tried ``write_attempts`` times in all with
    exponential backoff and jitter. Then, without a spool, its records are counted as failed and
    logged. With ``spool_dir`` they are spooled, and the circuit opens: every later batch goes
    straight to the spool (no per-batch retries, so memory stays flat however long the outage) and
    the writer tries the sink with the oldest spooled records, backing off from
    ``CIRCUIT_PROBE_MIN_S`` to ``CIRCUIT_PROBE_MAX_S``; the first accepted write closes it and the
    spool is replayed in order. Records the sink rejects as data (``TypeError``, ``ValueError``,
    a database ``DataError``/``IntegrityError``, or one record failing while the next succeeds)
    are logged and counted as failed instead of blocking the spool.

    A full queue drops the new record, counts it and warns at most once a minute; with a spool the
    queue only fills when the disk is slower than the traffic. ``retention`` (a ``timedelta`` or
    ``"30d"``) purges older records every ``retention_interval`` seconds if the sink has
    ``purge``. Threads start on the first record (at once with a spool, to adopt a dead process's
    spool), and again in a forked child. ``handle_sigterm`` installs a SIGTERM handler that drains
    before the process ends, only if SIGTERM has its default action and this is the main thread.
    Outcomes and the queue length are also OpenTelemetry metrics, on ``meter_provider`` (default:
    the global one); a replayed record is counted ``written`` when it reaches the sink.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        queue_size: int = QUEUE_SIZE,
        batch_size: int = BATCH_SIZE,
        batch_interval: float = BATCH_INTERVAL_S,
        write_attempts: int = WRITE_ATTEMPTS,
        meter_provider: MeterProvider | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = SPOOL_MAX_BYTES,
        retention: timedelta | str | None = None,
        retention_interval: float = RETENTION_INTERVAL_S,
        handle_sigterm: bool = True,
    ) -> None:
        if not callable(getattr(sink, "write", None)):
            raise ValueError(f"sink must have a write(records) method, got {type(sink).__name__}")
        for name, value in (
            ("queue_size", queue_size),
            ("batch_size", batch_size),
            ("write_attempts", write_attempts),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not batch_interval > 0:
            raise ValueError(f"batch_interval must be positive, got {batch_interval!r}")
        if not retention_interval > 0:
            raise ValueError(f"retention_interval must be positive, got {retention_interval!r}")
        self.retention = None if retention is None else parse_duration(retention, "retention")
        if self.retention is not None and not callable(getattr(sink, "purge", None)):
            raise ValueError(
                f"retention needs a sink that can purge old records; {type(sink).__name__} cannot "
                "(SQLiteSink and PostgresSink can)"
            )
        self.sink = sink
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.batch_interval = float(batch_interval)
        self.write_attempts = write_attempts
        self.retention_interval = float(retention_interval)
        self.spool = None if spool_dir is None else Spool(spool_dir, max_bytes=spool_max_bytes)
        self._spill_at = max(1, int(queue_size * SPILL_AT_QUEUE_FRACTION))
        self._pack_at = _PACK_AT_BATCHES * batch_size
        self._metrics = DispatcherMetrics(meter_provider)
        self._reset()
        lifecycle.register(self, handle_sigterm=handle_sigterm)
        if self.spool is not None:
            self._start()

    # -- the request path -------------------------------------------------------------------------

    def submit(self, record: RequestRecord) -> bool:
        """Queue ``record`` for writing; ``False`` (and counted) when the queue is full."""
        if self._intake is None:
            self._start()
        self._metrics.queued(1)  # before the worker can take it: the gauge never goes below zero
        item: RequestRecord | PackedRecord = record
        waiting = len(self._queue)
        if self._pack_at <= waiting < self.queue_size:
            # Behind a slow sink it waits long enough to reach the collector's oldest generation;
            # packed, it does not lengthen every full collection (see pack_record). How long, the
            # sink's last write tells (before the first one: assume long).
            per_record = self._write_s_per_record
            if per_record is None or waiting * per_record >= _PACK_WAIT_S:
                item = pack_record(record) or record
        with self._lock:
            queued = len(self._queue)
            if queued < self.queue_size:
                self._queue.append(item)
                self._enqueued += 1
                if self._intake_idle or (self._intake_gathering and queued + 1 >= self.batch_size):
                    self._intake_idle = self._intake_gathering = False
                    self._intake_wakeup.notify()
                if self._waiting_intake and queued + 1 >= self._spill_at:
                    self._changed.notify_all()  # the intake thread waits for a busy writer: spool now
                return True
        self._metrics.queued(-1)
        self._record_drop()
        return False

    def _record_drop(self) -> None:
        self._metrics.count(DROPPED)
        with self._lock:
            self._dropped += 1
            now = time.monotonic()
            warn = now - self._last_drop_warning >= DROP_WARNING_INTERVAL_S
            if warn:
                self._last_drop_warning = now
        if warn:
            logger.warning(
                "upstream_ops: record queue full (%d records); dropping new records "
                "(%d dropped so far). The %s is slower than the traffic.",
                self.queue_size,
                self._dropped,
                "sink" if self.spool is None else "spool's disk",
            )

    # -- control ----------------------------------------------------------------------------------

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every record accepted so far is written; ``False`` on timeout.

        With a spool: until the memory queue is written or spooled and, while the sink accepts
        writes, the spool is replayed too. ``True`` then means nothing is left only in memory and
        the spool is empty or the sink is refusing writes (see ``stats().in_spool``).
        """
        deadline = time.monotonic() + timeout
        if not self._wait_for_memory(deadline):
            return False
        return self._wait_for_spool(deadline)

    def drain(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """For shutdown: like ``flush``, but when the deadline nears, spool what is still in memory.

        Returns whether nothing is left only in memory. Without a spool this is ``flush``.
        """
        if self.spool is None:
            return self.flush(timeout)
        deadline = time.monotonic() + timeout
        reserve = min(1.0, timeout / 4)
        if self.flush(max(0.0, timeout - reserve)):
            return True
        with self._route_lock:
            self._spill_now.set()
            self._spool_handoff()  # a batch waiting for a writer stuck in the sink
        try:
            return self._wait_for_memory(deadline)
        finally:
            if not self._stop.is_set():
                self._spill_now.clear()

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Drain within ``timeout``, stop the threads, close the spool and the sink.

        Returns whether nothing was left only in memory. A record submitted later starts again.
        """
        deadline = time.monotonic() + timeout
        drained = self.drain(timeout)
        self._stop.set()
        self._spill_now.set()
        with self._lock:
            self._changed.notify_all()
            self._intake_wakeup.notify_all()
        for thread in (self._intake, self._writer, self._retention_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, min(deadline - time.monotonic(), 1.0)))
        if self.spool is not None:
            try:
                self.spool.close()
            except OSError:
                logger.exception("upstream_ops: closing the spool failed")
        try:
            close_sink(self.sink)
        except Exception:
            logger.exception("upstream_ops: closing the sink failed")
        return drained

    def running(self) -> bool:
        """Whether its threads are running (they start on the first record)."""
        return self._intake is not None or self._writer is not None

    def _after_fork(self) -> None:
        """In a forked child: a fresh queue and threads, and a spool directory of its own."""
        if self.spool is not None:
            self.spool.after_fork()
        self._reset()
        if self.spool is not None:
            self._start()

    def stats(self) -> DispatcherStats:
        """Counters: see ``DispatcherStats``."""
        spool = self.spool
        with self._lock:
            return DispatcherStats(
                enqueued=self._enqueued,
                written=self._written,
                dropped=self._dropped,
                failed=self._failed,
                queued=self._enqueued - self._handled,
                spooled=self._spooled,
                replayed=self._replayed,
                evicted=0 if spool is None else spool.evicted,
                in_spool=0 if spool is None else spool.pending,
            )

    def _wait_for_memory(self, deadline: float) -> bool:
        with self._lock:
            target = self._enqueued
            if self._handled >= target:
                return True
            # The intake thread hands over a partial batch at once instead of waiting for more.
            self._hurry_until = max(self._hurry_until, target)
            self._intake_wakeup.notify_all()
        return self._wait(lambda: self._handled >= target, deadline)

    def _wait_for_spool(self, deadline: float) -> bool:
        spool = self.spool
        if spool is None:
            return True
        if not self._spool_ready.wait(max(0.0, deadline - time.monotonic())):
            return False
        return self._wait(
            lambda: spool.pending == 0 or self._circuit.is_open or self._spill_now.is_set(),
            deadline,
        )

    def _wait(self, done: Callable[[], bool], deadline: float) -> bool:
        with self._lock:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, _POLL_S))
        return True

    # -- threads ----------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._intake is not None:
                return
            self._stop.clear()
            self._spill_now.clear()
            self._intake = threading.Thread(
                target=self._run_intake, name="upstream-ops-dispatcher", daemon=True
            )
            self._writer = threading.Thread(
                target=self._run_writer, name="upstream-ops-writer", daemon=True
            )
            if self.spool is not None:
                self._spool_ready.clear()
            if self.retention is not None:
                self._retention_thread = threading.Thread(
                    target=self._run_retention, name="upstream-ops-retention", daemon=True
                )
        self._writer.start()
        self._intake.start()
        if self._retention_thread is not None:
            self._retention_thread.start()

    def _run_retention(self) -> None:
        assert self.retention is not None
        try:
            purge_periodically(
                self.sink.purge,  # type: ignore[attr-defined]
                self.retention,
                self.retention_interval,
                self._stop,
            )
        finally:
            with self._lock:
                self._retention_thread = None


def flush(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    """Flush every live dispatcher (see ``Dispatcher.flush``) within one shared ``timeout``."""
    deadline = time.monotonic() + timeout
    ok = True
    for dispatcher in lifecycle.live():
        assert isinstance(dispatcher, Dispatcher)
        ok = dispatcher.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok
