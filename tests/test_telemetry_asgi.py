"""Server spans, ``upstream.error`` span events and status rules under the ASGI middleware.

Each test gets its own SDK providers (the ``otel`` fixture): the global ones stay unset, as in an app
that never configured OpenTelemetry.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import SpanKind, StatusCode

import upstream_ops
from upstream_ops import RequestRecord, UpstreamOpsMiddleware, append_upstream_error
from upstream_ops import asgi as asgi_module
from upstream_ops.sinks import MemorySink

from .conftest import OTel, serve_asgi, wait_for
from .speedups import with_and_without

pytestmark = pytest.mark.anyio

# Every test runs with the request's steps in C (upstream_ops._asgi_recording) and in Python.
recording_kind = with_and_without(asgi_module, "_new_c_call")

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def records_of(sink: MemorySink) -> list[RequestRecord]:
    assert upstream_ops.flush(timeout=5)
    return list(sink.records)


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def fail_504(attempt: int = 1, **fields: Any) -> None:
    append_upstream_error(
        platform="rix",
        account_id=7,
        upstream_status_code=504,
        upstream_request_id=f"rix-{attempt}",
        kind="http_error",
        error_class="server_error",
        attempt=attempt,
        message="gateway timeout",
        **fields,
    )


def gateway(
    sink: MemorySink, otel: OTel | None, *, native: bool = False, **options: Any
) -> FastAPI:
    """A FastAPI app whose upstream fails; ``native`` turns on FastAPI's own telemetry."""
    telemetry: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}
    if native and otel is not None:
        telemetry = {"tracer_provider": otel.tracer_provider, "metrics": False, "logs": False}
    app = FastAPI(telemetry=telemetry)  # type: ignore[arg-type]
    providers = otel.providers if otel is not None else {}
    app.add_middleware(UpstreamOpsMiddleware, sink=sink, **{**providers, **options})

    @app.post("/generate/{n}")
    async def generate(n: int) -> dict[str, bool]:
        for attempt in range(1, n + 1):
            fail_504(attempt)
        return {"ok": True}

    @app.get("/bad-gateway")
    async def bad_gateway() -> JSONResponse:
        fail_504()
        return JSONResponse({"ok": False}, status_code=502)

    @app.get("/not-found")
    async def not_found() -> JSONResponse:
        fail_504()
        return JSONResponse({"ok": False}, status_code=404)

    @app.get("/boom")
    async def boom() -> None:
        fail_504()
        raise RuntimeError("app bug")

    @app.get("/fine")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/later")
    async def later(tasks: BackgroundTasks) -> dict[str, bool]:
        fail_504(1)
        tasks.add_task(fail_504, 2)
        return {"ok": True}

    return app


def span_events(span: Any) -> list[dict[str, Any]]:
    assert all(event.name == "upstream.error" for event in span.events)
    return [dict(event.attributes) for event in span.events]


async def test_own_server_span_follows_http_semconv_and_links_the_record(otel: OTel) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel)) as client:
        response = await client.post("/generate/2?x=1", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    [span] = otel.spans()
    assert (span.name, span.kind) == ("POST /generate/{n}", SpanKind.SERVER)
    assert dict(span.attributes) == {
        "http.request.method": "POST",
        "url.scheme": "http",
        "url.path": "/generate/2",
        "server.address": "testserver",
        "server.port": 80,
        "network.protocol.version": "1.1",
        "http.route": "/generate/{n}",
        "http.response.status_code": 200,
        "upstream.error_count": 2,
        "upstream.recovered": True,
        "upstream_ops.request_id": records_of(sink)[0].request_id,
    }
    # The incoming traceparent is the parent; the record points at this span.
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID and span.parent.is_remote
    [record] = records_of(sink)
    assert (record.trace_id, record.span_id) == (TRACE_ID, format(span.context.span_id, "016x"))


async def test_every_event_becomes_an_upstream_error_span_event(otel: OTel) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel)) as client:
        await client.post("/generate/3")
    [span] = otel.spans()
    [record] = records_of(sink)
    assert span_events(span) == [
        {
            "upstream.kind": "http_error",
            "upstream.platform": "rix",
            "upstream.account_id": 7,
            "http.response.status_code": 504,
            "upstream.request_id": f"rix-{attempt}",
            "error.type": "504",
            "upstream.error_class": "server_error",
            "upstream.attempt": attempt,
            "upstream.message": "gateway timeout",
        }
        for attempt in (1, 2, 3)
    ]
    # Timestamped when appended, in the span's time range.
    times = [event.timestamp for event in span.events]
    assert times == [event.at_unix_ms * 1_000_000 for event in record.upstream_errors]
    assert all(span.start_time - 1_000_000 <= t <= span.end_time for t in times)


