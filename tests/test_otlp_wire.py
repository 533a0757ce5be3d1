"""The wire format: the real OTLP/HTTP exporter sends to a receiver on 127.0.0.1 (Jaeger's format).

Docker cannot run here, so instead of Jaeger a receiver started by the test decodes the protobuf
``ExportTraceServiceRequest`` with ``opentelemetry-proto``, as Jaeger's OTLP receiver would.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import upstream_ops
from upstream_ops import UpstreamOpsMiddleware
from upstream_ops.httpx import AsyncUpstreamOpsTransport
from upstream_ops.sinks import MemorySink

from .otlp_receiver import OTLPReceiver, attributes, otlp_receiver
from .test_examples import BIN, ROOT, free_port, wait_until_up

pytestmark = pytest.mark.anyio

TRACE_ID = "5b8efff798038103d269b633813fc60c"
PARENT_ID = "eee19b7ec3c1b174"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET = "sk-ant-api03-PLANTEDwireSecret0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def receiver() -> Any:
    with otlp_receiver() as running:
        yield running


def server_span(receiver: OTLPReceiver) -> tuple[dict[str, Any], Any]:
    [(resource, span)] = [(r, s) for r, s in receiver.spans() if s.kind == Span.SPAN_KIND_SERVER]
    return resource, span


async def test_server_span_and_events_over_otlp_http(receiver: OTLPReceiver) -> None:
    resource = Resource.create({"service.name": "wire-test"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{receiver.endpoint}/v1/metrics"),
        export_interval_millis=3_600_000,
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    sink = MemorySink()
    app = FastAPI(telemetry={"tracing": False})
    app.add_middleware(
        UpstreamOpsMiddleware,
        sink=sink,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )

    def rix(request: httpx.Request) -> httpx.Response:
        """The upstream: times out once per key, then answers."""
        key = request.url.path
        seen.append(key)
        if seen.count(key) == 1:
            body = {"error": {"message": f"gateway timeout (key {SECRET})"}}
            return httpx.Response(504, json=body, headers={"x-request-id": "rix-1"})
        return httpx.Response(200, json={"url": "https://cdn.example/1.png"})

    seen: list[str] = []

    @app.post("/generate/{n}")
    async def generate(n: int) -> dict[str, bool]:
        transport = AsyncUpstreamOpsTransport(
            httpx.MockTransport(rix), platform="rix", tracer_provider=tracer_provider
        )
        async with httpx.AsyncClient(transport=transport) as upstream:
            for _ in range(n):
                response = await upstream.post(f"https://rix.example/v1/images?api_key={SECRET}")
                await response.aread()
                if response.status_code < 400:
                    return {"ok": True}
        return {"ok": False}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.example") as client:
        response = await client.post(
            f"/generate/2?token={SECRET}",
            headers={"traceparent": TRACEPARENT, "Authorization": f"Bearer {SECRET}"},
        )
    assert response.status_code == 200
    assert upstream_ops.flush(5)
    assert tracer_provider.force_flush() and meter_provider.force_flush()
    try:
        resource_attributes, span = server_span(receiver)
        assert resource_attributes["service.name"] == "wire-test"
        assert span.name == "POST /generate/{n}"
        assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
        assert span.status.code == Status.STATUS_CODE_UNSET
        span_attributes = attributes(span.attributes)
        assert span_attributes["upstream.error_count"] == 1
        assert span_attributes["upstream.recovered"] is True
        assert span_attributes["http.route"] == "/generate/{n}"
        assert span_attributes["server.address"] == "gw.example"
        [event] = span.events
        assert event.name == "upstream.error"
        event_attributes = attributes(event.attributes)
        assert {
            key: event_attributes[key]
            for key in (
                "upstream.kind",
                "upstream.platform",
                "url.full",
                "http.response.status_code",
                "upstream.request_id",
                "error.type",
                "upstream.attempt",
            )
        } == {
            "upstream.kind": "http_error",
            "upstream.platform": "rix",
            "url.full": "https://rix.example/v1/images?api_key=[REDACTED]",
            "http.response.status_code": 504,
            "upstream.request_id": "rix-1",
            "error.type": "504",
            "upstream.attempt": 1,
        }
        assert "[REDACTED]" in event_attributes["upstream.message"]
        # One CLIENT span per attempt, children of the server span in the same trace.
        clients = [s for _, s in receiver.spans() if s.kind == Span.SPAN_KIND_CLIENT]
        assert [c.name for c in clients] == ["POST", "POST"]
        assert all(c.trace_id == span.trace_id for c in clients)
        assert all(c.parent_span_id == span.span_id for c in clients)
        first, second = (attributes(c.attributes) for c in clients)
        assert first["http.response.status_code"] == 504 and first["error.type"] == "504"
        assert "http.request.resend_count" not in first
        assert second["http.response.status_code"] == 200
        assert second["http.request.resend_count"] == 1
        assert [c.status.code for c in clients] == [
            Status.STATUS_CODE_ERROR,
            Status.STATUS_CODE_UNSET,
        ]
        # A stored record links to its trace.
        [record] = sink.records
        assert (record.trace_id, record.span_id) == (TRACE_ID, span.span_id.hex())
        errors = receiver.metric_points("upstream_ops.upstream.errors")
        assert errors == [
            (
                {
                    "upstream.platform": "rix",
                    "upstream.kind": "http_error",
                    "upstream.error_class": "server_error",
                    "http.response.status_code": 504,
                },
                1,
            )
        ]
        assert receiver.metric_points("upstream_ops.records") == [({"outcome": "written"}, 1)]
        # Not one byte of the planted secret left the process.
        assert receiver.raw and not any(SECRET.encode() in body for body in receiver.raw)
        assert not any(SECRET[14:].encode() in body for body in receiver.raw)
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


def test_jaeger_example_exports_over_otlp(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """examples/jaeger/app.py as docker compose runs it, with this receiver in Jaeger's place."""
    db = tmp_path / "ops.db"
    port = free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "100",
        "UPSTREAM_OPS_SINK": f"sqlite:///{db}",
        "UPSTREAM_URL": "http://127.0.0.1:9",
    }
    proc = subprocess.Popen(
        [str(BIN / "uvicorn"), "examples.jaeger.app:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", proc)
        response = httpx.post(
            f"http://127.0.0.1:{port}/generate", headers={"traceparent": TRACEPARENT}
        )
        assert response.status_code == 200
        assert receiver.wait_for(
            lambda: any(s.name == "POST /generate" for _, s in receiver.spans())
        )
        assert receiver.wait_for(lambda: bool(receiver.metric_points("upstream_ops.records")))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    [(resource, span)] = [(r, s) for r, s in receiver.spans() if s.name == "POST /generate"]
    assert resource["service.name"] == "listing-images"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
    [event] = span.events
    assert event.name == "upstream.error"
    assert attributes(event.attributes)["upstream.kind"] == "request_error"
    assert attributes(span.attributes)["upstream.recovered"] is True
    with sqlite3.connect(db) as conn:
        [(trace_id, span_id)] = conn.execute("select trace_id, span_id from ops_error_logs")
    assert (trace_id, span_id) == (TRACE_ID, span.span_id.hex())
