"""upstream_ops.httpx: real httpx clients against real servers on 127.0.0.1, exact events."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from upstream_ops import (
    UpstreamOpsMiddleware,
    flush,
    record_failover,
    suppress_capture,
    upstream,
)
from upstream_ops.collector import Collector, _activate, _deactivate
from upstream_ops.httpx import AsyncUpstreamOpsTransport, UpstreamOpsTransport, instrument_client
from upstream_ops.sanitize import sanitize_detail
from upstream_ops.sinks import MemorySink
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


def sync_client(**labels: str) -> httpx.Client:
    return httpx.Client(transport=UpstreamOpsTransport(**labels), timeout=5.0)


def async_client(**labels: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AsyncUpstreamOpsTransport(**labels), timeout=5.0)


# --- a failover loop, the way the issue shows it ------------------------------------------------


async def failover(client: httpx.AsyncClient, base: str) -> httpx.Response:
    accounts = [(1, "primary"), (2, "backup"), (3, "spare")]
    response = None
    for index, (account_id, name) in enumerate(accounts):
        with upstream(account_id=account_id, account_name=name, model="gpt-4o"):
            response = await client.post(f"{base}/by-account?account={account_id}", json={})
            if response.status_code < 400:
                return response
            if index + 1 < len(accounts):
                record_failover(
                    from_account=account_id,
                    to_account=accounts[index + 1][0],
                    reason=f"HTTP {response.status_code}",
                )
    assert response is not None
    return response


EXPECTED_FAILOVER = [
    {
        "platform": "openai",
        "account_id": 1,
        "upstream_status_code": 429,
        "upstream_request_id": "acct-1",
        "kind": "http_error",
        "message": "Rate limit reached",
        "detail": '{"error":{"message":"Rate limit reached","type":"requests"}}',
        "account_name": "primary",
        "model": "gpt-4o",
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
        "message": "failover from account 1 to account 2: HTTP 429",
        "account_name": "primary",
        "model": "gpt-4o",
        "attempt": 1,
    },
    {
        "platform": "openai",
        "account_id": 2,
        "upstream_status_code": 529,
        "upstream_request_id": "acct-2",
        "kind": "http_error",
        "message": "Overloaded",
        "detail": '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        "account_name": "backup",
        "model": "gpt-4o",
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
        "message": "failover from account 2 to account 3: HTTP 529",
        "account_name": "backup",
        "model": "gpt-4o",
        "attempt": 2,
    },
]


def test_failover_loop_records_each_failed_attempt_with_its_labels(up: str) -> None:
    async def main() -> Collector:
        async with async_client(platform="openai") as client:
            with collecting() as collector:
                response = await failover(client, up)
                assert response.status_code == 200 and response.json() == {"ok": True}
        return collector

    collector = asyncio.run(main())
    assert stable(collector.events, up) == EXPECTED_FAILOVER
    assert collector.attempts == 3  # the successful third attempt counts, and records nothing


def test_failover_behind_the_middleware_lands_in_one_recovered_record(up: str) -> None:
    sink = MemorySink()

    async def generate(request: Request) -> JSONResponse:
        async with async_client(platform="openai") as client:
            response = await failover(client, up)
        return JSONResponse(response.json())

    app = UpstreamOpsMiddleware(Starlette(routes=[Route("/generate", generate)]), sink=sink)
    with serve_asgi(app) as gateway:
        response = httpx.get(f"{gateway}/generate", headers={"X-Request-ID": "gw-1"})
        assert response.status_code == 200
        assert flush(timeout=5)
    [record] = sink.records
    assert (record.request_id, record.status_code, record.recovered) == ("gw-1", 200, True)
    assert stable(record.upstream_errors, up) == EXPECTED_FAILOVER


def test_attempts_are_numbered_across_retries_and_successes(up: str) -> None:
    dead = refused_url()
    with sync_client() as client, collecting() as collector:
        for _ in range(3):  # the caller's own retry loop: 503, 503, 200
            if client.get(f"{up}/flaky/retries?fail=2").status_code == 200:
                break
        assert client.get(f"{up}/ok").status_code == 200
        with pytest.raises(httpx.ConnectError):
            client.get(f"{dead}/v1")
    assert [(e.attempt, e.kind, e.upstream_status_code) for e in collector.events] == [
        (1, "http_error", 503),
        (2, "http_error", 503),
        (5, "request_error", 0),
    ]
    assert [e.upstream_request_id for e in collector.events[:2]] == ["retries-1", "retries-2"]
    assert collector.attempts == 5


# --- every envelope, through the transport --------------------------------------------------------

_CLASSES = {401: "auth", 403: "auth", 429: "rate_limited", 503: "overloaded", 529: "overloaded"}
_RETRY_AFTER = {"openai": 1500, "google": 7000, "plain_text": 3000}


def expected_envelope_event(name: str) -> dict[str, object]:
    found = ENVELOPES[name]
    status = found.status
    expected: dict[str, object] = {
        "upstream_status_code": status,
        "kind": "http_error",
        "message": found.message,
        "method": "GET",
        "upstream_url": f"{{up}}/envelope/{name}",
        "attempt": 1,
        "error_class": _CLASSES.get(status, "server_error" if status >= 500 else "client_error"),
        "error_type": str(status),
        "retryable": status in (408, 409, 429) or status >= 500,
    }
    if found.body:
        is_binary = name == "garbage"
        text = f"[{len(found.body)} bytes of binary data]" if is_binary else found.body.decode()
        expected["detail"] = sanitize_detail(text)
    for key, value in (
        ("upstream_request_id", found.request_id),
        ("retry_after_ms", _RETRY_AFTER.get(name, 0)),
        ("provider_error_type", found.provider_type),
        ("provider_error_code", found.provider_code),
        ("origin", found.origin),
    ):
        if value:
            expected[key] = value
    return expected


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_each_envelope_sync(up: str, name: str) -> None:
    with sync_client() as client, collecting() as collector:
        response = client.get(f"{up}/envelope/{name}")
    assert response.status_code == ENVELOPES[name].status
    assert response.content == ENVELOPES[name].body  # the caller got the whole body
    assert stable(collector.events, up) == [expected_envelope_event(name)]


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_each_envelope_async(up: str, name: str) -> None:
    async def main() -> Collector:
        async with async_client() as client:
            with collecting() as collector:
                response = await client.get(f"{up}/envelope/{name}")
                assert response.content == ENVELOPES[name].body
        return collector

    assert stable(asyncio.run(main()).events, up) == [expected_envelope_event(name)]


# --- the caller sees exactly what it would see without capture -----------------------------------


def test_success_records_nothing_and_returns_the_same_response(up: str) -> None:
    with httpx.Client() as bare, sync_client() as wrapped, collecting() as collector:
        for path in ("/ok", "/sse/ok", "/envelope/openai"):
            plain, captured = bare.get(f"{up}{path}"), wrapped.get(f"{up}{path}")
            assert captured.status_code == plain.status_code
            assert captured.content == plain.content
            drop_date = [(k, v) for k, v in captured.headers.multi_items() if k != "date"]
            assert drop_date == [(k, v) for k, v in plain.headers.multi_items() if k != "date"]
            assert captured.http_version == plain.http_version
    assert [e.upstream_status_code for e in collector.events] == [429]


def test_the_transport_returns_the_inner_response_and_raises_the_inner_exception() -> None:
    boom = httpx.ConnectError("boom")
    inner_response = httpx.Response(204)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/fail":
            raise boom
        return inner_response

    transport = UpstreamOpsTransport(httpx.MockTransport(handler))
    request = httpx.Request("GET", "https://api.example/ok")
    with collecting() as collector:
        assert transport.handle_request(request) is inner_response
        with pytest.raises(httpx.ConnectError) as raised:
            transport.handle_request(httpx.Request("GET", "https://api.example/fail"))
    assert raised.value is boom
    assert [e.error_type for e in collector.events] == ["httpx.ConnectError"]


def test_exceptions_of_custom_transports_propagate_and_are_recorded() -> None:
    class Broken(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            raise ValueError("custom transport bug")

    with (
        httpx.Client(transport=UpstreamOpsTransport(Broken())) as client,
        collecting() as c,
        pytest.raises(ValueError, match="custom transport bug"),
    ):
        client.get("https://api.example/x")
    [event] = c.events
    assert (event.kind, event.error_type, event.message) == (
        "request_error",
        "ValueError",
        "custom transport bug",
    )


def test_connection_refused(up: str) -> None:
    dead = refused_url()
    with (
        sync_client(platform="rix") as client,
        collecting() as collector,
        pytest.raises(httpx.ConnectError),
    ):
        client.post(f"{dead}/v1/images")
    [event] = stable(collector.events, dead)
    assert event == {
        "platform": "rix",
        "kind": "request_error",
        "message": "[Errno 111] Connection refused",
        "method": "POST",
        "upstream_url": "{up}/v1/images",
        "attempt": 1,
        "error_class": "connection_refused",
        "error_type": "httpx.ConnectError",
        "phase": "connect",
        "retryable": True,
    }


def test_read_timeout(up: str) -> None:
    with (
        httpx.Client(transport=UpstreamOpsTransport(), timeout=0.2) as client,
        collecting() as collector,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.get(f"{up}/slow?s=2")
    [event] = collector.events
    assert (event.kind, event.error_class, event.phase, event.error_type, event.retryable) == (
        "request_error",
        "connection_read_timeout",
        "awaiting_headers",
        "httpx.ReadTimeout",
        True,
    )
    assert event.duration_ms >= 150


def test_cancelled_attempt_is_recorded_and_the_cancellation_propagates(up: str) -> None:
    async def main() -> Collector:
        async with async_client() as client:
            with collecting() as collector, pytest.raises(TimeoutError):
                await asyncio.wait_for(client.get(f"{up}/slow?s=2"), 0.2)
        return collector

    [event] = asyncio.run(main()).events
    assert (event.kind, event.error_class, event.error_type) == (
        "request_error",
        "request_cancelled",
        "asyncio.CancelledError",
    )


# --- bodies ----------------------------------------------------------------------------------------


def test_body_cut_off_after_200_is_a_stream_error_and_the_error_propagates(
    dropping: str,
) -> None:
    with httpx.Client() as bare, pytest.raises(httpx.RemoteProtocolError) as plain:
        bare.get(f"{dropping}/200")
    with (
        sync_client() as client,
        collecting() as collector,
        pytest.raises(httpx.RemoteProtocolError) as captured,
    ):
        client.get(f"{dropping}/200")
    assert str(captured.value) == str(plain.value)
    [event] = stable(collector.events, dropping)
    assert event == {
        "upstream_status_code": 200,
        "upstream_request_id": "drop-200",
        "kind": "stream_error",
        "message": str(plain.value),
        "method": "GET",
        "upstream_url": "{up}/200",
        "attempt": 1,
        "error_class": "http_response_incomplete",
        "error_type": "httpx.RemoteProtocolError",
        "phase": "body",
        "retryable": False,
    }


def test_body_cut_off_after_200_is_a_stream_error_async(dropping: str) -> None:
    async def main() -> tuple[Collector, str]:
        async with httpx.AsyncClient() as bare:
            with pytest.raises(httpx.RemoteProtocolError) as plain:
                await bare.get(f"{dropping}/200")
        async with async_client() as client:
            with collecting() as collector, pytest.raises(httpx.RemoteProtocolError) as captured:
                await client.get(f"{dropping}/200")
        assert str(captured.value) == str(plain.value)
        return collector, str(plain.value)

    collector, message = asyncio.run(main())
    [event] = collector.events
    assert (event.kind, event.upstream_status_code, event.phase, event.message) == (
        "stream_error",
        200,
        "body",
        message,
    )
    assert event.error_class == "http_response_incomplete"


def test_body_cut_off_after_an_error_status_is_that_http_error(dropping: str) -> None:
    async def main() -> Collector:
        async with async_client() as client:
            with collecting() as collector, pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"{dropping}/502")
        return collector

    [event] = asyncio.run(main()).events
    assert (event.kind, event.upstream_status_code, event.detail) == (
        "http_error",
        502,
        '{"error":{"message":',
    )
    assert event.upstream_request_id == "drop-502"


def test_a_huge_error_body_is_read_by_the_caller_but_kept_bounded(up: str) -> None:
    with sync_client() as client, collecting() as collector:
        response = client.get(f"{up}/big/500")
    assert len(response.content) > 10_000_000
    [event] = collector.events
    assert event.message == "huge failure page"  # salvaged from the 2 KiB head of cut JSON
    assert len(event.detail.encode()) <= 2048 + 64
    assert event.detail.startswith('{"error":{"message":"huge failure page"')


def test_a_streamed_error_body_is_captured_as_read_and_recorded_on_close(up: str) -> None:
    with (
        sync_client() as client,
        collecting() as collector,
        client.stream("GET", f"{up}/big/503") as response,
    ):
        first = next(response.iter_raw(100))
        assert collector.events == []  # nothing until the stream is closed
    [event] = collector.events
    # What httpx pulled off the connection for the caller (it reads in network-sized chunks),
    # starting with what the caller saw, and no more than the limit.
    assert event.upstream_status_code == 503 and event.message == "huge failure page"
    assert event.detail.startswith(first.decode()) and len(event.detail.encode()) <= 2048 + 64


def test_the_capture_never_reads_ahead_of_the_caller() -> None:
    pulled: list[int] = []

    class CountingStream(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            for i in range(100):
                pulled.append(i)
                yield b'{"error": "x"} ' * 10

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, stream=CountingStream())

    client = httpx.Client(transport=UpstreamOpsTransport(httpx.MockTransport(handler)))
    with collecting() as collector, client.stream("GET", "https://api.example/") as response:
        iterator = response.iter_raw()
        next(iterator)
        next(iterator)
    assert pulled == [0, 1]
    [event] = collector.events
    assert event.detail == sanitize_detail((b'{"error": "x"} ' * 20).decode())


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the leak is the point
def test_an_unclosed_streamed_error_is_recorded_when_collected(up: str) -> None:
    with sync_client() as client, collecting() as collector:
        response = client.send(client.build_request("GET", f"{up}/envelope/kimi"), stream=True)
        assert response.status_code == 401
        del response
        gc.collect()
        [event] = collector.events
    assert (event.upstream_status_code, event.message, event.detail) == (
        401,
        "401 Unauthorized",
        "",
    )


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        (
            "anthropic_error",
            {
                "message": "Overloaded",
                "provider_error_type": "overloaded_error",
                "error_type": "overloaded_error",
                "detail": '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            },
        ),
        (
            "openai_error",
            {
                "message": "The server had an error",
                "provider_error_type": "server_error",
                "provider_error_code": "500",
                "error_type": "server_error",
                "error_class": "server_error",
                "retryable": True,
                "detail": '{"error":{"message":"The server had an error","type":"server_error",'
                '"code":"500"}}',
            },
        ),
    ],
)
def test_an_error_event_inside_a_200_event_stream_is_a_stream_error(
    up: str, variant: str, expected: dict[str, object]
) -> None:
    async def main() -> tuple[Collector, list[str]]:
        async with async_client(platform="anthropic") as client:
            with collecting() as collector:
                async with client.stream("POST", f"{up}/sse/{variant}") as response:
                    lines = [line async for line in response.aiter_lines()]
        return collector, lines

    collector, lines = asyncio.run(main())
    assert any("error" in line for line in lines)  # the caller read the stream unchanged
    assert stable(collector.events, up) == [
        {
            "platform": "anthropic",
            "upstream_status_code": 200,
            "kind": "stream_error",
            "method": "POST",
            "upstream_url": f"{{up}}/sse/{variant}",
            "attempt": 1,
            "phase": "body",
            **expected,
        }
    ]


@pytest.mark.parametrize("variant", ["ok", "long_lines"])
def test_event_streams_without_errors_record_nothing(up: str, variant: str) -> None:
    with (
        sync_client() as client,
        collecting() as collector,
        client.stream("GET", f"{up}/sse/{variant}") as response,
    ):
        lines = list(response.iter_lines())
    assert "data: [DONE]" in lines
    assert collector.events == []


# --- wiring ----------------------------------------------------------------------------------------


def test_instrument_client_wraps_the_transport_and_every_mount_once(up: str) -> None:
    mounted = httpx.HTTPTransport()
    client = httpx.Client(mounts={"http://127.0.0.1": mounted, "all://nowhere.invalid": None})
    assert instrument_client(client, platform="dify") is client
    instrument_client(client, platform="ignored: already wrapped")
    transports = {str(p.pattern): t for p, t in client._mounts.items()}
    wrapped = transports["http://127.0.0.1"]
    assert isinstance(wrapped, UpstreamOpsTransport) and wrapped.transport is mounted
    assert transports["all://nowhere.invalid"] is None
    assert isinstance(client._transport, UpstreamOpsTransport)
    assert not isinstance(client._transport.transport, UpstreamOpsTransport)
    with client, collecting() as collector:
        client.get(f"{up}/envelope/dify")  # through the mount
    assert [(e.platform, e.provider_error_code) for e in collector.events] == [
        ("dify", "invalid_param")
    ]


def test_instrument_async_client(up: str) -> None:
    async def main() -> Collector:
        client = instrument_client(httpx.AsyncClient(), model="m1")
        assert isinstance(client._transport, AsyncUpstreamOpsTransport)
        async with client:
            with collecting() as collector:
                await client.get(f"{up}/envelope/google")
        return collector

    [event] = asyncio.run(main()).events
    assert (event.model, event.provider_error_type) == ("m1", "RESOURCE_EXHAUSTED")


def test_instrument_client_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match=r"httpx\.Client"):
        instrument_client(object())  # type: ignore[call-overload]


def test_block_labels_override_the_transport_defaults(up: str) -> None:
    with sync_client(platform="openai", model="default") as client, collecting() as collector:
        with upstream(platform="azure"):
            client.get(f"{up}/envelope/openai")
        client.get(f"{up}/envelope/openai")
    assert [(e.platform, e.model) for e in collector.events] == [
        ("azure", "default"),
        ("openai", "default"),
    ]


def test_labels_are_taken_when_the_attempt_starts(up: str) -> None:
    with sync_client() as client, collecting() as collector:
        with upstream(account_id=7):
            response = client.send(
                client.build_request("GET", f"{up}/envelope/openai"), stream=True
            )
        with upstream(account_id=8):
            response.read()
            response.close()
    assert [e.account_id for e in collector.events] == [7]


def test_outside_a_request_and_when_suppressed_nothing_is_recorded_or_counted(up: str) -> None:
    with sync_client() as client:
        assert client.get(f"{up}/envelope/openai").status_code == 429  # no collector: no-op
        with collecting() as collector:
            with suppress_capture():
                client.get(f"{up}/envelope/openai")
            assert collector.events == [] and collector.attempts == 0
            client.get(f"{up}/envelope/openai")
            assert collector.attempts == 1


def test_a_finished_request_records_nothing(up: str) -> None:
    collector = Collector("done")
    collector.finish()
    token = _activate(collector)
    try:
        with sync_client() as client:
            client.get(f"{up}/envelope/openai")
    finally:
        _deactivate(token)
    assert collector.events == [] and collector.attempts == 0


def test_a_listener_that_calls_upstreams_does_not_recurse(up: str) -> None:
    client = sync_client()
    seen: list[int] = []

    def listener(event: object) -> None:
        seen.append(client.get(f"{up}/envelope/anthropic").status_code)

    with client, collecting() as collector:
        collector.listeners.append(listener)
        client.get(f"{up}/envelope/openai")
    assert seen == [529]
    assert [e.upstream_status_code for e in collector.events] == [429]


def test_our_own_failures_never_reach_the_caller(up: str, caplog: pytest.LogCaptureFixture) -> None:
    class Hostile:
        def __contains__(self, status: object) -> bool:
            raise RuntimeError("bad container")

    transport = UpstreamOpsTransport(record_statuses=Hostile())  # type: ignore[arg-type]
    with (
        caplog.at_level(logging.ERROR, "upstream_ops"),
        httpx.Client(transport=transport) as c,
        collecting() as collector,
    ):
        assert c.get(f"{up}/envelope/openai").status_code == 429
    assert collector.events == []
    assert "could not inspect an upstream response" in caplog.text


def test_bad_configuration_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        UpstreamOpsTransport(max_body_bytes=-1)
    with pytest.raises(ValueError, match="record_statuses"):
        AsyncUpstreamOpsTransport(record_statuses=5)  # type: ignore[arg-type]


# --- secrets ---------------------------------------------------------------------------------------


def test_no_planted_secret_reaches_an_event(up: str, dropping: str) -> None:
    host = up.removeprefix("http://")
    dead = refused_url().removeprefix("http://")
    with sync_client() as client, collecting() as collector:
        response = client.post(
            f"http://user:{PASSWORD}@{host}/echo?api_key={SECRET}&model=gpt-4o#token={SECRET}",
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        assert SECRET in response.text  # the upstream really echoed it
        with pytest.raises(httpx.ConnectError):
            client.get(f"http://admin:{PASSWORD}@{dead}/v1?access_token={SECRET}")
    events = collector.events
    assert [e.kind for e in events] == ["http_error", "request_error"]
    assert_no_secrets(events)
    echo = events[0]
    assert echo.upstream_status_code == 401 and echo.provider_error_code == "invalid_api_key"
    assert "model=gpt-4o" in echo.upstream_url and "[REDACTED]" in echo.upstream_url
    assert "Incorrect API key provided" in echo.message
    assert json.loads(json.dumps(echo.to_dict()))["error_class"] == "auth"


def test_error_bodies_are_read_in_their_declared_charset() -> None:
    body = '{"code":1640001,"code_name":"INVALID_ARGS","message":"参数错误","result":false}'
    transport = httpx.MockTransport(
        lambda request: httpx.Response(
            400,
            content=body.encode("gbk"),
            headers={"content-type": "application/json; charset=gbk"},
        )
    )
    with httpx.Client(transport=UpstreamOpsTransport(transport)) as client, collecting() as c:
        client.get("https://bkapi.example/")
    [event] = c.events
    assert (event.message, event.detail, event.provider_error_type) == (
        "参数错误",
        body,
        "INVALID_ARGS",
    )


def test_a_response_closed_unread_by_its_transport_is_recorded_without_a_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        response = httpx.Response(502, stream=httpx.ByteStream(b"never read"))
        response.close()
        return response

    transport = UpstreamOpsTransport(httpx.MockTransport(handler))
    with collecting() as collector:
        response = transport.handle_request(httpx.Request("GET", "https://api.example/"))
    assert response.status_code == 502
    [event] = collector.events
    assert (event.upstream_status_code, event.detail, event.message) == (502, "", "502 Bad Gateway")


# --- what a success costs: the body passes through the attempt ------------------------------------


def test_a_success_body_passes_through_the_attempt_chunk_by_chunk() -> None:
    chunks = [b'{"id":', b'"1"}']

    class Chunks(httpx.SyncByteStream):
        closed = False

        def __iter__(self) -> Iterator[bytes]:
            yield from chunks

        def close(self) -> None:
            Chunks.closed = True

    transport = UpstreamOpsTransport(
        httpx.MockTransport(lambda request: httpx.Response(200, stream=Chunks()))
    )
    with collecting() as collector:
        response = transport.handle_request(httpx.Request("GET", "https://api.example/"))
        assert list(response.iter_raw()) == chunks
    assert Chunks.closed and response.is_closed
    assert collector.events == [] and collector.attempts == 1


@pytest.mark.parametrize(
    "content_type",
    ["text/event-stream", "Text/Event-Stream; charset=utf-8", "TEXT/EVENT-STREAM"],
)
def test_an_event_stream_is_told_by_its_content_type_in_any_case(content_type: str) -> None:
    body = b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": content_type}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(body))

    with (
        httpx.Client(transport=UpstreamOpsTransport(httpx.MockTransport(handler))) as client,
        collecting() as collector,
    ):
        for _ in range(2):  # the second one's answer is the kept one
            with client.stream("GET", "https://api.example/") as response:
                response.read()
    assert [(e.kind, e.message) for e in collector.events] == [("stream_error", "Overloaded")] * 2


def test_the_kept_content_type_answers_are_bounded() -> None:
    from upstream_ops.httpx import _EVENT_STREAM_VALUES_KEPT, _event_stream_by_value

    def handler(request: httpx.Request) -> httpx.Response:
        boundary = request.url.params["b"]
        headers = {"content-type": f"multipart/mixed; boundary={boundary}"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(b"--"))

    with (
        httpx.Client(transport=UpstreamOpsTransport(httpx.MockTransport(handler))) as client,
        collecting() as collector,
    ):
        for boundary in range(_EVENT_STREAM_VALUES_KEPT * 2):
            assert client.get(f"https://api.example/?b={boundary}").content == b"--"
    assert len(_event_stream_by_value) <= _EVENT_STREAM_VALUES_KEPT
    assert collector.events == []


def test_a_stream_of_the_wrong_kind_fails_as_without_capture() -> None:
    class AsyncBody(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"never"

    class SyncBody(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"never"

    sync_wrong = httpx.MockTransport(lambda request: httpx.Response(200, stream=AsyncBody()))
    with collecting() as collector:
        response = UpstreamOpsTransport(sync_wrong).handle_request(
            httpx.Request("GET", "https://api.example/")
        )
        with pytest.raises(RuntimeError, match="sync iterator on an async stream"):
            response.read()
        response.close()

    async def main() -> None:
        async_wrong = httpx.MockTransport(lambda request: httpx.Response(200, stream=SyncBody()))
        response = await AsyncUpstreamOpsTransport(async_wrong).handle_async_request(
            httpx.Request("GET", "https://api.example/")
        )
        with pytest.raises(RuntimeError, match="async iterator on a sync stream"):
            await response.aread()
        await response.aclose()

    with collecting() as async_collector:
        asyncio.run(main())
    assert collector.events == [] and async_collector.events == []


def test_a_success_body_passes_through_the_async_attempt_chunk_by_chunk() -> None:
    chunks = [b'{"id":', b'"1"}']
    closed: list[bool] = []

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        async def aclose(self) -> None:
            closed.append(True)

    async def main() -> tuple[Collector, list[bytes]]:
        transport = AsyncUpstreamOpsTransport(
            httpx.MockTransport(lambda request: httpx.Response(200, stream=Chunks()))
        )
        with collecting() as collector:
            response = await transport.handle_async_request(
                httpx.Request("GET", "https://api.example/")
            )
            read = [chunk async for chunk in response.aiter_raw()]
        return collector, read

    collector, read = asyncio.run(main())
    assert read == chunks and closed == [True]
    assert collector.events == [] and collector.attempts == 1
