"""The built-in sinks, and ``sink_from_url`` to pick one by URL.

``MemorySink`` (tests), ``LoggingSink`` (a JSON line per record to ``logging``), ``JsonlSink`` (a
rotating file) and ``SQLiteSink`` (a file that also answers ``Store`` queries). ``PostgresSink``
lives in ``upstream_ops.sinks.postgres`` and is imported only when asked for, so psycopg stays
optional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from upstream_ops.sinks.base import Sink
from upstream_ops.sinks.jsonl import JsonlSink
from upstream_ops.sinks.log import LoggingSink
from upstream_ops.sinks.memory import MemorySink
from upstream_ops.sinks.sqlite import SQLiteSink
from upstream_ops.sinks.url import sink_from_url

if TYPE_CHECKING:
    from upstream_ops.sinks.postgres import PostgresSink

__all__ = [
    "JsonlSink",
    "LoggingSink",
    "MemorySink",
    "PostgresSink",
    "SQLiteSink",
    "Sink",
    "sink_from_url",
]


def __getattr__(name: str) -> Any:
    # PostgresSink imports psycopg (the [postgres] extra); load it only when asked for.
    if name == "PostgresSink":
        from upstream_ops.sinks.postgres import PostgresSink

        return PostgresSink
    raise AttributeError(f"module 'upstream_ops.sinks' has no attribute {name!r}")
