"""Flask extension: ``UpstreamOps(app, sink=...)`` or ``UpstreamOps(**options).init_app(app)``.

It wraps ``app.wsgi_app`` with ``UpstreamOpsWSGIMiddleware`` and adds what only Flask knows: the
matched URL rule (the record's ``route``), the exception a view raised before Flask turned it into a
500, and the server span of OpenTelemetry's Flask instrumentation, which the middleware adopts instead
of starting its own. It registers no per-request hook: a ``before_request`` function costs every request
more than the rest of the middleware, so the request object is kept when the response starts (its
context clears it from the environ at the end), its URL rule is read only for a request that gets a
record or a span, and the span is adopted when the response starts or when a view raises.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, got_request_exception, request
from werkzeug.exceptions import HTTPException

from upstream_ops.wsgi import (
    ENVIRON_ERROR,
    ENVIRON_TELEMETRY,
    UpstreamOpsWSGIMiddleware,
    WSGIEnvironment,
)

__all__ = ["UpstreamOps"]

EXTENSION_KEY = "upstream_ops"
#: Where werkzeug keeps a request's ``Request`` object; Flask clears it when the request context ends.
REQUEST_KEY = "werkzeug.request"


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
        # Not the object: Flask calls wsgi_app for every request, and CPython calls the C call
        # bound to the middleware (or its bound __call__) for less than an object's __call__.
        app.wsgi_app = middleware.wsgi_callable()  # type: ignore[method-assign,assignment]
        # FlaskInstrumentor sets a flag on an app it instrumented (by instrument_app or
        # instrument()), read on every request. Without it the middleware starts the SERVER span
        # and Flask's becomes an INTERNAL child.
        middleware._instrumented_app = app
        middleware._route_key = REQUEST_KEY
        middleware._route_of = lambda environ, current: _route_of(app, environ, current)
        got_request_exception.connect(_on_exception, app, weak=False)
        app.extensions[EXTENSION_KEY] = self
        self.middleware = middleware


def _route_of(app: Flask, environ: WSGIEnvironment, current: object) -> str | None:
    """The URL rule Flask matched on ``current``, the request object when the response started;
    without one (the app raised before it answered), the URL matched again."""
    if current is not None:
        rule = getattr(current, "url_rule", None)
        return None if rule is None else str(rule.rule)
    try:
        adapter = app.url_map.bind_to_environ(
            environ, server_name=app.config.get("SERVER_NAME") or None
        )
        matched, _ = adapter.match(return_rule=True)
    except HTTPException:
        return None
    return str(matched.rule)


def _on_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    environ = request.environ
    environ[ENVIRON_ERROR] = exception
    telemetry = environ.get(ENVIRON_TELEMETRY)
    if telemetry is not None:
        telemetry.adopt_current_span()
