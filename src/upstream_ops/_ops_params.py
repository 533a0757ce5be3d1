"""The parameters of the ops API, parsed into store queries: one table that the HTTP app checks
requests against, the OpenAPI description documents, and the CLI shares the time parsing of.

A bad value raises ``ParamError`` naming the parameter; nothing here does I/O or knows Starlette.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

from upstream_ops.defaults import (
    QUERY_LIMIT,
    QUERY_LIMIT_MAX,
    QUERY_TEXT_MAX,
    QUERY_WINDOW_DEFAULT_MS,
    QUERY_WINDOW_MAX_MS,
    STATS_MAX_BUCKETS,
    STATS_TOP_MESSAGES,
)
from upstream_ops.store import GROUP_BY, EventKey, GroupBy, QueryFilter, RecordKey


class ParamError(ValueError):
    """A request parameter is missing, malformed or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# --- times and durations ------------------------------------------------------------------------

_UNITS_MS: Final = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION: Final = re.compile(r"(\d{1,9})([smhdw])")
_UNIX_MS: Final = re.compile(r"-?\d{1,19}")


def parse_duration(text: str, field: str) -> int:
    """``30s``, ``5m``, ``1h``, ``24h``, ``7d``, ``2w`` in milliseconds (positive)."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match[1]) == 0:
        raise ParamError(
            field, f"{field} must be a positive duration like 5m, 1h, 24h or 7d, got {text!r:.40}"
        )
    return int(match[1]) * _UNITS_MS[match[2]]


def format_duration(ms: int) -> str:
    """The shortest spelling ``parse_duration`` reads back (``3600000`` -> ``1h``)."""
    for unit, size in sorted(_UNITS_MS.items(), key=lambda item: -item[1]):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_time(text: str, field: str) -> int:
    """Unix milliseconds, or an RFC 3339 time with a zone (``2026-02-12T08:30:00Z``)."""
    text = text.strip()
    if _UNIX_MS.fullmatch(text):
        value = int(text)
        if -(2**63) <= value < 2**63:
            return value
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return int(moment.timestamp() * 1000)
    raise ParamError(
        field,
        f"{field} must be Unix milliseconds or an RFC 3339 time with a zone like "
        f"2026-02-12T08:30:00Z, got {text!r:.40}",
    )


#: The names of the three time parameters: the API's, or a CLI's flags.
API_TIME_FIELDS: Final = ("start_time", "end_time", "time_range")


def resolve_window(
    *,
    now_ms: int,
    start_ms: int | None = None,
    end_ms: int | None = None,
    range_ms: int | None = None,
    fields: tuple[str, str, str] = API_TIME_FIELDS,
) -> tuple[int, int]:
    """``(start_ms, end_ms)``: the end defaults to now, the start is ``start_ms`` or ``end -
    range_ms`` (default ``QUERY_WINDOW_DEFAULT_MS``); the window is non-empty and at most
    ``QUERY_WINDOW_MAX_MS`` long. Errors name the parameter as ``fields`` spells it."""
    start_field, _, range_field = fields
    end = end_ms if end_ms is not None else now_ms
    if range_ms is not None and start_ms is not None:
        raise ParamError(range_field, f"give {range_field} or {start_field}, not both")
    if start_ms is not None:
        start, field = start_ms, start_field
    else:
        start = end - (range_ms if range_ms is not None else QUERY_WINDOW_DEFAULT_MS)
        field = range_field
    if start >= end:
        raise ParamError(field, f"the window is empty: start {start} is not before end {end}")
    if end - start > QUERY_WINDOW_MAX_MS:
        raise ParamError(
            field,
            f"the window is longer than the {format_duration(QUERY_WINDOW_MAX_MS)} a query may "
            f"cover ({format_duration(end - start)})",
        )
    if start < -(2**63):
        raise ParamError(field, "the window starts before the earliest time a store can hold")
    return start, end


#: Stats buckets chosen when none is asked for: the smallest giving at most ``_AUTO_BUCKETS``.
_NICE_BUCKETS_MS: Final = tuple(
    parse_duration(d, "bucket")
    for d in ("10s", "30s", "1m", "5m", "15m", "30m", "1h", "3h", "6h", "12h", "1d")
)
_AUTO_BUCKETS: Final = 120


def auto_bucket_ms(start_ms: int, end_ms: int, max_buckets: int = _AUTO_BUCKETS) -> int:
    """A round bucket width giving a readable chart (at most ``max_buckets``) for the window."""
    for width in _NICE_BUCKETS_MS:
        if bucket_count(start_ms, end_ms, width) <= max_buckets:
            return width
    return _NICE_BUCKETS_MS[-1]


def bucket_count(start_ms: int, end_ms: int, bucket_ms: int) -> int:
    """How many epoch-aligned buckets of ``bucket_ms`` cover ``[start_ms, end_ms)``."""
    origin = start_ms - start_ms % bucket_ms
    return -(-(end_ms - origin) // bucket_ms)


# --- the parameter table ------------------------------------------------------------------------

RECORDS: Final = "records"
EVENTS: Final = "events"
STATS: Final = "stats"
_ALL: Final = frozenset({RECORDS, EVENTS, STATS})
_PAGED: Final = frozenset({RECORDS, EVENTS})


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter: its JSON-schema type, where it is accepted and what it means."""

    name: str
    schema: dict[str, Any]
    description: str
    endpoints: frozenset[str] = _ALL
    repeatable: bool = False


