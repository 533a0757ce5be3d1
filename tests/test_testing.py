"""upstream_ops.testing: fault injection for httpx clients, as a user testing their error handling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from upstream_ops import current_collector
from upstream_ops.envelopes import parse_error_body
from upstream_ops.testing import (
    Fault,
    FaultInjectionTransport,
    broken_stream,
    collecting,
    connect_error,
    gateway_timeout,
    http_error,
    overloaded,
    rate_limited,
    service_unavailable,
    timeout,
)

from .conftest import serve_asgi
from .upstream_servers import misbehaving_upstream


@pytest.fixture(scope="module")
def up() -> Iterator[str]:
    with serve_asgi(misbehaving_upstream()) as url:
        yield url


def client_with(*faults: Fault, seed: int = 0) -> httpx.Client:
    return httpx.Client(transport=FaultInjectionTransport(faults=faults, seed=seed))


@pytest.mark.parametrize(
    ("fault", "status", "provider", "headers"),
    [
        (
            rate_limited(retry_after=2.5),
            429,
            ("openai", "requests", "rate_limit_exceeded", ""),
            {"retry-after": "2.5", "retry-after-ms": "2500", "x-request-id": "fault-1"},
        ),
        (
            service_unavailable(),
            503,
            ("openai", "server_error", "", ""),
            {"x-request-id": "fault-1"},
        ),
        (
            gateway_timeout(),
            504,
            ("bkapi", "REQUEST_BACKEND_TIMEOUT", "1650401", "gateway"),
            {"x-bkapi-error-code": "1650401", "x-bkapi-request-id": "fault-1"},
        ),
        (
            overloaded(),
            529,
            ("anthropic", "overloaded_error", "", ""),
            {"request-id": "fault-1"},
        ),
        (
            http_error(418, "I'm a teapot", {"x-extra": "1"}),
            418,
            ("text", "", "", ""),
            {"x-extra": "1", "x-request-id": "fault-1"},
        ),
    ],
    ids=["429", "503", "504", "529", "custom"],
)
def test_status_faults_answer_like_the_real_upstreams(
    fault: Fault, status: int, provider: tuple[str, str, str, str], headers: dict[str, str]
) -> None:
    with client_with(fault) as client:
        response = client.get("https://api.example/v1")
    assert response.status_code == status
    for name, value in headers.items():
        assert response.headers[name] == value
    found = parse_error_body(response.content, response.headers["content-type"], response.headers)
    assert found is not None
    assert (found.format, found.type, found.code, found.origin) == provider


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (connect_error(), httpx.ConnectError),
        (timeout(), httpx.ReadTimeout),
        (timeout("connect"), httpx.ConnectTimeout),
        (timeout("write"), httpx.WriteTimeout),
        (timeout("pool"), httpx.PoolTimeout),
    ],
)
def test_error_faults_raise_at_once(fault: Fault, error: type[Exception]) -> None:
    started = time.perf_counter()
    with client_with(fault) as client, pytest.raises(error) as raised:
        client.get("https://api.example/v1")
    assert time.perf_counter() - started < 0.5  # no sleeping unless asked
    assert isinstance(raised.value, httpx.RequestError)
    assert raised.value.request.url == "https://api.example/v1"


def test_delay_s_really_waits_sync_and_async() -> None:
    with client_with(timeout(delay_s=0.2)) as client:
        started = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            client.get("https://api.example/")
        assert time.perf_counter() - started >= 0.2

    async def main() -> float:
        transport = FaultInjectionTransport(faults=[service_unavailable(delay_s=0.2)])
        async with httpx.AsyncClient(transport=transport) as client:
            started = time.perf_counter()
            assert (await client.get("https://api.example/")).status_code == 503
            return time.perf_counter() - started

    assert asyncio.run(main()) >= 0.2


def test_without_a_transport_unhit_requests_get_200() -> None:
    with client_with() as client:
        response = client.get("https://api.example/")
    assert (response.status_code, response.json()) == (200, {"ok": True})


def test_rules_times_match_and_order() -> None:
    faults = (
        connect_error(match=lambda r: r.url.host == "down.example"),
        rate_limited(times=2),
        service_unavailable(times=1),
    )
    transport = FaultInjectionTransport(faults=faults)
    with httpx.Client(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            client.get("https://down.example/")
        statuses = [client.get("https://api.example/").status_code for _ in range(4)]
    assert statuses == [429, 429, 503, 200]
    assert transport.counts == {"connect_error": 1, "rate_limited": 2, "service_unavailable": 1}


def test_probabilities_are_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[int]:
        with client_with(service_unavailable(probability=0.3), seed=seed) as client:
            return [client.get("https://api.example/").status_code for _ in range(40)]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert 4 <= first.count(503) <= 20


def test_broken_stream_passes_the_request_through_and_breaks_the_body(up: str) -> None:
    transport = FaultInjectionTransport(httpx.HTTPTransport(), faults=[broken_stream(10)])
    with (
        httpx.Client(transport=transport) as client,
        client.stream("GET", f"{up}/sse/ok") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = b""
        with pytest.raises(httpx.RemoteProtocolError, match="received 10 bytes"):
            for chunk in response.iter_raw():
                received += chunk
    assert received == b'data: {"ch'


def test_broken_stream_async_and_on_the_default_answer() -> None:
    async def main() -> bytes:
        transport = FaultInjectionTransport(faults=[broken_stream(after_bytes=3)])
        received = b""
        async with (
            httpx.AsyncClient(transport=transport) as client,
            client.stream("GET", "https://api.example/") as response,
        ):
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_raw():
                    received += chunk
        return received

    assert asyncio.run(main()) == b'{"o'


def test_it_wraps_a_real_async_transport(up: str) -> None:
    async def main() -> list[int]:
        transport = FaultInjectionTransport(
            httpx.AsyncHTTPTransport(), faults=[overloaded(times=1)]
        )
        async with httpx.AsyncClient(transport=transport) as client:
            return [(await client.get(f"{up}/ok")).status_code for _ in range(2)]

    assert asyncio.run(main()) == [529, 200]


def test_transport_kind_mismatch_and_bad_faults_are_clear_errors() -> None:
    transport = FaultInjectionTransport(httpx.AsyncHTTPTransport())
    with httpx.Client(transport=transport) as client, pytest.raises(TypeError, match="sync"):
        client.get("https://api.example/")
    with pytest.raises(TypeError, match="Fault"):
        FaultInjectionTransport(faults=["429"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="after_bytes"):
        broken_stream(-1)


def test_collecting_makes_a_collector_current_for_the_block() -> None:
    assert current_collector() is None
    with collecting("t-1", max_events=2) as collector:
        assert current_collector() is collector and collector.request_id == "t-1"
    assert current_collector() is None
