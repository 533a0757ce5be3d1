from __future__ import annotations

import time
from datetime import timedelta

import pytest

from upstream_ops.retention import cutoff_ms, parse_duration, purge_in_batches


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        (" 7D ", timedelta(days=7)),
        (timedelta(hours=3), timedelta(hours=3)),
    ],
)
def test_parse_duration(text: str | timedelta, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "30", "d", "1.5d", "-1d", "0d", "30 days", 30, None, timedelta(0)]
)
def test_bad_durations_name_the_argument(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^retention must be"):
        parse_duration(bad, "retention")  # type: ignore[arg-type]


def test_cutoff_is_now_minus_the_age() -> None:
    before = time.time_ns() // 1_000_000
    cutoff = cutoff_ms("1d")
    after = time.time_ns() // 1_000_000
    assert before - 86_400_000 <= cutoff <= after - 86_400_000


def test_purge_in_batches_stops_at_a_short_batch_and_reports_progress() -> None:
    remaining = [10]
    limits: list[int] = []

    def delete_batch(limit: int) -> int:
        limits.append(limit)
        deleted = min(limit, remaining[0])
        remaining[0] -= deleted
        return deleted

    progress: list[int] = []
    assert purge_in_batches(delete_batch, 4, progress.append) == 10
    assert limits == [4, 4, 4] and progress == [4, 8, 10]
    assert purge_in_batches(delete_batch, 4, None) == 0  # one empty batch, no progress call
