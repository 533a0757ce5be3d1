"""The operators' subcommands of ``upstream-ops``: ``serve``, ``query``, ``tail`` and ``stats``.

``cli.py`` registers them with ``add_ops_commands`` and runs them with ``run_ops_command``. Tables
fit the terminal (80 columns when there is none, see ``_ops_output``); JSON output is ASCII and has
the API's shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, TextIO, cast
from urllib.parse import urlsplit, urlunsplit

from upstream_ops._ops_output import (
    EVENT_COLUMNS,
    RECORD_COLUMNS,
    Table,
    clean,
    event_cells,
    event_json,
    record_cells,
    stats_json,
    stats_lines,
    terminal_width,
    uses_unicode,
)
from upstream_ops._ops_params import (
    ParamError,
    auto_bucket_ms,
    bucket_count,
    format_duration,
    parse_duration,
    parse_time,
    resolve_window,
)
from upstream_ops.defaults import (
    DEFAULT_SINK_URL,
    OPS_HOST,
    OPS_PORT,
    OPS_TOKEN_ENV_VAR,
    QUERY_LIMIT,
    QUERY_LIMIT_MAX,
    SINK_ENV_VAR,
    STATS_MAX_BUCKETS,
    STATS_TOP_MESSAGES,
    TAIL_INTERVAL_S,
    TAIL_LOOKBACK_MS,
    TAIL_RECORDS,
)
from upstream_ops.record import RequestRecord
from upstream_ops.store import GroupBy, QueryFilter, Store, StoredEvent

EXIT_USAGE: Final = 2
EXIT_FAILURE: Final = 1
OPS_COMMANDS: Final = ("serve", "query", "tail", "stats")

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
#: ``query --limit`` pages through the store; this bounds one run.
_QUERY_ROWS_MAX: Final = 100_000
_CLI_TIME_FIELDS: Final = ("--start", "--end", "--since")
#: ``stats`` picks a bucket giving at most this many, so its trend line fits one row.
_STATS_CLI_BUCKETS: Final = 60
_BY: Final = {
    "platform": "platform",
    "status": "status_code",
    "kind": "kind",
    "error_class": "error_class",
    "category": "category",
}


class _UsageError(Exception):
    """A bad argument the parser could not see on its own (a window, a sink URL)."""


class _SinkError(Exception):
    """The sink cannot be read: a missing file, a sink that is not a store, a database down."""


# --- arguments ----------------------------------------------------------------------------------


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ParamError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return convert


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r:.40}")
        return value

    return convert


def _add_sink(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sink",
        metavar="URL",
        help=f"the store to read (default: ${SINK_ENV_VAR}, else {DEFAULT_SINK_URL})",
    )


def _add_filters(parser: argparse.ArgumentParser, *, since: str | None) -> None:
    window = parser.add_argument_group("time window (UTC; half-open)")
    window.add_argument(
        "--since",
        metavar="DURATION",
        type=_argument_type(lambda t: parse_duration(t, "--since")),
        help=f"how far back: 5m, 1h, 24h, 7d (default: {since or 'everything'})",
    )
    window.add_argument(
        "--start",
        type=_argument_type(lambda t: parse_time(t, "--start")),
        metavar="TIME",
        help="window start: RFC 3339 with a zone, or Unix ms (instead of --since)",
    )
    window.add_argument(
        "--end",
        type=_argument_type(lambda t: parse_time(t, "--end")),
        metavar="TIME",
        help="window end (default: now)",
    )
    filters = parser.add_argument_group("filters")
    filters.add_argument("--platform", metavar="P", help="upstream platform, exact")
    filters.add_argument(
        "--status",
        type=_int_in(100, 599, "an HTTP status from 100 to 599"),
        action="append",
        metavar="CODE",
        help="upstream status; repeat for several",
    )
    filters.add_argument("--kind", metavar="K", help="event kind, exact (http_error, retry ...)")
    filters.add_argument(
        "--account",
        type=_int_in(1, _INT64_MAX, "a positive account id"),
        metavar="ID",
        help="upstream account id",
    )
    filters.add_argument("--route", metavar="ROUTE", help="route template, exact")
    recovered = filters.add_mutually_exclusive_group()
    recovered.add_argument(
        "--recovered",
        dest="recovered",
        action="store_const",
        const=True,
        help="only requests whose client got a success",
    )
    recovered.add_argument(
        "--failed",
        dest="recovered",
        action="store_const",
        const=False,
        help="only requests whose client got an error",
    )
    filters.add_argument("--search", metavar="TEXT", help="text in messages or request ids")


def add_ops_commands(commands: Any) -> None:
    """Register ``serve``, ``query``, ``tail`` and ``stats`` on ``cli.py``'s subparsers."""
    serve = commands.add_parser("serve", help="run the ops API and dashboard")
    _add_sink(serve)
    serve.add_argument(
        "--host", default=OPS_HOST, help=f"address to listen on (default {OPS_HOST})"
    )
    serve.add_argument(
        "--port",
        type=_int_in(0, 65535, "a TCP port"),
        default=OPS_PORT,
        help=f"port (default {OPS_PORT}; 0 picks a free one)",
    )
    serve.add_argument(
        "--token",
        help=f"bearer token the API requires (default: ${OPS_TOKEN_ENV_VAR}, else a new random one)",
    )
    serve.add_argument("--jaeger-url", metavar="URL", help="link trace ids to this Jaeger UI")

    query = commands.add_parser("query", help="list recorded requests (or events), newest first")
    _add_sink(query)
    _add_filters(query, since="1h")
    query.add_argument("--events", action="store_true", help="list single events, not requests")
    query.add_argument(
        "--limit",
        type=_int_in(1, _QUERY_ROWS_MAX, f"from 1 to {_QUERY_ROWS_MAX}"),
        default=QUERY_LIMIT,
        help=f"rows at most (default {QUERY_LIMIT})",
    )
    query.add_argument("--format", choices=("table", "json", "jsonl"), default="table")

    tail = commands.add_parser("tail", help="the newest requests, oldest first; --follow for more")
    _add_sink(tail)
    _add_filters(tail, since=None)
    tail.add_argument(
        "-n",
        "--lines",
        type=_int_in(0, QUERY_LIMIT_MAX, f"from 0 to {QUERY_LIMIT_MAX}"),
        default=TAIL_RECORDS,
        help=f"requests shown at start (default {TAIL_RECORDS})",
    )
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new requests")
    tail.add_argument(
        "--interval",
        type=_argument_type(_interval),
        default=TAIL_INTERVAL_S,
        help=f"seconds between polls with --follow (default {TAIL_INTERVAL_S:g})",
    )
    tail.add_argument("--format", choices=("table", "jsonl"), default="table")

    stats = commands.add_parser("stats", help="error counts by platform, status or kind")
    _add_sink(stats)
    _add_filters(stats, since="24h")
    stats.add_argument("--by", choices=tuple(_BY), default="platform", help="group events by")
    stats.add_argument(
        "--bucket",
        type=_argument_type(lambda t: parse_duration(t, "--bucket")),
        metavar="DURATION",
        help="trend bucket width (default: at most 60 buckets)",
    )
    stats.add_argument(
        "--top",
        type=_int_in(0, 100, "from 0 to 100"),
        default=STATS_TOP_MESSAGES,
        help=f"top upstream messages shown (default {STATS_TOP_MESSAGES})",
    )
    stats.add_argument("--format", choices=("table", "json"), default="table")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.01 <= value <= 3600:
        raise ParamError("--interval", f"must be seconds from 0.01 to 3600, got {text!r:.40}")
    return value


