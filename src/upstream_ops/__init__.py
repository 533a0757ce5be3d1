"""upstream-ops: make failed upstream calls visible.

A request-scoped collector gathers one event per failed upstream attempt; when the response is finished
the middleware builds one ``RequestRecord`` and a background dispatcher writes it to a sink.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from upstream_ops._capture import suppress_capture
from upstream_ops._version import __version__
from upstream_ops.collector import (
    Collector,
    append_upstream_error,
    current_collector,
    get_upstream_errors,
    set_upstream_error,
    wrap_context,
)
from upstream_ops.dispatcher import Dispatcher, DispatcherStats, flush
from upstream_ops.events import (
    CIRCUIT_OPEN,
    FAILOVER,
    HTTP_ERROR,
    REQUEST_ERROR,
    RETRY,
    RETRY_EXHAUSTED,
    STREAM_ERROR,
    UpstreamErrorEvent,
    marshal_upstream_errors,
)
from upstream_ops.labels import UpstreamLabels, upstream
from upstream_ops.record import RequestRecord
from upstream_ops.retries import record_failover, record_retry, record_retry_exhausted
from upstream_ops.sanitize import (
    Sanitizer,
    sanitize_detail,
    sanitize_headers,
    sanitize_label,
    sanitize_message,
    sanitize_url,
)
from upstream_ops.store import QueryFilter, Store
from upstream_ops.wsgi import UpstreamOpsWSGIMiddleware

if TYPE_CHECKING:
    from upstream_ops.asgi import UpstreamOpsMiddleware
    from upstream_ops.ops_app import create_ops_app

__all__ = [
    "CIRCUIT_OPEN",
    "FAILOVER",
    "HTTP_ERROR",
    "REQUEST_ERROR",
    "RETRY",
    "RETRY_EXHAUSTED",
    "STREAM_ERROR",
    "Collector",
    "Dispatcher",
    "DispatcherStats",
    "QueryFilter",
    "RequestRecord",
    "Sanitizer",
    "Store",
    "UpstreamErrorEvent",
    "UpstreamLabels",
    "UpstreamOpsMiddleware",
    "UpstreamOpsWSGIMiddleware",
    "__version__",
    "append_upstream_error",
    "create_ops_app",
    "current_collector",
    "flush",
    "get_upstream_errors",
    "marshal_upstream_errors",
    "record_failover",
    "record_retry",
    "record_retry_exhausted",
    "sanitize_detail",
    "sanitize_headers",
    "sanitize_label",
    "sanitize_message",
    "sanitize_url",
    "set_upstream_error",
    "suppress_capture",
    "upstream",
    "wrap_context",
]


def __getattr__(name: str) -> Any:
    # The ASGI middleware imports Starlette and anyio; load it only when asked for.
    if name == "UpstreamOpsMiddleware":
        from upstream_ops.asgi import UpstreamOpsMiddleware

        return UpstreamOpsMiddleware
    if name == "create_ops_app":  # the ops app is Starlette too
        from upstream_ops.ops_app import create_ops_app

        return create_ops_app
    raise AttributeError(f"module 'upstream_ops' has no attribute {name!r}")
