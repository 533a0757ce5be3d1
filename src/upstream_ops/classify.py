"""Classify a failed upstream call: error class, phase, ``error.type``, retryability, retry delay
and the upstream's request id.

Pure functions over plain data. Exceptions are recognized by the fully qualified names of the
classes in their MRO, so httpx, httpcore, requests and urllib3 are never imported here. Every rule
is a module-level table that the docs render: ``ERROR_CLASSES``, ``EXCEPTION_RULES``,
``MESSAGE_RULES``, ``ERRNO_RULES``, ``PHASES``, ``RETRY_RULES``, ``REQUEST_ID_HEADERS``.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final, NamedTuple

from upstream_ops.defaults import LABEL_MAX_BYTES
from upstream_ops.envelopes import _header

_RFC = "exception (RFC 9209)"

#: ``(name, applies_to, meaning)`` for every error class this module produces. Transport failures
#: use the RFC 9209 (Proxy-Status) error type names, seen from the calling side of the connection.
ERROR_CLASSES: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "rate_limited",
        "HTTP 429",
        "The upstream throttles this caller; slow down (see Retry-After).",
    ),
    (
        "overloaded",
        "HTTP 503, 529",
        "The upstream is overloaded or unavailable for everyone (529: Anthropic's overloaded).",
    ),
    ("auth", "HTTP 401, 403", "Credentials missing, invalid, expired or not allowed."),
    (
        "client_error",
        "other HTTP 4xx",
        "The upstream rejected this request (validation, not found, conflict, 408 timeout).",
    ),
    (
        "server_error",
        "other HTTP 5xx",
        "The upstream, or a gateway in front of it (502, 504), failed.",
    ),
    ("dns_error", _RFC, "The upstream host name did not resolve."),
    (
        "destination_ip_unroutable",
        _RFC,
        "No route to the upstream address (network or host unreachable).",
    ),
    ("destination_unavailable", _RFC, "The upstream host is known to be down (host down)."),
    (
        "connection_refused",
        _RFC,
        "The upstream refused the TCP connection: nothing listens there, or a firewall rejects it.",
    ),
    ("connection_timeout", _RFC, "Opening the connection took longer than the connect timeout."),
    (
        "connection_limit_reached",
        _RFC,
        "No connection of the client's own pool became free in time (pool timeout, pool full).",
    ),
    (
        "tls_protocol_error",
        _RFC,
        "TLS failed during or after the handshake (version or cipher mismatch, plain HTTP on a TLS "
        "port, unexpected EOF).",
    ),
    (
        "tls_certificate_error",
        _RFC,
        "The upstream's certificate did not verify (unknown CA, expired, wrong host name).",
    ),
    ("tls_alert_received", _RFC, "The upstream aborted the TLS handshake with an alert."),
    (
        "http_request_error",
        _RFC,
        "The request could not be sent as valid HTTP: bad URL, unsupported scheme, illegal header.",
    ),
    (
        "connection_write_timeout",
        _RFC,
        "Writing the request stalled longer than the write timeout.",
    ),
    (
        "connection_read_timeout",
        _RFC,
        "No data arrived within the read timeout (httpx and urllib3 time each read, not the "
        "whole response).",
    ),
    (
        "http_response_timeout",
        _RFC,
        "The whole response did not arrive before an overall deadline (asyncio or anyio "
        "timeouts, a bare TimeoutError).",
    ),
    (
        "connection_terminated",
        _RFC,
        "The connection closed or was reset before any of the response arrived (stale keep-alive, "
        "upstream restart).",
    ),
    (
        "http_protocol_error",
        _RFC,
        "The upstream answered something that is not valid HTTP.",
    ),
    (
        "http_response_incomplete",
        _RFC,
        "The response started but ended early (body shorter than announced, broken chunking).",
    ),
    (
        "http_response_content_coding",
        _RFC,
        "The response body could not be decoded (gzip, deflate, brotli, zstd).",
    ),
    (
        "proxy_internal_error",
        _RFC,
        "The forward proxy between this service and the upstream failed.",
    ),
    (
        "request_cancelled",
        "exception (not in RFC 9209)",
        "This side cancelled the call before it finished (task cancelled, client went away).",
    ),
)

#: Statuses with their own class; other 4xx are ``client_error``, other 5xx ``server_error``.
_STATUS_CLASSES: Final = {
    401: "auth",
    403: "auth",
    429: "rate_limited",
    503: "overloaded",
    529: "overloaded",
}


def error_class_for_status(status: int) -> str:
    """The error class of an HTTP status (``ERROR_CLASSES``); ``""`` for a status below 400."""
    if status in _STATUS_CLASSES:
        return _STATUS_CLASSES[status]
    if 400 <= status < 500:
        return "client_error"
    if 500 <= status < 600:
        return "server_error"
    return ""


# --- exceptions ---------------------------------------------------------------------------------


class ExceptionRule(NamedTuple):
    """How one exception class is classified.

    ``phase`` overrides the phase of ``error_class`` (``PHASES``) when set. ``refined`` means the
    class alone says too little; in this order, the first clue decides: ``errno`` (``ERRNO_RULES``),
    the exceptions it wraps (``__cause__``, urllib3's ``reason``, ``args``), its message
    (``MESSAGE_RULES``), the exception it was raised while handling (``__context__``); then
    ``error_class`` as the fallback (``""``: unknown). Exceptions matching no rule are judged by
    what they wrap alone.
    """

    exception: str
    error_class: str
    phase: str = ""
    refined: bool = False


# httpx re-exports httpcore's exception names; both map the same way.
_HTTPX_AND_HTTPCORE: Final = (
    ExceptionRule("ConnectTimeout", "connection_timeout"),
    ExceptionRule("ConnectError", "connection_refused", refined=True),
    ExceptionRule("ReadTimeout", "connection_read_timeout"),
    ExceptionRule("WriteTimeout", "connection_write_timeout"),
    ExceptionRule("PoolTimeout", "connection_limit_reached"),
    ExceptionRule("TimeoutException", "http_response_timeout"),
    ExceptionRule("ReadError", "connection_terminated", refined=True),
    ExceptionRule("WriteError", "connection_terminated", "send", refined=True),
    ExceptionRule("RemoteProtocolError", "http_protocol_error", refined=True),
    ExceptionRule("LocalProtocolError", "http_request_error"),
    ExceptionRule("ProtocolError", "http_protocol_error", refined=True),
    ExceptionRule("ProxyError", "proxy_internal_error"),
    ExceptionRule("UnsupportedProtocol", "http_request_error"),
    ExceptionRule("NetworkError", "", refined=True),
)

#: Exception classes by fully qualified name, matched against the exception's MRO (most specific
#: class first). Builtins have no module prefix.
EXCEPTION_RULES: Final[tuple[ExceptionRule, ...]] = (
    *(rule._replace(exception=f"httpx.{rule.exception}") for rule in _HTTPX_AND_HTTPCORE),
    ExceptionRule("httpx.DecodingError", "http_response_content_coding"),
    ExceptionRule("httpx.InvalidURL", "http_request_error"),
    ExceptionRule("httpx.TransportError", "", refined=True),
    ExceptionRule("httpx.RequestError", "", refined=True),
    *(rule._replace(exception=f"httpcore.{rule.exception}") for rule in _HTTPX_AND_HTTPCORE),
    ExceptionRule("requests.exceptions.ConnectTimeout", "connection_timeout"),
    ExceptionRule("requests.exceptions.ReadTimeout", "connection_read_timeout"),
    ExceptionRule("requests.exceptions.Timeout", "http_response_timeout"),
    ExceptionRule("requests.exceptions.SSLError", "tls_protocol_error", refined=True),
    ExceptionRule("requests.exceptions.ProxyError", "proxy_internal_error"),
    ExceptionRule("requests.exceptions.ChunkedEncodingError", "http_response_incomplete"),
    ExceptionRule("requests.exceptions.ContentDecodingError", "http_response_content_coding"),
    ExceptionRule("requests.exceptions.InvalidURL", "http_request_error"),
    ExceptionRule("requests.exceptions.MissingSchema", "http_request_error"),
    ExceptionRule("requests.exceptions.InvalidSchema", "http_request_error"),
    ExceptionRule("requests.exceptions.InvalidHeader", "http_request_error"),
    ExceptionRule("requests.exceptions.ConnectionError", "", refined=True),
    ExceptionRule("requests.exceptions.RequestException", "", refined=True),
    ExceptionRule("urllib3.exceptions.NameResolutionError", "dns_error"),
    ExceptionRule("urllib3.exceptions.NewConnectionError", "connection_refused", refined=True),
    ExceptionRule("urllib3.exceptions.ConnectTimeoutError", "connection_timeout"),
    ExceptionRule("urllib3.exceptions.ReadTimeoutError", "connection_read_timeout"),
    ExceptionRule("urllib3.exceptions.TimeoutError", "http_response_timeout"),
    ExceptionRule("urllib3.exceptions.SSLError", "tls_protocol_error", refined=True),
    ExceptionRule("urllib3.exceptions.ProxyError", "proxy_internal_error"),
    ExceptionRule("urllib3.exceptions.ProtocolError", "connection_terminated", refined=True),
    ExceptionRule("urllib3.exceptions.DecodeError", "http_response_content_coding"),
    ExceptionRule("urllib3.exceptions.EmptyPoolError", "connection_limit_reached"),
    ExceptionRule("urllib3.exceptions.LocationValueError", "http_request_error"),
    ExceptionRule("urllib3.exceptions.MaxRetryError", "", refined=True),
    ExceptionRule("urllib3.exceptions.HTTPError", "", refined=True),
    ExceptionRule("socket.gaierror", "dns_error"),
    ExceptionRule("socket.herror", "dns_error"),
    ExceptionRule("ssl.SSLCertVerificationError", "tls_certificate_error"),
    ExceptionRule("ssl.SSLError", "tls_protocol_error", refined=True),
    ExceptionRule("ConnectionRefusedError", "connection_refused"),
    ExceptionRule("ConnectionResetError", "connection_terminated"),
    ExceptionRule("ConnectionAbortedError", "connection_terminated"),
    ExceptionRule("BrokenPipeError", "connection_terminated", "send"),
    ExceptionRule("ConnectionError", "connection_terminated", refined=True),
    # socket.timeout and asyncio.TimeoutError are TimeoutError: usually an overall deadline, but
    # ETIMEDOUT ("[Errno 110] Connection timed out") is the kernel giving up on a connect.
    ExceptionRule("TimeoutError", "http_response_timeout", refined=True),
    ExceptionRule("http.client.IncompleteRead", "http_response_incomplete"),
    ExceptionRule("http.client.HTTPException", "http_protocol_error"),
    ExceptionRule("asyncio.IncompleteReadError", "http_response_incomplete"),
    ExceptionRule("asyncio.CancelledError", "request_cancelled"),
    ExceptionRule("OSError", "", refined=True),
)

#: ``(error_class, substrings)``: the first class whose substring occurs in a refined exception's
#: message (lower-cased) wins. httpx puts the OS error's text in its own message, and a requests
#: ``ConnectionError`` quotes the whole urllib3 chain, so both are often decided here.
MESSAGE_RULES: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    (
        "http_response_incomplete",
        (
            "without sending complete message body",
            "incomplete chunked read",
            "incompleteread",
            "invalidchunklength",
            "response ended prematurely",
            "connection broken",
        ),
    ),
    (
        "dns_error",
        (
            "name or service not known",
            "nodename nor servname",
            "getaddrinfo failed",
            "temporary failure in name resolution",
            "no address associated with hostname",
            "name does not resolve",
            "failed to resolve",
            "nameresolutionerror",
        ),
    ),
    (
        "tls_certificate_error",
        ("certificate_verify_failed", "certificate verify failed", "sslcertverificationerror"),
    ),
    ("tls_alert_received", ("_alert_", "alert handshake failure")),
    (
        "tls_protocol_error",
        ("[ssl", "sslerror", "wrong version number", "eof occurred in violation of protocol"),
    ),
    ("connection_refused", ("connection refused", "actively refused", "errno 111]")),
    ("destination_ip_unroutable", ("network is unreachable", "no route to host")),
    (
        "connection_terminated",
        (
            "server disconnected",
            "remote end closed connection",
            "connection reset",
            "connection aborted",
            "broken pipe",
        ),
    ),
    ("connection_timeout", ("connection timed out", "connect timeout")),
)

#: ``(errno name, error_class)`` for ``OSError`` s whose class says nothing more.
ERRNO_RULES: Final[tuple[tuple[str, str], ...]] = (
    ("ECONNREFUSED", "connection_refused"),
    ("ECONNRESET", "connection_terminated"),
    ("ECONNABORTED", "connection_terminated"),
    ("EPIPE", "connection_terminated"),
    ("ETIMEDOUT", "connection_timeout"),
    ("ENETUNREACH", "destination_ip_unroutable"),
    ("EHOSTUNREACH", "destination_ip_unroutable"),
    ("EHOSTDOWN", "destination_unavailable"),
)

#: ``(phase, meaning, error classes)``: the phase an error class implies. An ``ExceptionRule`` may
#: override it (``httpx.WriteError`` is ``send``); callers that saw the response headers report
#: ``body`` whatever the exception says.
PHASES: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    (
        "connect",
        "Resolving the host, waiting for a pooled connection, opening the TCP connection or the "
        "proxy tunnel.",
        (
            "dns_error",
            "destination_ip_unroutable",
            "destination_unavailable",
            "connection_refused",
            "connection_timeout",
            "connection_limit_reached",
            "proxy_internal_error",
        ),
    ),
    (
        "tls",
        "The TLS handshake with the upstream.",
        ("tls_protocol_error", "tls_certificate_error", "tls_alert_received"),
    ),
    (
        "send",
        "Writing the request, or failing to form it.",
        ("connection_write_timeout", "http_request_error"),
    ),
    (
        "awaiting_headers",
        "The request is sent; waiting for the status line and headers.",
        (
            "connection_read_timeout",
            "http_response_timeout",
            "connection_terminated",
            "http_protocol_error",
        ),
    ),
    (
        "body",
        "The headers arrived; reading the body.",
        ("http_response_incomplete", "http_response_content_coding"),
    ),
)

_RULES: Final = {rule.exception: rule for rule in EXCEPTION_RULES}
_PHASE_OF: Final = {cls: phase for phase, _, classes in PHASES for cls in classes}
_ERRNO_CLASSES: Final = {
    getattr(errno, name): cls for name, cls in ERRNO_RULES if hasattr(errno, name)
}
#: Wrapped exceptions followed at most this deep, and at most this many looked at in all.
_MAX_DEPTH: Final = 8
_MAX_VISITS: Final = 32
_PUBLIC_MODULES: Final = {"asyncio.exceptions": "asyncio"}
#: Inside another exception, a cancellation is how a deadline was enforced (``asyncio.timeout``
#: raises ``TimeoutError`` from ``CancelledError``), not what went wrong: it is not followed.
_CANCELLED: Final = "request_cancelled"


def error_class_for_exception(exc: BaseException) -> str:
    """The error class of a transport exception (``EXCEPTION_RULES``); ``""`` when unknown.

    A ``connection_terminated`` reported after the response headers arrived is, for the caller,
    ``http_response_incomplete``.
    """
    return _classify_safely(exc)[0]


def phase_for_exception(exc: BaseException) -> str:
    """Best-effort phase of a transport exception (``PHASES``): ``connect``, ``tls``, ``send``,
    ``awaiting_headers`` or ``body``; ``""`` when unknown. Callers that saw headers override it
    with ``body``.
    """
    return _classify_safely(exc)[1]


def error_type_for(status: int | None, exc: BaseException | None) -> str:
    """OpenTelemetry ``error.type``: the status code of an HTTP error (>= 400), else the exception's
    fully qualified class name without private modules (``httpx.ConnectError``,
    ``requests.exceptions.ReadTimeout``, ``TimeoutError``), else ``""``.
    """
    if status is not None and status >= 400:
        return str(status)
    if exc is not None:
        return _qualified_name(type(exc))
    return ""


def _classify_safely(exc: BaseException) -> tuple[str, str]:
    try:
        return _classify(exc, 0, set())
    except Exception:  # a hostile __str__ or attribute must not break the caller
        return "", ""


def _classify(exc: BaseException, depth: int, seen: set[int]) -> tuple[str, str]:
    """``(error_class, phase)``: a specific rule, else errno, the exceptions it explicitly wraps,
    its message, the exception it was raised while handling, and last the rule's fallback."""
    if depth > _MAX_DEPTH or len(seen) >= _MAX_VISITS or id(exc) in seen:
        return "", ""
    seen.add(id(exc))
    rule, known = _rule_for(type(exc))
    if rule is not None and not rule.refined:
        return rule.error_class, rule.phase or _PHASE_OF.get(rule.error_class, "")
    override = rule.phase if rule is not None else ""
    found = _errno_class(exc) if known else ""
    if found:
        return found, override or _PHASE_OF.get(found, "")
    for inner in _wrapped(exc):
        found, phase = _classify(inner, depth + 1, seen)
        if found and found != _CANCELLED:
            return found, override or phase
    found = _message_class(exc) if known else ""
    if found:
        return found, override or _PHASE_OF.get(found, "")
    context = exc.__context__
    if context is not None and not exc.__suppress_context__:
        found, phase = _classify(context, depth + 1, seen)
        if found and found != _CANCELLED:
            return found, override or phase
    if rule is not None:
        return rule.error_class, override or _PHASE_OF.get(rule.error_class, "")
    return "", ""


def _rule_for(cls: type[BaseException]) -> tuple[ExceptionRule | None, bool]:
    """The first rule in the MRO that names a class, and whether any rule (even ``""``) matched."""
    known = False
    for base in cls.__mro__:
        rule = _RULES.get(_qualified_name(base))
        if rule is not None:
            known = True
            if rule.error_class:
                return rule, known
    return None, known


def _errno_class(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    return _ERRNO_CLASSES.get(code, "") if isinstance(code, int) else ""


def _message_class(exc: BaseException) -> str:
    try:
        text = str(exc)[:2048].lower()
    except Exception:  # a broken __str__ leaves the other clues
        return ""
    for error_class, needles in MESSAGE_RULES:
        if any(needle in text for needle in needles):
            return error_class
    return ""


def _wrapped(exc: BaseException) -> list[BaseException]:
    """What an exception explicitly wraps: its ``__cause__``, urllib3's ``reason``, its args."""
    inner: list[BaseException] = []
    if exc.__cause__ is not None:
        inner.append(exc.__cause__)
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        inner.append(reason)
    inner.extend(arg for arg in exc.args[:4] if isinstance(arg, BaseException))
    return inner


def _qualified_name(cls: type) -> str:
    """``httpx._exceptions.ConnectError`` -> ``httpx.ConnectError``; builtins keep the bare name."""
    public: list[str] = []
    for part in cls.__module__.split("."):
        if part.startswith("_"):
            break
        public.append(part)
    module = ".".join(public)
    module = _PUBLIC_MODULES.get(module, module)
    if module in ("", "builtins"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


# --- retries ------------------------------------------------------------------------------------

#: The OpenAI and Anthropic Python SDKs retry these: request timeout, lock conflict, rate limit and
#: every server error (529 included). HTTP statuses have three digits, so 5xx is 500-599.
RETRYABLE_STATUSES: Final[frozenset[int]] = frozenset({408, 409, 429, *range(500, 600)})

#: Transport failures worth retrying: nothing reached the upstream (connect phase), or a timeout,
#: which the SDKs retry too although the upstream may have done the work.
RETRYABLE_ERROR_CLASSES: Final[frozenset[str]] = frozenset(
    {
        "dns_error",
        "destination_ip_unroutable",
        "destination_unavailable",
        "connection_refused",
        "connection_timeout",
        "connection_limit_reached",
        "connection_read_timeout",
        "connection_write_timeout",
        "http_response_timeout",
    }
)

#: ``(rule, retryable, why)``, applied in this order by ``is_retryable``.
RETRY_RULES: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "`x-should-retry: true` / `false` response header",
        "as the header says",
        "The server knows best; the OpenAI and Anthropic SDKs obey it before anything else.",
    ),
    (
        "HTTP 408, 409, 429, 5xx",
        "yes",
        "The SDKs' default: timeout, conflict, rate limit and server errors can pass.",
    ),
    ("any other HTTP status >= 400", "no", "The same request gets the same answer."),
    (
        "exception classed " + ", ".join(f"`{c}`" for c in sorted(RETRYABLE_ERROR_CLASSES)),
        "yes",
        "Connect-phase failures reached nothing; timeouts are retried by the SDKs, though the "
        "upstream may have done the work.",
    ),
    (
        "any other exception",
        "no",
        "TLS and certificate errors, bad requests and broken responses do not fix themselves; a "
        "dropped connection may have delivered the request.",
    ),
)

#: ``Retry-After`` values are capped at a day: longer is a misconfiguration, not a plan.
RETRY_AFTER_MAX_MS: Final = 24 * 60 * 60 * 1000


def is_retryable(
    status: int | None,
    headers: Mapping[str, str] | None = None,
    exc: BaseException | None = None,
) -> bool:
    """Whether a retry could succeed, by ``RETRY_RULES`` (the big SDKs' defaults)."""
    should = _header(headers, "x-should-retry").strip().lower()
    if should in ("true", "false"):
        return should == "true"
    if status is not None and status >= 400:
        return status in RETRYABLE_STATUSES
    if exc is not None:
        return error_class_for_exception(exc) in RETRYABLE_ERROR_CLASSES
    return False


def retry_after_ms(headers: Mapping[str, str] | None, now: float | None = None) -> int:
    """How long the upstream asks to wait, in ms; ``0`` when it does not say (or says garbage).

    ``retry-after-ms`` (milliseconds, OpenAI) wins over ``retry-after`` (seconds, or an HTTP date
    relative to ``now``, a Unix time defaulting to the clock). Negative waits are ``0``; waits are
    capped at ``RETRY_AFTER_MAX_MS``.
    """
    milliseconds = _finite(_header(headers, "retry-after-ms"))
    if milliseconds is not None:
        return _bounded_ms(milliseconds)
    value = _header(headers, "retry-after").strip()
    if not value:
        return 0
    seconds = _finite(value)
    if seconds is None:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return 0
        if when.tzinfo is None:  # "-0000" means UTC with no claim about the sender's zone
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return _bounded_ms(seconds * 1000)


def _finite(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _bounded_ms(milliseconds: float) -> int:
    if not milliseconds > 0:
        return 0
    return math.ceil(min(milliseconds, RETRY_AFTER_MAX_MS))


# --- request ids --------------------------------------------------------------------------------

#: Response headers carrying the upstream's id for the request, first present wins: the generic
#: ``x-request-id`` (OpenAI and most gateways), ``request-id`` (Anthropic), AWS, Azure API
#: Management, BlueKing APIGateway, Kong, and Cloudflare's ``cf-ray`` last (it names the edge hop).
REQUEST_ID_HEADERS: Final = (
    "x-request-id",
    "request-id",
    "x-amzn-requestid",
    "apim-request-id",
    "x-bkapi-request-id",
    "x-kong-request-id",
    "cf-ray",
)


def upstream_request_id(headers: Mapping[str, str] | None) -> str:
    """The upstream's request id from the first ``REQUEST_ID_HEADERS`` present; ``""`` if none.

    Works with case-insensitive header mappings and with plain dicts in any case.
    """
    for name in REQUEST_ID_HEADERS:
        value = _header(headers, name).strip()
        if value:
            return value[:LABEL_MAX_BYTES]
    return ""
