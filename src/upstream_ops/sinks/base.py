"""The sink contract: a sink only writes (like an OpenTelemetry exporter); the dispatcher decides when."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from upstream_ops.record import RequestRecord


@runtime_checkable
class Sink(Protocol):
    """Where records go. ``write`` is called on the dispatcher's worker thread, one batch at a time.

    A write that raises is retried by the dispatcher, so a sink must tolerate seeing a record twice
    (the built-in databases ignore a record id they already hold). ``close()`` is optional.
    """

    def write(self, records: Sequence[RequestRecord], /) -> None: ...


def close_sink(sink: Sink) -> None:
    """Call the sink's optional ``close()``."""
    close = getattr(sink, "close", None)
    if callable(close):
        close()
