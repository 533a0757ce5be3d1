"""The sink contract: a sink only writes (like an OpenTelemetry exporter); the dispatcher decides when."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from upstream_ops.record import RequestRecord


@runtime_checkable
class Sink(Protocol):
    """Where records go. ``write`` is called on the dispatcher's worker thread, one batch at a time.

    A write that raises is retried by the dispatcher (and replayed from its spool, if it has one),
    so a sink must tolerate seeing a record twice (the built-in databases ignore a record id they
    already hold). ``TypeError`` or ``ValueError`` says "none of these can ever be stored": the
    dispatcher counts the batch as failed instead of retrying or spooling it; any other exception
    means "try again later". ``close()`` is optional.
    """

    def write(self, records: Sequence[RequestRecord], /) -> None: ...


def close_sink(sink: Sink) -> None:
    """Call the sink's optional ``close()``."""
    close = getattr(sink, "close", None)
    if callable(close):
        close()


def record_json(record: RequestRecord) -> str:
    """The record for a log line: JSON when possible (ASCII, so any handler can write it)."""
    try:
        return json.dumps(record.to_dict(), separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        return repr(record)


class RejectedRecords:
    """Logs each record a store could not keep at ERROR with its full JSON, so its data is not lost.

    A record is logged once however often the dispatcher retries its batch (the last
    ``remember`` ids are remembered).
    """

    def __init__(self, store: str, log: logging.Logger, remember: int = 1024) -> None:
        self.store = store
        self.log = log
        self.remember = remember
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def report(self, record: RequestRecord, error: BaseException) -> None:
        key = str(record.id)
        with self._lock:
            if key in self._seen:
                return
            self._seen[key] = None
            if len(self._seen) > self.remember:
                self._seen.popitem(last=False)
        self.log.error(
            "upstream_ops: %s could not store record %s (%s: %s); the record: %s",
            self.store,
            key,
            type(error).__name__,
            error,
            record_json(record),
        )
