"""The ASGI middleware, driven in-process through httpx's ASGI transport and raw ASGI calls."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

import upstream_ops
from upstream_ops import (
    RequestRecord,
    UpstreamOpsMiddleware,
    append_upstream_error,
    current_collector,
    set_upstream_error,
)
from upstream_ops import asgi as asgi_module
from upstream_ops.sinks import MemorySink

from .speedups import with_and_without

pytestmark = pytest.mark.anyio

# Every test runs with the request's steps in C (upstream_ops._asgi_recording) and in Python.
recording_kind = with_and_without(asgi_module, "_new_c_call")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def records_of(sink: MemorySink) -> list[RequestRecord]:
    assert upstream_ops.flush(timeout=5)
    return list(sink.records)


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def gateway(sink: MemorySink, **options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(UpstreamOpsMiddleware, sink=sink, service="listing-images", **options)

    @app.post("/generate/{n}")
    async def generate(n: int) -> dict[str, bool]:
        append_upstream_error(
            platform="rix",
            upstream_status_code=504,
            kind="http_error",
            message="gateway timeout",
            detail='{"error":{"code":"bade_status_code"}}',
        )
        return {"ok": True}

    @app.get("/fine")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("app bug")

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise HTTPException(503, "try later")

    @app.get("/summary")
    async def summary() -> dict[str, bool]:
        set_upstream_error(429, "rate limited", "")
        return {"ok": True}

    return app


async def test_hidden_504_behind_200_becomes_one_recovered_record() -> None:
    sink = MemorySink()
    async with client_for(gateway(sink)) as client:
        response = await client.post("/generate/3?secret=1", headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 200
    assert "x-request-id" not in response.headers  # the response is the app's own unless asked
    [record] = records_of(sink)
    assert record.request_id == "abc-123"
    assert record.service == "listing-images"
    assert (record.method, record.path, record.route) == ("POST", "/generate/3", "/generate/{n}")
    assert record.status_code == 200
    assert record.recovered is True
    assert record.error is None
    assert record.duration_ms >= 0 and record.started_at_ms > 0
    assert [(e.platform, e.upstream_status_code, e.kind) for e in record.upstream_errors] == [
        ("rix", 504, "http_error")
    ]
    assert re.fullmatch(r"[0-9a-f]{32}", record.id)


async def test_successful_request_without_upstream_errors_is_not_recorded() -> None:
    sink = MemorySink()
    async with client_for(gateway(sink)) as client:
        assert (await client.get("/fine")).status_code == 200
    assert records_of(sink) == []


async def test_summary_alone_is_recorded() -> None:
    sink = MemorySink()
    async with client_for(gateway(sink)) as client:
        await client.get("/summary")
    [record] = records_of(sink)
    assert (record.upstream_status_code, record.upstream_error_message) == (429, "rate limited")
    assert record.recovered is True and record.upstream_errors == []


async def test_app_exception_propagates_unchanged_and_is_recorded_as_500() -> None:
    sink = MemorySink()
    async with client_for(gateway(sink)) as client:
        with pytest.raises(RuntimeError, match="app bug"):
            await client.get("/boom")
    [record] = records_of(sink)
    assert record.status_code == 500
    assert record.error == "RuntimeError"
    assert record.route == "/boom"
    assert record.recovered is False


async def test_handled_5xx_is_recorded() -> None:
    sink = MemorySink()
    async with client_for(gateway(sink)) as client:
        assert (await client.get("/unavailable")).status_code == 503
    [record] = records_of(sink)
    assert record.status_code == 503 and record.error is None


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("bad id", False),
        ("x<script>", False),
        ("", False),
    ],
)
async def test_request_id_is_trusted_only_when_well_formed(incoming: str, kept: bool) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, echo_request_id=True)) as client:
        response = await client.post("/generate/1", headers={"X-Request-ID": incoming})
    echoed = response.headers["x-request-id"]
    if kept:
        assert echoed == incoming
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", echoed)
    assert records_of(sink)[0].request_id == echoed


async def test_request_id_header_can_be_renamed_echoed_or_turned_off() -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, request_id_header="X-Trace")) as client:
        response = await client.post("/generate/1", headers={"X-Trace": "t-1"})
    assert "x-trace" not in response.headers and "x-request-id" not in response.headers
    assert records_of(sink)[0].request_id == "t-1"
    sink2 = MemorySink()
    async with client_for(gateway(sink2, request_id_header="X-Trace", echo_request_id=True)) as c:
        response = await c.post("/generate/1", headers={"X-Trace": "t-2"})
    assert response.headers["x-trace"] == "t-2" and "x-request-id" not in response.headers
    assert records_of(sink2)[0].request_id == "t-2"
    sink3 = MemorySink()
    async with client_for(gateway(sink3, request_id_header=None)) as client:
        response = await client.post("/generate/1", headers={"X-Request-ID": "given"})
    assert "x-request-id" not in response.headers
    made = records_of(sink3)[0].request_id  # no header is trusted: a UUIDv7 made here
    assert re.fullmatch(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}", made)


async def test_an_echoed_request_id_does_not_replace_the_apps_own() -> None:
    app = FastAPI()
    app.add_middleware(UpstreamOpsMiddleware, sink=MemorySink(), echo_request_id=True)

    @app.get("/own")
    async def own() -> Response:
        return Response("ok", headers={"X-Request-ID": "the-apps"})

    async with client_for(app) as client:
        own_id = await client.get("/own", headers={"X-Request-ID": "incoming"})
        fresh = await client.get("/missing")
    assert own_id.headers.get_list("x-request-id") == ["the-apps"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])


async def test_should_record_and_before_flush() -> None:
    sink = MemorySink()

    def enrich(record: RequestRecord) -> RequestRecord | None:
        if record.path == "/summary":
            return None
        record.service = "enriched"
        return record

    app = gateway(sink, should_record=lambda r: True, before_flush=enrich)
    async with client_for(app) as client:
        await client.get("/fine")
        await client.get("/summary")
    [record] = records_of(sink)
    assert (record.path, record.service, record.status_code) == ("/fine", "enriched", 200)


async def test_failing_hooks_never_reach_the_app() -> None:
    sink = MemorySink()

    def broken(record: RequestRecord) -> bool:
        raise ValueError("hook bug")

    async with client_for(gateway(sink, should_record=broken)) as client:
        assert (await client.post("/generate/1")).status_code == 200
    assert records_of(sink) == []


async def test_state_background_tasks_and_threadpool_endpoints() -> None:
    sink = MemorySink()
    app = FastAPI()
    app.add_middleware(UpstreamOpsMiddleware, sink=sink)

    def later(n: int) -> None:
        append_upstream_error(upstream_status_code=502, kind="http_error", message=f"bg {n}")

    @app.get("/bg")
    async def bg(request: Request, tasks: BackgroundTasks) -> dict[str, bool]:
        same = request.state.upstream_ops is current_collector()
        tasks.add_task(later, 1)
        return {"same": same}

    @app.get("/sync")
    def sync_endpoint() -> dict[str, bool]:  # runs in the threadpool
        append_upstream_error(upstream_status_code=500, kind="http_error", message="sync")
        return {"ok": True}

    async with client_for(app) as client:
        assert (await client.get("/bg")).json() == {"same": True}
        await client.get("/sync")
    records = {r.path: r for r in records_of(sink)}
    assert [e.message for e in records["/bg"].upstream_errors] == ["bg 1"]
    assert [e.message for e in records["/sync"].upstream_errors] == ["sync"]


async def test_behind_and_in_front_of_base_http_middleware() -> None:
    class Tagging(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            append_upstream_error(upstream_status_code=429, message="from middleware")
            response = await call_next(request)
            response.headers["x-tag"] = "1"
            return response

    async def endpoint(request: Request) -> JSONResponse:
        append_upstream_error(upstream_status_code=503, message="from endpoint")
        return JSONResponse({"ok": True})

    sink = MemorySink()
    app = Starlette(
        routes=[Route("/x", endpoint)],
        middleware=[
            Middleware(Tagging),
            Middleware(UpstreamOpsMiddleware, sink=sink),
            Middleware(Tagging),
        ],
    )
    async with client_for(app) as client:
        response = await client.get("/x")
    assert response.headers["x-tag"] == "1"
    [record] = records_of(sink)
    assert [e.message for e in record.upstream_errors] == ["from middleware", "from endpoint"]
    assert record.route == "/x"


async def test_streaming_response_records_events_appended_while_streaming() -> None:
    sink = MemorySink()
    app = FastAPI()
    app.add_middleware(UpstreamOpsMiddleware, sink=sink)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"part1\n"
            append_upstream_error(upstream_status_code=0, kind="stream_error", message="broke")
            yield b"part2\n"

        return StreamingResponse(body())

    async with client_for(app) as client:
        assert (await client.get("/stream")).text == "part1\npart2\n"
    [record] = records_of(sink)
    assert record.status_code == 200 and record.recovered
    assert record.upstream_errors[0].kind == "stream_error"


async def test_mounted_app_route_includes_the_mount_prefix() -> None:
    async def item(request: Request) -> PlainTextResponse:
        append_upstream_error(upstream_status_code=500, message="x")
        return PlainTextResponse("ok")

    sink = MemorySink()
    app = Starlette(
        routes=[Mount("/api", routes=[Route("/items/{item_id}", item)])],
        middleware=[Middleware(UpstreamOpsMiddleware, sink=sink)],
    )
    async with client_for(app) as client:
        await client.get("/api/items/7")
    [record] = records_of(sink)
    assert (record.path, record.route) == ("/api/items/7", "/api/items/{item_id}")


async def raw_call(app: Any, messages: list[dict[str, Any]], scope: dict[str, Any]) -> list[Any]:
    sent: list[Any] = []
    inbox = list(messages)

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


HTTP_SCOPE = {"type": "http", "method": "GET", "path": "/slow", "headers": [], "query_string": b""}


async def test_client_disconnect_before_the_response_is_recorded_as_499() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=504, message="upstream slow")
        message = await receive()
        assert message["type"] == "http.disconnect"

    sink = MemorySink()
    middleware = UpstreamOpsMiddleware(app, sink=sink)
    await raw_call(middleware, [{"type": "http.disconnect"}], dict(HTTP_SCOPE))
    [record] = records_of(sink)
    assert record.status_code == 499 and record.recovered is False


async def test_cancelled_request_is_recorded_as_499_and_cancellation_propagates() -> None:
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=504, message="slow")
        started.set()
        await asyncio.sleep(3600)

    sink = MemorySink()
    middleware = UpstreamOpsMiddleware(app, sink=sink)
    task = asyncio.ensure_future(raw_call(middleware, [], dict(HTTP_SCOPE)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [record] = records_of(sink)
    assert record.status_code == 499 and record.error is None


async def test_lifespan_shutdown_drains_the_queue_and_other_scopes_pass_through() -> None:
    sink = MemorySink()
    seen_types: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen_types.append(scope["type"])
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            append_upstream_error(upstream_status_code=500, message="x")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    middleware = UpstreamOpsMiddleware(app, sink=sink)
    middleware.dispatcher.batch_interval = 30.0  # only a drain can write it in time
    await raw_call(middleware, [], dict(HTTP_SCOPE))
    await raw_call(middleware, [], {"type": "websocket", "path": "/ws", "headers": []})
    started = time.monotonic()
    sent = await raw_call(
        middleware,
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
        {"type": "lifespan"},
    )
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert len(sink.records) == 1 and time.monotonic() - started < 5
    assert seen_types == ["http", "websocket", "lifespan"]


def test_bad_options_are_rejected_clearly() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(ValueError, match="request_id_header"):
        UpstreamOpsMiddleware(app, sink=MemorySink(), request_id_header="bad header")
    with pytest.raises(ValueError, match="echo_request_id"):
        UpstreamOpsMiddleware(app, sink=MemorySink(), request_id_header=None, echo_request_id=True)
    with pytest.raises(ValueError, match="echo_request_id"):
        UpstreamOpsMiddleware(app, sink=MemorySink(), echo_request_id="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_events"):
        UpstreamOpsMiddleware(app, sink=MemorySink(), max_events=0)
    with pytest.raises(ValueError, match="write"):
        UpstreamOpsMiddleware(app, sink=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheme"):
        UpstreamOpsMiddleware(app, sink="ftp://nowhere")
