"""One HTTP request through the ASGI middleware, driven the ways a server or an event loop drives it.

Every test runs twice: with ``upstream_ops._asgi_recording`` (the request's steps in C) and with the
Python code alone; both must behave the same way. Tests that drive the middleware's coroutine by
hand (send, throw, close) stand for the event loops that do: asyncio sends None, trio sends values
in, cancellation throws, a dropped task closes.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import types
from collections.abc import Generator
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message

import upstream_ops
from upstream_ops import UpstreamOpsMiddleware, append_upstream_error, current_collector
from upstream_ops import asgi as asgi_module
from upstream_ops.collector import Collector, _current
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import MemorySink

from .speedups import (
    INCOMING_IDS,
    SUMMARIES,
    assert_made_as_init_makes_it,
    require_extension,
    summary_of,
    with_and_without,
)

_asgi_recording: ModuleType | None
try:
    from upstream_ops import _asgi_recording
except ImportError:  # pragma: no cover - depends on the build
    _asgi_recording = None

recording_kind = with_and_without(asgi_module, "_new_c_call")

SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/r", "headers": []}
START = {"type": "http.response.start", "status": 200, "headers": []}
BODY = {"type": "http.response.body", "body": b"ok"}


def records(sink: MemorySink) -> list[RequestRecord]:
    assert upstream_ops.flush(timeout=5)
    return list(sink.records)


@types.coroutine
def pause(label: str) -> Generator[str, Any, Any]:
    """Suspends the app the way an event loop's primitive does; answers what is sent back in."""
    return (yield label)


async def nothing_received() -> dict[str, Any]:
    raise AssertionError("the app did not ask")


class ServerSend:
    """A server's send: notes each message; ``fail_on`` makes it raise for that message type."""

    def __init__(self, fail_on: str | None = None, error: BaseException | None = None) -> None:
        self.messages: list[Message] = []
        self.fail_on = fail_on
        self.error = error or OSError("connection reset by peer")

    async def __call__(self, message: Message) -> None:
        if message["type"] == self.fail_on:
            raise self.error
        self.messages.append(message)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_a_send_that_fails_before_the_response_is_complete_is_a_499() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=502, message="bad gateway")
        await send(START)
        await send(BODY)

    sink = MemorySink()
    server = ServerSend(fail_on="http.response.start")
    with pytest.raises(OSError) as raised:
        run(UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, server))
    assert raised.value is server.error
    [record] = records(sink)
    assert record.status_code == 499


def test_a_send_that_fails_after_the_last_body_keeps_the_status() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(START)
        await send(BODY)

    sink = MemorySink()
    server = ServerSend(fail_on="http.response.body")
    with pytest.raises(OSError):
        run(UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, server))
    [record] = records(sink)
    assert record.status_code == 200 and record.error is not None


def test_a_disconnect_received_after_the_response_is_not_a_499() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=429, message="slow down")
        await send(START)
        await send(BODY)
        assert (await receive())["type"] == "http.disconnect"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    sink = MemorySink()
    run(UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), receive, ServerSend()))
    [record] = records(sink)
    assert record.status_code == 200


def test_an_app_that_cannot_be_awaited_fails_and_is_recorded() -> None:
    def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=500, message="boom")

    sink = MemorySink()
    middleware = UpstreamOpsMiddleware(app, sink=sink)  # type: ignore[arg-type]  # on purpose
    with pytest.raises(TypeError):
        run(middleware(dict(SCOPE), nothing_received, ServerSend()))
    [record] = records(sink)
    assert record.status_code == 500 and "TypeError" in (record.error or "")
    assert len(record.upstream_errors) == 1


