"""One upstream attempt in flight, and the event it records when it fails.

What the capture integrations share, independent of any HTTP client: ``upstream_ops.httpx`` and
``upstream_ops.requests`` translate their objects into calls on an ``Attempt`` (started, raised,
received headers, body chunk read, body failed, body ended); the ``Attempt`` classifies with
``classify``, reads the provider's error with ``envelopes`` and appends one event to the request's
collector. Also here: the switch that keeps the library from recording its own HTTP traffic.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import weakref
from collections.abc import Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from time import perf_counter
from typing import Final

from opentelemetry.trace import TracerProvider

from upstream_ops._event_stream import EventStreamScanner
from upstream_ops.classify import (
    RETRYABLE_ERROR_CLASSES,
    error_class_for_exception,
    error_class_for_status,
    error_type_for,
    is_retryable,
    phase_for_exception,
    retry_after_ms,
    upstream_request_id,
)
from upstream_ops.collector import Collector, _current
from upstream_ops.defaults import CAPTURE_BODY_MAX_BYTES, CAPTURE_STATUSES, SSE_LINE_MAX_BYTES
from upstream_ops.envelopes import (
    ProviderError,
    _decode,
    _header,
    _looks_binary,
    _LowerCaseHeaders,
    parse_error_body,
)
from upstream_ops.events import HTTP_ERROR, REQUEST_ERROR, STREAM_ERROR, UpstreamErrorEvent
from upstream_ops.labels import UpstreamLabels, make_labels
from upstream_ops.labels import _current as _labels_in_effect
from upstream_ops.telemetry._client import ClientTelemetry, default_client_telemetry

__all__ = ["Attempt", "CaptureOptions", "active_collector", "suppress_capture"]

logger = logging.getLogger("upstream_ops")

_suppressed: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "upstream_ops_capture_suppressed", default=False
)


@contextmanager
def suppress_capture() -> Iterator[None]:
    """Record nothing for the HTTP calls made inside.

    Sinks and exporters that talk HTTP wrap their calls in it, so the library never records (and
    never recurses into) its own traffic. The capture code itself runs event listeners under it.
    """
    token = _suppressed.set(True)
    try:
        yield
    finally:
        _suppressed.reset(token)


def active_collector() -> Collector | None:
    """The collector an attempt made here records into; ``None`` outside a request or when
    suppressed. The only work a capture integration does before delegating, when it returns ``None``.
    """
    collector = _current.get()
    # ``_finished`` is what the ``finished`` property returns, read without the property's call.
    if collector is None or collector._finished or _suppressed.get():
        return None
    return collector


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """The configuration of one capture transport or adapter (it holds no per-request state)."""

    labels: UpstreamLabels
    record_statuses: Container[int]
    max_body_bytes: int
    #: Makes the CLIENT span of each attempt (OpenTelemetry).
    client_spans: ClientTelemetry

    @classmethod
    def from_arguments(
        cls,
        *,
        platform: str = "",
        account_id: int | str = 0,
        account_name: str = "",
        model: str = "",
        record_statuses: Container[int] = CAPTURE_STATUSES,
        max_body_bytes: int = CAPTURE_BODY_MAX_BYTES,
        tracer_provider: TracerProvider | None = None,
    ) -> CaptureOptions:
        """Validate what a user passed to a transport's constructor (raises ``ValueError`` there)."""
        if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool):
            raise ValueError(f"max_body_bytes must be an integer, got {max_body_bytes!r}")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be 0 or more, got {max_body_bytes!r}")
        if not isinstance(record_statuses, Container):
            raise ValueError(
                f"record_statuses must be a container of ints, got {record_statuses!r}"
            )
        return cls(
            labels=make_labels(platform, account_id, account_name, model),
            record_statuses=record_statuses,
            max_body_bytes=max_body_bytes,
            client_spans=(
                default_client_telemetry()
                if tracer_provider is None
                else ClientTelemetry(tracer_provider)
            ),
        )


# What the body of a received response is watched for:
# a success (only a failure while reading it is an event); a recorded status (keep the head of what
# the caller reads, record at the end); a 2xx event stream (look for error events); done (recorded,
# or finished without an event).
_WATCH: Final = 0
_ERROR_BODY: Final = 1
_EVENT_STREAM: Final = 2
_DONE: Final = 3

