from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

import pytest

from tests.sink_records import full_record
from upstream_ops.record import RequestRecord
from upstream_ops.spool import Spool


def rec(i: int, **fields: object) -> RequestRecord:
    return RequestRecord(id=f"id-{i}", request_id=f"req-{i}", started_at_ms=i, **fields)  # type: ignore[arg-type]


def drain(spool: Spool, limit: int = 1000) -> list[RequestRecord]:
    """Read and commit everything, in order."""
    out: list[RequestRecord] = []
    while (chunk := spool.read(limit)) is not None:
        out.extend(chunk.records)
        spool.commit(chunk)
    return out


def process_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_no_io_until_first_use(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool(root)
    assert not root.exists()


def test_records_come_back_in_order_and_intact(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    nasty = full_record("nasty", error="nul \x00 surrogate \udc80 ctl \x01", status_code=2**70)
    spool.append([rec(i) for i in range(5)])
    spool.append([nasty, rec(5)])
    assert spool.pending == 7
    chunk = spool.read(3)
    assert chunk is not None and [r.id for r in chunk.records] == ["id-0", "id-1", "id-2"]
    # not committed: read again gives the same records
    again = spool.read(3)
    assert again is not None and again.records == chunk.records
    spool.commit(chunk)
    assert spool.pending == 4
    rest = drain(spool)
    assert [r.id for r in rest] == ["id-3", "id-4", "nasty", "id-5"]
    assert rest[2] == nasty  # any str and any int survive the JSON round trip
    assert spool.pending == 0 and spool.size_bytes == 0
    assert list(spool.directory.glob("*.jsonl")) == []  # type: ignore[union-attr]
    spool.close()
    assert process_dirs(tmp_path) == []  # an empty spool leaves nothing behind


def test_segments_rotate_and_chunks_span_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=4096)
    for i in range(100):
        spool.append([rec(i, path="/" + "p" * 200)])
    assert spool.directory is not None
    assert len(list(spool.directory.glob("*.jsonl"))) > 3
    chunk = spool.read(100)
    assert chunk is not None and [r.id for r in chunk.records] == [f"id-{i}" for i in range(100)]
    spool.commit(chunk)
    assert list(spool.directory.glob("*.jsonl")) == []
    spool.close()


def test_unserializable_records_are_rejected_not_spooled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    loop: list[object] = []
    loop.append(loop)
    bad = rec(1, route=loop)
    with caplog.at_level(logging.ERROR, logger="upstream_ops"):
        rejected = spool.append([rec(0), bad, rec(2)])
    assert rejected == [bad]
    assert "cannot spool a record" in caplog.text
    assert [r.id for r in drain(spool)] == ["id-0", "id-2"]
    spool.close()


def test_bounded_oldest_evicted_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, max_bytes=64 * 1024, segment_bytes=8 * 1024)
    with caplog.at_level(logging.WARNING, logger="upstream_ops"):
        for i in range(2000):
            spool.append([rec(i, path="/" + "p" * 100)])
            assert spool.size_bytes <= 64 * 1024
    assert spool.evicted > 0
    assert spool.evicted + spool.pending == 2000
    assert "evicted the" in caplog.text
    assert caplog.text.count("is full") == 1  # warned once a minute, not per eviction
    remaining = drain(spool)
    assert [r.id for r in remaining] == [f"id-{i}" for i in range(2000 - len(remaining), 2000)]
    spool.close()


def test_a_batch_bigger_than_the_bound_keeps_its_newest_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=8192)
    spool.append([rec(i, path="/" + "p" * 500) for i in range(100)])
    kept = drain(spool)
    assert 0 < len(kept) < 100 and kept[-1].id == "id-99"
    assert spool.evicted == 100 - len(kept)
    spool.close()


def test_a_closed_spool_with_records_is_adopted_by_the_next(tmp_path: Path) -> None:
    first = Spool(tmp_path, segment_bytes=4096)
    for i in range(50):
        first.append([rec(i, path="/" + "p" * 100)])
    chunk = first.read(10)
    assert chunk is not None
    first.commit(chunk)  # replayed 10 before stopping: the cursor remembers
    first.close()
    assert len(process_dirs(tmp_path)) == 1

    second = Spool(tmp_path)
    assert second.open() == 40
    assert second.pending == 40
    assert [r.id for r in drain(second)] == [f"id-{i}" for i in range(10, 50)]
    second.close()
    assert process_dirs(tmp_path) == []


def test_a_live_owner_is_never_adopted(tmp_path: Path) -> None:
    owner = Spool(tmp_path)
    owner.append([rec(1)])
    other = Spool(tmp_path)
    assert other.open() == 0  # owner holds its lock
    other.close()
    assert owner.pending == 1 and [r.id for r in drain(owner)] == ["id-1"]
    owner.close()


def test_adopted_later_while_running(tmp_path: Path) -> None:
    running = Spool(tmp_path)
    running.append([rec(0)])
    leaver = Spool(tmp_path)
    leaver.append([rec(1), rec(2)])
    leaver.close()  # leaves its records behind
    running.append([rec(3)])
    assert running.adopt_orphans() == 2
    running.append([rec(4)])
    assert [r.id for r in drain(running)] == ["id-0", "id-3", "id-1", "id-2", "id-4"]
    running.close()


def test_a_torn_write_at_the_end_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = Spool(tmp_path)
    first.append([rec(0), rec(1)])
    assert first.directory is not None
    [segment] = first.directory.glob("*.jsonl")
    first.close()
    with segment.open("ab") as file:  # a crash in the middle of an append
        file.write(b'{"id":"torn","request_')
    with caplog.at_level(logging.WARNING, logger="upstream_ops"):
        second = Spool(tmp_path)
        assert second.open() == 2
    assert "incomplete write" in caplog.text
    assert [r.id for r in drain(second)] == ["id-0", "id-1"]
    second.close()


def test_an_unreadable_line_is_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = Spool(tmp_path)
    first.append([rec(0)])
    assert first.directory is not None
    [segment] = first.directory.glob("*.jsonl")
    first.close()
    with segment.open("ab") as file:
        file.write(b"not json\n" + json.dumps(rec(2).to_dict()).encode() + b"\n")
    second = Spool(tmp_path)
    with caplog.at_level(logging.ERROR, logger="upstream_ops"):
        chunk = second.read(10)
    assert chunk is not None and [r.id for r in chunk.records] == ["id-0", "id-2"]
    assert chunk.unreadable == 1 and "unreadable spooled record" in caplog.text
    second.commit(chunk)
    assert second.pending == 0
    second.close()


def test_lock_is_per_open_file_so_a_second_spool_in_one_process_is_separate(
    tmp_path: Path,
) -> None:
    a, b = Spool(tmp_path), Spool(tmp_path)
    a.append([rec(1)])
    b.append([rec(2)])
    assert a.directory != b.directory
    for spool in (a, b):
        assert spool.directory is not None
        fd = os.open(spool.directory / "lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    a.close()
    b.close()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"directory": ""}, "spool_dir"),
        ({"directory": 5}, "spool_dir"),
        ({"max_bytes": 10}, "spool_max_bytes"),
        ({"max_bytes": True}, "spool_max_bytes"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, object], name: str) -> None:
    options: dict[str, object] = {"directory": tmp_path, **kwargs}
    directory = options.pop("directory")
    with pytest.raises(ValueError, match=name):
        Spool(directory, **options)  # type: ignore[arg-type]