def run_ops_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one of ``OPS_COMMANDS``; bad arguments and unreadable sinks end in one line on stderr."""
    out = out or sys.stdout
    try:
        if args.command == "serve":
            return _serve(args)
        store = _open_store(args.sink)
        if args.command == "query":
            return _query(store, args, out)
        if args.command == "tail":
            return _tail(store, args, out)
        return _stats(store, args, out)
    except _UsageError as exc:
        print(f"upstream-ops: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ParamError as exc:
        print(f"upstream-ops: error: {exc.field}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except _SinkError as exc:
        print(f"upstream-ops: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # `upstream-ops query | head`
        sys.stderr.close()
        return 0


# --- the store ----------------------------------------------------------------------------------


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _open_store(url: str | None) -> Store:
    from upstream_ops.sinks import SQLiteSink, sink_from_url

    url = url or os.environ.get(SINK_ENV_VAR) or DEFAULT_SINK_URL
    shown = _redact(url)
    try:
        sink = sink_from_url(url)
    except ValueError as exc:
        raise _UsageError(f"--sink: {exc}") from None
    except ImportError as exc:
        raise _SinkError(str(exc)) from None
    if not isinstance(sink, Store):
        raise _UsageError(
            f"--sink: {shown} cannot be queried; use a sqlite:// or postgresql:// URL"
        )
    if isinstance(sink, SQLiteSink) and not sink.path.is_file():
        raise _SinkError(
            f"cannot read {shown}: no SQLite database at {sink.path} (nothing recorded yet, or "
            f"another --sink / ${SINK_ENV_VAR}?)"
        )
    try:  # one cheap query, so an unreachable or broken store is one clear line
        sink.search_records(QueryFilter(0, 1), limit=1)
    except Exception as exc:
        raise _SinkError(f"cannot read {shown}: {type(exc).__name__}: {exc}") from None
    return sink


def _filters(args: argparse.Namespace, default_range_ms: int | None) -> QueryFilter:
    """The window and filters of ``args``; no window at all when ``default_range_ms`` is None and
    no time flag was given (``tail``)."""
    if args.since is None and args.start is None and default_range_ms is None:
        start, end = _INT64_MIN, args.end if args.end is not None else _INT64_MAX
    else:
        range_ms = args.since
        if range_ms is None and args.start is None:
            range_ms = default_range_ms
        start, end = resolve_window(
            now_ms=_now_ms(),
            start_ms=args.start,
            end_ms=args.end,
            range_ms=range_ms,
            fields=_CLI_TIME_FIELDS,
        )
    try:
        return QueryFilter(
            start,
            end,
            platform=args.platform or None,
            status_codes=tuple(args.status or ()),
            kind=args.kind or None,
            account_id=args.account,
            route=args.route or None,
            recovered=args.recovered,
            q=args.search or None,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _records(store: Store, filters: QueryFilter, limit: int) -> Iterator[RequestRecord]:
    """Up to ``limit`` records, newest first, page by page."""
    after = None
    left = limit
    while left > 0:
        page = store.search_records(filters, limit=min(left, QUERY_LIMIT_MAX), after=after)
        yield from page.records
        left -= len(page.records)
        if page.next_key is None:
            return
        after = page.next_key


def _events(store: Store, filters: QueryFilter, limit: int) -> Iterator[StoredEvent]:
    after = None
    left = limit
    while left > 0:
        page = store.search_events(filters, limit=min(left, QUERY_LIMIT_MAX), after=after)
        yield from page.events
        left -= len(page.events)
        if page.next_key is None:
            return
        after = page.next_key


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(", ", ": "))


# --- commands -----------------------------------------------------------------------------------


def _query(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    filters = _filters(args, parse_duration("1h", "--since"))
    if args.events:
        rows: list[Any] = list(_events(store, filters, args.limit))
        as_json: Callable[[Any], Any] = event_json
        table = Table(EVENT_COLUMNS, terminal_width())
        cells: Callable[[Any], list[str]] = event_cells
    else:
        rows = list(_records(store, filters, args.limit))
        as_json, table, cells = (
            RequestRecord.to_dict,
            Table(RECORD_COLUMNS, terminal_width()),
            record_cells,
        )
    if args.format == "jsonl":
        for row in rows:
            print(_json(as_json(row)), file=out)
    elif args.format == "json":
        print(json.dumps([as_json(row) for row in rows], ensure_ascii=True, indent=2), file=out)
    else:
        grid = [cells(row) for row in rows]
        widths = table.widths([[clean(c) for c in r] for r in grid])
        print(table.line(table.headers, widths), file=out)
        for row_cells in grid:
            print(table.line(row_cells, widths), file=out)
        noun = "events" if args.events else "requests"
        print(f"({len(rows)} {noun}, newest first)", file=out)
    return 0


def _tail(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    filters = _filters(args, None)
    table = Table(RECORD_COLUMNS, terminal_width())
    widths = table.widths([])

    def show(records: Iterable[RequestRecord]) -> None:
        for record in records:
            if args.format == "jsonl":
                print(_json(record.to_dict()), file=out)
            else:
                print(table.line(record_cells(record), widths), file=out)
        out.flush()

    if args.format == "table":
        print(table.line(table.headers, widths), file=out)
    newest = list(_records(store, filters, args.lines)) if args.lines else []
    show(reversed(newest))
    if not args.follow:
        return 0
    # Records arrive when their request finishes, so each poll looks back TAIL_LOOKBACK_MS from
    # the newest start seen and skips the ids already shown.
    seen: dict[str, int] = {r.id: r.started_at_ms for r in newest}
    horizon = max(seen.values(), default=_now_ms())
    while True:
        time.sleep(args.interval)
        since = max(filters.start_ms, horizon - TAIL_LOOKBACK_MS)
        window = QueryFilter(
            since,
            filters.end_ms,
            platform=filters.platform,
            status_codes=filters.status_codes,
            kind=filters.kind,
            account_id=filters.account_id,
            route=filters.route,
            recovered=filters.recovered,
            q=filters.q,
        )
        fresh = [r for r in _records(store, window, _QUERY_ROWS_MAX) if r.id not in seen]
        fresh.sort(key=lambda r: (r.started_at_ms, r.id))
        show(fresh)
        for record in fresh:
            seen[record.id] = record.started_at_ms
            horizon = max(horizon, record.started_at_ms)
        cutoff = horizon - TAIL_LOOKBACK_MS
        seen = {rid: at for rid, at in seen.items() if at >= cutoff}


def _stats(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    filters = _filters(args, parse_duration("24h", "--since"))
    if args.bucket is None:
        bucket_ms = auto_bucket_ms(filters.start_ms, filters.end_ms, _STATS_CLI_BUCKETS)
    else:
        bucket_ms = args.bucket
        if bucket_count(filters.start_ms, filters.end_ms, bucket_ms) > STATS_MAX_BUCKETS:
            raise _UsageError(
                f"--bucket: {format_duration(bucket_ms)} makes more than {STATS_MAX_BUCKETS} "
                "buckets in this window; choose a wider bucket"
            )
    group_by = cast(GroupBy, _BY[args.by])
    stats = store.stats(filters, bucket_ms=bucket_ms, group_by=group_by, top_messages=args.top)
    if args.format == "json":
        print(json.dumps(stats_json(stats), ensure_ascii=True, indent=2), file=out)
        return 0
    for line in stats_lines(stats, args.by, terminal_width(), uses_unicode(out)):
        print(line, file=out)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise _SinkError(
            "serve needs uvicorn: pip install 'upstream-ops[demo]' (or add uvicorn)"
        ) from None
    from upstream_ops.ops_app import create_ops_app

    store = _open_store(args.sink)
    token = args.token if args.token is not None else os.environ.get(OPS_TOKEN_ENV_VAR)
    if token is not None and not token.strip():
        raise _UsageError("--token must not be empty")
    if token is None:
        token = secrets.token_urlsafe(24)
        print(
            f"upstream-ops: no --token or ${OPS_TOKEN_ENV_VAR}; this run's API token: {token}",
            file=sys.stderr,
        )
    try:
        app = create_ops_app(store, token=token, jaeger_url=args.jaeger_url)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)  # from now on connections wait for uvicorn instead of being refused
    except OSError as exc:
        sock.close()
        raise _SinkError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(
        f"upstream-ops: ops API and dashboard on http://{shown}:{port}/ (Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
