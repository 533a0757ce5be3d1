"""CLIENT spans per upstream attempt (``telemetry/_client.py``), driven as a capture transport does."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_http_instrumentation_enabled
from opentelemetry.trace import SpanKind, StatusCode

from upstream_ops import Collector
from upstream_ops.telemetry import _providers
from upstream_ops.telemetry._client import ClientTelemetry
from upstream_ops.telemetry._providers import has_current_span

from .conftest import OTel
from .test_telemetry import run_python

SECRET = "sk-proj-PLANTEDclientSecret0123456789"


def test_one_client_span_per_attempt_child_of_the_current_span(otel: OTel) -> None:
    client = ClientTelemetry(otel.tracer_provider)
    collector = Collector("r")
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("POST /generate", kind=SpanKind.SERVER) as server:
        for status in (503, 200):
            headers: dict[str, str] = {}
            span = client.start(collector, "POST", "https://rix.example:8443/v1/images", headers)
            assert span is not None and span.owned
            assert not is_http_instrumentation_enabled()  # no second span below this one
            span.finish(status_code=status)
            assert is_http_instrumentation_enabled()
            ids = span.span.get_span_context()
            flags = int(ids.trace_flags)
            assert (
                headers["traceparent"] == f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{flags:02x}"
            )
    first, second = otel.spans()[:2]
    assert (first.name, first.kind) == ("POST", SpanKind.CLIENT)
    assert first.parent.span_id == server.get_span_context().span_id
    assert dict(first.attributes) == {
        "http.request.method": "POST",
        "url.full": "https://rix.example:8443/v1/images",
        "server.address": "rix.example",
        "server.port": 8443,
        "http.response.status_code": 503,
        "error.type": "503",
    }
    assert first.status.status_code is StatusCode.ERROR
    # The retry to the same method and URL is a resend.
    assert second.attributes["http.request.resend_count"] == 1
    assert second.status.status_code is StatusCode.UNSET
    assert "error.type" not in second.attributes


def test_resend_count_is_per_method_and_url(otel: OTel) -> None:
    client = ClientTelemetry(otel.tracer_provider)
    collector = Collector("r")
    for method, url in [
        ("POST", "https://a.example/x"),
        ("POST", "https://b.example/x"),  # failover: not a resend
        ("GET", "https://a.example/x"),
        ("POST", "https://a.example/x"),
        ("POST", "https://a.example/x"),
    ]:
        span = client.start(collector, method, url, {})
        assert span is not None
        span.finish(status_code=200)
    counts = [s.attributes.get("http.request.resend_count") for s in otel.spans()]
    assert counts == [None, None, None, 1, 2]


def test_transport_error_marks_the_span(otel: OTel) -> None:
    client = ClientTelemetry(otel.tracer_provider)
    span = client.start(Collector("r"), "GET", "http://127.0.0.1:9/", {})
    assert span is not None
    span.finish(error=httpx.ConnectError(f"refused, key={SECRET}"))
    [exported] = otel.spans()
    assert exported.attributes["error.type"] == "httpx.ConnectError"
    assert exported.status.status_code is StatusCode.ERROR
    assert exported.status.description is None
    assert SECRET not in otel.exported_text()


def test_url_credentials_and_secret_query_values_are_redacted(otel: OTel) -> None:
    client = ClientTelemetry(otel.tracer_provider)
    url = f"https://user:{SECRET}@rix.example/v1?api_key={SECRET}&n=1"
    span = client.start(Collector("r"), "GET", url, {})
    assert span is not None
    span.finish(status_code=401)
    [exported] = otel.spans()
    assert (
        exported.attributes["url.full"]
        == "https://[REDACTED]@rix.example/v1?api_key=[REDACTED]&n=1"
    )
    assert SECRET not in otel.exported_text()


def test_the_instrumentations_client_span_is_enriched_not_doubled(otel: OTel) -> None:
    client = ClientTelemetry(otel.tracer_provider)
    collector = Collector("r")
    tracer = otel.tracer_provider.get_tracer("opentelemetry.instrumentation.httpx")
    url = f"https://rix.example/v1?key={SECRET}"
    for _ in range(2):
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as theirs:
            theirs.set_attribute("url.full", url)  # as the instrumentation sets it: unredacted
            span = client.start(collector, "GET", url, {})
            assert span is not None and not span.owned and span.span is theirs
            span.finish(status_code=500)  # their status rules apply; nothing ends twice
    first, second = otel.spans()
    assert first.attributes["url.full"] == "https://rix.example/v1?key=[REDACTED]"
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert first.status.status_code is StatusCode.UNSET


def test_without_sdk_no_span_and_no_header() -> None:
    client = ClientTelemetry()
    collector = Collector("r")
    headers: dict[str, str] = {}
    assert client.start(collector, "GET", "https://rix.example/", headers) is None
    assert headers == {}
    assert collector.count_send("GET", "https://rix.example/") == 0  # nothing was counted either


@pytest.mark.parametrize("url", ["http://[::1", "http://host:notaport/"])
def test_a_url_that_does_not_parse_never_raises(otel: OTel, url: str) -> None:
    client = ClientTelemetry(otel.tracer_provider)
    span = client.start(Collector("r"), "GET", url, {})
    if span is not None:
        span.finish(status_code=200)


def test_the_current_span_is_read_from_the_context_directly_and_agrees_with_the_api(
    otel: OTel,
) -> None:
    # The shortcut that answers "no span is current" in one lookup is in use with this API version.
    assert _providers._CONTEXT_VAR is not None
    assert _providers._CONTEXT_VAR.get().get(_providers._SPAN_KEY) is None
    assert not has_current_span()
    assert trace.get_current_span() is trace.INVALID_SPAN
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        assert _providers._CONTEXT_VAR.get().get(_providers._SPAN_KEY) is outer
        assert has_current_span()
        assert _providers.get_context() is not _providers.EMPTY_CONTEXT


def test_the_empty_context_is_told_apart_from_one_attached_without_a_span() -> None:
    # The adapters skip OpenTelemetry while get_context() is the variable's empty default.
    assert _providers.get_context() is _providers.EMPTY_CONTEXT
    token = otel_context.attach(otel_context.set_value("other", 1))
    try:
        assert _providers.get_context() is not _providers.EMPTY_CONTEXT
        assert not has_current_span()
        assert trace.get_current_span() is trace.INVALID_SPAN
    finally:
        otel_context.detach(token)
    assert _providers.get_context() is _providers.EMPTY_CONTEXT


def test_a_global_tracer_provider_set_later_is_picked_up_and_then_not_looked_for() -> None:
    out = run_python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from upstream_ops import Collector
        from upstream_ops.telemetry._client import ClientTelemetry

        client = ClientTelemetry()
        before = client.start(Collector("r"), "GET", "https://rix.example/", {})
        trace.set_tracer_provider(TracerProvider())
        span = client.start(Collector("r"), "GET", "https://rix.example/", {})
        span.finish(status_code=200)
        print(before, span.owned, client._live.unset)
        """
    )
    assert out.strip() == "None True False"
