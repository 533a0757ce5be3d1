"""Capture failed upstream attempts made with httpx: transports that wrap any other transport.

``UpstreamOpsTransport`` (``httpx.Client``) and ``AsyncUpstreamOpsTransport`` (``httpx.AsyncClient``)
wrap the default transport, a mount, or a custom one, the way ``httpx.MockTransport`` composes. They
hand back the response the wrapped transport produced and let its exceptions through unchanged; each
failed attempt made during a request becomes one event. Outside a request, or inside
``suppress_capture()``, they only delegate.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Container, Iterator
from types import TracebackType
from typing import Final, TypeVar, overload

import httpx
from opentelemetry.trace import TracerProvider

from upstream_ops._capture import Attempt, CaptureOptions, active_collector
from upstream_ops.defaults import CAPTURE_BODY_MAX_BYTES, CAPTURE_STATUSES
from upstream_ops.telemetry._client import ClientSpan
from upstream_ops.telemetry._providers import EMPTY_CONTEXT, get_context

__all__ = ["AsyncUpstreamOpsTransport", "UpstreamOpsTransport", "instrument_client"]

_NOT_RECORDED = (KeyboardInterrupt, SystemExit, GeneratorExit)

T = TypeVar("T", bound="UpstreamOpsTransport")
AT = TypeVar("AT", bound="AsyncUpstreamOpsTransport")


class UpstreamOpsTransport(httpx.BaseTransport):
    """Records the failed attempts that go through ``transport`` (default: ``httpx.HTTPTransport()``).

    The labels (``platform``, ``account_id``, ``account_name``, ``model``) are defaults: an enclosing
    ``upstream(...)`` block overrides them. ``record_statuses`` are the statuses recorded as
    ``http_error`` (default 400-599); ``max_body_bytes`` bounds the part of an error body kept, taken
    from what the caller reads (default 2 KiB). Every attempt is also an OpenTelemetry CLIENT span on
    ``tracer_provider`` (default: the global one), its trace context sent with the request.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        platform: str = "",
        account_id: int | str = 0,
        account_name: str = "",
        model: str = "",
        record_statuses: Container[int] = CAPTURE_STATUSES,
        max_body_bytes: int = CAPTURE_BODY_MAX_BYTES,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.transport = transport if transport is not None else httpx.HTTPTransport()
        self.options = CaptureOptions.from_arguments(
            platform=platform,
            account_id=account_id,
            account_name=account_name,
            model=model,
            record_statuses=record_statuses,
            max_body_bytes=max_body_bytes,
            tracer_provider=tracer_provider,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        collector = active_collector()
        if collector is None:
            return self.transport.handle_request(request)
        options = self.options
        attempt = _SyncAttempt(collector, options, request.method, request.url)
        spans = options.client_spans
        # ClientTelemetry.start's own first test, inline: with OpenTelemetry idle (no provider,
        # nothing attached to its context) no call is made.
        live = spans._live
        if live.unset:
            live.refresh()
        span = (
            spans.start(collector, request.method, request.url, request.headers)
            if live.tracing or get_context() is not EMPTY_CONTEXT
            else None
        )
        try:
            response = self.transport.handle_request(request)
        except BaseException as exc:
            _failed(attempt, span, exc)
            raise
        if span is not None:
            span.finish(status_code=response.status_code)
        if _watch(attempt, response):
            stream = response.stream
            attempt.stream = stream if isinstance(stream, httpx.SyncByteStream) else None
            response.stream = attempt
        return response

    def close(self) -> None:
        self.transport.close()

    def __enter__(self: T) -> T:
        self.transport.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.transport.__exit__(exc_type, exc_value, traceback)


class AsyncUpstreamOpsTransport(httpx.AsyncBaseTransport):
    """``UpstreamOpsTransport`` for ``httpx.AsyncClient`` (default: ``httpx.AsyncHTTPTransport()``)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        platform: str = "",
        account_id: int | str = 0,
        account_name: str = "",
        model: str = "",
        record_statuses: Container[int] = CAPTURE_STATUSES,
        max_body_bytes: int = CAPTURE_BODY_MAX_BYTES,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self.options = CaptureOptions.from_arguments(
            platform=platform,
            account_id=account_id,
            account_name=account_name,
            model=model,
            record_statuses=record_statuses,
            max_body_bytes=max_body_bytes,
            tracer_provider=tracer_provider,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        collector = active_collector()
        if collector is None:
            return await self.transport.handle_async_request(request)
        options = self.options
        attempt = _AsyncAttempt(collector, options, request.method, request.url)
        spans = options.client_spans
        # ClientTelemetry.start's own first test, inline: with OpenTelemetry idle (no provider,
        # nothing attached to its context) no call is made.
        live = spans._live
        if live.unset:
            live.refresh()
        span = (
            spans.start(collector, request.method, request.url, request.headers)
            if live.tracing or get_context() is not EMPTY_CONTEXT
            else None
        )
        try:
            response = await self.transport.handle_async_request(request)
        except BaseException as exc:  # cancellation included: the attempt ended unfinished
            _failed(attempt, span, exc)
            raise
        if span is not None:
            span.finish(status_code=response.status_code)
        if _watch(attempt, response):
            stream = response.stream
            attempt.stream = stream if isinstance(stream, httpx.AsyncByteStream) else None
            response.stream = attempt
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self: AT) -> AT:
        await self.transport.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.transport.__aexit__(exc_type, exc_value, traceback)


def _failed(attempt: Attempt, span: ClientSpan | None, exc: BaseException) -> None:
    """The wrapped transport raised ``exc``: the attempt's event (none when the process is being
    stopped), then the end of the attempt's span."""
    if isinstance(exc, _NOT_RECORDED):
        if span is not None:
            span.finish()
        return
    attempt.failed(exc)
    if span is not None:
        span.finish(error=exc)


