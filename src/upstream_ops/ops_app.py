"""The ops HTTP API and dashboard: a Starlette app over any ``Store``.

Mount it in your app (``app.mount("/ops", create_ops_app(store, token=...))``) or run it alone
(``upstream-ops serve``). Every ``/api/`` endpoint but the OpenAPI description needs the bearer
token; the dashboard page and its script hold no data and load without it, then ask for the token.
"""

from __future__ import annotations

import hmac
import html
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final
from urllib.parse import quote, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from upstream_ops._ops_openapi import openapi_document
from upstream_ops._ops_output import event_json, stats_json, window_json
from upstream_ops._ops_params import (
    EVENTS,
    RECORDS,
    ParamError,
    encode_cursor,
    parse_page_query,
    parse_stats_query,
)
from upstream_ops.record import RequestRecord
from upstream_ops.store import Store

__all__ = ["create_ops_app"]

logger = logging.getLogger("upstream_ops")

_DASHBOARD_FILES: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: The page runs only its own script and style and talks only to this origin.
_DASHBOARD_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_API_HEADERS: Final = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

Handler = Callable[[Request], Awaitable[Response]]


def create_ops_app(
    store: Store,
    *,
    token: str | None = None,
    allow_anonymous: bool = False,
    jaeger_url: str | None = None,
) -> Starlette:
    """The ops API (``/api/...``) and dashboard (``/``) over ``store``.

    ``token`` is the bearer token every data endpoint requires, compared in constant time. Without
    one the app is not built unless ``allow_anonymous=True`` (only for a server on 127.0.0.1 that
    nobody else reaches). ``jaeger_url`` (``http://jaeger:16686``) turns trace ids into links.
    """
    if not isinstance(store, Store):
        raise TypeError(
            f"store must be a queryable store such as SQLiteSink, got {type(store).__name__}"
        )
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError("token must be a non-empty string")
    if token is None and not allow_anonymous:
        raise ValueError(
            "create_ops_app needs a token (the API serves upstream error data); pass "
            "allow_anonymous=True only for a server on 127.0.0.1 that nobody else reaches"
        )
    trace_base = _check_jaeger_url(jaeger_url)
    api = _OpsApi(store, token.encode() if token is not None else None, trace_base)
    dashboard = _Dashboard()
    routes = [
        Route("/", dashboard.page, methods=["GET"]),
        Route("/static/{name}", dashboard.static, methods=["GET"]),
        Route("/api/openapi.json", api.openapi, methods=["GET"]),
        Route("/api/records", api.guard(api.records), methods=["GET"]),
        Route("/api/records/{request_id:path}", api.guard(api.record), methods=["GET"]),
        Route("/api/events", api.guard(api.events), methods=["GET"]),
        Route("/api/stats", api.guard(api.stats), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def _check_jaeger_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url.strip()) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"jaeger_url must be an http(s) URL like http://jaeger:16686, got {url!r:.80}"
        )
    return url.strip().rstrip("/")


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=_API_HEADERS)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": exc.detail},
        status_code=exc.status_code,
        headers={**(exc.headers or {}), **_API_HEADERS},
    )


