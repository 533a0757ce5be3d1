"""upstream_ops.requests: a real requests Session against real servers on 127.0.0.1, exact events."""

from __future__ import annotations

import gc
import pickle
import weakref
from collections.abc import Iterator

import pytest
import requests
from urllib3.util.retry import Retry

from upstream_ops import record_failover, suppress_capture, upstream
from upstream_ops.requests import UpstreamOpsAdapter
from upstream_ops.sanitize import sanitize_detail
from upstream_ops.testing import collecting

from .capture_helpers import assert_no_secrets, stable
from .conftest import serve_asgi
from .upstream_servers import (
    ENVELOPES,
    PASSWORD,
    SECRET,
    body_dropping_server,
    misbehaving_upstream,
    refused_url,
)


@pytest.fixture(scope="module")
def up() -> Iterator[str]:
    with serve_asgi(misbehaving_upstream()) as url:
        yield url


@pytest.fixture(scope="module")
def dropping() -> Iterator[str]:
    with body_dropping_server() as url:
        yield url


def session(adapter: UpstreamOpsAdapter | None = None, **labels: str) -> requests.Session:
    s = requests.Session()
    adapter = adapter or UpstreamOpsAdapter(**labels)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


def no_wait(**options: object) -> Retry:
    return Retry(backoff_factor=0, respect_retry_after_header=False, **options)  # type: ignore[arg-type]


def test_failover_loop_records_each_failed_attempt_with_its_labels(up: str) -> None:
    accounts = [(1, "primary"), (2, "backup"), (3, "spare")]
    with session(platform="dify") as s, collecting() as collector:
        for index, (account_id, name) in enumerate(accounts):
            with upstream(account_id=account_id, account_name=name):
                response = s.post(f"{up}/by-account?account={account_id}", json={"q": 1})
                if response.ok:
                    break
                record_failover(from_account=account_id, to_account=accounts[index + 1][0])
    assert response.json() == {"ok": True}
    assert stable(collector.events, up) == [
        {
            "platform": "dify",
            "account_id": 1,
            "upstream_status_code": 429,
            "upstream_request_id": "acct-1",
            "kind": "http_error",
            "message": "Rate limit reached",
            "detail": '{"error":{"message":"Rate limit reached","type":"requests"}}',
            "account_name": "primary",
            "method": "POST",
            "upstream_url": "{up}/by-account?account=1",
            "attempt": 1,
            "error_class": "rate_limited",
            "error_type": "429",
            "retryable": True,
            "retry_after_ms": 2000,
            "provider_error_type": "requests",
        },
        {
            "account_id": 1,
            "kind": "failover",
            "message": "failover from account 1 to account 2",
            "account_name": "primary",
            "attempt": 1,
        },
        {
            "platform": "dify",
            "account_id": 2,
            "upstream_status_code": 529,
            "upstream_request_id": "acct-2",
            "kind": "http_error",
            "message": "Overloaded",
            "detail": '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            "account_name": "backup",
            "method": "POST",
            "upstream_url": "{up}/by-account?account=2",
            "attempt": 2,
            "error_class": "overloaded",
            "error_type": "529",
            "retryable": True,
            "provider_error_type": "overloaded_error",
        },
        {
            "account_id": 2,
            "kind": "failover",
            "message": "failover from account 2 to account 3",
            "account_name": "backup",
            "attempt": 2,
        },
    ]
    assert collector.attempts == 3


def test_each_urllib3_retry_is_an_attempt(up: str) -> None:
    adapter = UpstreamOpsAdapter(max_retries=no_wait(total=3, status_forcelist=[503]))
    with session(adapter) as s, collecting() as collector:
        response = s.get(f"{up}/flaky/urllib3?fail=2")
    assert response.json() == {"ok": True, "call": 3}
    assert stable(collector.events, up) == [
        {
            "upstream_status_code": 503,
            "upstream_request_id": f"urllib3-{n}",
            "kind": "http_error",
            "message": f"call {n} failed",
            "detail": f'{{"error":{{"message":"call {n} failed","type":"server_error"}}}}',
            "method": "GET",
            "upstream_url": "{up}/flaky/urllib3?fail=2",
            "attempt": n,
            "error_class": "overloaded",
            "error_type": "503",
            "retryable": True,
            "provider_error_type": "server_error",
        }
        for n in (1, 2)
    ]
    assert collector.attempts == 3