def _watch(attempt: Attempt, response: httpx.Response) -> bool:
    """Tell the attempt about the response; True when the caller must read its body through the
    attempt (False: it was in memory already, and the attempt has looked at it)."""
    headers = response.headers
    if attempt.received_head(response.status_code, headers, _is_event_stream(headers)):
        attempt.record_on_collect(response)
    if not response.is_closed:
        return True
    if attempt.reads_body:  # built with content=...: the body is already in memory
        with contextlib.suppress(httpx.ResponseNotRead):  # closed unread: nothing to see
            attempt.feed(response.content)
    attempt.body_ended()
    return False


#: Whether a raw Content-Type value is ``text/event-stream`` (any case, any parameters), by value:
#: an upstream answers with a handful of values, and a lookup costs a third of lower-casing one.
_event_stream_by_value: dict[bytes, bool] = {}
_EVENT_STREAM_VALUES_KEPT: Final = 64


def _is_event_stream(headers: httpx.Headers) -> bool:
    """Whether the Content-Type is ``text/event-stream``, found without ``headers.get``'s cost:
    httpx keeps the lower-cased names."""
    try:
        for _, name, value in headers._list:
            if name == b"content-type":
                try:
                    return _event_stream_by_value[value]
                except KeyError:
                    known = value[:17].lower() == b"text/event-stream"
                    if len(_event_stream_by_value) < _EVENT_STREAM_VALUES_KEPT:
                        _event_stream_by_value[value] = known
                    return known
        return False
    except (AttributeError, TypeError, ValueError):  # another httpx version's layout
        return str(headers.get("content-type", ""))[:17].lower() == "text/event-stream"


class _SyncAttempt(Attempt, httpx.SyncByteStream):
    """An attempt through ``httpx.Client`` that is also the body stream of its response: the caller
    reads the wrapped transport's ``stream`` through it, so the attempt is shown each chunk when it
    reads the body (an error body is kept, an event stream scanned) and sees a failure while the
    body is read. A success passes its chunks through untouched."""

    #: The wrapped transport's stream (None when it returned an async one).
    stream: httpx.SyncByteStream | None = None

    def __iter__(self) -> Iterator[bytes]:
        stream = self.stream
        if stream is None:
            raise RuntimeError("Attempted to call a sync iterator on an async stream.")
        try:
            if not self.reads_body:
                yield from stream  # a success: only a failure while it is read is an event
                return
            for chunk in stream:
                self.feed(chunk)
                yield chunk
        except _NOT_RECORDED:
            raise
        except BaseException as exc:
            self.body_failed(exc)
            raise
        self.body_ended()

    def close(self) -> None:
        try:
            if self.stream is not None:
                self.stream.close()
        finally:
            if self.reads_body:  # a success has nothing left to record
                self.body_ended()


