"""CLIENT spans made by the capture transports, against a real upstream on 127.0.0.1.

The upstream answers ``/flaky/{key}`` with 503 for the first ``fail`` calls of a key and 200 after,
and remembers the ``traceparent`` each call carried, so the tests can check that the trace context
sent is the one of the attempt's own span.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from urllib3.util.retry import Retry

import upstream_ops
from upstream_ops import UpstreamOpsMiddleware
from upstream_ops.httpx import AsyncUpstreamOpsTransport, UpstreamOpsTransport
from upstream_ops.requests import UpstreamOpsAdapter
from upstream_ops.sinks import MemorySink
from upstream_ops.testing import collecting

from .conftest import OTel, serve_asgi, wait_for

pytestmark = pytest.mark.anyio

SECRET = "sk-proj-PLANTEDcaptureSecret0123456789"


class Upstream:
    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.traceparents: dict[str, list[str | None]] = defaultdict(list)

    async def flaky(self, request: Request) -> JSONResponse:
        key = request.path_params["key"]
        self.calls[key] += 1
        self.traceparents[key].append(request.headers.get("traceparent"))
        if self.calls[key] <= int(request.query_params.get("fail", "1")):
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return JSONResponse({"ok": True})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/flaky/{key}", self.flaky, methods=["GET", "POST"])])


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, str]]:
    state = Upstream()
    with serve_asgi(state.app()) as url:
        yield state, url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def traceparent_of(span: Any) -> str:
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def client_spans(otel: OTel) -> list[Any]:
    return [span for span in otel.spans() if span.kind is SpanKind.CLIENT]


async def test_httpx_retry_gives_one_client_span_per_attempt_under_the_server_span(
    otel: OTel, upstream: tuple[Upstream, str]
) -> None:
    state, up = upstream
    sink = MemorySink()
    app = FastAPI(telemetry={"tracing": False})
    app.add_middleware(UpstreamOpsMiddleware, sink=sink, **otel.providers)

    @app.post("/generate")
    async def generate() -> dict[str, bool]:
        transport = AsyncUpstreamOpsTransport(platform="rix", tracer_provider=otel.tracer_provider)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                response = await client.post(f"{up}/flaky/h1?fail=2&api_key={SECRET}")
                await response.aread()
                if response.status_code < 400:
                    return {"ok": True}
        return {"ok": False}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        assert (await client.post("/generate")).json() == {"ok": True}
    assert wait_for(lambda: upstream_ops.flush(5) and len(sink.records) == 1)
    [server] = otel.server_spans()
    spans = client_spans(otel)
    assert [span.attributes.get("http.request.resend_count") for span in spans] == [None, 1, 2]
    assert [span.attributes["http.response.status_code"] for span in spans] == [503, 503, 200]
    assert [span.status.status_code for span in spans] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    for span in spans:
        assert span.name == "POST"
        assert span.parent.span_id == server.context.span_id
        assert span.attributes["url.full"] == f"{up}/flaky/h1?fail=2&api_key=[REDACTED]"
        assert span.attributes["server.address"] == "127.0.0.1"
    assert spans[0].attributes["error.type"] == "503"
    # Each attempt sent its own span's trace context.
    assert state.traceparents["h1"] == [traceparent_of(span) for span in spans]
    # The two failures are events on the server span, and the record links to the trace.
    assert [e.attributes["upstream.attempt"] for e in server.events] == [1, 2]
    [record] = sink.records
    assert record.span_id == f"{server.context.span_id:016x}"
    assert SECRET not in otel.exported_text()


def test_httpx_transport_error_is_an_error_client_span(otel: OTel) -> None:
    transport = UpstreamOpsTransport(tracer_provider=otel.tracer_provider)
    with (
        collecting(),
        httpx.Client(transport=transport) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get("http://127.0.0.1:9/v1")
    [span] = client_spans(otel)
    assert span.attributes["error.type"] == "httpx.ConnectError"
    assert span.status.status_code is StatusCode.ERROR
    assert "http.response.status_code" not in span.attributes


def test_outside_a_request_the_transport_makes_no_span(
    otel: OTel, upstream: tuple[Upstream, str]
) -> None:
    state, up = upstream
    transport = UpstreamOpsTransport(tracer_provider=otel.tracer_provider)
    with httpx.Client(transport=transport) as client:
        client.get(f"{up}/flaky/outside?fail=0")
    assert otel.spans() == []
    assert state.traceparents["outside"] == [None]


def test_httpx_instrumented_client_span_is_enriched_not_doubled(
    otel: OTel, upstream: tuple[Upstream, str]
) -> None:
    state, up = upstream
    transport = UpstreamOpsTransport(tracer_provider=otel.tracer_provider)
    client = httpx.Client(transport=transport)
    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=otel.tracer_provider)
    try:
        with collecting():
            for _ in range(2):
                client.get(f"{up}/flaky/inst?fail=1&token={SECRET}")
    finally:
        HTTPXClientInstrumentor.uninstrument_client(client)
        client.close()
    spans = client_spans(otel)
    assert len(spans) == 2  # one per attempt: the instrumentation's
    assert {span.instrumentation_scope.name for span in spans} == {
        "opentelemetry.instrumentation.httpx"
    }
    assert [span.attributes.get("http.request.resend_count") for span in spans] == [None, 1]
    redacted = f"{up}/flaky/inst?fail=1&token=[REDACTED]"
    assert redacted in (spans[0].attributes.get("url.full"), spans[0].attributes.get("http.url"))
    assert spans[0].status.status_code is StatusCode.ERROR  # its own rule for a 503
    assert state.traceparents["inst"] == [traceparent_of(span) for span in spans]
    assert SECRET not in otel.exported_text()


def test_class_level_httpx_instrumentation_is_suppressed_below_our_span(
    otel: OTel, upstream: tuple[Upstream, str]
) -> None:
    _, up = upstream
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tracer_provider)
    try:
        transport = UpstreamOpsTransport(tracer_provider=otel.tracer_provider)
        with collecting(), httpx.Client(transport=transport) as client:
            client.get(f"{up}/flaky/cls?fail=0")
    finally:
        instrumentor.uninstrument()
    [span] = client_spans(otel)
    assert span.instrumentation_scope.name == "upstream_ops"


def test_requests_urllib3_retries_each_get_a_client_span(
    otel: OTel, upstream: tuple[Upstream, str]
) -> None:
    state, up = upstream
    retry = Retry(total=3, status_forcelist=[503], backoff_factor=0, allowed_methods=None)
    adapter = UpstreamOpsAdapter(max_retries=retry, tracer_provider=otel.tracer_provider)
    session = requests.Session()
    session.mount("http://", adapter)
    tracer = otel.tracer_provider.get_tracer("test")
    with collecting(), tracer.start_as_current_span("handler") as parent:
        assert session.post(f"{up}/flaky/r1?fail=2").status_code == 200
    spans = client_spans(otel)
    assert [span.attributes.get("http.request.resend_count") for span in spans] == [None, 1, 2]
    assert [span.attributes["http.response.status_code"] for span in spans] == [503, 503, 200]
    assert all(span.parent.span_id == parent.get_span_context().span_id for span in spans)
    # urllib3 resends the headers it copied for the first try: every try carries its context.
    assert state.traceparents["r1"] == [traceparent_of(spans[0])] * 3


def test_requests_refused_connection_is_an_error_client_span(otel: OTel) -> None:
    adapter = UpstreamOpsAdapter(max_retries=0, tracer_provider=otel.tracer_provider)
    session = requests.Session()
    session.mount("http://", adapter)
    with collecting(), pytest.raises(requests.ConnectionError):
        session.get("http://127.0.0.1:9/")
    [span] = client_spans(otel)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "requests.exceptions.ConnectionError"


def test_requests_instrumentation_span_is_enriched_and_urllib3_below_is_suppressed(
    otel: OTel, upstream: tuple[Upstream, str]
) -> None:
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

    _, up = upstream
    requests_instrumentor, urllib3_instrumentor = RequestsInstrumentor(), URLLib3Instrumentor()
    requests_instrumentor.instrument(tracer_provider=otel.tracer_provider)
    urllib3_instrumentor.instrument(tracer_provider=otel.tracer_provider)
    try:
        session = requests.Session()
        session.mount("http://", UpstreamOpsAdapter(tracer_provider=otel.tracer_provider))
        with collecting():
            for _ in range(2):
                session.get(f"{up}/flaky/ri?fail=1&api_key={SECRET}")
    finally:
        urllib3_instrumentor.uninstrument()
        requests_instrumentor.uninstrument()
    spans = client_spans(otel)
    assert [span.instrumentation_scope.name for span in spans] == [
        "opentelemetry.instrumentation.requests"
    ] * 2
    assert [span.attributes.get("http.request.resend_count") for span in spans] == [None, 1]
    assert SECRET not in otel.exported_text()
