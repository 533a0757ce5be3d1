"""Capture failed upstream attempts made with requests: a transport adapter.

``session.mount("https://", UpstreamOpsAdapter(platform="dify"))``. Each try is an attempt, including
the ones urllib3 makes by itself when the adapter has ``max_retries``: the adapter's ``Retry`` is given
a recording subclass that reports every failed try before urllib3 retries it. Responses and exceptions
reach the caller unchanged; outside a request, or inside ``suppress_capture()``, it only delegates.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import weakref
from collections.abc import Container, Iterator, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Self, cast

import requests
from opentelemetry.trace import TracerProvider
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, DEFAULT_RETRIES, HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from upstream_ops._capture import Attempt, CaptureOptions, active_collector
from upstream_ops.collector import Collector
from upstream_ops.defaults import CAPTURE_BODY_MAX_BYTES, CAPTURE_STATUSES
from upstream_ops.telemetry._client import ClientSpan

__all__ = ["UpstreamOpsAdapter"]

logger = logging.getLogger("upstream_ops")

_NOT_RECORDED = (KeyboardInterrupt, SystemExit, GeneratorExit)


class _Send:
    """One ``adapter.send``: the try in flight and its CLIENT span; urllib3 may make several."""

    __slots__ = ("attempt", "collector", "headers", "method", "options", "span", "url")

    def __init__(
        self,
        collector: Collector,
        options: CaptureOptions,
        method: str,
        url: str,
        headers: MutableMapping[str, str],
    ) -> None:
        self.collector = collector
        self.options = options
        self.method = method
        self.url = url
        self.headers = (
            headers  # urllib3 sends each try with this mapping: the trace context goes in
        )
        self.attempt = Attempt(collector, options, method, url)
        self.span: ClientSpan | None = options.client_spans.start(collector, method, url, headers)

    def retrying(self, response: BaseHTTPResponse | None, error: Exception | None) -> None:
        """urllib3 gave up on this try and will make another: record it, start the next one."""
        self.finish_try(response, error)
        self.attempt = Attempt(self.collector, self.options, self.method, self.url)
        self.span = self.options.client_spans.start(
            self.collector, self.method, self.url, self.headers
        )

    def end_span(self, status_code: int = 0, error: BaseException | None = None) -> None:
        """The try's CLIENT span ends (once)."""
        span, self.span = self.span, None
        if span is not None:
            span.finish(status_code=status_code, error=error)

    def finish_try(self, response: BaseHTTPResponse | None, error: Exception | None) -> None:
        """Record the try now: its response will be drained by urllib3, never seen by the caller."""
        self.end_span(response.status if response is not None else 0, error)
        attempt = self.attempt
        if response is None:
            attempt.failed(error if error is not None else RuntimeError("urllib3 retry"))
            return
        headers = response.headers
        if attempt.received(response.status, headers, headers.get("content-type") or ""):
            try:  # urllib3 drains this body next; the head is read from what it would discard
                attempt.feed(response.read(self.options.max_body_bytes, decode_content=True))
            except Exception as exc:
                logger.debug("upstream_ops: could not read a retried response's body: %r", exc)
        attempt.body_ended()


_current_send: contextvars.ContextVar[_Send | None] = contextvars.ContextVar(
    "upstream_ops_requests_send", default=None
)


class _RecordingRetry(Retry):
    """Mixed in before the adapter's own ``Retry`` class: reports each failed try of a send."""

    _plain_class: type[Retry] = Retry

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        send = _current_send.get()
        if send is None:
            return super().increment(method, url, response, error, _pool, _stacktrace)
        try:
            retry = super().increment(method, url, response, error, _pool, _stacktrace)
        except BaseException as exc:
            # The last try. A response is drained and raised over, unless urllib3 returns it to the
            # caller (raise_on_status=False); an error becomes the caller's exception. Those two
            # are recorded by send(), as the caller sees them.
            returned = isinstance(exc, MaxRetryError) and not self.raise_on_status
            if response is not None and not returned:
                send.finish_try(response, None)
            raise
        send.retrying(response, error)
        return retry

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        super().sleep(response)
        send = _current_send.get()
        if send is not None:
            send.attempt.restart_clock()  # the back-off is not part of the next try


_recording_classes: dict[type[Retry], type[_RecordingRetry]] = {}


def _recording_class(cls: type[Retry]) -> type[_RecordingRetry]:
    """``Recording<YourRetry>``: the recording mixin before the class the user chose, made once."""
    if issubclass(cls, _RecordingRetry):
        return cls
    made = _recording_classes.get(cls)
    if made is None:
        made = type(
            f"Recording{cls.__name__}",
            (_RecordingRetry, cls),
            {"__module__": __name__, "_plain_class": cls},
        )
        made = _recording_classes.setdefault(cls, made)
    return made