#: ``error.type`` of an error event in a stream that names no type (OpenTelemetry's fallback value).
_OTHER_ERROR_TYPE: Final = "_OTHER"


class Attempt:
    """One attempt of an upstream call, from sending the request until its body ends.

    Records at most one event. Created only inside a request (``active_collector()``), it takes the
    attempt number and the labels in effect when the attempt starts, so an event recorded later (a
    stream closed after the ``upstream`` block) still carries them. None of its methods raises.
    """

    # What stays at its default on a successful attempt is read from the class, so starting an
    # attempt costs seven attribute stores. (No ``__slots__``: slots cannot have class defaults.)
    status = 0
    _headers: Mapping[str, str] | None = None
    _mode = _WATCH
    _body: bytearray | None = None
    _scanner: EventStreamScanner | None = None
    #: Set by :meth:`received`: the chunks of the body must be fed (an error body is kept, an
    #: event stream scanned). Otherwise only a failure while the body is read is an event.
    reads_body = False

    def __init__(
        self, collector: Collector, options: CaptureOptions, method: str, url: object
    ) -> None:
        self._collector = collector
        self._options = options
        self._labels = _labels_in_effect.get()
        self.method = method
        self.url = url  # the client's URL object: made a string only when an event is recorded
        self.number = collector.next_attempt()
        self._started = perf_counter()

    @property
    def pending(self) -> bool:
        """True while the attempt can still record an event."""
        return self._mode != _DONE

    def failed(self, exc: BaseException) -> None:
        """The call raised: before a response this is a ``request_error``, after one a body failure."""
        if self.status:
            self.body_failed(exc)
        elif self._mode != _DONE:
            self._record(REQUEST_ERROR, exc=exc)

    def received(self, status: int, headers: Mapping[str, str], content_type: str) -> bool:
        """The status line and headers arrived. True when an event is pending until the body ends.

        ``content_type`` is passed in because each client has a faster way to look it up than a
        case-insensitive ``headers.get``.
        """
        event_stream = 200 <= status < 300 and content_type[:17].lower() == "text/event-stream"
        return self.received_head(status, headers, event_stream)

    def received_head(self, status: int, headers: Mapping[str, str], event_stream: bool) -> bool:
        """:meth:`received`, told whether the Content-Type is ``text/event-stream``: for a client
        that can tell faster than from the header's text (this runs on every successful attempt).
        """
        self.status = status
        self._headers = headers
        try:
            if status in self._options.record_statuses:
                self._mode = _ERROR_BODY
                self._body = bytearray()
                self.reads_body = True
                return True
            if event_stream and 200 <= status < 300:
                self._mode = _EVENT_STREAM
                self._scanner = EventStreamScanner(
                    data_max=self._options.max_body_bytes, line_max=SSE_LINE_MAX_BYTES
                )
                self.reads_body = True
        except Exception:  # a record_statuses container that fails: watch nothing, break nothing
            self._mode = _DONE
            logger.exception("upstream_ops: could not inspect an upstream response")
        return False

    def record_on_collect(self, response: object) -> None:
        """Record a pending event when ``response`` is garbage-collected unread and unclosed."""
        with contextlib.suppress(TypeError):  # not weak-referenceable: only close() records then
            weakref.finalize(response, self.body_ended).atexit = False

    def restart_clock(self) -> None:
        """Start timing now (a retry's back-off sleep is not part of the try that follows it)."""
        self._started = perf_counter()

    def feed(self, chunk: bytes | str) -> None:
        """The caller read ``chunk`` of the body (``str`` when it asked requests for text)."""
        mode = self._mode
        if mode in (_WATCH, _DONE):
            return
        try:
            if isinstance(chunk, str):
                chunk = chunk.encode("utf-8")
            if mode == _ERROR_BODY:
                body = self._body
                if body is not None and (room := self._options.max_body_bytes - len(body)) > 0:
                    body += chunk[:room]
            elif self._scanner is not None:
                found = self._scanner.feed(chunk)
                if found is not None:
                    self._record(STREAM_ERROR, stream_data=found)
        except Exception:
            self._mode = _DONE
            logger.exception("upstream_ops: could not inspect an upstream response body")

    def body_failed(self, exc: BaseException) -> None:
        """Reading the body raised ``exc`` (it propagates to the caller unchanged)."""
        if self._mode == _ERROR_BODY:
            self._record(HTTP_ERROR)  # the status is the failure; the body is what arrived
        elif self._mode != _DONE:
            self._record(STREAM_ERROR, exc=exc)

    def body_ended(self) -> None:
        """The body was read to its end, or closed by the caller."""
        mode = self._mode
        if mode == _ERROR_BODY:
            self._record(HTTP_ERROR)
        elif mode == _EVENT_STREAM and self._scanner is not None:
            try:
                found = self._scanner.finish()
            except Exception:
                found = None
                logger.exception("upstream_ops: could not inspect an upstream response body")
            if found is not None:
                self._record(STREAM_ERROR, stream_data=found)
        self._mode = _DONE

    def _record(
        self,
        kind: str,
        *,
        exc: BaseException | None = None,
        stream_data: bytes | None = None,
    ) -> None:
        self._mode = _DONE
        try:
            event = self._event(kind, exc, stream_data)
            token = _suppressed.set(True)  # a listener making HTTP calls must not record them here
            try:
                self._collector._append_own(event)
            finally:
                _suppressed.reset(token)
        except Exception:
            logger.exception("upstream_ops: could not record an upstream attempt")

    def _event(
        self, kind: str, exc: BaseException | None, stream_data: bytes | None
    ) -> UpstreamErrorEvent:
        options = self._options
        labels = options.labels.override(self._labels)
        headers = self._headers
        if headers:
            headers = _readable(headers)
        status = self.status
        event = UpstreamErrorEvent(
            kind=kind,
            platform=labels.platform,
            account_id=labels.account_id,
            account_name=labels.account_name,
            model=labels.model,
            upstream_status_code=status,
            upstream_request_id=upstream_request_id(headers) if headers else "",
            method=self.method,
            upstream_url=str(self.url),
            attempt=self.number,
            duration_ms=round((perf_counter() - self._started) * 1000, 3),
        )
        provider: ProviderError | None = None
        if kind == HTTP_ERROR:
            body = bytes(self._body or b"")
            content_type = _header(headers, "content-type")
            provider = parse_error_body(
                body, content_type, headers, max_bytes=options.max_body_bytes
            )
            event.error_class = error_class_for_status(status)
            event.error_type = error_type_for(status, None)
            event.retryable = is_retryable(status, headers)
            event.retry_after_ms = retry_after_ms(headers)
            event.message = (provider.message if provider else "") or _reason_phrase(status)
            event.detail = _body_text(body, content_type)
        elif exc is not None:
            error_class = error_class_for_exception(exc)
            event.phase = phase_for_exception(exc)
            if status:  # the headers had arrived: the body broke
                event.phase = "body"
                if error_class == "connection_terminated":
                    error_class = "http_response_incomplete"
            event.error_class = error_class
            event.error_type = error_type_for(None, exc)
            event.retryable = error_class in RETRYABLE_ERROR_CLASSES
            event.message = _exception_message(exc)
        elif stream_data is not None:
            provider = parse_error_body(stream_data, "application/json")
            event.phase = "body"
            code = provider.code if provider else ""
            if code.isdigit() and 400 <= int(code) < 600:  # Google-style numeric codes
                event.error_class = error_class_for_status(int(code))
                event.retryable = is_retryable(int(code))
            event.error_type = (provider.type if provider else "") or _OTHER_ERROR_TYPE
            event.message = (provider.message if provider else "") or "error event in the stream"
            event.detail = _body_text(stream_data, "")
        if provider is not None:
            event.provider_error_type = provider.type
            event.provider_error_code = provider.code
            event.origin = provider.origin
        return event


def _readable(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` read once for the dozen lookups of an event (``_LowerCaseHeaders``); as they are
    when they cannot be read so."""
    try:
        return _LowerCaseHeaders.of(headers)
    except Exception:
        return headers


def _reason_phrase(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _exception_message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or error_type_for(None, exc)


def _body_text(body: bytes, content_type: str) -> str:
    """The body as text in its declared charset (UTF-8 by default), or a note that it is binary."""
    text = _decode(body, content_type, len(body))
    if text and _looks_binary(text):
        return f"[{len(body)} bytes of binary data]"
    return text