@pytest.mark.parametrize(
    ("path", "status", "recovered", "span_status", "error_type"),
    [
        ("/generate/1", 200, True, StatusCode.UNSET, None),
        ("/not-found", 404, False, StatusCode.UNSET, None),
        ("/bad-gateway", 502, False, StatusCode.ERROR, "502"),
        ("/boom", 500, False, StatusCode.ERROR, "RuntimeError"),
    ],
)
async def test_status_rules(
    otel: OTel,
    path: str,
    status: int,
    recovered: bool,
    span_status: StatusCode,
    error_type: str | None,
) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel)) as client:
        try:
            response = await client.request("POST" if "generate" in path else "GET", path)
            assert response.status_code == status
        except RuntimeError:
            assert path == "/boom"  # the app's exception reaches the test client unchanged
    [span] = otel.spans()
    assert span.status.status_code is span_status
    assert span.attributes.get("error.type") == error_type
    assert span.attributes["upstream.recovered"] is recovered
    assert span.attributes["upstream.error_count"] == 1
    assert span.attributes["http.response.status_code"] == status
    assert span.status.description is None  # never an exception message: it may hold a secret
    [record] = records_of(sink)
    assert record.recovered is recovered


async def test_request_without_upstream_trouble_gets_a_plain_server_span(otel: OTel) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel)) as client:
        await client.get("/fine")
    [span] = otel.spans()
    assert span.name == "GET /fine" and not span.events
    assert not any(key.startswith(("upstream.", "upstream_ops.")) for key in span.attributes)
    assert span.status.status_code is StatusCode.UNSET


async def test_unknown_method_is_other_and_span_named_http(otel: OTel) -> None:
    app = gateway(MemorySink(), otel)
    async with client_for(app) as client:
        await client.request("BREW", "/fine")
    [span] = otel.spans()
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "BREW"
    assert span.name.startswith("HTTP")


async def test_fastapi_instrumentation_span_is_enriched_not_doubled(otel: OTel) -> None:
    sink = MemorySink()
    app = gateway(sink, otel)
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    try:
        async with client_for(app) as client:
            await client.post("/generate/2", headers={"traceparent": TRACEPARENT})
    finally:
        FastAPIInstrumentor.uninstrument_app(app)
    [server] = otel.server_spans()
    assert server.instrumentation_scope.name == "opentelemetry.instrumentation.fastapi"
    assert len(span_events(server)) == 2
    assert server.attributes["upstream.error_count"] == 2
    assert server.attributes["upstream.recovered"] is True
    assert server.status.status_code is StatusCode.UNSET
    assert format(server.context.trace_id, "032x") == TRACE_ID
    [record] = records_of(sink)
    assert record.span_id == format(server.context.span_id, "016x")
    # Its "http send" children carry no events of ours.
    assert all(not span.events for span in otel.spans() if span is not server)


async def test_fastapi_own_telemetry_span_is_the_server_span(otel: OTel) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel, native=True)) as client:
        await client.post("/generate/1", headers={"traceparent": TRACEPARENT})
    [server] = otel.server_spans()
    assert server.instrumentation_scope.name == "fastapi"
    assert server.name == "POST /generate/{n}"
    assert len(span_events(server)) == 1 and server.attributes["upstream.recovered"] is True
    assert {span.name for span in otel.spans()} >= {"fastapi.endpoint"}
    [record] = records_of(sink)
    assert (record.trace_id, record.span_id) == (
        TRACE_ID,
        format(server.context.span_id, "016x"),
    )