def _recording(retry: Retry) -> Retry:
    if isinstance(retry, _RecordingRetry) or not isinstance(retry, Retry):
        return retry
    recording = copy.copy(retry)
    recording.__class__ = _recording_class(type(retry))
    return recording


def _plain(retry: Retry) -> Retry:
    if not isinstance(retry, _RecordingRetry):
        return retry
    plain: Retry = copy.copy(retry)
    plain.__class__ = retry._plain_class
    return plain


class UpstreamOpsAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that records each failed try, urllib3's own retries included.

    Labels and limits as for ``upstream_ops.httpx.UpstreamOpsTransport``; the other arguments are
    ``HTTPAdapter``'s. A ``Retry`` assigned to ``max_retries`` later is wrapped too. Error bodies are
    captured from what the caller reads through ``iter_content`` (``.content``, ``.json()``,
    ``.text``, ``iter_lines``); reading ``response.raw`` directly bypasses the capture. Every try is
    also an OpenTelemetry CLIENT span on ``tracer_provider`` (default: the global one).
    """

    __attrs__ = [*HTTPAdapter.__attrs__, "capture_options"]

    def __init__(
        self,
        *,
        platform: str = "",
        account_id: int | str = 0,
        account_name: str = "",
        model: str = "",
        record_statuses: Container[int] = CAPTURE_STATUSES,
        max_body_bytes: int = CAPTURE_BODY_MAX_BYTES,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        max_retries: Retry | int | None = DEFAULT_RETRIES,
        pool_block: bool = DEFAULT_POOLBLOCK,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.capture_options = CaptureOptions.from_arguments(
            platform=platform,
            account_id=account_id,
            account_name=account_name,
            model=model,
            record_statuses=record_statuses,
            max_body_bytes=max_body_bytes,
            tracer_provider=tracer_provider,
        )
        super().__init__(pool_connections, pool_maxsize, max_retries, pool_block)

    @property
    def max_retries(self) -> Retry:
        return self._recording_retries

    @max_retries.setter
    def max_retries(self, retries: Retry) -> None:
        self._recording_retries = _recording(retries)

    def __getstate__(self) -> dict[str, Any]:
        state = cast(dict[str, Any], super().__getstate__())
        state["max_retries"] = _plain(
            self._recording_retries
        )  # the recording class is not importable
        return state

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        collector = active_collector()
        if collector is None:
            return super().send(request, stream, timeout, verify, cert, proxies)
        send = _Send(
            collector,
            self.capture_options,
            request.method or "",
            request.url or "",
            request.headers,
        )
        token = _current_send.set(send)
        status_code, error = 0, None
        try:
            response = super().send(request, stream, timeout, verify, cert, proxies)
            status_code = response.status_code
        except _NOT_RECORDED:
            raise
        except BaseException as exc:
            error = exc
            send.attempt.failed(exc)
            raise
        finally:
            _current_send.reset(token)
            send.end_span(status_code, error)
        attempt = send.attempt
        if attempt.pending:
            headers = response.headers
            if attempt.received(response.status_code, headers, headers.get("content-type") or ""):
                attempt.record_on_collect(response)
            _tap(response, attempt)
        return response


def _tap(response: requests.Response, attempt: Attempt) -> None:
    """Show the attempt what the caller reads: ``iter_content`` feeds every reader of requests.

    Instance attributes shadow the two methods for this response only; its class stays requests'.
    They hold the response weakly: a reference cycle would keep every body alive until the
    garbage collector's next full pass.
    """
    cls = type(response)
    ref = weakref.ref(response)

    def captured_iter_content(
        chunk_size: int | None = 1, decode_unicode: bool = False
    ) -> Iterator[Any]:
        return _captured(cls.iter_content(_alive(ref), chunk_size, decode_unicode), attempt)

    def captured_close() -> None:
        try:
            cls.close(_alive(ref))
        finally:
            attempt.body_ended()

    response.iter_content = captured_iter_content  # type: ignore[method-assign]
    response.close = captured_close  # type: ignore[method-assign]


def _alive(ref: weakref.ref[requests.Response]) -> requests.Response:
    response = ref()
    if response is None:  # only reachable through a method taken off a response since collected
        raise ReferenceError("the response was garbage-collected")
    return response


def _captured(chunks: Iterator[Any], attempt: Attempt) -> Iterator[Any]:
    try:
        for chunk in chunks:
            attempt.feed(chunk)
            yield chunk
    except _NOT_RECORDED:
        raise
    except BaseException as exc:
        attempt.body_failed(exc)
        raise
    attempt.body_ended()