def test_exhausted_status_retries_record_every_try_once(up: str) -> None:
    adapter = UpstreamOpsAdapter(max_retries=no_wait(total=2, status_forcelist=[503]))
    with session(adapter) as s, collecting() as collector:
        with pytest.raises(requests.exceptions.RetryError):
            s.get(f"{up}/flaky/exhausted?fail=9")
        adapter.max_retries = no_wait(total=1, status_forcelist=[503], raise_on_status=False)
        response = s.get(f"{up}/flaky/exhausted?fail=9")  # the last 503 goes back to the caller
        assert response.status_code == 503
    assert [
        (e.attempt, e.upstream_status_code, e.upstream_request_id) for e in collector.events
    ] == [
        (1, 503, "exhausted-1"),
        (2, 503, "exhausted-2"),
        (3, 503, "exhausted-3"),
        (4, 503, "exhausted-4"),
        (5, 503, "exhausted-5"),
    ]
    assert all(e.message.startswith("call ") for e in collector.events)


def test_connect_retries_and_the_final_error_as_the_caller_sees_it() -> None:
    dead = refused_url()
    adapter = UpstreamOpsAdapter(max_retries=no_wait(total=2, connect=2))
    with (
        session(adapter) as s,
        collecting() as collector,
        pytest.raises(requests.exceptions.ConnectionError),
    ):
        s.get(f"{dead}/v1")
    assert [
        (e.attempt, e.kind, e.error_class, e.phase, e.retryable, e.error_type)
        for e in collector.events
    ] == [
        (1, "request_error", "connection_refused", "connect", True, "urllib3.exceptions.NewConnectionError"),
        (2, "request_error", "connection_refused", "connect", True, "urllib3.exceptions.NewConnectionError"),
        (3, "request_error", "connection_refused", "connect", True, "requests.exceptions.ConnectionError"),
    ]  # fmt: skip


def test_default_adapter_refused_and_read_timeout(up: str) -> None:
    dead = refused_url()
    with session(platform="p") as s, collecting() as collector:
        with pytest.raises(requests.exceptions.ConnectionError):
            s.get(f"{dead}/v1")
        with pytest.raises(requests.exceptions.ReadTimeout):
            s.get(f"{up}/slow?s=2", timeout=0.2)
    refused, slow = collector.events
    assert (refused.error_class, refused.error_type, refused.platform) == (
        "connection_refused",
        "requests.exceptions.ConnectionError",
        "p",
    )
    assert (slow.error_class, slow.phase, slow.error_type) == (
        "connection_read_timeout",
        "awaiting_headers",
        "requests.exceptions.ReadTimeout",
    )


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_each_envelope(up: str, name: str) -> None:
    found = ENVELOPES[name]
    with session() as s, collecting() as collector:
        response = s.get(f"{up}/envelope/{name}")
    assert response.content == found.body
    [event] = collector.events
    assert (event.upstream_status_code, event.message) == (found.status, found.message)
    assert (event.provider_error_type, event.provider_error_code, event.origin) == (
        found.provider_type,
        found.provider_code,
        found.origin,
    )
    assert event.upstream_request_id == found.request_id
    if found.body and name != "garbage":
        assert event.detail == sanitize_detail(found.body.decode())


def test_body_cut_off_after_200(dropping: str) -> None:
    with requests.Session() as bare, pytest.raises(requests.exceptions.ChunkedEncodingError):
        bare.get(f"{dropping}/200")
    with (
        session() as s,
        collecting() as collector,
        pytest.raises(requests.exceptions.ChunkedEncodingError),
    ):
        s.get(f"{dropping}/200")
    [event] = collector.events
    assert (event.kind, event.upstream_status_code, event.error_class, event.phase) == (
        "stream_error",
        200,
        "http_response_incomplete",
        "body",
    )
    assert event.error_type == "requests.exceptions.ChunkedEncodingError"


