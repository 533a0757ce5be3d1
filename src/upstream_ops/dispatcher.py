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
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from opentelemetry.metrics import MeterProvider

from upstream_ops import lifecycle
from upstream_ops.circuit import Circuit
from upstream_ops.defaults import (
    BATCH_INTERVAL_S,
    BATCH_SIZE,
    CIRCUIT_PROBE_MAX_S,
    CIRCUIT_PROBE_MIN_S,
    DROP_WARNING_INTERVAL_S,
    FLUSH_TIMEOUT_S,
    QUEUE_SIZE,
    RETENTION_INTERVAL_S,
    RETRY_BACKOFF_MAX_S,
    RETRY_BACKOFF_S,
    SPILL_AT_QUEUE_FRACTION,
    SPOOL_ADOPT_INTERVAL_S,
    SPOOL_MAX_BYTES,
    WRITE_ATTEMPTS,
)
from upstream_ops.record import PackedRecord, RequestRecord, pack_record, unpack_record
from upstream_ops.retention import parse_duration, purge_periodically
from upstream_ops.sinks.base import Sink, close_sink, record_json
from upstream_ops.spool import Spool, SpoolChunk
from upstream_ops.telemetry._metrics import (
    DROPPED,
    EVICTED,
    FAILED,
    SPOOLED,
    WRITTEN,
    DispatcherMetrics,
)

__all__ = ["Dispatcher", "DispatcherStats", "flush"]

logger = logging.getLogger("upstream_ops")

# How long a waiting thread sleeps before it looks again (a backstop for missed wake-ups).
_POLL_S = 0.05
#: Records submitted behind this many full batches are packed while they wait (see pack_record).
_PACK_AT_BATCHES = 2
#: A spooling intake thread takes up to this many already-queued records into one fsync'd append.
_SPOOL_APPEND_MAX = 4096
#: Exceptions that say "this data", not "this sink": retrying or spooling them cannot help.
_DATA_ERRORS = (TypeError, ValueError, OverflowError)
_DATA_ERROR_NAMES = frozenset(("DataError", "IntegrityError"))


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


