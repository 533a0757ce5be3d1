"""Flask extension: ``UpstreamOps(app, sink=...)`` or ``UpstreamOps(**options).init_app(app)``.

It wraps ``app.wsgi_app`` with ``UpstreamOpsWSGIMiddleware`` and adds what only Flask knows: the
matched URL rule (the record's ``route``), the exception a view raised before Flask turned it into a
500, ``flask.g.upstream_ops``, and the server span of OpenTelemetry's Flask instrumentation, which is
started in a ``before_request`` hook inside the middleware: the middleware adopts it instead of
starting its own.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, g, got_request_exception, request

from upstream_ops.wsgi import (
    ENVIRON_COLLECTOR,
    ENVIRON_ERROR,
    ENVIRON_ROUTE,
    ENVIRON_TELEMETRY,
    UpstreamOpsWSGIMiddleware,
)

__all__ = ["UpstreamOps"]

EXTENSION_KEY = "upstream_ops"


class UpstreamOps:
    """Flask extension; takes the options of ``UpstreamOpsWSGIMiddleware``."""

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self.options = options
        self.middleware: UpstreamOpsWSGIMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, **options: Any) -> None:
        if EXTENSION_KEY in app.extensions:
            raise ValueError("UpstreamOps is already initialised on this Flask app")
        middleware = UpstreamOpsWSGIMiddleware(app.wsgi_app, **{**self.options, **options})
        app.wsgi_app = middleware  # type: ignore[method-assign]
        middleware._app_starts_server_span = lambda: _instrumented_by_opentelemetry(app)
        app.before_request(_before_request)
        got_request_exception.connect(_on_exception, app, weak=False)
        app.extensions[EXTENSION_KEY] = self
        self.middleware = middleware


def _instrumented_by_opentelemetry(app: Flask) -> bool:
    # The flag FlaskInstrumentor sets on an app it instrumented (by instrument_app or instrument()).
    # Without it the middleware starts the SERVER span and Flask's becomes an INTERNAL child.
    return getattr(app, "_is_instrumented_by_opentelemetry", False) is True


def _adopt_server_span(environ: dict[str, Any]) -> None:
    telemetry = environ.get(ENVIRON_TELEMETRY)
    if telemetry is not None:
        telemetry.adopt_current_span()


def _before_request() -> None:
    environ = request.environ
    g.upstream_ops = environ.get(ENVIRON_COLLECTOR)
    rule = request.url_rule
    if rule is not None:
        environ[ENVIRON_ROUTE] = rule.rule
    _adopt_server_span(environ)


def _on_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    request.environ[ENVIRON_ERROR] = exception
    _adopt_server_span(request.environ)