_TIME_SCHEMA: Final = {"type": "string", "examples": ["2026-02-12T08:30:00Z", "1770885000000"]}
_DURATION_SCHEMA: Final = {"type": "string", "pattern": _DURATION.pattern, "examples": ["1h"]}

PARAMS: Final = (
    Param(
        "start_time",
        _TIME_SCHEMA,
        "Window start, inclusive: Unix milliseconds or RFC 3339 with a zone. Not with time_range.",
    ),
    Param(
        "end_time",
        _TIME_SCHEMA,
        "Window end, exclusive: Unix milliseconds or RFC 3339 with a zone. Default: now.",
    ),
    Param(
        "time_range",
        _DURATION_SCHEMA,
        "Window length ending at end_time: 5m, 1h, 24h, 7d ... (units s m h d w). Default: "
        f"{format_duration(QUERY_WINDOW_DEFAULT_MS)}; at most {format_duration(QUERY_WINDOW_MAX_MS)}.",
    ),
    Param("platform", {"type": "string"}, "Upstream platform, exact match (openai, rix ...)."),
    Param(
        "status_code",
        {"type": "integer", "minimum": 100, "maximum": 599},
        "Upstream HTTP status; repeat for several (status_code=429&status_code=529).",
        repeatable=True,
    ),
    Param("kind", {"type": "string"}, "Event kind, exact match (http_error, retry, failover ...)."),
    Param("account_id", {"type": "integer", "minimum": 1}, "Upstream account id."),
    Param("route", {"type": "string"}, "The service's route template, exact match (/v1/{name})."),
    Param(
        "recovered",
        {"type": "boolean"},
        "true: the client got a success despite upstream errors; false: it did not.",
    ),
    Param(
        "q",
        {"type": "string", "maxLength": QUERY_TEXT_MAX},
        "Case-insensitive text in upstream messages, request ids and upstream request ids.",
    ),
    Param(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": QUERY_LIMIT_MAX, "default": QUERY_LIMIT},
        "Page size.",
        endpoints=_PAGED,
    ),
    Param(
        "cursor",
        {"type": "string"},
        "next_cursor of the previous page: continue with older rows.",
        endpoints=_PAGED,
    ),
    Param(
        "bucket",
        _DURATION_SCHEMA,
        f"Time bucket width (1m, 1h ...). Default: a round width giving at most {_AUTO_BUCKETS} "
        f"buckets; at most {STATS_MAX_BUCKETS} buckets.",
        endpoints=frozenset({STATS}),
    ),
    Param(
        "group_by",
        {"type": "string", "enum": list(GROUP_BY), "default": "category"},
        "What events are counted by; category is 429 / overloaded / 5xx / 4xx / transport / other.",
        endpoints=frozenset({STATS}),
    ),
    Param(
        "top",
        {"type": "integer", "minimum": 0, "maximum": 100, "default": STATS_TOP_MESSAGES},
        "How many of the most frequent upstream messages to return.",
        endpoints=frozenset({STATS}),
    ),
)
_BY_NAME: Final = {param.name: param for param in PARAMS}


def params_for(endpoint: str) -> list[Param]:
    return [param for param in PARAMS if endpoint in param.endpoints]


# --- parsing one request ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageQuery:
    """A validated ``/api/records`` or ``/api/events`` request."""

    filters: QueryFilter
    limit: int
    after: tuple[Any, ...] | None


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """A validated ``/api/stats`` request."""

    filters: QueryFilter
    bucket_ms: int
    group_by: GroupBy
    top: int


def _collect(items: Sequence[tuple[str, str]], endpoint: str) -> dict[str, list[str]]:
    """Values by name; unknown names and repeats of single-valued parameters are errors, empty
    values count as absent."""
    values: dict[str, list[str]] = {}
    for name, value in items:
        param = _BY_NAME.get(name)
        if param is None or endpoint not in param.endpoints:
            accepted = ", ".join(p.name for p in params_for(endpoint))
            raise ParamError(name, f"unknown parameter {name!r:.40}; accepted: {accepted}")
        if value.strip() == "":
            continue
        if name in values and not param.repeatable:
            raise ParamError(name, f"{name} may be given once")
        values.setdefault(name, []).append(value)
    return values


def _one(values: dict[str, list[str]], name: str) -> str | None:
    found = values.get(name)
    return found[0] if found else None


def _integer(text: str, field: str, low: int, high: int) -> int:
    text = text.strip()
    if not re.fullmatch(r"-?\d{1,19}", text) or not low <= int(text) <= high:
        raise ParamError(
            field, f"{field} must be an integer from {low} to {high}, got {text!r:.40}"
        )
    return int(text)


