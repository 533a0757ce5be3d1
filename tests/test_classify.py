"""classify: status classes, real httpx/httpcore/requests/urllib3 exceptions, retries, request ids."""

from __future__ import annotations

import ast
import asyncio
import errno
import http.client
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpcore
import httpx
import pytest
import requests
import urllib3
from requests.structures import CaseInsensitiveDict

import upstream_ops.classify
from upstream_ops.classify import (
    ERROR_CLASSES,
    EXCEPTION_RULES,
    MESSAGE_RULES,
    PHASES,
    REQUEST_ID_HEADERS,
    RETRY_AFTER_MAX_MS,
    RETRYABLE_ERROR_CLASSES,
    RETRYABLE_STATUSES,
    error_class_for_exception,
    error_class_for_status,
    error_type_for,
    is_retryable,
    phase_for_exception,
    retry_after_ms,
    upstream_request_id,
)

CLASS_NAMES = {name for name, _, _ in ERROR_CLASSES}

# --- statuses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (429, "rate_limited"),
        (503, "overloaded"),
        (529, "overloaded"),
        (401, "auth"),
        (403, "auth"),
        (400, "client_error"),
        (404, "client_error"),
        (408, "client_error"),
        (409, "client_error"),
        (422, "client_error"),
        (499, "client_error"),
        (500, "server_error"),
        (502, "server_error"),
        (504, "server_error"),
        (599, "server_error"),
        (200, ""),
        (204, ""),
        (302, ""),
        (0, ""),
        (600, ""),
    ],
)
def test_error_class_for_status(status: int, expected: str) -> None:
    assert error_class_for_status(status) == expected


def test_every_produced_class_is_documented() -> None:
    produced = {error_class_for_status(s) for s in range(100, 700)} - {""}
    produced |= {rule.error_class for rule in EXCEPTION_RULES} - {""}
    produced |= {cls for cls, _ in MESSAGE_RULES}
    produced |= {cls for _, _, classes in PHASES for cls in classes}
    produced |= RETRYABLE_ERROR_CLASSES
    assert produced <= CLASS_NAMES
    assert len(CLASS_NAMES) == len(ERROR_CLASSES)


def test_every_transport_class_has_a_phase_but_cancellation() -> None:
    with_phase = {cls for _, _, classes in PHASES for cls in classes}
    transport = {name for name, applies_to, _ in ERROR_CLASSES if applies_to.startswith("exc")}
    assert transport - with_phase == {"request_cancelled"}
    assert {phase for phase, _, _ in PHASES} == {
        "connect",
        "tls",
        "send",
        "awaiting_headers",
        "body",
    }


def test_exception_rules_name_each_class_once() -> None:
    names = [rule.exception for rule in EXCEPTION_RULES]
    assert len(names) == len(set(names))


# --- exceptions built by hand (real classes, the way the libraries build them) ------------------


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


def _cert_error() -> ssl.SSLCertVerificationError:
    return ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"
    )


def _max_retry(reason: Exception) -> urllib3.exceptions.MaxRetryError:
    return urllib3.exceptions.MaxRetryError(None, "/v1/chat", reason)  # type: ignore[arg-type]


def _new_connection_error(message: str) -> urllib3.exceptions.NewConnectionError:
    return urllib3.exceptions.NewConnectionError(None, message)  # type: ignore[arg-type]


def _name_resolution_error() -> urllib3.exceptions.NameResolutionError:
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return urllib3.exceptions.NameResolutionError("api.example", None, gai)  # type: ignore[arg-type]


