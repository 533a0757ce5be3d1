"""Server spans and span events under the WSGI middleware and the Flask extension, under waitress."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask, Response, stream_with_context
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.trace import SpanKind, StatusCode

import upstream_ops
from upstream_ops import RequestRecord, UpstreamOpsWSGIMiddleware, append_upstream_error
from upstream_ops import wsgi as wsgi_module
from upstream_ops.flask import UpstreamOps
from upstream_ops.sinks import MemorySink

from .conftest import OTel, serve_wsgi, wait_for
from .speedups import with_and_without

# Every test runs with the request's object in C (upstream_ops._wsgi_recording) and in Python.
recording_kind = with_and_without(wsgi_module, "_new_c_recording", "_c_call")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


# waitress may close the response iterable (where the record is built and a span started here
# ends) just after the client has the whole response: wait for them.


def records_of(sink: MemorySink, count: int = 1) -> list[RequestRecord]:
    assert wait_for(lambda: upstream_ops.flush(timeout=5) and len(sink.records) >= count)
    return list(sink.records)


def spans_of(otel: OTel, count: int = 1) -> list[Any]:
    assert wait_for(lambda: len(otel.spans()) >= count)
    return otel.spans()


def fail(attempt: int, status: int = 429) -> None:
    append_upstream_error(
        platform="rix", upstream_status_code=status, kind="http_error", attempt=attempt
    )


def add_views(app: Flask) -> Flask:
    @app.post("/generate/<int:n>")
    def generate(n: int) -> dict[str, bool]:
        for attempt in range(1, n + 1):
            fail(attempt)
        return {"ok": True}

    @app.get("/boom")
    def boom() -> str:
        fail(1, 503)
        raise RuntimeError("view bug")

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            fail(1)
            yield "one\n"
            fail(2)
            yield "two\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    return app


def instrumented_flask(sink: MemorySink, otel: OTel, *, instrument_first: bool) -> Flask:
    """A Flask app with OpenTelemetry's Flask instrumentation, set up before or after ours."""
    app = Flask(__name__)
    if instrument_first:
        FlaskInstrumentor().instrument_app(app, tracer_provider=otel.tracer_provider)
        UpstreamOps(app, sink=sink, **otel.providers)
    else:
        UpstreamOps(app, sink=sink, **otel.providers)
        FlaskInstrumentor().instrument_app(app, tracer_provider=otel.tracer_provider)
    return add_views(app)


def events_of(span: Any) -> list[int]:
    """The attempts of the span's ``upstream.error`` events (Flask adds an ``exception`` event)."""
    return [e.attributes["upstream.attempt"] for e in span.events if e.name == "upstream.error"]


