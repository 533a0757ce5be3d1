"""record_retry, record_retry_exhausted, record_failover: the caller's decisions as events."""

from __future__ import annotations

import logging

import httpx
import pytest

from upstream_ops import (
    record_failover,
    record_retry,
    record_retry_exhausted,
    upstream,
)
from upstream_ops.httpx import UpstreamOpsTransport
from upstream_ops.testing import FaultInjectionTransport, collecting, rate_limited

from .capture_helpers import stable


def test_outside_a_request_they_do_nothing() -> None:
    assert record_retry("x") is None
    assert record_retry_exhausted(attempts=3) is None
    assert record_failover(from_account=1, to_account=2) is None


def test_a_retry_loop_with_capture_reads_as_a_story() -> None:
    transport = FaultInjectionTransport(faults=[rate_limited(retry_after=2, times=2)])
    client = httpx.Client(transport=UpstreamOpsTransport(transport, platform="openai"))
    with collecting() as collector, upstream(account_id=1, model="gpt-4o"):
        for attempt in range(1, 3):
            response = client.get("https://api.example/v1/chat")
            if attempt < 2:
                record_retry(f"HTTP {response.status_code}", status_code=429, wait_ms=2000)
        record_retry_exhausted(attempts=2, reason="still rate limited", status_code=429)
    assert [
        {k: v for k, v in e.items() if k not in ("detail", "upstream_url", "method")}
        for e in stable(collector.events)
    ] == [
        {
            "platform": "openai",
            "account_id": 1,
            "upstream_status_code": 429,
            "upstream_request_id": "fault-1",
            "kind": "http_error",
            "message": "Rate limit reached for requests",
            "model": "gpt-4o",
            "attempt": 1,
            "error_class": "rate_limited",
            "error_type": "429",
            "retryable": True,
            "retry_after_ms": 2000,
            "provider_error_type": "requests",
            "provider_error_code": "rate_limit_exceeded",
        },
        {
            "account_id": 1,
            "upstream_status_code": 429,
            "kind": "retry",
            "message": "HTTP 429",
            "model": "gpt-4o",
            "attempt": 1,
            "error_class": "rate_limited",
            "error_type": "429",
            "retryable": True,
            "retry_after_ms": 2000,
        },
        {
            "platform": "openai",
            "account_id": 1,
            "upstream_status_code": 429,
            "upstream_request_id": "fault-2",
            "kind": "http_error",
            "message": "Rate limit reached for requests",
            "model": "gpt-4o",
            "attempt": 2,
            "error_class": "rate_limited",
            "error_type": "429",
            "retryable": True,
            "retry_after_ms": 2000,
            "provider_error_type": "requests",
            "provider_error_code": "rate_limit_exceeded",
        },
        {
            "account_id": 1,
            "upstream_status_code": 429,
            "kind": "retry_exhausted",
            "message": "gave up after 2 attempts: still rate limited",
            "model": "gpt-4o",
            "attempt": 2,
            "error_class": "rate_limited",
            "error_type": "429",
            "retryable": True,
        },
    ]


def test_errors_give_class_type_status_and_detail() -> None:
    request = httpx.Request("GET", "https://api.example/")
    status_error = httpx.HTTPStatusError(
        "Server error '503 Service Unavailable'",
        request=request,
        response=httpx.Response(503, request=request),
    )
    with collecting():
        timeout = record_retry(error=httpx.ReadTimeout("timed out"), wait_ms=250)
        from_status = record_retry("backing off", error=status_error)
    assert timeout is not None and from_status is not None
    assert (timeout.kind, timeout.message, timeout.error_class, timeout.error_type) == (
        "retry",
        "retrying",
        "connection_read_timeout",
        "httpx.ReadTimeout",
    )
    assert (timeout.retryable, timeout.retry_after_ms, timeout.detail) == (
        True,
        250,
        "httpx.ReadTimeout: timed out",
    )
    assert timeout.attempt == 0  # no attempt went through a capture integration
    assert (from_status.upstream_status_code, from_status.error_class) == (503, "overloaded")


def test_failover_names_both_accounts_by_id_or_name() -> None:
    with collecting(), upstream(platform="rix", account_id=5):
        by_id = record_failover(from_account=1, to_account=2, reason="HTTP 504")
        by_digits = record_failover(from_account="3", to_account="4")
        by_name = record_failover(from_account="primary", to_account="backup", status_code=429)
    assert by_id is not None and by_digits is not None and by_name is not None
    assert (by_id.kind, by_id.account_id, by_id.platform, by_id.message) == (
        "failover",
        1,
        "rix",
        "failover from account 1 to account 2: HTTP 504",
    )
    assert by_digits.account_id == 3
    assert (by_name.account_id, by_name.account_name, by_name.upstream_status_code) == (
        5,  # the block's account: the name did not say which id
        "primary",
        429,
    )


def test_explicit_labels_win_over_the_block() -> None:
    with collecting(), upstream(platform="a", model="m"):
        event = record_retry("x", platform="b", account_id="12", account_name="n")
    assert event is not None
    assert (event.platform, event.account_id, event.account_name, event.model) == (
        "b",
        12,
        "n",
        "m",
    )


def test_they_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    class Hostile(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no string for you")

    with collecting(), caplog.at_level(logging.WARNING, "upstream_ops"):
        event = record_retry(error=Hostile(), wait_ms="soon")  # type: ignore[arg-type]
        assert event is None
        quiet = record_retry_exhausted(attempts=1, error=Hostile())
    assert quiet is not None and quiet.detail.endswith("Hostile")
    assert "could not record a retry event" in caplog.text
