"""Flask extension: ``UpstreamOps(app, sink=...)`` or ``UpstreamOps(**options).init_app(app)``.

It wraps ``app.wsgi_app`` with ``UpstreamOpsWSGIMiddleware`` and adds what only Flask knows: the
matched URL rule (the record's ``route``), the exception a view raised before Flask turned it into a
500, and ``flask.g.upstream_ops``.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, g, got_request_exception, request

from upstream_ops.wsgi import (
    ENVIRON_COLLECTOR,
    ENVIRON_ERROR,
    ENVIRON_ROUTE,
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
        app.before_request(_before_request)
        got_request_exception.connect(_on_exception, app, weak=False)
        app.extensions[EXTENSION_KEY] = self
        self.middleware = middleware


def _before_request() -> None:
    environ = request.environ
    g.upstream_ops = environ.get(ENVIRON_COLLECTOR)
    rule = request.url_rule
    if rule is not None:
        environ[ENVIRON_ROUTE] = rule.rule


def _on_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    request.environ[ENVIRON_ERROR] = exception
