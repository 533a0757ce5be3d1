"""The ``upstream-ops`` command line.

Every failure a user can cause (a bad argument, a missing extra, an unreachable sink) ends in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from upstream_ops._ops_cli import OPS_COMMANDS, add_ops_commands, run_ops_command
from upstream_ops._version import __version__

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command in OPS_COMMANDS:
            return run_ops_command(args)
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


if __name__ == "__main__":
    sys.exit(main())
