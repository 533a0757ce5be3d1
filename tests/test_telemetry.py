"""The telemetry package: metrics values, the no-op fast path, configure(), and planted secrets.

Tests that need the *global* providers set run in a subprocess: the API allows setting them once per
process, and every other test relies on them being unset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

import upstream_ops
from upstream_ops import Collector, Dispatcher, UpstreamOpsMiddleware, append_upstream_error
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import MemorySink
from upstream_ops.telemetry import OUTCOMES
from upstream_ops.telemetry._server import ServerTelemetry

from .conftest import OTel

pytestmark = pytest.mark.anyio

#: Shaped like an OpenAI key, so the sanitizer knows it wherever it appears.
SECRET = "sk-proj-PLANTEDsecret0123456789abcdefXYZ"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- metrics ------------------------------------------------------------------------------------


async def test_upstream_errors_counter_has_low_cardinality_attributes_only(otel: OTel) -> None:
    app = FastAPI(telemetry={"tracing": False})
    app.add_middleware(UpstreamOpsMiddleware, sink=MemorySink(), **otel.providers)

    @app.get("/{n}")
    async def endpoint(n: int) -> dict[str, bool]:
        append_upstream_error(
            platform="rix",
            kind="http_error",
            upstream_status_code=429,
            error_class="rate_limited",
            upstream_request_id=f"req-{n}",
            upstream_url=f"https://rix.example/v1/{n}",
            message=f"rate limited #{n}",
            account_id=n,
        )
        append_upstream_error(platform="rix", kind="request_error", message="refused")
        return {"ok": True}

    async with client_for(app) as client:
        for n in range(3):
            await client.get(f"/{n}")
    points = sorted(otel.metric_points("upstream_ops.upstream.errors"), key=lambda p: len(p[0]))
    assert points == [
        ({"upstream.platform": "rix", "upstream.kind": "request_error"}, 3),
        (
            {
                "upstream.platform": "rix",
                "upstream.kind": "http_error",
                "upstream.error_class": "rate_limited",
                "http.response.status_code": 429,
            },
            3,
        ),
    ]


class GatedSink:
    """Waits for ``release`` before each write; refuses batches with a record of path /refused."""

    def __init__(self) -> None:
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, records: list[RequestRecord]) -> None:
        self.writing.set()
        assert self.release.wait(5)
        if any(record.path == "/refused" for record in records):
            raise OSError("disk full")


def test_records_counter_by_outcome_and_queue_gauge(otel: OTel) -> None:
    sink = GatedSink()
    dispatcher = Dispatcher(
        sink, queue_size=1, batch_size=1, write_attempts=1, meter_provider=otel.meter_provider
    )

    def submit(path: str) -> bool:
        return dispatcher.submit(RequestRecord(id=path, request_id=path, path=path))

    def queued() -> Any:
        return otel.metric_points("upstream_ops.dispatcher.queued")[0][1]

    try:
        sink.release.set()
        for path in ("/a", "/refused", "/b"):
            assert submit(path) and dispatcher.flush(5)
        sink.release.clear()
        sink.writing.clear()
        assert submit("/c") and sink.writing.wait(5)  # the worker holds /c ...
        assert submit("/d")  # ... /d fills the queue ...
        assert not submit("/e")  # ... and /e is dropped
        assert queued() == 2
        sink.release.set()
        assert dispatcher.flush(5)
    finally:
        sink.release.set()
        dispatcher.close(5)
    outcomes = {p[0]["outcome"]: p[1] for p in otel.metric_points("upstream_ops.records")}
    assert outcomes == {"written": 4, "failed": 1, "dropped": 1}
    assert set(outcomes) <= set(OUTCOMES)
    assert queued() == 0


# -- the no-op fast path ----------------------------------------------------------------------


def test_without_sdk_the_middleware_skips_all_telemetry_work() -> None:
    telemetry = ServerTelemetry()  # global providers: unset in this process

    def describe(_: object) -> Any:
        raise AssertionError("no span is started, so the request is never described")

    collector = Collector("r")
    assert telemetry.start(collector, describe, None) is None
    assert collector.listeners == []


def test_explicit_noop_provider_is_the_fast_path() -> None:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    telemetry = ServerTelemetry(
        tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider()
    )
    assert telemetry.start(Collector("r"), lambda _: None, None) is None  # type: ignore[arg-type, return-value]


def test_global_providers_set_later_are_picked_up() -> None:
    out = run_python(
        """
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        from upstream_ops.telemetry._providers import ProviderLiveness

        live = ProviderLiveness(None, None)
        before = (live.tracing, live.metrics)
        trace.set_tracer_provider(TracerProvider())
        metrics.set_meter_provider(MeterProvider())
        live.refresh()  # the middleware does this on each request while live.unset
        print(before, (live.tracing, live.metrics, live.unset))
        """
    )
    assert out.strip() == "(False, False) (True, True, False)"


# -- configure() ------------------------------------------------------------------------------


def test_configure_sets_global_providers_from_arguments_and_environment() -> None:
    out = run_python(
        """
        from opentelemetry import metrics, trace
        from upstream_ops.telemetry import configure

        providers = configure(service_name="listing-images", endpoint="http://127.0.0.1:9/")
        assert trace.get_tracer_provider() is providers.tracer_provider
        assert metrics.get_meter_provider() is providers.meter_provider
        resource = providers.tracer_provider.resource.attributes
        [processor] = providers.tracer_provider._active_span_processor._span_processors
        print(resource["service.name"], resource["deployment.environment"])
        print(processor._batch_processor._exporter._endpoint)
        again = configure(service_name="other")
        print(again.tracer_provider, again.meter_provider)
        """,
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
    )
    assert out.splitlines() == [
        "listing-images test",
        "http://127.0.0.1:9/v1/traces",
        "None None",  # a second call keeps the providers already set
    ]


def test_configure_honours_exporter_none_and_sdk_disabled() -> None:
    out = run_python(
        """
        import os
        from upstream_ops.telemetry import configure

        p = configure(service_name="s")
        print(p.tracer_provider is not None, p.meter_provider is None)
        """,
        OTEL_METRICS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert out.strip() == "True True"
    out = run_python(
        """
        from upstream_ops.telemetry import configure
        print(configure(service_name="s"))
        """,
        OTEL_SDK_DISABLED="true",
    )
    assert out.strip() == "TelemetryProviders(tracer_provider=None, meter_provider=None)"


def test_configure_leaves_a_user_configured_sdk_alone(caplog: pytest.LogCaptureFixture) -> None:
    out = run_python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from upstream_ops.telemetry import configure

        mine = TracerProvider()
        trace.set_tracer_provider(mine)
        p = configure(service_name="s", endpoint="http://127.0.0.1:9")
        print(p.tracer_provider is None, trace.get_tracer_provider() is mine)
        p.shutdown()
        """
    )
    assert out.strip() == "True True"


