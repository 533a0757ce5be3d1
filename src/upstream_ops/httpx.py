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
from typing import TypeVar, overload

import httpx
from opentelemetry.trace import TracerProvider

from upstream_ops._capture import Attempt, CaptureOptions, active_collector
from upstream_ops.defaults import CAPTURE_BODY_MAX_BYTES, CAPTURE_STATUSES

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
        attempt = Attempt(collector, self.options, request.method, request.url)
        span = self.options.client_spans.start(
            collector, request.method, request.url, request.headers
        )
        status_code, error = 0, None
        try:
            response = self.transport.handle_request(request)
            status_code = response.status_code
        except _NOT_RECORDED:
            raise
        except BaseException as exc:
            error = exc
            attempt.failed(exc)
            raise
        finally:
            if span is not None:
                span.finish(status_code=status_code, error=error)
        if _watch(attempt, response):
            response.stream = _CapturedSyncStream(response.stream, attempt)
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
        attempt = Attempt(collector, self.options, request.method, request.url)
        span = self.options.client_spans.start(
            collector, request.method, request.url, request.headers
        )
        status_code, error = 0, None
        try:
            response = await self.transport.handle_async_request(request)
            status_code = response.status_code
        except _NOT_RECORDED:
            raise
        except BaseException as exc:  # cancellation included: the attempt ended unfinished
            error = exc
            attempt.failed(exc)
            raise
        finally:
            if span is not None:
                span.finish(status_code=status_code, error=error)
        if _watch(attempt, response):
            response.stream = _CapturedAsyncStream(response.stream, attempt)
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


def _watch(attempt: Attempt, response: httpx.Response) -> bool:
    """Tell the attempt about the response; True when its stream must be wrapped."""
    headers = response.headers
    if attempt.received(response.status_code, headers, _content_type(headers)):
        attempt.record_on_collect(response)
    if not response.is_closed:
        return True
    if attempt.reads_body:  # built with content=...: the body is already in memory
        with contextlib.suppress(httpx.ResponseNotRead):  # closed unread: nothing to see
            attempt.feed(response.content)
    attempt.body_ended()
    return False


def _content_type(headers: httpx.Headers) -> str:
    """``headers.get("content-type")`` at a fifth of its cost: httpx keeps the lower-cased names."""
    try:
        for _, name, value in headers._list:
            if name == b"content-type":
                return value.decode("latin-1")
        return ""
    except (AttributeError, TypeError, ValueError):  # another httpx version's layout
        return str(headers.get("content-type", ""))


class _CapturedSyncStream(httpx.SyncByteStream):
    """The response stream as the caller reads it: shown to the attempt chunk by chunk when the
    attempt reads the body, passed through otherwise; a failure while it is read is the attempt's."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, attempt: Attempt):
        self._stream = stream
        self._attempt = attempt

    def __iter__(self) -> Iterator[bytes]:
        attempt = self._attempt
        if not isinstance(self._stream, httpx.SyncByteStream):
            raise RuntimeError("Attempted to call a sync iterator on an async stream.")
        try:
            if attempt.reads_body:
                for chunk in self._stream:
                    attempt.feed(chunk)
                    yield chunk
            else:  # a success: only a failure while it is read is an event
                yield from self._stream
        except _NOT_RECORDED:
            raise
        except BaseException as exc:
            attempt.body_failed(exc)
            raise
        attempt.body_ended()

    def close(self) -> None:
        try:
            if isinstance(self._stream, httpx.SyncByteStream):
                self._stream.close()
        finally:
            self._attempt.body_ended()


class _CapturedAsyncStream(httpx.AsyncByteStream):
    """``_CapturedSyncStream`` for async clients."""

    def __init__(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream, attempt: Attempt):
        self._stream = stream
        self._attempt = attempt

    async def __aiter__(self) -> AsyncIterator[bytes]:
        attempt = self._attempt
        if not isinstance(self._stream, httpx.AsyncByteStream):
            raise RuntimeError("Attempted to call an async iterator on a sync stream.")
        try:
            if attempt.reads_body:
                async for chunk in self._stream:
                    attempt.feed(chunk)
                    yield chunk
            else:  # a success: only a failure while it is read is an event
                async for chunk in self._stream:
                    yield chunk
        except _NOT_RECORDED:
            raise
        except BaseException as exc:
            attempt.body_failed(exc)
            raise
        attempt.body_ended()

    async def aclose(self) -> None:
        try:
            if isinstance(self._stream, httpx.AsyncByteStream):
                await self._stream.aclose()
        finally:
            self._attempt.body_ended()


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
