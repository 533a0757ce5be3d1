"""Sinks named by URL, for configuration files and ``$UPSTREAM_OPS_SINK``.

=========================================  ==================================================
``sqlite:///upstream_ops.db``              ``SQLiteSink("upstream_ops.db")``, relative to the cwd
``sqlite:////var/lib/ops/ops.db``          ``SQLiteSink("/var/lib/ops/ops.db")``, absolute
``jsonl:///var/log/ops.jsonl``             ``JsonlSink("/var/log/ops.jsonl")``, absolute;
                                           optional ``?max_bytes=...&backups=...``
``jsonl:ops.jsonl``                        ``JsonlSink("ops.jsonl")``, relative to the cwd
``memory://``                              ``MemorySink()``
``logging://``                             ``LoggingSink()``; optional ``?logger=name&level=INFO``
``postgresql://...``, ``postgres://...``   ``PostgresSink(url)``, from ``upstream-ops[postgres]``;
                                           optional ``?schema=name``
=========================================  ==================================================

``sqlite:`` URLs follow SQLAlchemy's convention: what follows ``sqlite:///`` is the path as written,
so three slashes give a relative path and four an absolute one. ``jsonl:`` URLs follow ``file:`` URLs:
the URL path is the file path. Percent-escapes are decoded.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Final, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from upstream_ops.sinks.base import Sink
from upstream_ops.sinks.jsonl import JsonlSink
from upstream_ops.sinks.log import DEFAULT_LOGGER, LoggingSink
from upstream_ops.sinks.memory import MemorySink
from upstream_ops.sinks.sqlite import SQLiteSink

SCHEMES: Final = ("sqlite", "jsonl", "memory", "logging", "postgresql", "postgres")
_POSTGRES_MODULE: Final = "upstream_ops.sinks.postgres"


def sink_from_url(url: str) -> Sink:
    """The sink a URL names (see the module docstring); a bad URL raises ``ValueError``."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(
            f"url must be a non-empty sink URL like 'sqlite:///upstream_ops.db', got {url!r}"
        )
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("postgresql", "postgres"):
        return _postgres(url.strip())
    try:
        params = dict(
            parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        )
    except ValueError:
        raise ValueError(f"url has a malformed query string: {url!r}") from None
    if scheme == "sqlite":
        _only(params, (), url)
        return SQLiteSink(_file_path(parts.netloc, parts.path, url))
    if scheme == "jsonl":
        _only(params, ("max_bytes", "backups"), url)
        options = {name: _int_param(name, value, url) for name, value in params.items()}
        # Like file:// URLs: jsonl:///var/log/ops.jsonl is absolute, jsonl:ops.jsonl is relative.
        if parts.netloc:
            _file_path(parts.netloc, parts.path, url)  # raises: file URLs have no host
        if not parts.path:
            raise ValueError(
                f"url has no file path (like 'jsonl:///var/log/ops.jsonl'), got {url!r}"
            )
        return JsonlSink(unquote(parts.path), **options)
    if scheme == "memory":
        if parts.netloc or parts.path or parts.query:
            raise ValueError(f"url 'memory://' takes no host, path or options, got {url!r}")
        return MemorySink()
    if scheme == "logging":
        if parts.netloc or parts.path:
            raise ValueError(f"url 'logging://' takes only ?logger=...&level=..., got {url!r}")
        _only(params, ("logger", "level"), url)
        return LoggingSink(params.get("logger", DEFAULT_LOGGER), params.get("level", "WARNING"))
    shown = f"scheme {scheme!r}" if scheme else "no scheme"
    raise ValueError(
        f"url must use one of the schemes {', '.join(s + '://' for s in SCHEMES)}; got {shown}"
    )


def _file_path(netloc: str, path: str, url: str) -> str:
    if netloc:
        raise ValueError(
            f"url names a host ({netloc!r}); file URLs have none: use 'scheme:///relative/path' or "
            f"'scheme:////absolute/path', got {url!r}"
        )
    file_path = unquote(path.removeprefix("/"))
    if not file_path:
        raise ValueError(f"url has no file path (like 'sqlite:///upstream_ops.db'), got {url!r}")
    return file_path


def _only(params: Mapping[str, str], allowed: tuple[str, ...], url: str) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"url has unknown options {unknown} (accepted: {accepted}): {url!r}")


def _int_param(name: str, value: str, url: str) -> int:
    if not value.strip().isdigit():
        raise ValueError(
            f"url option {name} must be a non-negative integer, got {value!r}: {url!r}"
        )
    return int(value)


def _postgres(url: str) -> Sink:
    """``PostgresSink(url)``, imported only now so psycopg stays optional."""
    try:
        module = importlib.import_module(_POSTGRES_MODULE)
    except ModuleNotFoundError as exc:
        raise ImportError(
            "PostgreSQL URLs need psycopg: pip install 'upstream-ops[postgres]' "
            f"({exc.name} is missing)"
        ) from exc
    return cast(Sink, module.PostgresSink(url))