def test_streamed_error_body_is_captured_as_read_and_recorded_on_close(up: str) -> None:
    with session() as s, collecting() as collector, s.get(f"{up}/big/500", stream=True) as response:
        first = next(response.iter_content(64))
        assert collector.events == []
    [event] = collector.events
    assert (event.upstream_status_code, event.detail) == (500, first.decode())


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the leak is the point
def test_unread_unclosed_error_response_is_recorded_when_collected(up: str) -> None:
    with session() as s, collecting() as collector:
        response = s.get(f"{up}/envelope/dify", stream=True)
        del response
        gc.collect()
        [event] = collector.events
    assert (event.upstream_status_code, event.detail) == (400, "")


def test_sse_error_in_a_200_stream_read_with_iter_lines(up: str) -> None:
    with (
        session() as s,
        collecting() as collector,
        s.get(f"{up}/sse/anthropic_error", stream=True) as response,
    ):
        lines = list(response.iter_lines(decode_unicode=True))
    assert "event: error" in lines
    [event] = collector.events
    assert (event.kind, event.provider_error_type, event.message) == (
        "stream_error",
        "overloaded_error",
        "Overloaded",
    )


def test_successes_record_nothing_and_suppression_and_no_request_do_nothing(up: str) -> None:
    with session() as s:
        assert s.get(f"{up}/envelope/openai").status_code == 429  # outside a request
        with collecting() as collector:
            assert s.get(f"{up}/ok").json() == {"ok": True}
            with suppress_capture():
                s.get(f"{up}/envelope/openai")
    assert collector.events == [] and collector.attempts == 1


class CountingRetry(Retry):
    """A user's own Retry class: its overrides must keep working under the recording mixin."""

    backoffs = 0

    def get_backoff_time(self) -> float:
        CountingRetry.backoffs += 1
        return 0.0


def test_a_custom_retry_class_keeps_working_and_the_adapter_pickles(up: str) -> None:
    adapter = UpstreamOpsAdapter(
        platform="x", max_retries=CountingRetry(total=2, status_forcelist=[503])
    )
    assert isinstance(adapter.max_retries, CountingRetry)
    with session(adapter) as s, collecting() as collector:
        assert s.get(f"{up}/flaky/custom?fail=1").status_code == 200
    assert CountingRetry.backoffs == 1
    assert [e.attempt for e in collector.events] == [1]

    restored = pickle.loads(pickle.dumps(session(adapter))).get_adapter(up)
    assert isinstance(restored, UpstreamOpsAdapter)
    assert isinstance(restored.max_retries, CountingRetry)
    assert restored.max_retries.total == 2 and restored.capture_options.labels.platform == "x"
    with session(restored) as s, collecting() as collector:
        s.get(f"{up}/flaky/pickled?fail=1")
    assert [(e.attempt, e.platform) for e in collector.events] == [(1, "x")]


def test_no_planted_secret_reaches_an_event(up: str) -> None:
    host = up.removeprefix("http://")
    dead = refused_url().removeprefix("http://")
    with session() as s, collecting() as collector:
        response = s.post(
            f"http://user:{PASSWORD}@{host}/echo?api_key={SECRET}&model=m",
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        assert SECRET in response.text
        with pytest.raises(requests.exceptions.ConnectionError):
            s.get(f"http://{dead}/v1?api_key={SECRET}&client_secret={PASSWORD}")
    assert [e.kind for e in collector.events] == ["http_error", "request_error"]
    assert_no_secrets(collector.events)


def test_a_tapped_response_is_freed_without_the_garbage_collector(up: str) -> None:
    with session() as s, collecting():
        response = s.get(f"{up}/envelope/openai")
        alive = weakref.ref(response)
        gc.disable()
        try:
            del response
            assert alive() is None  # no reference cycle keeps the body in memory
        finally:
            gc.enable()