def _boolean(text: str, field: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ParamError(field, f"{field} must be true or false, got {text!r:.40}")


def _filters(values: dict[str, list[str]], now_ms: int) -> QueryFilter:
    start_time, end_time, time_range = (_one(values, name) for name in API_TIME_FIELDS)
    start, end = resolve_window(
        now_ms=now_ms,
        start_ms=parse_time(start_time, "start_time") if start_time is not None else None,
        end_ms=parse_time(end_time, "end_time") if end_time is not None else None,
        range_ms=parse_duration(time_range, "time_range") if time_range is not None else None,
    )
    recovered = _one(values, "recovered")
    account = _one(values, "account_id")
    q = _one(values, "q")
    if q is not None and len(q) > QUERY_TEXT_MAX:
        raise ParamError("q", f"q must be at most {QUERY_TEXT_MAX} characters, got {len(q)}")
    try:
        return _filter(values, start, end, recovered, account, q)
    except ParamError:
        raise
    except ValueError as exc:  # QueryFilter's own checks; its messages start with the field name
        name = str(exc).split(" ", 1)[0]
        raise ParamError(_FILTER_FIELDS.get(name, name), str(exc)) from None


#: ``QueryFilter`` field -> request parameter, where they differ.
_FILTER_FIELDS: Final = {
    "start_ms": "start_time",
    "end_ms": "end_time",
    "status_codes": "status_code",
}


def _filter(
    values: dict[str, list[str]],
    start: int,
    end: int,
    recovered: str | None,
    account: str | None,
    q: str | None,
) -> QueryFilter:
    return QueryFilter(
        start,
        end,
        platform=_one(values, "platform"),
        status_codes=tuple(
            _integer(v, "status_code", 100, 599) for v in values.get("status_code", [])
        ),
        kind=_one(values, "kind"),
        account_id=_integer(account, "account_id", 1, 2**63 - 1) if account is not None else None,
        route=_one(values, "route"),
        recovered=_boolean(recovered, "recovered") if recovered is not None else None,
        q=q,
    )


def parse_page_query(items: Sequence[tuple[str, str]], endpoint: str, now_ms: int) -> PageQuery:
    """``/api/records`` (``endpoint=RECORDS``) or ``/api/events`` (``EVENTS``) parameters."""
    values = _collect(items, endpoint)
    limit = _one(values, "limit")
    cursor = _one(values, "cursor")
    return PageQuery(
        filters=_filters(values, now_ms),
        limit=_integer(limit, "limit", 1, QUERY_LIMIT_MAX) if limit is not None else QUERY_LIMIT,
        after=decode_cursor(cursor, endpoint) if cursor is not None else None,
    )


def parse_stats_query(items: Sequence[tuple[str, str]], now_ms: int) -> StatsQuery:
    """``/api/stats`` parameters."""
    values = _collect(items, STATS)
    filters = _filters(values, now_ms)
    bucket = _one(values, "bucket")
    if bucket is None:
        bucket_ms = auto_bucket_ms(filters.start_ms, filters.end_ms)
    else:
        bucket_ms = parse_duration(bucket, "bucket")
        count = bucket_count(filters.start_ms, filters.end_ms, bucket_ms)
        if count > STATS_MAX_BUCKETS:
            raise ParamError(
                "bucket",
                f"bucket {bucket} cuts the window into {count} buckets, more than "
                f"{STATS_MAX_BUCKETS}: choose a wider bucket or a shorter window",
            )
    group_by = _one(values, "group_by") or "category"
    if group_by not in GROUP_BY:
        raise ParamError(
            "group_by", f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r:.40}"
        )
    top = _one(values, "top")
    return StatsQuery(
        filters=filters,
        bucket_ms=bucket_ms,
        group_by=cast(GroupBy, group_by),
        top=_integer(top, "top", 0, 100) if top is not None else STATS_TOP_MESSAGES,
    )


# --- cursors ------------------------------------------------------------------------------------


def encode_cursor(key: RecordKey | EventKey) -> str:
    """An opaque, URL-safe cursor for a keyset key."""
    raw = json.dumps(list(key), separators=(",", ":"), ensure_ascii=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, endpoint: str) -> tuple[Any, ...]:
    """The key ``encode_cursor`` wrote, checked for the endpoint's shape."""
    shape = (int, str) if endpoint == RECORDS else (int, str, int)
    try:
        padded = cursor.strip() + "=" * (-len(cursor.strip()) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        key = None
    if (
        isinstance(key, list)
        and len(key) == len(shape)
        and all(_fits(v, t) for v, t in zip(key, shape, strict=True))
    ):
        return tuple(key)
    raise ParamError("cursor", f"cursor is not a next_cursor of /api/{endpoint}: {cursor!r:.40}")


def _fits(value: object, expected: type) -> bool:
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return isinstance(value, str) and 0 < len(value) <= 1024