async def test_fastapi_own_span_ends_with_the_body_and_later_events_still_reach_the_record(
    otel: OTel,
) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel, native=True)) as client:
        await client.get("/later")
    [server] = otel.server_spans()
    # The span ended when the last body chunk went out, before the background task ran; the
    # attributes were set at that moment.
    assert [e["upstream.attempt"] for e in span_events(server)] == [1]
    assert server.attributes["upstream.error_count"] == 1
    [record] = records_of(sink)
    assert [e.attempt for e in record.upstream_errors] == [1, 2]


async def test_own_span_waits_for_background_tasks(otel: OTel) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel)) as client:
        await client.get("/later")
    [server] = otel.spans()
    assert [e["upstream.attempt"] for e in span_events(server)] == [1, 2]
    assert server.attributes["upstream.error_count"] == 2


async def test_create_server_span_off_without_instrumentation_makes_no_span(otel: OTel) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel, create_server_span=False)) as client:
        await client.post("/generate/1")
    assert otel.spans() == []
    [record] = records_of(sink)
    assert record.trace_id is None and record.span_id is None
    # Metrics do not depend on a span.
    assert [value for _, value in otel.metric_points("upstream_ops.upstream.errors")] == [1]


async def test_create_server_span_off_still_enriches_an_instrumentation(otel: OTel) -> None:
    sink = MemorySink()
    async with client_for(gateway(sink, otel, native=True, create_server_span=False)) as client:
        await client.post("/generate/1")
    [server] = otel.server_spans()
    assert len(server.events) == 1


async def test_concurrent_requests_keep_their_own_spans(otel: OTel) -> None:
    sink = MemorySink()
    app = FastAPI(telemetry={"tracing": False})
    app.add_middleware(UpstreamOpsMiddleware, sink=sink, **otel.providers)

    @app.get("/n/{n}")
    async def numbered(n: int) -> dict[str, int]:
        for attempt in range(1, n + 1):
            await asyncio.sleep(0.001)
            fail_504(attempt, upstream_url=f"https://rix.example/{n}")
        return {"n": n}

    async with client_for(app) as client:
        await asyncio.gather(*(client.get(f"/n/{n}") for n in (1, 2, 3, 4)))
    spans = {span.attributes["url.path"]: span for span in otel.spans()}
    for n in (1, 2, 3, 4):
        events = span_events(spans[f"/n/{n}"])
        assert [e["url.full"] for e in events] == [f"https://rix.example/{n}"] * n
    records = {record.path: record for record in records_of(sink)}
    assert {records[p].span_id for p in spans} == {
        format(s.context.span_id, "016x") for s in spans.values()
    }


async def test_under_uvicorn_with_a_real_client(otel: OTel) -> None:
    sink = MemorySink()
    with serve_asgi(gateway(sink, otel)) as url:
        response = httpx.post(f"{url}/generate/1", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    # The span ends, and the record is built, just after the client has the response.
    assert wait_for(lambda: len(otel.spans()) == 1 and upstream_ops.flush(5) and bool(sink.records))
    [span] = otel.spans()
    assert span.attributes["server.address"] == "127.0.0.1"
    assert span.attributes["server.port"] == int(url.rsplit(":", 1)[1])
    assert format(span.context.trace_id, "032x") == TRACE_ID
    [record] = records_of(sink)
    assert record.trace_id == TRACE_ID


async def test_broken_tracer_provider_never_reaches_the_app() -> None:
    class Broken:
        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            return self

        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter bug")

    sink = MemorySink()
    app = gateway(sink, None, tracer_provider=Broken())
    async with client_for(app) as client:
        assert (await client.post("/generate/1")).status_code == 200
    [record] = records_of(sink)
    assert record.upstream_errors and record.trace_id is None
