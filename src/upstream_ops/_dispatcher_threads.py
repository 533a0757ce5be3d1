"""The dispatcher's shared state and its two threads, the side of ``Dispatcher`` callers never see.

``Dispatcher`` (in ``dispatcher.py``) adds the configuration and what callers use: ``submit`` on the
request path, and ``flush``, ``drain``, ``close`` and ``stats``. This base owns what they share with
the threads (the queue, the locks, the hand-over and the counters, made by ``_reset``) and the
threads' work: the *intake* thread turns the queue into batches and hands each to the writer or
spools it; the *writer* thread writes batches to the sink and replays the spool.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence

from upstream_ops.circuit import Circuit
from upstream_ops.defaults import (
    CIRCUIT_PROBE_MAX_S,
    CIRCUIT_PROBE_MIN_S,
    DROP_WARNING_INTERVAL_S,
    RETRY_BACKOFF_MAX_S,
    RETRY_BACKOFF_S,
    SPOOL_ADOPT_INTERVAL_S,
)
from upstream_ops.record import PackedRecord, RequestRecord, unpack_record
from upstream_ops.sinks.base import Sink, record_json
from upstream_ops.spool import Spool, SpoolChunk
from upstream_ops.telemetry._metrics import EVICTED, FAILED, SPOOLED, WRITTEN, DispatcherMetrics

logger = logging.getLogger("upstream_ops")

# How long a waiting thread sleeps before it looks again (a backstop for missed wake-ups).
_POLL_S = 0.05
#: A spooling intake thread takes up to this many already-queued records into one fsync'd append.
_SPOOL_APPEND_MAX = 4096
#: Exceptions that say "this data", not "this sink": retrying or spooling them cannot help.
_DATA_ERRORS = (TypeError, ValueError, OverflowError)
_DATA_ERROR_NAMES = frozenset(("DataError", "IntegrityError"))


class _DispatcherThreads:
    """The state ``Dispatcher`` shares with its threads, and the threads' work.

    ``Dispatcher.__init__`` sets the configuration below, then calls ``_reset``.
    """

    sink: Sink
    spool: Spool | None
    batch_size: int
    batch_interval: float
    write_attempts: int
    _spill_at: int
    _metrics: DispatcherMetrics

    def _reset(self) -> None:
        """Fresh state: at construction and in a forked child (the parent owns what it had queued)."""
        # Bounded by submit (queue_size); records that will wait long are packed (see submit).
        self._queue: deque[RequestRecord | PackedRecord] = deque()
        # Seconds the sink's last successful write took a record (None before one): how long a
        # record queued now will wait, for submit's choice to pack it.
        self._write_s_per_record: float | None = None
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
            started = time.perf_counter()
            try:
                self.sink.write(batch)
            except Exception as exc:
                error = exc
                continue
            self._write_s_per_record = (time.perf_counter() - started) / max(len(batch), 1)
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