def test_values_sent_in_reach_the_app() -> None:
    answers: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=503, message="unavailable")
        answers.append(await pause("waiting"))
        await send(START)
        await send(BODY)

    sink = MemorySink()
    server = ServerSend()
    coroutine = UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, server)
    assert coroutine.send(None) == "waiting"
    assert current_collector() is not None  # the request's, while it runs in this context
    with pytest.raises(StopIteration):
        coroutine.send({"outcome": 1})
    assert answers == [{"outcome": 1}]
    assert current_collector() is None
    [record] = records(sink)
    assert record.status_code == 200 and len(record.upstream_errors) == 1
    assert [m["type"] for m in server.messages] == ["http.response.start", "http.response.body"]


def test_an_exception_thrown_in_reaches_the_app_which_may_handle_it() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=504, message="timeout")
        try:
            await pause("waiting")
        except KeyError:
            await send(START)
            await send(BODY)

    sink = MemorySink()
    coroutine = UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, ServerSend())
    assert coroutine.send(None) == "waiting"
    with pytest.raises(StopIteration):
        coroutine.throw(KeyError("handled"))
    [record] = records(sink)
    assert record.status_code == 200 and record.error is None


def test_an_exception_thrown_in_and_not_handled_is_raised_unchanged() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await pause("waiting")

    sink = MemorySink()
    failure = LookupError("not handled")
    coroutine = UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, ServerSend())
    coroutine.send(None)
    with pytest.raises(LookupError) as raised:
        coroutine.throw(failure)
    assert raised.value is failure
    assert current_collector() is None
    [record] = records(sink)
    assert (record.status_code, record.error) == (500, "LookupError")


def test_closing_the_request_midway_ends_it_once() -> None:
    closed: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=504, message="timeout")
        try:
            await pause("waiting")
        finally:
            closed.append(True)

    sink = MemorySink()
    coroutine = UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, ServerSend())
    coroutine.send(None)
    coroutine.close()
    coroutine.close()
    assert closed == [True]
    assert current_collector() is None
    [record] = records(sink)
    assert record.status_code == 500 and len(record.upstream_errors) == 1


def test_a_request_dropped_midway_is_ended_when_collected() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        append_upstream_error(upstream_status_code=504, message="timeout")
        await pause("waiting")

    sink = MemorySink()
    coroutine = UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, ServerSend())
    coroutine.send(None)
    del coroutine
    gc.collect()
    [record] = records(sink)
    assert len(record.upstream_errors) == 1