EXCEPTIONS: list[tuple[str, Callable[[], BaseException], str, str]] = [
    # httpx
    (
        "httpx-refused",
        lambda: httpx.ConnectError("[Errno 111] Connection refused"),
        "connection_refused",
        "connect",
    ),
    (
        "httpx-dns-linux",
        lambda: httpx.ConnectError("[Errno -2] Name or service not known"),
        "dns_error",
        "connect",
    ),
    (
        "httpx-dns-macos",
        lambda: httpx.ConnectError("[Errno 8] nodename nor servname provided, or not known"),
        "dns_error",
        "connect",
    ),
    (
        "httpx-dns-windows",
        lambda: httpx.ConnectError("[Errno 11001] getaddrinfo failed"),
        "dns_error",
        "connect",
    ),
    (
        "httpx-dns-temporary",
        lambda: httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
        "dns_error",
        "connect",
    ),
    (
        "httpx-dns-by-cause",
        lambda: _caused(
            httpx.ConnectError(""),
            _caused(httpcore.ConnectError(""), socket.gaierror(-3, "Temporary failure")),
        ),
        "dns_error",
        "connect",
    ),
    (
        "httpx-cert-by-message",
        lambda: httpx.ConnectError(
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local "
            "issuer certificate (_ssl.c:1006)"
        ),
        "tls_certificate_error",
        "tls",
    ),
    (
        "httpx-cert-by-cause",
        lambda: _caused(httpx.ConnectError("handshake failed"), _cert_error()),
        "tls_certificate_error",
        "tls",
    ),
    (
        "httpx-tls-version",
        lambda: httpx.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:992)"),
        "tls_protocol_error",
        "tls",
    ),
    (
        "httpx-tls-alert",
        lambda: httpx.ConnectError(
            "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version (_ssl.c:1006)"
        ),
        "tls_alert_received",
        "tls",
    ),
    (
        "httpx-unreachable",
        lambda: httpx.ConnectError("[Errno 101] Network is unreachable"),
        "destination_ip_unroutable",
        "connect",
    ),
    (
        "httpx-all-attempts-failed",
        lambda: _caused(
            httpx.ConnectError("All connection attempts failed"),
            ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"),
        ),
        "connection_refused",
        "connect",
    ),
    ("httpx-connect-error-bare", lambda: httpx.ConnectError(""), "connection_refused", "connect"),
    ("httpx-connect-timeout", lambda: httpx.ConnectTimeout(""), "connection_timeout", "connect"),
    (
        "httpx-read-timeout",
        lambda: httpx.ReadTimeout("timed out"),
        "connection_read_timeout",
        "awaiting_headers",
    ),
    ("httpx-write-timeout", lambda: httpx.WriteTimeout(""), "connection_write_timeout", "send"),
    ("httpx-pool-timeout", lambda: httpx.PoolTimeout(""), "connection_limit_reached", "connect"),
    (
        "httpx-disconnected",
        lambda: httpx.RemoteProtocolError("Server disconnected without sending a response."),
        "connection_terminated",
        "awaiting_headers",
    ),
    (
        "httpx-incomplete-body",
        lambda: httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body (incomplete chunked read)"
        ),
        "http_response_incomplete",
        "body",
    ),
    (
        "httpx-bad-status-line",
        lambda: httpx.RemoteProtocolError("illegal status line: bytearray(b'garbage')"),
        "http_protocol_error",
        "awaiting_headers",
    ),
    (
        "httpx-read-error",
        lambda: httpx.ReadError("[Errno 104] Connection reset by peer"),
        "connection_terminated",
        "awaiting_headers",
    ),
    (
        "httpx-write-error",
        lambda: httpx.WriteError("[Errno 32] Broken pipe"),
        "connection_terminated",
        "send",
    ),
    (
        "httpx-proxy",
        lambda: httpx.ProxyError("407 Proxy Authentication Required"),
        "proxy_internal_error",
        "connect",
    ),
    (
        "httpx-unsupported-protocol",
        lambda: httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
        "http_request_error",
        "send",
    ),
    (
        "httpx-local-protocol",
        lambda: httpx.LocalProtocolError("Illegal header value b' x'"),
        "http_request_error",
        "send",
    ),
    (
        "httpx-decoding",
        lambda: httpx.DecodingError("Error -3 while decompressing data"),
        "http_response_content_coding",
        "body",
    ),
    ("httpx-invalid-url", lambda: httpx.InvalidURL("Invalid port"), "http_request_error", "send"),
    ("httpx-too-many-redirects", lambda: httpx.TooManyRedirects("Exceeded"), "", ""),
    # httpcore
    (
        "httpcore-connect-error-gaierror",
        lambda: _caused(httpcore.ConnectError(""), socket.gaierror(-2, "not known")),
        "dns_error",
        "connect",
    ),
    (
        "httpcore-read-timeout",
        lambda: httpcore.ReadTimeout(""),
        "connection_read_timeout",
        "awaiting_headers",
    ),
    (
        "httpcore-remote-protocol",
        lambda: httpcore.RemoteProtocolError("Server disconnected without sending a response."),
        "connection_terminated",
        "awaiting_headers",
    ),
    # requests, wrapping urllib3 the way requests.adapters does
    (
        "requests-refused",
        lambda: requests.exceptions.ConnectionError(
            _max_retry(
                _new_connection_error(
                    "Failed to establish a new connection: [Errno 111] Connection refused"
                )
            )
        ),
        "connection_refused",
        "connect",
    ),
    (
        "requests-name-resolution",
        lambda: requests.exceptions.ConnectionError(_max_retry(_name_resolution_error())),
        "dns_error",
        "connect",
    ),
    (
        "requests-connect-timeout",
        lambda: requests.exceptions.ConnectTimeout(
            _max_retry(urllib3.exceptions.ConnectTimeoutError(None, "timed out"))
        ),
        "connection_timeout",
        "connect",
    ),
    (
        "requests-read-timeout",
        lambda: requests.exceptions.ReadTimeout("Read timed out. (read timeout=1)"),
        "connection_read_timeout",
        "awaiting_headers",
    ),
    (
        "requests-ssl-certificate",
        lambda: requests.exceptions.SSLError(
            _max_retry(urllib3.exceptions.SSLError(_cert_error()))
        ),
        "tls_certificate_error",
        "tls",
    ),
    (
        "requests-ssl-other",
        lambda: requests.exceptions.SSLError("EOF"),
        "tls_protocol_error",
        "tls",
    ),
    (
        "requests-chunked",
        lambda: requests.exceptions.ChunkedEncodingError(
            urllib3.exceptions.ProtocolError(
                "Connection broken: IncompleteRead(5 bytes read, 95 more expected)",
                urllib3.exceptions.IncompleteRead(5, 95),
            )
        ),
        "http_response_incomplete",
        "body",
    ),
    (
        "requests-proxy",
        lambda: requests.exceptions.ProxyError("Unable to connect to proxy"),
        "proxy_internal_error",
        "connect",
    ),
    (
        "requests-aborted",
        lambda: requests.exceptions.ConnectionError(
            urllib3.exceptions.ProtocolError(
                "Connection aborted.",
                http.client.RemoteDisconnected("Remote end closed connection without response"),
            )
        ),
        "connection_terminated",
        "awaiting_headers",
    ),
    (
        "requests-bad-status-line",
        lambda: requests.exceptions.ConnectionError(
            urllib3.exceptions.ProtocolError(
                "Connection aborted.", http.client.BadStatusLine("garbage")
            )
        ),
        "http_protocol_error",
        "awaiting_headers",
    ),
    (
        "requests-missing-schema",
        lambda: requests.exceptions.MissingSchema("Invalid URL 'x': No scheme supplied."),
        "http_request_error",
        "send",
    ),
    (
        "requests-content-decoding",
        lambda: requests.exceptions.ContentDecodingError("Received response with gzip"),
        "http_response_content_coding",
        "body",
    ),
    ("requests-connection-error-bare", lambda: requests.exceptions.ConnectionError(), "", ""),
    # urllib3 alone
    (
        "urllib3-new-connection",
        lambda: _new_connection_error("Failed to establish a new connection: [Errno 111] refused"),
        "connection_refused",
        "connect",
    ),
    ("urllib3-name-resolution", _name_resolution_error, "dns_error", "connect"),
    (
        "urllib3-read-timeout",
        lambda: urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out."),  # type: ignore[arg-type]
        "connection_read_timeout",
        "awaiting_headers",
    ),
    (
        "urllib3-reset",
        lambda: urllib3.exceptions.ProtocolError(
            "Connection aborted.",
            ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        ),
        "connection_terminated",
        "awaiting_headers",
    ),
    # the standard library
    (
        "refused",
        lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        "connection_refused",
        "connect",
    ),
    (
        "reset",
        lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        "connection_terminated",
        "awaiting_headers",
    ),
    (
        "broken-pipe",
        lambda: BrokenPipeError(errno.EPIPE, "Broken pipe"),
        "connection_terminated",
        "send",
    ),
    ("timeout", TimeoutError, "http_response_timeout", "awaiting_headers"),
    ("asyncio-timeout", asyncio.TimeoutError, "http_response_timeout", "awaiting_headers"),
    (
        "timeout-message",
        lambda: TimeoutError("timed out"),
        "http_response_timeout",
        "awaiting_headers",
    ),
    ("gaierror", lambda: socket.gaierror(-2, "Name or service not known"), "dns_error", "connect"),
    ("cert", _cert_error, "tls_certificate_error", "tls"),
    (
        "ssl-error",
        lambda: ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        "tls_protocol_error",
        "tls",
    ),
    (
        "errno-unreachable",
        lambda: OSError(errno.ENETUNREACH, "Network is unreachable"),
        "destination_ip_unroutable",
        "connect",
    ),
    (
        "errno-host-down",
        lambda: OSError(errno.EHOSTDOWN, "Host is down"),
        "destination_unavailable",
        "connect",
    ),
    ("errno-timed-out", lambda: OSError(errno.ETIMEDOUT, "x"), "connection_timeout", "connect"),
    ("cancelled", asyncio.CancelledError, "request_cancelled", ""),
    (
        "incomplete-read",
        lambda: http.client.IncompleteRead(b"partial", 10),
        "http_response_incomplete",
        "body",
    ),
    (
        "asyncio-incomplete-read",
        lambda: asyncio.IncompleteReadError(b"x", 10),
        "http_response_incomplete",
        "body",
    ),
    # unknown classes: judged by what they wrap, never by their message
    ("unknown", lambda: ValueError("Connection refused"), "", ""),
    ("file-not-found", lambda: FileNotFoundError(errno.ENOENT, "x"), "", ""),
    (
        "unknown-wrapping-known",
        lambda: _caused(RuntimeError("upstream failed"), httpx.ConnectTimeout("")),
        "connection_timeout",
        "connect",
    ),
]


