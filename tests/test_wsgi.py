"""The WSGI middleware and the Flask extension, under a real waitress server."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask, Response, request, send_file, stream_with_context

import upstream_ops
from upstream_ops import (
    RequestRecord,
    UpstreamOpsWSGIMiddleware,
    append_upstream_error,
    current_collector,
)
from upstream_ops import wsgi as wsgi_module
from upstream_ops.flask import UpstreamOps
from upstream_ops.sinks import MemorySink

from .conftest import serve_wsgi, wait_for
from .speedups import with_and_without

# Every test runs with the request's object in C (upstream_ops._wsgi_recording) and in Python.
recording_kind = with_and_without(wsgi_module, "_new_c_recording", "_c_call")


def records_of(sink: MemorySink, expected: int = 1) -> list[RequestRecord]:
    # A WSGI server closes the response iterable (which finishes the record) after the client
    # already has the response, so the record may reach the queue a moment after the client returns.
    wait_for(lambda: upstream_ops.flush(timeout=1) and len(sink.records) >= expected)
    return list(sink.records)


def flask_app(sink: MemorySink, tmp_path: Path, **options: Any) -> Flask:
    app = Flask(__name__)
    UpstreamOps(app, sink=sink, service="flask-gw", **options)
    asset = tmp_path / "asset.txt"
    asset.write_text("file body")

    @app.post("/generate/<int:n>")
    def generate(n: int) -> dict[str, Any]:
        append_upstream_error(
            platform="rix", upstream_status_code=504, kind="http_error", message="gateway timeout"
        )
        return {
            "ok": True,
            "same": request.environ["upstream_ops.collector"] is current_collector(),
        }

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            yield "one\n"
            append_upstream_error(kind="stream_error", message="upstream stream broke")
            yield "two\n"

        return Response(stream_with_context(body()), mimetype="text/plain")

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("view bug")

    @app.get("/file")
    def file() -> Response:
        append_upstream_error(upstream_status_code=502, message="served stale file")
        return send_file(asset)

    return app


def test_flask_recovered_request_under_waitress(tmp_path: Path) -> None:
    sink = MemorySink()
    with serve_wsgi(flask_app(sink, tmp_path)) as url:
        response = httpx.post(f"{url}/generate/4", headers={"X-Request-ID": "w-1"})
    assert response.status_code == 200 and response.json() == {"ok": True, "same": True}
    assert "x-request-id" not in response.headers  # echoed only with echo_request_id=True
    [record] = records_of(sink)
    assert (record.request_id, record.service, record.method) == ("w-1", "flask-gw", "POST")
    assert (record.path, record.route, record.status_code) == (
        "/generate/4",
        "/generate/<int:n>",
        200,
    )
    assert record.recovered and record.upstream_errors[0].upstream_status_code == 504


def test_flask_streamed_response_is_recorded_with_its_final_state(tmp_path: Path) -> None:
    sink = MemorySink()
    with serve_wsgi(flask_app(sink, tmp_path)) as url:
        assert httpx.get(f"{url}/stream").text == "one\ntwo\n"
    [record] = records_of(sink)
    assert record.status_code == 200 and record.recovered
    assert [e.kind for e in record.upstream_errors] == ["stream_error"]
    # The trouble came after the response started: the route is matched again at the end.
    assert record.route == "/stream"


def test_flask_view_exception_is_recorded_with_its_class(tmp_path: Path) -> None:
    sink = MemorySink()
    with serve_wsgi(flask_app(sink, tmp_path)) as url:
        assert httpx.get(f"{url}/boom").status_code == 500
    [record] = records_of(sink)
    assert (record.status_code, record.error, record.route) == (500, "RuntimeError", "/boom")


def test_flask_registers_no_per_request_hook_and_echoes_on_request(tmp_path: Path) -> None:
    sink = MemorySink()
    app = flask_app(sink, tmp_path, echo_request_id=True)
    assert not any(app.before_request_funcs.values())  # a hook would cost every request
    with serve_wsgi(app) as url:
        response = httpx.post(f"{url}/generate/1", headers={"X-Request-ID": "w-2"})
    assert response.headers["x-request-id"] == "w-2"
    [record] = records_of(sink)
    assert (record.request_id, record.route) == ("w-2", "/generate/<int:n>")


def test_flask_file_wrapper_response_passes_through(tmp_path: Path) -> None:
    sink = MemorySink()
    with serve_wsgi(flask_app(sink, tmp_path)) as url:
        response = httpx.get(f"{url}/file")
    assert response.status_code == 200 and response.text == "file body"
    [record] = records_of(sink)
    assert record.path == "/file" and record.upstream_errors[0].upstream_status_code == 502


def test_flask_init_app_pattern_and_double_init(tmp_path: Path) -> None:
    sink = MemorySink()
    ext = UpstreamOps(sink=sink)
    app = Flask(__name__)
    ext.init_app(app)
    assert app.extensions["upstream_ops"] is ext
    # Flask calls the C call bound to the middleware, or its bound __call__ (either is cheaper for
    # CPython than calling the object).
    installed: Any = app.wsgi_app
    if wsgi_module._c_call is not None:
        assert isinstance(installed, functools.partial)
        assert installed.func is wsgi_module._c_call and installed.args == (ext.middleware,)
    else:
        assert installed == ext.middleware.__call__  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="already"):
        UpstreamOps(app, sink=sink)


def plain_wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    append_upstream_error(upstream_status_code=503, message=f"upstream for {path}")
    if path == "/raise":
        raise ValueError("plain app bug")
    if path == "/raise-in-body":

        def body() -> Iterator[bytes]:
            yield b"partial"
            raise OSError("body broke")

        start_response("200 OK", [("Content-Type", "text/plain")])
        return body()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_plain_wsgi_app_and_its_errors() -> None:
    sink = MemorySink()
    app = UpstreamOpsWSGIMiddleware(plain_wsgi_app, sink=sink, echo_request_id=True)
    with serve_wsgi(app) as url:
        ok = httpx.get(f"{url}/ok", headers={"X-Request-ID": "bad id!"})
        assert ok.text == "hello" and re.fullmatch(r"[0-9a-f]{32}", ok.headers["x-request-id"])
        assert httpx.get(f"{url}/raise").status_code == 500
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/raise-in-body")
    records = {r.path: r for r in records_of(sink, expected=3)}
    assert records["/ok"].status_code == 200 and records["/ok"].recovered
    assert records["/ok"].request_id == ok.headers["x-request-id"]
    assert (records["/raise"].status_code, records["/raise"].error) == (500, "ValueError")
    assert records["/raise-in-body"].status_code == 200
    assert records["/raise-in-body"].error == "OSError"


def test_server_stopping_iteration_early_is_499() -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        append_upstream_error(upstream_status_code=504, message="slow")
        start_response("200 OK", [])
        return iter([b"a", b"b", b"c"])

    middleware = UpstreamOpsWSGIMiddleware(app, sink=sink)
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}, lambda s, h, e=None: None)
    iterator = iter(body)
    next(iterator)
    body.close()  # type: ignore[attr-defined]
    [record] = records_of(sink)
    assert record.status_code == 499
    assert current_collector() is None


@pytest.mark.parametrize(
    ("status", "recorded"),
    [("200 OK", None), ("404 Not Found", None), ("499 Gone", None), ("503 Busy", 503), ("x", None)],
)
def test_a_healthy_status_line_is_not_parsed_into_a_record(
    status: str, recorded: int | None
) -> None:
    sink = MemorySink()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response(status, [])
        return [b"body"]

    middleware = UpstreamOpsWSGIMiddleware(app, sink=sink)
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/s"}, lambda s, h, e=None: None)
    assert b"".join(body) == b"body"
    body.close()  # type: ignore[attr-defined]
    upstream_ops.flush(timeout=1)
    assert [r.status_code for r in sink.records] == ([] if recorded is None else [recorded])
    assert current_collector() is None


def test_flask_exception_propagated_before_a_response_has_its_route_matched_again(
    tmp_path: Path,
) -> None:
    sink = MemorySink()
    app = flask_app(sink, tmp_path)
    app.config["PROPAGATE_EXCEPTIONS"] = True  # no 500 response: the error reaches the server
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/boom",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    with pytest.raises(RuntimeError, match="view bug"):
        app(environ, lambda s, h, e=None: None)
    [record] = records_of(sink)
    assert (record.status_code, record.error, record.route) == (500, "RuntimeError", "/boom")
    assert current_collector() is None


def test_a_healthy_request_makes_no_request_id_unless_it_is_read() -> None:
    from upstream_ops.collector import Collector
    from upstream_ops.wsgi import ENVIRON_COLLECTOR

    seen: list[Collector] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(environ[ENVIRON_COLLECTOR])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = UpstreamOpsWSGIMiddleware(app, sink=MemorySink())
    try:
        for incoming in (None, "bad id!", "w-9"):
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.input": None}
            if incoming is not None:
                environ["HTTP_X_REQUEST_ID"] = incoming
            body = middleware(environ, lambda status, headers, exc=None: None)
            assert b"".join(body) == b"ok"
            body.close()  # type: ignore[attr-defined]  # as a server does: the request ends
    finally:
        middleware.dispatcher.close()
    assert [c._request_id for c in seen] == [None, None, "w-9"]  # nobody asked: none was made
    assert re.fullmatch(r"[0-9a-f]{32}", seen[1].request_id)
