"""The WSGI middleware's object for one request, driven as a server drives it, in C and in Python.

Every test runs twice: with ``upstream_ops._wsgi_recording`` (the steps every request takes in C)
and with the Python class alone; both must behave the same way.
"""

from __future__ import annotations

import contextvars
import gc
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

import upstream_ops
import upstream_ops.collector
from upstream_ops import UpstreamOpsWSGIMiddleware, append_upstream_error, current_collector
from upstream_ops import wsgi as wsgi_module
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import MemorySink

from .speedups import (
    INCOMING_IDS,
    SUMMARIES,
    assert_made_as_init_makes_it,
    require_extension,
    summary_of,
    with_and_without,
)

_wsgi_recording: ModuleType | None
try:
    from upstream_ops import _wsgi_recording
except ImportError:  # pragma: no cover - depends on the build
    _wsgi_recording = None

recording_kind = with_and_without(wsgi_module, "_new_c_recording", "_c_call")

ENVIRON: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/r"}


class ServerStartResponse:
    """A server's start_response: notes each call's arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return lambda data: None


def records(sink: MemorySink) -> list[RequestRecord]:
    assert upstream_ops.flush(timeout=2)
    return list(sink.records)


def serve(middleware: UpstreamOpsWSGIMiddleware, server: ServerStartResponse) -> Any:
    return middleware(dict(ENVIRON), server)


def test_an_error_in_the_body_is_recorded_and_raised_unchanged() -> None:
    sink = MemorySink()
    failure = OSError("stream broke")

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        raise failure

    body = serve(UpstreamOpsWSGIMiddleware(app, sink=sink), ServerStartResponse())
    iterator = iter(body)
    assert next(iterator) == b"first"
    with pytest.raises(OSError) as raised:
        next(iterator)
    assert raised.value is failure
    assert list(iterator) == []  # ended: no more items, no second error
    body.close()
    [record] = records(sink)
    assert (record.status_code, record.error) == (200, "OSError")
    assert current_collector() is None


def test_a_body_that_cannot_be_iterated_is_an_error_of_the_request() -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        return 42  # not iterable

    body = serve(UpstreamOpsWSGIMiddleware(app, sink=sink), ServerStartResponse())
    with pytest.raises(TypeError):
        list(body)
    body.close()
    [record] = records(sink)
    assert record.error == "TypeError"


def test_close_of_the_apps_body_raising_still_finishes_the_request_once() -> None:
    sink = MemorySink()
    closed: list[str] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            closed.append("body")
            raise RuntimeError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        append_upstream_error(upstream_status_code=502, message="bad gateway")
        start_response("200 OK", [])
        return Body()

    body = serve(UpstreamOpsWSGIMiddleware(app, sink=sink), ServerStartResponse())
    assert b"".join(body) == b"x"
    with pytest.raises(RuntimeError, match="close failed"):
        body.close()
    with pytest.raises(RuntimeError, match="close failed"):
        body.close()  # the app's close runs again; the request was finished once
    assert closed == ["body", "body"]
    [record] = records(sink)
    assert record.recovered and record.status_code == 200
    assert current_collector() is None


def test_finishing_that_fails_after_a_failing_close_raises_with_closes_error_as_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Body(list[bytes]):
        def close(self) -> None:
            raise RuntimeError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        append_upstream_error(upstream_status_code=502, message="bad gateway")
        start_response("200 OK", [])
        return Body([b"x"])

    def broken_finish(self: object, error: BaseException | None) -> None:
        raise KeyError("finish failed")

    middleware = UpstreamOpsWSGIMiddleware(app, sink=MemorySink())
    body = serve(middleware, ServerStartResponse())
    monkeypatch.setattr(type(body), "_finish_slow", broken_finish)
    assert b"".join(body) == b"x"
    with pytest.raises(KeyError, match="finish failed") as raised:
        body.close()
    context = raised.value.__context__
    assert isinstance(context, RuntimeError) and str(context) == "close failed"
    middleware.dispatcher.close()


def test_start_response_passes_what_it_was_given_to_the_server() -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(start_response("200 OK", [("A", "1")]))
        seen.append(start_response("500 Oops", [], None))
        try:
            raise ValueError("late")
        except ValueError:
            import sys

            info = sys.exc_info()
        seen.append(start_response("502 Bad", [], info))
        seen.append(start_response(status="503 Busy", headers=[("B", "2")]))
        return [b""]

    server = ServerStartResponse()
    middleware = UpstreamOpsWSGIMiddleware(app, sink=MemorySink())
    body = serve(middleware, server)
    list(body)
    body.close()
    middleware.dispatcher.close()
    assert [call[:2] for call in server.calls] == [
        ("200 OK", [("A", "1")]),
        ("500 Oops", []),
        ("502 Bad", []),
        ("503 Busy", [("B", "2")]),
    ]
    assert [len(call) for call in server.calls] == [2, 2, 3, 2]
    assert all(callable(write) for write in seen)
    assert body.status == "503 Busy"


def test_the_request_id_is_echoed_through_the_slow_start_response() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = ServerStartResponse()
    middleware = UpstreamOpsWSGIMiddleware(app, sink=MemorySink(), echo_request_id=True)
    body: Any = middleware({**ENVIRON, "HTTP_X_REQUEST_ID": "req-7"}, server)
    assert b"".join(body) == b"ok"
    body.close()
    middleware.dispatcher.close()
    assert server.calls == [("200 OK", [("Content-Type", "text/plain"), ("X-Request-ID", "req-7")])]


def test_a_body_closed_in_another_thread_leaves_no_collector_behind() -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        append_upstream_error(upstream_status_code=429, message="slow down")
        start_response("200 OK", [])
        return [b"ok"]

    body = serve(UpstreamOpsWSGIMiddleware(app, sink=sink), ServerStartResponse())
    assert current_collector() is not None  # until the server closes the body
    context = contextvars.Context()
    thread = threading.Thread(target=lambda: context.run(lambda: (list(body), body.close())))
    thread.start()
    thread.join()
    assert context.run(current_collector) is None  # the token was not of that context
    [record] = records(sink)
    assert [e.upstream_status_code for e in record.upstream_errors] == [429]
    # This context still has the request's collector set: the server closed the body elsewhere.
    upstream_ops.collector._current.set(None)


def test_healthy_requests_leave_nothing_behind() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    middleware = UpstreamOpsWSGIMiddleware(app, sink=MemorySink())
    kind = wsgi_module._WSGIRequestRecording if wsgi_module._new_c_recording else None
    kind = kind or wsgi_module._PyWSGIRequestRecording
    gc.collect()
    before = sum(type(o) is kind for o in gc.get_objects())
    for _ in range(200):
        body = serve(middleware, ServerStartResponse())
        assert b"".join(body) == b"ok"
        body.close()
    del body
    gc.collect()
    assert sum(type(o) is kind for o in gc.get_objects()) == before
    middleware.dispatcher.close()


def test_new_recording_refuses_what_is_not_a_recording() -> None:
    require_extension(_wsgi_recording)
    assert _wsgi_recording is not None
    with pytest.raises(TypeError, match="subclass of Recording"):
        _wsgi_recording.new_recording(object, *([None] * 5), 0.0, None, None, None, True, True)
    with pytest.raises(TypeError, match="12 arguments"):
        _wsgi_recording.new_recording(object)


# -- the whole request in one C call (``_wsgi_recording.call``), against the Python ``_serve`` -----


def test_the_collector_is_made_as_its_init_makes_it() -> None:
    seen: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        collector = current_collector()
        assert type(collector) is upstream_ops.Collector
        assert environ["upstream_ops.collector"] is collector
        seen.append(dict(vars(collector)))
        start_response("200 OK", [])
        return [b"ok"]

    middleware = UpstreamOpsWSGIMiddleware(app, sink=MemorySink(), max_events=7)
    for rid in INCOMING_IDS:
        incoming = {} if rid is None else {"HTTP_X_REQUEST_ID": rid}
        body = middleware({**ENVIRON, **incoming}, ServerStartResponse())
        assert b"".join(body) == b"ok"
        body.close()  # type: ignore[attr-defined]
    assert_made_as_init_makes_it(seen, middleware.recorder, 7)
    middleware.dispatcher.close()


@pytest.mark.parametrize("summary", ["status", "message", "detail"])
def test_a_collector_with_only_a_summary_is_not_quiet(summary: str) -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        collector = current_collector()
        assert collector is not None
        collector.set_summary(*SUMMARIES[summary][0])
        start_response("200 OK", [])
        return [b"ok"]

    body = serve(UpstreamOpsWSGIMiddleware(app, sink=sink), ServerStartResponse())
    assert b"".join(body) == b"ok"
    body.close()
    [record] = records(sink)
    assert record.upstream_errors == []
    assert summary_of(record) == SUMMARIES[summary][1]


class _DictEnviron(dict[str, Any]):
    """An environ that is not exactly a dict (the C call leaves it to the Python code)."""


class _PropertyMiddleware(UpstreamOpsWSGIMiddleware):
    """A subclass whose ``app`` is a property: read through getattr, not the instance dict."""

    @property  # type: ignore[override]
    def app(self) -> Any:
        return self._wrapped

    @app.setter
    def app(self, value: Any) -> None:
        self._wrapped = value


@pytest.mark.parametrize("kind", ["dict subclass environ", "subclass with a property"])
def test_unusual_environs_and_subclasses_are_served_alike(kind: str) -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        append_upstream_error(upstream_status_code=503, message="busy")
        start_response("200 OK", [])
        return [b"ok"]

    if kind == "dict subclass environ":
        middleware = UpstreamOpsWSGIMiddleware(app, sink=sink)
        environ: dict[str, Any] = _DictEnviron(ENVIRON)
    else:
        middleware = _PropertyMiddleware(app, sink=sink)
        environ = dict(ENVIRON)
    body = middleware(environ, ServerStartResponse())
    assert b"".join(body) == b"ok"
    body.close()  # type: ignore[attr-defined]
    [record] = records(sink)
    assert [e.upstream_status_code for e in record.upstream_errors] == [503]
    assert current_collector() is None


def test_an_app_error_goes_on_unchanged_and_a_failing_finish_keeps_it_as_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failure = KeyError("from the app")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise failure

    sink = MemorySink()
    middleware = UpstreamOpsWSGIMiddleware(app, sink=sink)
    with pytest.raises(KeyError) as raised:
        serve(middleware, ServerStartResponse())
    assert raised.value is failure and current_collector() is None
    [record] = records(sink)
    assert record.status_code == 500

    def broken_fail(self: Any, error: BaseException) -> None:
        raise RuntimeError("finishing failed")

    monkeypatch.setattr(wsgi_module._RecordingSteps, "fail", broken_fail)
    with pytest.raises(RuntimeError, match="finishing failed") as finishing:
        serve(middleware, ServerStartResponse())
    assert finishing.value.__context__ is failure
    upstream_ops.collector._current.set(None)  # fail() never reset it


def test_flask_installs_the_c_call_bound_to_the_middleware() -> None:
    from flask import Flask

    from upstream_ops.flask import UpstreamOps

    app = Flask(__name__)
    middleware = UpstreamOps(app, sink=MemorySink()).middleware
    assert middleware is not None
    installed: Any = app.wsgi_app
    if wsgi_module._c_call is None:
        assert installed == middleware.__call__
    else:
        assert installed.func is wsgi_module._c_call and installed.args == (middleware,)
    middleware.dispatcher.close()


def test_call_and_setup_refuse_bad_arguments() -> None:
    require_extension(_wsgi_recording)
    assert _wsgi_recording is not None
    with pytest.raises(TypeError, match="3 arguments"):
        _wsgi_recording.call(None)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="12 arguments"):
        _wsgi_recording.setup()  # type: ignore[call-arg]
    good: list[Any] = [
        lambda: 0.0,
        "upstream_ops.error",
        UpstreamOpsWSGIMiddleware,
        wsgi_module._WSGIRequestRecording,
        upstream_ops.Collector,
        upstream_ops.collector._current,
        lambda: None,
        object(),
        lambda: False,
        "flag",
        "key",
        None,
    ]
    for index, bad in [(0, 1), (1, b"key"), (3, object), (4, len), (5, None), (9, 1)]:
        arguments = list(good)
        arguments[index] = bad
        with pytest.raises(TypeError, match="setup expects"):
            _wsgi_recording.setup(*arguments)
    with pytest.raises(TypeError, match="setup expects"):
        _wsgi_recording.setup(*good[:11], ({}, {}, {}))
