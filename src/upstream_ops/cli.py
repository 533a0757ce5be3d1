"""The ``upstream-ops`` command line.

Every failure a user can cause (a bad argument, a missing extra, an unreachable sink) ends in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from upstream_ops._ops_cli import OPS_COMMANDS, add_ops_commands, run_ops_command
from upstream_ops._version import __version__
from upstream_ops.defaults import DEFAULT_SINK_URL, SINK_ENV_VAR

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"upstream-ops: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="upstream-ops", description="Make failed upstream calls visible.")
    parser.add_argument("--version", action="version", version=f"upstream-ops {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="run a flaky upstream and a gateway, show the records")
    demo.add_argument("--db", type=Path, default=None, help="SQLite file to keep (default: temp)")
    demo.add_argument("--requests", type=int, default=36, help="client requests to send")
    add_ops_commands(commands)
    migrate = commands.add_parser("migrate", help="create or upgrade a database's schema now")
    migrate.add_argument("--sink", required=True, help="sink URL, e.g. postgresql://user@host/db")
    purge = commands.add_parser("purge", help="delete records older than an age")
    purge.add_argument("--older-than", required=True, help="age: 30d, 12h, 90m, 45s or 2w")
    purge.add_argument(
        "--sink",
        default=None,
        help="sink URL (default: $UPSTREAM_OPS_SINK, else the SQLite default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command in OPS_COMMANDS:
            return run_ops_command(args)
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "purge":
            return _purge(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"upstream-ops: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def _demo(args: argparse.Namespace) -> int:
    if args.requests < 1:
        print("upstream-ops: error: --requests must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        from upstream_ops.demo import run_demo
    except ImportError as exc:
        print(
            f"upstream-ops: the demo needs the [demo] extra ({exc.name} is missing): "
            "pip install 'upstream-ops[demo]'",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    landed = run_demo(sink_path=args.db, requests=args.requests, out=sys.stdout)
    return 0 if landed else EXIT_FAILURE


def _migrate(args: argparse.Namespace) -> int:
    sink = _open_store(args.sink, "migrate")
    if isinstance(sink, int):
        return sink
    try:
        version = sink.migrate()
    except Exception as exc:
        return _failed("migrate", exc)
    finally:
        _close(sink)
    print(f"{sink!r}: schema at version {version}")
    return 0


def _purge(args: argparse.Namespace) -> int:
    from upstream_ops.retention import parse_duration

    try:
        older_than = parse_duration(args.older_than, "--older-than")
    except ValueError as exc:
        print(f"upstream-ops: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sink = _open_store(args.sink or os.environ.get(SINK_ENV_VAR) or DEFAULT_SINK_URL, "purge")
    if isinstance(sink, int):
        return sink
    shown = _ProgressLine()
    try:
        sink.migrate()  # one direct connection: an unreachable database fails fast, with its reason
        deleted = sink.purge(older_than, progress=shown.update)
    except Exception as exc:
        shown.end()
        return _failed("purge", exc)
    finally:
        _close(sink)
    shown.end()
    print(f"purged {deleted} records older than {args.older_than} from {sink!r}")
    return 0


def _open_store(url: str, command: str) -> Any:
    """The sink a URL names if it has ``command`` (a method); else an exit code, error printed."""
    # Connection errors are reported here, in one line; keep psycopg's pool logs off stderr.
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    try:
        from upstream_ops.sinks.url import sink_from_url

        sink = sink_from_url(url)
    except ValueError as exc:
        print(f"upstream-ops: error: --sink: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:
        print(f"upstream-ops: {command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not all(callable(getattr(sink, name, None)) for name in (command, "migrate")):
        _close(sink)
        print(
            f"upstream-ops: error: --sink: {type(sink).__name__} cannot {command} "
            "(use a sqlite:// or postgresql:// URL)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return sink


def _failed(command: str, exc: Exception) -> int:
    message = " ".join(str(exc).split())  # libpq's messages span lines
    print(f"upstream-ops: {command} failed: {type(exc).__name__}: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _close(sink: object) -> None:
    close = getattr(sink, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


class _ProgressLine:
    """``purged N records...`` on stderr at most once a second, for purges that take a while."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._shown = False

    def update(self, deleted: int) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            self._shown = True
            end = "\r" if sys.stderr.isatty() else "\n"
            print(f"upstream-ops: purged {deleted} records so far...", end=end, file=sys.stderr)

    def end(self) -> None:
        if self._shown and sys.stderr.isatty():
            print(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