def test_own_server_span_for_a_flask_app(otel: OTel) -> None:
    sink = MemorySink()
    app = add_views(Flask(__name__))
    UpstreamOps(app, sink=sink, **otel.providers)
    with serve_wsgi(app) as url:
        response = httpx.post(f"{url}/generate/2", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    [span] = spans_of(otel)
    assert (span.name, span.kind) == ("POST /generate/<int:n>", SpanKind.SERVER)
    attributes = dict(span.attributes)
    assert attributes.pop("server.port") == int(url.rsplit(":", 1)[1])
    assert attributes == {
        "http.request.method": "POST",
        "url.scheme": "http",
        "url.path": "/generate/2",
        "server.address": "127.0.0.1",
        "network.protocol.version": "1.1",
        "http.route": "/generate/<int:n>",
        "http.response.status_code": 200,
        "upstream.error_count": 2,
        "upstream.recovered": True,
        "upstream_ops.request_id": records_of(sink)[0].request_id,
    }
    assert events_of(span) == [1, 2]
    assert span.status.status_code is StatusCode.UNSET
    assert format(span.parent.span_id, "016x") == PARENT_ID
    [record] = records_of(sink)
    assert (record.trace_id, record.span_id) == (TRACE_ID, format(span.context.span_id, "016x"))


def test_own_span_covers_a_streamed_body_and_an_exception(otel: OTel) -> None:
    sink = MemorySink()
    app = add_views(Flask(__name__))
    UpstreamOps(app, sink=sink, **otel.providers)
    with serve_wsgi(app) as url:
        assert httpx.get(f"{url}/stream").text == "one\ntwo\n"
        assert httpx.get(f"{url}/boom").status_code == 500
    spans = {span.name: span for span in spans_of(otel, 2)}
    assert events_of(spans["GET /stream"]) == [1, 2]
    boom = spans["GET /boom"]
    assert boom.status.status_code is StatusCode.ERROR
    assert boom.attributes["error.type"] == "RuntimeError"
    assert boom.attributes["upstream.recovered"] is False


@pytest.mark.parametrize(
    "instrument_first", [True, False], ids=["instrumented-first", "ours-first"]
)
def test_flask_instrumentation_span_is_adopted_not_doubled(
    otel: OTel, instrument_first: bool
) -> None:
    sink = MemorySink()
    app = instrumented_flask(sink, otel, instrument_first=instrument_first)
    with serve_wsgi(app) as url:
        response = httpx.post(f"{url}/generate/3", headers={"traceparent": TRACEPARENT})
    assert response.status_code == 200
    [span] = spans_of(otel)
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.flask"
    assert span.kind is SpanKind.SERVER
    assert events_of(span) == [1, 2, 3]
    assert span.attributes["upstream.error_count"] == 3
    assert span.attributes["upstream.recovered"] is True
    assert span.status.status_code is StatusCode.UNSET
    [record] = records_of(sink)
    assert (record.trace_id, record.span_id) == (TRACE_ID, format(span.context.span_id, "016x"))


def test_flask_instrumentation_span_ends_before_the_streamed_body(otel: OTel) -> None:
    sink = MemorySink()
    app = instrumented_flask(sink, otel, instrument_first=True)
    with serve_wsgi(app) as url:
        assert httpx.get(f"{url}/stream").text == "one\ntwo\n"
    [span] = spans_of(otel)
    # Flask ends its span with the request context, before waitress iterates the body; what was
    # known then is on the span, and every event is in the record.
    assert span.attributes["http.route"] == "/stream"
    [record] = records_of(sink)
    assert [e.attempt for e in record.upstream_errors] == [1, 2]
    assert record.span_id == format(span.context.span_id, "016x")


def test_flask_instrumentation_exception(otel: OTel) -> None:
    sink = MemorySink()
    app = instrumented_flask(sink, otel, instrument_first=False)
    with serve_wsgi(app) as url:
        assert httpx.get(f"{url}/boom").status_code == 500
    [span] = spans_of(otel)
    assert span.status.status_code is StatusCode.ERROR  # Flask's rule: 5xx
    assert events_of(span) == [1]
    assert span.attributes["upstream.recovered"] is False
    [record] = records_of(sink)
    assert record.error == "RuntimeError"
    assert record.span_id == format(span.context.span_id, "016x")


def test_wsgi_instrumentation_outside_the_middleware_is_enriched(otel: OTel) -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        fail(1)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    wrapped = OpenTelemetryMiddleware(
        UpstreamOpsWSGIMiddleware(app, sink=sink, **otel.providers),
        tracer_provider=otel.tracer_provider,
    )
    with serve_wsgi(wrapped) as url:
        assert httpx.get(f"{url}/x", headers={"traceparent": TRACEPARENT}).text == "ok"
    [span] = spans_of(otel)
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.wsgi"
    assert events_of(span) == [1] and span.attributes["upstream.recovered"] is True
    [record] = records_of(sink)
    assert (record.trace_id, record.span_id) == (TRACE_ID, format(span.context.span_id, "016x"))


def test_plain_wsgi_without_sdk_records_no_trace_ids() -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        fail(1)
        start_response("200 OK", [])
        return [b"ok"]

    middleware = UpstreamOpsWSGIMiddleware(app, sink=sink)
    with serve_wsgi(middleware) as url:
        assert httpx.get(url).text == "ok"
    [record] = records_of(sink)
    assert record.trace_id is None and record.upstream_errors


def test_flask_streaming_with_context_keeps_working_with_instrumentation(otel: OTel) -> None:
    """stream_with_context re-enters the request context: events still land once, in order."""
    sink = MemorySink()
    app = instrumented_flask(sink, otel, instrument_first=False)

    @app.get("/ctx")
    def ctx() -> Response:
        @stream_with_context
        def body() -> Iterator[str]:
            fail(1)
            yield "x"

        return Response(body())

    with serve_wsgi(app) as url:
        assert httpx.get(f"{url}/ctx").text == "x"
    [record] = records_of(sink)
    assert [e.attempt for e in record.upstream_errors] == [1]


# With neither provider of its own live, the middleware skips OpenTelemetry unless a span is current
# or the app's instrumentation will start one: both are still noticed.


def test_idle_middleware_still_enriches_a_span_current_around_it(otel: OTel) -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        fail(1)
        start_response("200 OK", [])
        return [b"ok"]

    middleware = UpstreamOpsWSGIMiddleware(app, sink=sink)  # global providers: unset here
    assert not (middleware.telemetry.live.tracing or middleware.telemetry.live.metrics)
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("outer", kind=SpanKind.SERVER) as outer:
        body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}, lambda *a: None)
        assert b"".join(body) == b"ok"
        body.close()  # type: ignore[attr-defined]
    [span] = spans_of(otel)
    assert span.context.span_id == outer.get_span_context().span_id
    assert events_of(span) == [1] and span.attributes["upstream.recovered"] is True
    [record] = records_of(sink)
    assert record.span_id == format(span.context.span_id, "016x")


def test_idle_middleware_adopts_the_span_of_flask_instrumented_later(otel: OTel) -> None:
    sink = MemorySink()
    app = Flask(__name__)
    UpstreamOps(app, sink=sink)  # no providers of its own, and the global ones unset
    FlaskInstrumentor().instrument_app(app, tracer_provider=otel.tracer_provider)
    add_views(app)
    try:
        with serve_wsgi(app) as url:
            assert httpx.post(f"{url}/generate/2").json() == {"ok": True}
    finally:
        FlaskInstrumentor().uninstrument_app(app)
    [span] = spans_of(otel)
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.flask"
    assert span.kind is SpanKind.SERVER and events_of(span) == [1, 2]
    [record] = records_of(sink)
    assert record.span_id == format(span.context.span_id, "016x")


def test_global_providers_set_after_the_middleware_was_made_are_picked_up() -> None:
    # In a process of its own: the API's global providers can be set only once.
    from .test_telemetry import run_python

    out = run_python(
        f"""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from upstream_ops import UpstreamOpsWSGIMiddleware, wsgi
        from upstream_ops.sinks import MemorySink

        if {wsgi_module._c_call is None!r}:  # the Python code alone, as this test module runs
            wsgi._c_call = wsgi._new_c_recording = None

        def app(environ, start_response):
            start_response("200 OK", [])
            return [b"ok"]

        middleware = UpstreamOpsWSGIMiddleware(app, sink=MemorySink())
        exporter = InMemorySpanExporter()

        def serve():
            body = middleware({{"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}}, lambda *a: None)
            b"".join(body)
            body.close()

        serve()
        before = len(exporter.get_finished_spans())
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        serve()
        print(before, [s.name for s in exporter.get_finished_spans()])
        """
    )
    assert out.strip() == "0 ['GET']"