def test_an_error_of_the_end_is_chained_to_the_apps_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("app")

    def failing_finish(*args: Any) -> None:
        raise RuntimeError("finish")

    middleware = UpstreamOpsMiddleware(app, sink=MemorySink())
    monkeypatch.setattr(middleware, "_finish", failing_finish)
    with pytest.raises(RuntimeError) as raised:
        run(middleware(dict(SCOPE), nothing_received, ServerSend()))
    assert isinstance(raised.value.__context__, KeyError)
    assert current_collector() is None


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_starlette_app_under_each_anyio_backend(anyio_backend: str) -> None:
    async def endpoint(request: Request) -> JSONResponse:
        if request.query_params.get("fail"):
            append_upstream_error(upstream_status_code=429, message="rate limited")
        await anyio.sleep(0.001)  # trio sends its result back in through the middleware
        body = await request.body()
        return JSONResponse({"size": len(body)})

    sink = MemorySink()
    app = Starlette(
        routes=[Route("/r", endpoint, methods=["POST"])],
        middleware=[Middleware(UpstreamOpsMiddleware, sink=sink)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        healthy = await client.post("/r", content=b"abc")
        failed = await client.post("/r?fail=1", content=b"abcd")
    assert (healthy.json(), failed.json()) == ({"size": 3}, {"size": 4})
    [record] = records(sink)
    assert record.path == "/r" and record.status_code == 200 and len(record.upstream_errors) == 1


def test_no_object_is_left_behind_per_request() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/fail":
            append_upstream_error(upstream_status_code=502, message="bad gateway")
        assert (await receive())["type"] == "http.request"
        await send(START)
        await send(BODY)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    middleware = UpstreamOpsMiddleware(app, sink=MemorySink(), before_flush=lambda record: None)

    async def requests(count: int) -> None:
        for number in range(count):
            scope = dict(SCOPE, path="/fail" if number % 10 == 0 else "/r")
            await middleware(scope, receive, send)

    async def measure() -> int:
        await requests(500)
        assert upstream_ops.flush(timeout=5)
        gc.collect()
        before = sys.getallocatedblocks()
        await requests(5_000)
        assert upstream_ops.flush(timeout=5)
        gc.collect()
        return sys.getallocatedblocks() - before

    assert run(measure()) < 1_000  # one object kept a request would be 5,000


def test_the_extension_refuses_bad_arguments() -> None:
    require_extension(_asgi_recording)
    assert _asgi_recording is not None
    with pytest.raises(TypeError, match="made by new_call"):
        _asgi_recording.Call()
    with pytest.raises(TypeError, match="5 arguments"):
        _asgi_recording.new_call(object)
    with pytest.raises(TypeError, match="subclass of Call"):
        _asgi_recording.new_call(object, None, {}, None, None)
    with pytest.raises(TypeError, match="8 arguments"):
        _asgi_recording.setup(print)
    good: list[Any] = [print, Collector, _current, print, object(), print, print, None]
    for index, bad in [(1, print), (2, None), (7, ({},)), (7, ({}, []))]:
        arguments = list(good)
        arguments[index] = bad
        with pytest.raises(TypeError, match="setup expects"):
            _asgi_recording.setup(*arguments)


# -- the collector's steps done in C (``_collector_steps.h``), against the Python code -----------


def test_the_collector_is_made_as_its_init_makes_it() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        collector = current_collector()
        assert type(collector) is Collector and scope["state"]["upstream_ops"] is collector
        seen.append(dict(vars(collector)))
        await send(START)
        await send(BODY)

    middleware = UpstreamOpsMiddleware(app, sink=MemorySink(), max_events=7)
    for rid in INCOMING_IDS:
        headers = [] if rid is None else [(b"x-request-id", rid.encode())]
        run(middleware({**SCOPE, "headers": headers}, nothing_received, ServerSend()))
    assert_made_as_init_makes_it(seen, middleware.recorder, 7)
    middleware.dispatcher.close()


@pytest.mark.parametrize("summary", ["status", "message", "detail"])
def test_a_collector_with_only_a_summary_is_not_quiet(summary: str) -> None:
    sink = MemorySink()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        collector = current_collector()
        assert collector is not None
        collector.set_summary(*SUMMARIES[summary][0])
        await send(START)
        await send(BODY)

    run(UpstreamOpsMiddleware(app, sink=sink)(dict(SCOPE), nothing_received, ServerSend()))
    [record] = records(sink)
    assert summary_of(record) == SUMMARIES[summary][1]


def test_global_providers_set_after_the_middleware_was_made_are_picked_up() -> None:
    # In a process of its own: the API's global providers can be set only once.
    from .test_telemetry import run_python

    out = run_python(
        f"""
        import asyncio
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from upstream_ops import UpstreamOpsMiddleware, asgi
        from upstream_ops.sinks import MemorySink

        if {asgi_module._new_c_call is None!r}:  # the Python code alone, as this module runs
            asgi._new_c_call = None

        async def app(scope, receive, send):
            await send({{"type": "http.response.start", "status": 200, "headers": []}})
            await send({{"type": "http.response.body", "body": b"ok"}})

        async def send(message):
            pass

        middleware = UpstreamOpsMiddleware(app, sink=MemorySink())
        exporter = InMemorySpanExporter()
        scope = {{"type": "http", "method": "GET", "path": "/x", "headers": []}}
        asyncio.run(middleware(dict(scope), None, send))
        before = len(exporter.get_finished_spans())
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        asyncio.run(middleware(dict(scope), None, send))
        print(before, [s.name for s in exporter.get_finished_spans()])
        """
    )
    assert out.strip() == "0 ['GET']"