class _OpsApi:
    """The ``/api/`` handlers: parse, ask the store in a worker thread, answer JSON."""

    def __init__(self, store: Store, token: bytes | None, trace_base: str | None) -> None:
        self.store = store
        self.token = token
        self.trace_base = trace_base

    def guard(self, handler: Handler) -> Handler:
        """``handler`` behind the bearer token, with bad input as 400 and store failures as 503."""

        async def guarded(request: Request) -> Response:
            if not self._authorized(request):
                response = _error(401, "a valid bearer token is required")
                response.headers["WWW-Authenticate"] = 'Bearer realm="upstream-ops"'
                return response
            try:
                return await handler(request)
            except ParamError as exc:
                return _error(400, exc.message, exc.field)
            except Exception as exc:
                logger.exception("upstream_ops: the ops API could not query the store")
                return _error(503, f"the store failed: {type(exc).__name__}: {exc}"[:500])

        return guarded

    def _authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self.token)

    async def openapi(self, request: Request) -> Response:
        server = str(request.url.replace(path=_mount_path(request), query=""))
        return JSONResponse(openapi_document(server), headers=_API_HEADERS)

    async def records(self, request: Request) -> Response:
        query = parse_page_query(request.query_params.multi_items(), RECORDS, _now_ms())
        page = await run_in_threadpool(
            self.store.search_records, query.filters, limit=query.limit, after=query.after
        )
        return JSONResponse(
            {
                "records": [_record_summary(r) for r in page.records],
                "next_cursor": encode_cursor(page.next_key) if page.next_key else None,
                "window": window_json(query.filters.start_ms, query.filters.end_ms),
            },
            headers=_API_HEADERS,
        )

    async def record(self, request: Request) -> Response:
        if request.query_params:
            name = next(iter(request.query_params))
            raise ParamError(name, f"unknown parameter {name!r:.40}; this endpoint takes none")
        request_id = request.path_params["request_id"]
        record = await run_in_threadpool(self.store.get_record, request_id)
        if record is None:
            return _error(404, f"no record with request_id {request_id!r:.140}", "request_id")
        trace_url = None
        if self.trace_base and record.trace_id:
            trace_url = f"{self.trace_base}/trace/{quote(record.trace_id, safe='')}"
        return JSONResponse(
            {"record": record.to_dict(), "trace_url": trace_url}, headers=_API_HEADERS
        )

    async def events(self, request: Request) -> Response:
        query = parse_page_query(request.query_params.multi_items(), EVENTS, _now_ms())
        page = await run_in_threadpool(
            self.store.search_events, query.filters, limit=query.limit, after=query.after
        )
        return JSONResponse(
            {
                "events": [event_json(e) for e in page.events],
                "next_cursor": encode_cursor(page.next_key) if page.next_key else None,
                "window": window_json(query.filters.start_ms, query.filters.end_ms),
            },
            headers=_API_HEADERS,
        )

    async def stats(self, request: Request) -> Response:
        query = parse_stats_query(request.query_params.multi_items(), _now_ms())
        stats = await run_in_threadpool(
            self.store.stats,
            query.filters,
            bucket_ms=query.bucket_ms,
            group_by=query.group_by,
            top_messages=query.top,
        )
        return JSONResponse(stats_json(stats), headers=_API_HEADERS)


def _mount_path(request: Request) -> str:
    """Where this app is mounted, ending in ``/`` (``/ops/`` under ``Mount("/ops", ...)``)."""
    return str(request.scope.get("root_path", "")).rstrip("/") + "/"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _record_summary(record: RequestRecord) -> dict[str, Any]:
    """A record for lists: every key of ``to_dict`` but the long ``detail`` texts, which
    ``/api/records/{request_id}`` returns."""
    out = record.to_dict()
    del out["upstream_error_detail"]
    for event in out["upstream_errors"]:
        event.pop("detail", None)
    return out


class _Dashboard:
    """The page and its two static files, read from the package once, when the app is built."""

    def __init__(self) -> None:
        folder = resources.files("upstream_ops").joinpath("dashboard")
        self.template = folder.joinpath("index.html").read_text(encoding="utf-8")
        self.files = {name: folder.joinpath(name).read_bytes() for name in _DASHBOARD_FILES}

    async def page(self, request: Request) -> Response:
        base = html.escape(_mount_path(request), quote=True)
        body = self.template.replace("{{base}}", base)
        return Response(body, media_type="text/html; charset=utf-8", headers=_DASHBOARD_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.files:
            raise HTTPException(404, f"no static file {name!r:.60}")
        return Response(
            self.files[name],
            media_type=_DASHBOARD_FILES[name],
            headers={**_DASHBOARD_HEADERS, "Cache-Control": "no-cache"},
        )