# -- planted secrets ----------------------------------------------------------------------------


async def test_a_planted_secret_never_reaches_a_span_an_event_or_a_metric(otel: OTel) -> None:
    sink = MemorySink()
    app = FastAPI(telemetry={"tracing": False})
    app.add_middleware(UpstreamOpsMiddleware, sink=sink, **otel.providers)

    @app.get("/items/{item}")
    async def item(item: str) -> JSONResponse:
        append_upstream_error(
            platform=f"rix token={SECRET}",
            kind="http_error",
            upstream_status_code=401,
            upstream_request_id=f"api_key={SECRET}",
            message=f"invalid key {SECRET} (Authorization: Bearer {SECRET})",
            detail=f'{{"password": "{SECRET}"}}',
            upstream_url=f"https://user:{SECRET}@rix.example/v1?key={SECRET}&x=1",
            error_type=f"auth {SECRET}",
            error_class=f"auth {SECRET}",
            model=SECRET,
            account_name=f"secret={SECRET}",
        )
        if item == "boom":
            raise RuntimeError(f"upstream said {SECRET}")
        return JSONResponse({"ok": False}, status_code=502)

    async with client_for(app) as client:
        headers = {"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}"}
        await client.get(f"/items/{SECRET}?api_key={SECRET}", headers=headers)
        with pytest.raises(RuntimeError):
            await client.get(f"/items/boom?token={SECRET}", headers=headers)
    assert upstream_ops.flush(5)
    exported = otel.exported_text()
    assert "upstream.error" in exported and "[REDACTED]" in exported
    assert SECRET not in exported
    assert SECRET[8:20] not in exported  # not even a part of it
    assert len(otel.spans()) == 2


def test_the_request_telemetry_lets_go_of_the_collector_at_the_end(otel: OTel) -> None:
    """No reference cycle survives a request: the collector drops its telemetry listener."""
    telemetry = ServerTelemetry(meter_provider=otel.meter_provider, create_server_span=False)
    collector = Collector("r")
    request = telemetry.start(collector, lambda _: None, None)  # type: ignore[arg-type, return-value]
    assert request is not None and collector.listeners == [request.on_event]
    request.end(status_code=200, route=None, error=None)
    assert collector.listeners == []