@pytest.mark.parametrize(
    ("build", "error_class", "phase"),
    [pytest.param(build, cls, phase, id=name) for name, build, cls, phase in EXCEPTIONS],
)
def test_exception_classes(
    build: Callable[[], BaseException], error_class: str, phase: str
) -> None:
    exc = build()
    assert error_class_for_exception(exc) == error_class
    assert phase_for_exception(exc) == phase


def test_raised_chains_are_followed_through_context() -> None:
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError:
            raise httpx.NetworkError("lookup failed") from None  # suppressed: not followed
    except httpx.NetworkError as exc:
        assert error_class_for_exception(exc) == ""
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError:
            raise httpx.NetworkError("lookup failed")  # noqa: B904 - the implicit chain is the point
    except httpx.NetworkError as exc:
        assert error_class_for_exception(exc) == "dns_error"


def test_explicit_clues_win_over_context() -> None:
    try:
        try:
            raise httpx.ReadTimeout("earlier attempt")
        except httpx.ReadTimeout:
            raise httpx.ConnectError("[Errno 111] Connection refused")  # noqa: B904
    except httpx.ConnectError as exc:
        assert error_class_for_exception(exc) == "connection_refused"


def test_asyncio_deadline_is_a_timeout_not_a_cancellation() -> None:
    async def slow_call() -> None:
        await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)

    with pytest.raises(TimeoutError) as info:
        asyncio.run(slow_call())
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert error_class_for_exception(info.value) == "http_response_timeout"


