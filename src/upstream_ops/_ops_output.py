"""How ops answers look: the JSON shapes the API and the CLI share, and the CLI's terminal tables.

Tables fit a given width and show upstream text with control characters replaced, so a message
cannot move the cursor or rewrite the terminal title.
"""

from __future__ import annotations

import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from upstream_ops._ops_params import format_duration
from upstream_ops.record import RequestRecord
from upstream_ops.store import Stats, StoredEvent

# --- JSON -------------------------------------------------------------------------------------


def window_json(start_ms: int, end_ms: int) -> dict[str, int]:
    return {"start_ms": start_ms, "end_ms": end_ms}


def event_json(stored: StoredEvent) -> dict[str, Any]:
    return {
        "record_id": stored.record_id,
        "seq": stored.seq,
        "request_id": stored.request_id,
        **stored.event.to_dict(),
    }


def stats_json(stats: Stats) -> dict[str, Any]:
    """The JSON shape of ``Stats`` (``/api/stats``, ``upstream-ops stats --format json``)."""
    return {
        "window": window_json(stats.start_ms, stats.end_ms),
        "bucket_ms": stats.bucket_ms,
        "group_by": stats.group_by,
        "buckets": [
            {
                "start_ms": bucket.start_ms,
                "counts": [{"group": g, "count": n} for g, n in bucket.counts.items()],
            }
            for bucket in stats.buckets
        ],
        "groups": [{"group": g, "count": n} for g, n in stats.groups.items()],
        "totals": {
            "events": stats.events,
            "records": stats.records,
            "recovered_records": stats.recovered_records,
            "recovered_ratio": stats.recovered_ratio,
        },
        "top_messages": [
            {"message": m.message, "count": m.count, "last_at_ms": m.last_at_ms}
            for m in stats.top_messages
        ],
    }


# --- terminal tables ---------------------------------------------------------------------------


def clean(value: object) -> str:
    """One line of text: control characters (newlines, escape sequences) become spaces."""
    text = "" if value is None else str(value)
    return "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def text_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal columns (``…`` marks a cut) and padded to it."""
    if text_width(text) <= width:
        return text + " " * (width - text_width(text))
    cut, used = [], 0
    for c in text:
        w = text_width(c)
        if used + w > width - 1:
            break
        cut.append(c)
        used += w
    return "".join(cut) + "…" + " " * (width - 1 - used)


class Table:
    """Columns of capped width; the last column takes what is left of the terminal."""

    def __init__(self, columns: Sequence[tuple[str, int]], total: int) -> None:
        self.headers = [header for header, _ in columns]
        self.caps = [cap for _, cap in columns]
        self.total = total

    def widths(self, rows: Sequence[Sequence[str]]) -> list[int]:
        """Each capped column as wide as its longest cell (or its cap when rows are unknown)."""
        widths = []
        for i, cap in enumerate(self.caps[:-1]):
            longest = (
                max([text_width(self.headers[i]), *(text_width(r[i]) for r in rows)])
                if rows
                else cap
            )
            widths.append(min(cap, longest))
        used = sum(widths) + len(widths)
        widths.append(max(10, self.total - used))
        return widths

    def line(self, cells: Sequence[str], widths: Sequence[int]) -> str:
        parts = [fit(clean(cell), width) for cell, width in zip(cells, widths, strict=True)]
        return " ".join(parts).rstrip()


def terminal_width() -> int:
    return max(60, shutil.get_terminal_size((80, 24)).columns)


def short_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%m-%d %H:%M:%S")


def distinct(values: Iterable[object]) -> list[str]:
    seen: list[str] = []
    for value in values:
        if value not in (None, "", 0) and str(value) not in seen:
            seen.append(str(value))
    return seen


RECORD_COLUMNS: Final = (
    ("TIME (UTC)", 14),
    ("ST", 3),
    ("UP", 4),
    ("REC", 3),
    ("PLATFORM", 9),
    ("KIND", 11),
    ("ROUTE", 12),
    ("MESSAGE", 0),
)