class _AsyncAttempt(Attempt, httpx.AsyncByteStream):
    """``_SyncAttempt`` for ``httpx.AsyncClient``. It iterates with ``__anext__`` instead of an
    async generator: a generator's machinery costs more than the rest of a successful attempt."""

    #: The wrapped transport's stream (None when it returned a sync one).
    stream: httpx.AsyncByteStream | None = None
    _chunks: AsyncIterator[bytes]

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self.stream is None:
            raise RuntimeError("Attempted to call an async iterator on a sync stream.")
        self._chunks = self.stream.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            if self.reads_body:
                self.body_ended()
            raise
        except _NOT_RECORDED:
            raise
        except BaseException as exc:
            self.body_failed(exc)
            raise
        if self.reads_body:
            self.feed(chunk)
        return chunk

    async def aclose(self) -> None:
        try:
            if self.stream is not None:
                await self.stream.aclose()
        finally:
            if self.reads_body:  # a success has nothing left to record
                self.body_ended()


@overload
def instrument_client(
    client: httpx.Client,
    *,
    platform: str = ...,
    account_id: int | str = ...,
    account_name: str = ...,
    model: str = ...,
    record_statuses: Container[int] = ...,
    max_body_bytes: int = ...,
    tracer_provider: TracerProvider | None = ...,
) -> httpx.Client: ...


@overload
def instrument_client(
    client: httpx.AsyncClient,
    *,
    platform: str = ...,
    account_id: int | str = ...,
    account_name: str = ...,
    model: str = ...,
    record_statuses: Container[int] = ...,
    max_body_bytes: int = ...,
    tracer_provider: TracerProvider | None = ...,
) -> httpx.AsyncClient: ...


def instrument_client(
    client: httpx.Client | httpx.AsyncClient,
    *,
    platform: str = "",
    account_id: int | str = 0,
    account_name: str = "",
    model: str = "",
    record_statuses: Container[int] = CAPTURE_STATUSES,
    max_body_bytes: int = CAPTURE_BODY_MAX_BYTES,
    tracer_provider: TracerProvider | None = None,
) -> httpx.Client | httpx.AsyncClient:
    """Wrap the transport of an existing client, and of each of its mounts, in place; returns it.

    For clients you do not construct (an SDK's). Idempotent: a transport that already records is
    left alone. httpx has no public setter for a client's transports, so this replaces its private
    ``_transport`` and ``_mounts`` entries (checked against httpx 0.27 and 0.28).
    """
    options = CaptureOptions.from_arguments(
        platform=platform,
        account_id=account_id,
        account_name=account_name,
        model=model,
        record_statuses=record_statuses,
        max_body_bytes=max_body_bytes,
        tracer_provider=tracer_provider,
    )
    if isinstance(client, httpx.AsyncClient):
        client._transport = _wrap_async(client._transport, options)
        client._mounts = {
            pattern: None if transport is None else _wrap_async(transport, options)
            for pattern, transport in client._mounts.items()
        }
    elif isinstance(client, httpx.Client):
        client._transport = _wrap_sync(client._transport, options)
        client._mounts = {
            pattern: None if transport is None else _wrap_sync(transport, options)
            for pattern, transport in client._mounts.items()
        }
    else:
        raise TypeError(
            f"expected an httpx.Client or httpx.AsyncClient, got {type(client).__name__}"
        )
    return client


def _wrap_sync(transport: httpx.BaseTransport, options: CaptureOptions) -> httpx.BaseTransport:
    if isinstance(transport, UpstreamOpsTransport):
        return transport
    wrapped = UpstreamOpsTransport(transport)
    wrapped.options = options
    return wrapped


def _wrap_async(
    transport: httpx.AsyncBaseTransport, options: CaptureOptions
) -> httpx.AsyncBaseTransport:
    if isinstance(transport, AsyncUpstreamOpsTransport):
        return transport
    wrapped = AsyncUpstreamOpsTransport(transport)
    wrapped.options = options
    return wrapped