def test_cycles_and_deep_chains_end() -> None:
    first, second = httpx.NetworkError("a"), httpx.NetworkError("b")
    first.__cause__, second.__cause__ = second, first
    assert error_class_for_exception(first) == ""
    exc: BaseException = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    for _ in range(100):
        exc = _caused(RuntimeError("wrapper"), exc)
    assert error_class_for_exception(exc) == ""  # beyond the depth bound: unknown, not slow


def test_broken_str_is_survived() -> None:
    class Hostile(httpx.ConnectError):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_class_for_exception(Hostile("x")) == "connection_refused"


# --- real failures against sockets on 127.0.0.1 -------------------------------------------------


@contextmanager
def tcp_server(behaviour: str) -> Iterator[str]:
    """A raw TCP server on 127.0.0.1 that misbehaves on purpose; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.02)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(conn)
            conn.settimeout(2)
            conn.recv(65536)
            if behaviour == "close":
                conn.close()
            elif behaviour == "short-body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
                conn.close()
            elif behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            # "silent": keep the connection open and say nothing

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in accepted:
            conn.close()


def _closed_port_url() -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}/"


def _httpx_failure(url: str) -> BaseException:
    with pytest.raises(httpx.HTTPError) as info, httpx.Client(timeout=0.3) as client:
        client.get(url).read()
    return info.value


def _requests_failure(url: str) -> BaseException:
    with pytest.raises(requests.RequestException) as info:
        requests.get(url, timeout=0.3).content  # noqa: B018 - reading the body is the point
    return info.value


@pytest.mark.parametrize("fail", [_httpx_failure, _requests_failure], ids=["httpx", "requests"])
@pytest.mark.parametrize(
    ("behaviour", "error_class", "phase"),
    [
        ("refused", "connection_refused", "connect"),
        ("silent", "connection_read_timeout", "awaiting_headers"),
        ("close", "connection_terminated", "awaiting_headers"),
        ("reset", "connection_terminated", "awaiting_headers"),
        ("short-body", "http_response_incomplete", "body"),
    ],
)
def test_real_failures(
    fail: Callable[[str], BaseException], behaviour: str, error_class: str, phase: str
) -> None:
    if behaviour == "refused":
        exc = fail(_closed_port_url())
    else:
        with tcp_server(behaviour) as url:
            exc = fail(url)
    assert error_class_for_exception(exc) == error_class
    assert phase_for_exception(exc) == phase


# --- error.type ---------------------------------------------------------------------------------


class _Outer:
    class Nested(Exception):
        pass


_Outer.Nested.__module__ = "vendor._impl.errors"


@pytest.mark.parametrize(
    ("status", "exc", "expected"),
    [
        (503, None, "503"),
        (429, httpx.ReadTimeout(""), "429"),
        (400, None, "400"),
        (None, httpx.ConnectError(""), "httpx.ConnectError"),
        (None, httpcore.ReadTimeout(""), "httpcore.ReadTimeout"),
        (200, httpx.RemoteProtocolError(""), "httpx.RemoteProtocolError"),
        (None, requests.exceptions.ReadTimeout(), "requests.exceptions.ReadTimeout"),
        (None, _new_connection_error("x"), "urllib3.exceptions.NewConnectionError"),
        (None, TimeoutError(), "TimeoutError"),
        (None, asyncio.CancelledError(), "asyncio.CancelledError"),
        (None, _cert_error(), "ssl.SSLCertVerificationError"),
        (None, socket.gaierror(), "socket.gaierror"),
        (None, _Outer.Nested(), "vendor._Outer.Nested"),
        (200, None, ""),
        (None, None, ""),
    ],
)
def test_error_type_for(status: int | None, exc: BaseException | None, expected: str) -> None:
    assert error_type_for(status, exc) == expected


# --- retries ------------------------------------------------------------------------------------


def test_retryable_statuses_match_the_sdks() -> None:
    assert {408, 409, 429, 500, 502, 503, 504, 529} <= RETRYABLE_STATUSES
    assert not {400, 401, 403, 404, 413, 422} & RETRYABLE_STATUSES


@pytest.mark.parametrize(
    ("status", "headers", "exc", "expected"),
    [
        (429, None, None, True),
        (408, None, None, True),
        (409, None, None, True),
        (500, None, None, True),
        (529, None, None, True),
        (400, None, None, False),
        (401, None, None, False),
        (404, None, None, False),
        (503, {"X-Should-Retry": "false"}, None, False),
        (400, {"x-should-retry": "true"}, None, True),
        (400, httpx.Headers({"X-SHOULD-RETRY": "TRUE"}), None, True),
        (503, {"x-should-retry": "maybe"}, None, True),
        (None, {"x-should-retry": "false"}, httpx.ConnectError(""), False),
        (None, None, httpx.ConnectError("[Errno 111] Connection refused"), True),
        (None, None, httpx.ConnectError("[Errno -2] Name or service not known"), True),
        (None, None, httpx.ConnectTimeout(""), True),
        (None, None, httpx.PoolTimeout(""), True),
        (None, None, httpx.ReadTimeout(""), True),
        (None, None, httpx.WriteTimeout(""), True),
        (None, None, requests.exceptions.ConnectTimeout(), True),
        (None, None, httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] x"), False),
        (None, None, httpx.RemoteProtocolError("Server disconnected"), False),
        (None, None, httpx.UnsupportedProtocol(""), False),
        (None, None, requests.exceptions.ChunkedEncodingError(), False),
        (None, None, ValueError("boom"), False),
        (200, None, None, False),
        (None, None, None, False),
    ],
)
def test_is_retryable(
    status: int | None,
    headers: dict[str, str] | None,
    exc: BaseException | None,
    expected: bool,
) -> None:
    assert is_retryable(status, headers, exc) is expected


NOW = datetime(2026, 2, 12, 14, 37, 14, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1500),
        ({"Retry-After-Ms": "0.4"}, 1),
        ({"retry-after-ms": "250", "retry-after": "9"}, 250),
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9000),
        ({"Retry-After": "2"}, 2000),
        ({"retry-after": " 1.5 "}, 1500),
        ({"Retry-After": "Thu, 12 Feb 2026 14:37:44 GMT"}, 30_000),
        ({"Retry-After": "Thu, 12 Feb 2026 14:37:44 -0000"}, 30_000),
        ({"Retry-After": "Thu, 12 Feb 2026 22:37:44 +0800"}, 30_000),
        ({"Retry-After": "Thu, 12 Feb 2026 14:00:00 GMT"}, 0),
        ({"Retry-After": "-5"}, 0),
        ({"retry-after-ms": "-5"}, 0),
        ({"Retry-After": "soon"}, 0),
        ({"Retry-After": ""}, 0),
        ({"Retry-After": "nan"}, 0),
        ({"Retry-After": "inf"}, 0),
        ({"Retry-After": "1e400"}, 0),
        ({"Retry-After": "99999999"}, RETRY_AFTER_MAX_MS),
        ({"Retry-After": "1e300"}, RETRY_AFTER_MAX_MS),
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, RETRY_AFTER_MAX_MS),
        (httpx.Headers({"RETRY-AFTER": "3"}), 3000),
        (CaseInsensitiveDict({"Retry-After": "4"}), 4000),
        ({}, 0),
        (None, 0),
    ],
)
def test_retry_after_ms(headers: dict[str, str] | None, expected: int) -> None:
    assert retry_after_ms(headers, now=NOW) == expected


def test_retry_after_date_defaults_to_the_clock() -> None:
    assert retry_after_ms({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}) == 0
    assert retry_after_ms({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}) > 0


# --- request ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-request-id": "req_1", "request-id": "req_2", "cf-ray": "ray"}, "req_1"),
        ({"Request-Id": "req_011CV", "CF-RAY": "8f1e2a-AMS"}, "req_011CV"),
        ({"X-Amzn-RequestId": "a1b2", "cf-ray": "ray"}, "a1b2"),
        ({"apim-request-id": "apim", "X-Kong-Request-Id": "kong"}, "apim"),
        ({"X-Bkapi-Request-Id": "bk", "cf-ray": "ray"}, "bk"),
        ({"X-Kong-Request-Id": "kong"}, "kong"),
        ({"CF-Ray": "8f1e2a-AMS"}, "8f1e2a-AMS"),
        ({"X-Request-ID": " ", "request-id": "second"}, "second"),
        ({"X-Request-ID": "  padded  "}, "padded"),
        (httpx.Headers({"X-REQUEST-ID": "httpx"}), "httpx"),
        (CaseInsensitiveDict({"X-Request-Id": "requests"}), "requests"),
        ({"content-type": "application/json"}, ""),
        ({}, ""),
        (None, ""),
    ],
)
def test_upstream_request_id(headers: dict[str, str] | None, expected: str) -> None:
    assert upstream_request_id(headers) == expected


def test_request_id_headers_are_lower_case_and_distinct() -> None:
    assert all(name == name.lower() for name in REQUEST_ID_HEADERS)
    assert len(set(REQUEST_ID_HEADERS)) == len(REQUEST_ID_HEADERS)
    assert REQUEST_ID_HEADERS[0] == "x-request-id"
    assert REQUEST_ID_HEADERS[-1] == "cf-ray"


def test_module_imports_no_http_client() -> None:
    tree = ast.parse(Path(upstream_ops.classify.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"httpx", "httpcore", "requests", "urllib3"}
