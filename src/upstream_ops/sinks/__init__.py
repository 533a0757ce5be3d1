"""The built-in sinks, and ``sink_from_url`` to pick one by URL.

``MemorySink`` (tests), ``LoggingSink`` (a JSON line per record to ``logging``), ``JsonlSink`` (a
rotating file) and ``SQLiteSink`` (a file that also answers ``Store`` queries). PostgreSQL lives in
``upstream_ops.sinks.postgres`` and is imported only when asked for, so psycopg stays optional.
"""

from upstream_ops.sinks.base import Sink
from upstream_ops.sinks.jsonl import JsonlSink
from upstream_ops.sinks.log import LoggingSink
from upstream_ops.sinks.memory import MemorySink
from upstream_ops.sinks.sqlite import SQLiteSink
from upstream_ops.sinks.url import sink_from_url

__all__ = ["JsonlSink", "LoggingSink", "MemorySink", "SQLiteSink", "Sink", "sink_from_url"]