def record_cells(record: RequestRecord) -> list[str]:
    events = record.upstream_errors
    statuses = (
        [str(record.upstream_status_code)]
        if record.upstream_status_code
        else distinct(e.upstream_status_code for e in events)
    )
    up = statuses[0] + ("+" if len(statuses) > 1 else "") if statuses else ""
    message = (
        record.upstream_error_message
        or (events[-1].message if events else "")
        or record.error
        or ""
    )
    return [
        short_time(record.started_at_ms),
        str(record.status_code or ""),
        up,
        "yes" if record.recovered else "no",
        ",".join(distinct(e.platform for e in events)),
        ",".join(distinct(e.kind for e in events)),
        record.route or record.path,
        message,
    ]


EVENT_COLUMNS: Final = (
    ("TIME (UTC)", 14),
    ("UP", 3),
    ("PLATFORM", 10),
    ("ACCOUNT", 8),
    ("KIND", 13),
    ("REQUEST ID", 12),
    ("MESSAGE", 0),
)


def event_cells(stored: StoredEvent) -> list[str]:
    e = stored.event
    return [
        short_time(e.at_unix_ms),
        str(e.upstream_status_code or ""),
        e.platform,
        e.account_name or (str(e.account_id) if e.account_id else ""),
        e.kind,
        stored.request_id,
        e.message,
    ]


def uses_unicode(out: TextIO) -> bool:
    encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
    return encoding in ("utf8", "utf8sig")


def stats_lines(stats: Stats, by: str, width: int, unicode: bool) -> Iterator[str]:
    span = format_duration(stats.end_ms - stats.start_ms)
    start = datetime.fromtimestamp(stats.start_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    end = datetime.fromtimestamp(stats.end_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    yield f"upstream errors {start} - {end} UTC ({span})"
    ratio = f" ({stats.recovered_ratio:.0%})" if stats.recovered_ratio is not None else ""
    yield (
        f"events {stats.events}   requests {stats.records}   "
        f"recovered {stats.recovered_records}{ratio}"
    )
    yield trend_line(stats, width, unicode)
    yield ""
    label = by.upper()
    name_width = min(24, max([len(label), *(len(clean(group_label(g))) for g in stats.groups)]))
    bar_room = max(10, width - name_width - 17)  # name, 2, events 6, 2, share 5, 2, bar
    yield f"{fit(label, name_width)}  {'EVENTS':>6}  {'SHARE':>5}"
    top = max(stats.groups.values(), default=0)
    bar = "█" if unicode else "#"
    for group, n in stats.groups.items():
        share = f"{n / stats.events:.0%}" if stats.events else ""
        length = max(1, round(n / top * bar_room)) if top else 0
        yield f"{fit(clean(group_label(group)), name_width)}  {n:>6}  {share:>5}  {bar * length}"
    if not stats.groups:
        yield "(no upstream errors in this window)"
    if stats.top_messages:
        yield ""
        yield "TOP UPSTREAM MESSAGES"
        for m in stats.top_messages:
            yield fit(f"{m.count:>6}  {clean(m.message)}", width).rstrip()


def trend_line(stats: Stats, width: int, unicode: bool) -> str:
    """A one-row sparkline of events per bucket, adjacent buckets merged until it fits."""
    totals = [sum(b.counts.values()) for b in stats.buckets]
    peak_all = max(totals, default=0)
    suffix = f"  peak {peak_all}" if peak_all else ""
    per = 1
    prefix = f"trend per {format_duration(stats.bucket_ms)}: "
    while len(totals) > max(1, width - len(prefix) - len(suffix)):
        per *= 2
        totals = [sum(totals[i : i + 2]) for i in range(0, len(totals), 2)]
        prefix = f"trend per {format_duration(stats.bucket_ms * per)}: "
        suffix = f"  peak {max(totals)}" if peak_all else ""
    levels = " ▁▂▃▄▅▆▇█" if unicode else " .:-=+*#%"
    peak = max(totals, default=0)
    line = "".join(
        levels[max(1, round(n / peak * (len(levels) - 1)))] if n else levels[0] for n in totals
    )
    return prefix + line + suffix


def group_label(group: object) -> str:
    return "(none)" if group is None or group == "" else str(group)
