"""The dispatcher: gets records off the request path and into a sink.

Like the OpenTelemetry SDK's batch processor, it owns the decisions (queue, batches, retries, drain)
while the sink only writes. ``submit`` is a ``put_nowait`` on a bounded queue: it never blocks, never
does I/O and never raises, so a slow or broken sink cannot hurt the request that produced the record.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import random
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.metrics import MeterProvider

from upstream_ops.defaults import (
    BATCH_INTERVAL_S,
    BATCH_SIZE,
    DROP_WARNING_INTERVAL_S,
    FLUSH_TIMEOUT_S,
    QUEUE_SIZE,
    RETRY_BACKOFF_MAX_S,
    RETRY_BACKOFF_S,
    WRITE_ATTEMPTS,
)
from upstream_ops.record import RequestRecord
from upstream_ops.sinks.base import Sink, close_sink
from upstream_ops.telemetry._metrics import DROPPED, FAILED, WRITTEN, DispatcherMetrics

__all__ = ["Dispatcher", "DispatcherStats", "flush"]

logger = logging.getLogger("upstream_ops")

# Put on the queue by flush() so the worker writes its partial batch at once.
_WAKE = object()


@dataclass(frozen=True, slots=True)
class DispatcherStats:
    """Counters since the dispatcher started (or since the process forked)."""

    enqueued: int
    written: int
    dropped: int
    failed: int
    queued: int


class Dispatcher:
    """One background thread, one bounded queue, batches to one sink.

    A batch is written when it has ``batch_size`` records or its first record has waited
    ``batch_interval`` seconds. A failing write is tried ``write_attempts`` times in all with
    exponential backoff and jitter, then its records are counted as failed and logged. A full queue
    drops the new record, counts it and warns at most once a minute. The thread starts on the first
    record, and again in a forked child. Outcomes and the queue length are also OpenTelemetry
    metrics, on ``meter_provider`` (default: the global one).
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
        self.sink = sink
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.batch_interval = float(batch_interval)
        self.write_attempts = write_attempts
        self._metrics = DispatcherMetrics(meter_provider)
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """Fresh state: at construction and in a forked child (the parent owns what it had queued)."""
        self._queue: queue.Queue[object] = queue.Queue(self.queue_size)
        self._lock = threading.Lock()
        self._done_changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._enqueued = 0
        self._written = 0
        self._dropped = 0
        self._failed = 0
        self._handled = 0  # written + failed: what flush() waits for
        self._last_drop_warning = -DROP_WARNING_INTERVAL_S

    # -- the request path -------------------------------------------------------------------------

    def submit(self, record: RequestRecord) -> bool:
        """Queue ``record`` for writing; ``False`` (and counted) when the queue is full."""
        if self._thread is None:
            self._start()
        self._metrics.queued(1)  # before the worker can take it: the gauge never goes below zero
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._metrics.queued(-1)
            self._record_drop()
            return False
        with self._lock:
            self._enqueued += 1
        return True

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
                "(%d dropped so far). The sink is slower than the traffic.",
                self.queue_size,
                self._dropped,
            )

    # -- control ----------------------------------------------------------------------------------

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every record accepted so far was handed to the sink; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._enqueued
            if self._handled >= target:
                return True
        # A full queue makes full batches: the worker is not waiting anyway.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_WAKE)
        with self._lock:
            while self._handled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done_changed.wait(remaining)
        return True

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Drain within ``timeout``, stop the worker and close the sink. Returns whether it drained."""
        drained = self.flush(timeout)
        self._closed = True
        thread = self._thread
        if thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_WAKE)
            thread.join(max(0.0, min(timeout, 1.0)))
        try:
            close_sink(self.sink)
        except Exception:
            logger.exception("upstream_ops: closing the sink failed")
        return drained

    def stats(self) -> DispatcherStats:
        """Counters: enqueued, written, dropped (queue full), failed (write gave up), queued now."""
        with self._lock:
            return DispatcherStats(
                enqueued=self._enqueued,
                written=self._written,
                dropped=self._dropped,
                failed=self._failed,
                queued=self._enqueued - self._handled,
            )

    # -- the worker -------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._closed = False
            self._thread = threading.Thread(
                target=self._run, name="upstream-ops-dispatcher", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                self._write(batch)
            elif self._closed and self._queue.empty():
                with self._lock:
                    self._thread = None
                return

    def _next_batch(self) -> list[RequestRecord]:
        """Block for the first record, then gather until the batch is full, old, or a flush asks."""
        batch: list[RequestRecord] = []
        item = self._queue.get()
        if item is _WAKE:
            return batch
        assert isinstance(item, RequestRecord)
        batch.append(item)
        deadline = time.monotonic() + self.batch_interval
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _WAKE:
                # flush(): take what is already queued without waiting for more.
                while len(batch) < self.batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, RequestRecord):
                        batch.append(item)
                break
            assert isinstance(item, RequestRecord)
            batch.append(item)
        return batch

    def _write(self, batch: Sequence[RequestRecord]) -> None:
        error: BaseException | None = None
        for attempt in range(self.write_attempts):
            if attempt:
                delay = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.5, 1.5))
            try:
                self.sink.write(batch)
            except Exception as exc:
                error = exc
                continue
            self._settle(WRITTEN, len(batch))
            with self._lock:
                self._written += len(batch)
                self._handled += len(batch)
                self._done_changed.notify_all()
            return
        self._give_up(batch, error)

    def _give_up(self, batch: Sequence[RequestRecord], error: BaseException | None) -> None:
        """The sink refused the batch ``write_attempts`` times: count and log the loss."""
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
            self._done_changed.notify_all()

    def _settle(self, outcome: str, records: int) -> None:
        """``records`` left the queue as ``outcome``: the records metric and the queue gauge.

        Called before ``flush()`` can see them handled, so a flushed dispatcher's metrics are current.
        """
        self._metrics.count(outcome, records)
        self._metrics.queued(-records)


_live: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


def flush(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    """Drain every live dispatcher: ``True`` once all records accepted so far reached their sinks."""
    deadline = time.monotonic() + timeout
    ok = True
    for dispatcher in list(_live):
        ok = dispatcher.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok


def _drain_at_exit() -> None:
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    for dispatcher in list(_live):
        if dispatcher._thread is not None:
            dispatcher.close(max(0.0, deadline - time.monotonic()))


def _after_fork_in_child() -> None:
    for dispatcher in list(_live):
        dispatcher._reset()


atexit.register(_drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
