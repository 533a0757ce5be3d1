"""upstream_ops.tenacity: retry and retry_exhausted events from tenacity, its behaviour unchanged."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from tenacity import (
    AsyncRetrying,
    RetryError,
    Retrying,
    retry,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    wait_fixed,
)

from upstream_ops import upstream
from upstream_ops.httpx import AsyncUpstreamOpsTransport, UpstreamOpsTransport
from upstream_ops.tenacity import record_before_sleep, record_retry_error
from upstream_ops.testing import FaultInjectionTransport, collecting, connect_error, overloaded

from .capture_helpers import stable

CALLBACKS = {"before_sleep": record_before_sleep, "retry_error_callback": record_retry_error}


def test_retries_then_success_records_each_failure_and_each_retry() -> None:
    faults = FaultInjectionTransport(faults=[overloaded(times=2)])
    client = httpx.Client(transport=UpstreamOpsTransport(faults))

    @retry(
        stop=stop_after_attempt(3),
        wait=wait_fixed(0),
        retry=retry_if_exception_type(httpx.HTTPStatusError),
        **CALLBACKS,
    )
    def generate() -> int:
        return (
            client.get("https://api.anthropic.example/v1/messages").raise_for_status().status_code
        )

    with collecting() as collector, upstream(platform="anthropic", account_id=4):
        assert generate() == 200
    events = stable(collector.events, "https://api.anthropic.example")
    assert [(e["kind"], e["attempt"], e.get("upstream_status_code")) for e in events] == [
        ("http_error", 1, 529),
        ("retry", 1, 529),
        ("http_error", 2, 529),
        ("retry", 2, 529),
    ]
    assert events[1] == {
        "platform": "anthropic",
        "account_id": 4,
        "upstream_status_code": 529,
        "kind": "retry",
        "message": "attempt 1 of test_retries_then_success_records_each_failure_and_each_retry."
        "<locals>.generate() raised HTTPStatusError, retrying in 0.00 s",
        "detail": "httpx.HTTPStatusError: Server error '529 ' for url "
        "'https://api.anthropic.example/v1/messages'\nFor more information check: "
        "https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/529",
        "attempt": 1,
        "error_class": "overloaded",
        "error_type": "529",
        "retryable": True,
    }


def test_exhausted_records_and_raises_what_tenacity_raises() -> None:
    def failing() -> None:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with pytest.raises(RetryError) as plain:
        Retrying(stop=stop_after_attempt(2), wait=wait_fixed(0))(failing)
    with collecting() as collector, pytest.raises(RetryError) as recorded:
        Retrying(stop=stop_after_attempt(2), wait=wait_fixed(0), **CALLBACKS)(failing)
    assert type(recorded.value.last_attempt.exception()) is type(
        plain.value.last_attempt.exception()
    )
    assert isinstance(recorded.value.__cause__, httpx.ConnectError)
    retry_event, exhausted = collector.events
    assert (retry_event.kind, retry_event.error_class) == ("retry", "connection_refused")
    assert (exhausted.kind, exhausted.message, exhausted.error_type) == (
        "retry_exhausted",
        "gave up after 2 attempts: test_exhausted_records_and_raises_what_tenacity_raises."
        "<locals>.failing() raised ConnectError",
        "httpx.ConnectError",
    )


def test_reraise_true_raises_the_last_exception_itself() -> None:
    boom = ValueError("boom")

    def failing() -> None:
        raise boom

    with collecting() as collector, pytest.raises(ValueError) as raised:
        Retrying(stop=stop_after_attempt(1), reraise=True, **CALLBACKS)(failing)
    assert raised.value is boom
    assert [e.kind for e in collector.events] == ["retry_exhausted"]


def test_async_with_capture_and_retry_on_result() -> None:
    faults = FaultInjectionTransport(faults=[connect_error(times=1), overloaded()])
    client = httpx.AsyncClient(transport=AsyncUpstreamOpsTransport(faults))

    async def main() -> list[tuple[str, int, int]]:
        with collecting() as collector, pytest.raises(RetryError):
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(3),
                wait=wait_fixed(0),
                retry=retry_if_exception_type(httpx.ConnectError)
                | retry_if_result(lambda r: r.status_code >= 500),
                **CALLBACKS,
            ):
                with attempt:
                    response = await client.get("https://api.example/")
                if not attempt.retry_state.outcome.failed:  # type: ignore[union-attr]
                    attempt.retry_state.set_result(response)
        await client.aclose()
        return [(e.kind, e.attempt, e.upstream_status_code) for e in collector.events]

    assert asyncio.run(main()) == [
        ("request_error", 1, 0),
        ("retry", 1, 0),
        ("http_error", 2, 529),
        ("retry", 2, 529),
        ("http_error", 3, 529),
        ("retry_exhausted", 3, 529),
    ]


def test_outside_a_request_tenacity_behaves_as_usual() -> None:
    calls = []

    @retry(stop=stop_after_attempt(2), wait=wait_fixed(0), **CALLBACKS)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise RuntimeError("first")
        return "ok"

    assert flaky() == "ok" and len(calls) == 2