class Dispatcher:
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

    def _reset(self) -> None:
        """Fresh state: at construction and in a forked child (the parent owns what it had queued)."""
        # Bounded by submit (queue_size); records that will wait long are packed (see submit).
        self._queue: deque[RequestRecord | PackedRecord] = deque()
        self._lock = threading.Lock()  # queue, counters and hand-over; never held during I/O
        self._changed = threading.Condition(self._lock)
        # The intake thread waits here, and says why, so submit wakes it only when it must.
        self._intake_wakeup = threading.Condition(self._lock)
        self._intake_idle = False  # it waits for a first record
        self._intake_gathering = False  # it waits for its batch to fill or grow old
        # flush() wants every record up to this count (of records ever enqueued) handed over now.
        self._hurry_until = 0
        # Serializes "spool or hand over" against "the spool is empty, stop spooling", so records
        # leave in the order they came. Held while appending to the spool; submit never takes it.
        self._route_lock = threading.Lock()
        self._intake: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._retention_thread: threading.Thread | None = None
        self._stop = threading.Event()  # closing: end the threads once drained
        self._spill_now = threading.Event()  # a deadline is near: spool instead of writing
        self._spool_ready = threading.Event()
        self._handoff: list[RequestRecord] | None = None
        # Batches go to the spool: it holds older records, or the sink fails or is too slow.
        self._spilling = False
        self._waiting_intake = False  # the intake thread waits for the writer to take a batch
        self._circuit = Circuit(self.batch_size)
        self._enqueued = 0
        self._written = 0
        self._dropped = 0
        self._failed = 0
        self._spooled = 0
        self._replayed = 0
        self._handled = 0  # written from memory + spooled + failed: what flush() waits for
        self._last_drop_warning = -DROP_WARNING_INTERVAL_S

    # -- the request path -------------------------------------------------------------------------

    def submit(self, record: RequestRecord) -> bool:
        """Queue ``record`` for writing; ``False`` (and counted) when the queue is full."""
        if self._intake is None:
            self._start()
        self._metrics.queued(1)  # before the worker can take it: the gauge never goes below zero
        item: RequestRecord | PackedRecord = record
        if self._pack_at <= len(self._queue) < self.queue_size:
            # It will wait behind a slow sink long enough to reach the collector's oldest
            # generation; packed, it does not lengthen every full collection (see pack_record).
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

    # -- intake: queue -> batches -> writer or spool ----------------------------------------------

    def _run_intake(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._route(batch)
                del batch  # hold nothing while waiting for the next record
        finally:
            with self._lock:
                self._intake = None
                self._changed.notify_all()

    def _next_batch(self) -> list[RequestRecord] | None:
        """Wait for a first record, then until the batch is full, old, or a flush asks.

        ``None`` when closing with nothing queued. Submitters wake this thread only for a first
        record or a full batch; the ``batch_interval`` timer ends every other wait.
        """
        records = self._queue
        with self._lock:
            while not records:
                if self._stop.is_set():
                    return None
                self._intake_idle = True
                self._intake_wakeup.wait()
                self._intake_idle = False
            deadline = time.monotonic() + self.batch_interval
            while len(records) < self.batch_size and not self._hurried():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._intake_gathering = True
                self._intake_wakeup.wait(remaining)
                self._intake_gathering = False
            taken = self._take_queued(self.batch_size)
        return _unpacked(taken)  # outside the lock: submitters never wait for it

    def _hurried(self) -> bool:
        """A flush waits for a record still queued, or the dispatcher closes (caller holds the lock)."""
        taken = self._enqueued - len(self._queue)
        return taken < self._hurry_until or self._stop.is_set()

    def _take_queued(self, limit: int) -> list[RequestRecord | PackedRecord]:
        """Up to ``limit`` queued items, oldest first (the caller holds ``_lock``)."""
        records = self._queue
        if len(records) <= limit:
            batch = list(records)
            records.clear()
            return batch
        return [records.popleft() for _ in range(limit)]

    def _route(self, batch: list[RequestRecord]) -> None:
        """Hand ``batch`` to the writer; with a spool, spool it when the sink is not keeping up."""
        if self.spool is None:
            with self._lock:
                while self._handoff is not None:
                    self._changed.wait(_POLL_S)
                self._handoff = batch
                self._changed.notify_all()
            return
        while True:
            with self._route_lock:
                if self._spilling or self._spill_now.is_set():
                    with self._lock:
                        taken = self._take_queued(_SPOOL_APPEND_MAX - len(batch))
                    batch += _unpacked(taken)
                    self._spool_batch(batch)
                    return
                with self._lock:
                    if self._handoff is None:
                        self._handoff = batch
                        self._changed.notify_all()
                        return
                    if len(self._queue) >= self._spill_at:
                        self._spilling = True  # the sink is slower than the traffic
                        continue
            with self._lock:
                if self._handoff is not None:
                    self._waiting_intake = True
                    self._changed.wait(_POLL_S)
                    self._waiting_intake = False

    def _spool_handoff(self) -> None:
        """Take back the batch waiting for the writer and spool it (caller holds ``_route_lock``)."""
        with self._lock:
            batch, self._handoff = self._handoff, None
            self._changed.notify_all()
        if batch:
            self._spool_batch(batch)

    def _spool_batch(self, batch: Sequence[RequestRecord]) -> None:
        """Append to the spool (the caller holds ``_route_lock``) and count what happened."""
        spool = self.spool
        assert spool is not None
        evicted = spool.evicted
        try:
            rejected = len(spool.append(batch))
        except OSError as exc:
            logger.error(
                "upstream_ops: could not spool %d records to %s: %r; they are lost",
                len(batch),
                spool.root,
                exc,
            )
            rejected = len(batch)
        self._settle(SPOOLED, len(batch) - rejected)
        self._settle(FAILED, rejected)
        self._metrics.count(EVICTED, spool.evicted - evicted)
        with self._lock:
            self._spooled += len(batch) - rejected
            self._failed += rejected
            self._handled += len(batch)
            self._changed.notify_all()

    # -- writer: batches and spool -> sink --------------------------------------------------------

    def _run_writer(self) -> None:
        next_adoption = time.monotonic() + SPOOL_ADOPT_INTERVAL_S
        if self.spool is not None:
            self._open_spool()
        try:
            while True:
                work = self._next_work()
                if work is _DONE:
                    return
                if isinstance(work, list):
                    self._write_batch(work)
                else:
                    self._replay()
                del work  # hold nothing while waiting for the next batch
                if self.spool is not None and time.monotonic() >= next_adoption:
                    next_adoption = time.monotonic() + SPOOL_ADOPT_INTERVAL_S
                    self._adopt_orphans()
        finally:
            with self._lock:
                self._writer = None
                self._changed.notify_all()

    def _open_spool(self) -> None:
        assert self.spool is not None
        try:
            self.spool.open()
        except OSError:
            logger.exception("upstream_ops: could not open the spool in %s", self.spool.root)
        finally:
            self._spool_ready.set()
        if self.spool.pending:
            with self._route_lock:
                self._spilling = True  # adopted records go first

    def _adopt_orphans(self) -> None:
        assert self.spool is not None
        try:
            with self._route_lock:
                if self.spool.adopt_orphans():
                    self._spilling = True
        except OSError:
            logger.exception("upstream_ops: could not look for orphaned spools")

    def _next_work(self) -> object:
        """A handed-over batch, ``_REPLAY`` when the spool is due, or ``_DONE`` when closed."""
        spool = self.spool
        with self._lock:
            while True:
                if self._handoff is not None:
                    batch, self._handoff = self._handoff, None
                    self._changed.notify_all()
                    return batch
                now = time.monotonic()
                if (
                    spool is not None
                    and spool.pending
                    and not self._spill_now.is_set()
                    and self._circuit.due(now)
                ):
                    return _REPLAY
                if self._stop.is_set() and self._intake is None:
                    return _DONE
                wait = _POLL_S * 4
                if spool is not None and spool.pending and not self._spill_now.is_set():
                    wait = min(wait, max(0.0, self._circuit.probe_at - now))
                self._changed.wait(wait)

    def _write_batch(self, batch: list[RequestRecord]) -> None:
        if self.spool is not None and (self._circuit.is_open or self._spill_now.is_set()):
            with self._route_lock:
                self._spool_batch(batch)
            return
        error: BaseException | None = None
        for attempt in range(self.write_attempts):
            if attempt:
                delay = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** (attempt - 1))
                if self._spill_now.wait(delay * random.uniform(0.5, 1.5)) and self.spool:
                    break  # shutting down: the spool is faster than waiting out the backoff
            try:
                self.sink.write(batch)
            except Exception as exc:
                error = exc
                continue
            self._settle(WRITTEN, len(batch))
            with self._lock:
                self._written += len(batch)
                self._handled += len(batch)
                self._changed.notify_all()
            return
        self._give_up(batch, error)

    def _give_up(self, batch: Sequence[RequestRecord], error: BaseException | None) -> None:
        """The sink refused the batch ``write_attempts`` times: spool it, or count and log the loss."""
        if self.spool is not None and not _is_data_error(error):
            with self._route_lock:
                self._spool_batch(batch)
                self._spool_handoff()  # the next batch, before anything newer
                self._spilling = True
            self._circuit_failed(error)
            return
        logger.error(
            "upstream_ops: %s failed to write %d records after %d attempts: %r",
            type(self.sink).__name__,
            len(batch),
            self.write_attempts,
            error,
        )
        self._settle(FAILED, len(batch))
        with self._lock:
            self._failed += len(batch)
            self._handled += len(batch)
            self._changed.notify_all()

    def _replay(self) -> None:
        """Write the oldest spooled records; on failure back off (the circuit) and shrink the probe."""
        spool = self.spool
        assert spool is not None
        try:
            chunk = spool.read(self._circuit.probe_size)
        except OSError:
            logger.exception("upstream_ops: could not read the spool")
            self._circuit_failed(None)
            return
        if chunk is None:
            with self._route_lock:
                if spool.pending == 0:
                    self._spilling = False  # caught up: hand batches to the writer again
            return
        records = chunk.records
        try:
            if records:
                self.sink.write(records)
        except Exception as exc:
            if len(records) > 1:
                # The sink is down, or a record in here is bad: try fewer at a time. After a
                # data error at once; otherwise after a probe delay that grows only once the
                # probes are single records.
                if _is_data_error(exc):
                    with self._lock:
                        self._circuit.probe_size = max(1, len(records) // 2)
                else:
                    self._circuit_failed(exc, shrink=True, back_off=False)
                return
            if _is_data_error(exc):
                self._dead_letter(records, exc)
                self._committed(chunk, 0)
            elif not self._resolved_poison(exc):
                self._circuit_failed(exc)
            return
        self._committed(chunk, len(records))

    def _resolved_poison(self, error: Exception) -> bool:
        """One spooled record failed. If the next one is accepted the sink works: this one is bad."""
        spool = self.spool
        assert spool is not None
        chunk = spool.read(2)
        if chunk is None or len(chunk.records) < 2:
            return False
        suspect, other = chunk.records
        try:
            self.sink.write([other])
        except Exception:
            return False
        written = 1
        try:
            self.sink.write([suspect])
            written = 2
        except Exception as exc:
            self._dead_letter([suspect], exc)
        self._committed(chunk, written)
        return True

    def _committed(self, chunk: SpoolChunk, written: int) -> None:
        spool = self.spool
        assert spool is not None
        self._metrics.count(WRITTEN, written)
        self._metrics.count(FAILED, chunk.unreadable)
        with self._lock:  # counted before the spool shrinks, so a flush sees both
            self._written += written
            self._replayed += written
            self._failed += chunk.unreadable
        with self._route_lock:
            spool.commit(chunk)
            if spool.pending == 0:
                self._spilling = False  # caught up: hand batches to the writer again
        if written:
            self._circuit_succeeded()
        with self._lock:
            self._changed.notify_all()

    def _dead_letter(self, records: Sequence[RequestRecord], error: BaseException) -> None:
        """The sink rejects these records as data: log each in full (so nothing is silently lost)."""
        for record in records:
            logger.error(
                "upstream_ops: %s rejected spooled record %s (%r); giving up on it: %s",
                type(self.sink).__name__,
                record.id,
                error,
                record_json(record),
            )
        self._metrics.count(FAILED, len(records))
        with self._lock:
            self._failed += len(records)

    def _circuit_failed(
        self, error: BaseException | None, *, shrink: bool = False, back_off: bool = True
    ) -> None:
        with self._lock:
            warn = self._circuit.failed(shrink=shrink, back_off=back_off)
            self._changed.notify_all()
        if warn:
            assert self.spool is not None
            logger.warning(
                "upstream_ops: %s is failing (%r); spooling records to %s and retrying it every "
                "%.1f-%.1f s",
                type(self.sink).__name__,
                error,
                self.spool.root,
                CIRCUIT_PROBE_MIN_S,
                CIRCUIT_PROBE_MAX_S,
            )

    def _circuit_succeeded(self) -> None:
        with self._lock:
            was_open = self._circuit.succeeded()
        if was_open:
            logger.warning(
                "upstream_ops: %s accepts writes again; replaying the spool",
                type(self.sink).__name__,
            )

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

    def _settle(self, outcome: str, records: int) -> None:
        """``records`` left the queue as ``outcome``: the records metric and the queue gauge.

        Called before ``flush()`` can see them handled, so a flushed dispatcher's metrics are current.
        """
        if not records:
            return
        self._metrics.count(outcome, records)
        self._metrics.queued(-records)


_REPLAY = object()
_DONE = object()


def _unpacked(items: list[RequestRecord | PackedRecord]) -> list[RequestRecord]:
    """The records queued as ``items``: submit packs the ones that will wait long."""
    return [unpack_record(item) if isinstance(item, tuple) else item for item in items]


def _is_data_error(error: BaseException | None) -> bool:
    if isinstance(error, _DATA_ERRORS):
        return True
    return error is not None and any(c.__name__ in _DATA_ERROR_NAMES for c in type(error).__mro__)


def flush(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    """Flush every live dispatcher (see ``Dispatcher.flush``) within one shared ``timeout``."""
    deadline = time.monotonic() + timeout
    ok = True
    for dispatcher in lifecycle.live():
        assert isinstance(dispatcher, Dispatcher)
        ok = dispatcher.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok
