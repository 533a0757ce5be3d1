from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.sink_records import bare_record, full_record
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import JsonlSink
from upstream_ops.sinks.base import Sink


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ids(path: Path) -> list[str]:
    return [item["id"] for item in read_lines(path)]


def line_bytes(record: RequestRecord) -> int:
    text = json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))
    return len(text.encode()) + 1


def test_is_a_sink(tmp_path: Path) -> None:
    assert isinstance(JsonlSink(tmp_path / "ops.jsonl"), Sink)


def test_no_io_until_first_write_then_parent_dirs_are_made(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ops.jsonl"
    sink = JsonlSink(path)
    sink.write([])
    assert not path.parent.exists()
    sink.write([full_record()])
    assert path.exists()
    sink.close()


def test_round_trip_every_field(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    records = [full_record("a"), full_record("b", events=[]), bare_record("c", 5)]
    sink = JsonlSink(path)
    sink.write(records)
    # flushed per batch: readable before close
    assert read_lines(path) == [r.to_dict() for r in records]
    assert [RequestRecord.from_dict(item) for item in read_lines(path)] == records
    sink.close()
    text = path.read_text(encoding="utf-8")
    assert "München 東京 🚀" in text  # UTF-8, not \u escapes
    assert text.count("\n") == 3


def test_lone_surrogate_is_kept_as_a_json_escape(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    record = bare_record("s", 1, error="broken \udc80 \\ text")
    sink = JsonlSink(path)
    sink.write([record])
    sink.close()
    path.read_bytes().decode("utf-8")  # valid UTF-8
    assert RequestRecord.from_dict(read_lines(path)[0]) == record


def test_appends_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    sink = JsonlSink(path)
    sink.write([bare_record("1", 1)])
    sink.close()
    sink.close()  # twice is fine
    sink.write([bare_record("2", 2)])
    JsonlSink(path).write([bare_record("3", 3)])
    sink.close()
    assert ids(path) == ["1", "2", "3"]


def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    records = [bare_record(f"rec-{i:02d}", i) for i in range(10)]
    size = line_bytes(records[0])
    assert all(line_bytes(r) == size for r in records)
    sink = JsonlSink(path, max_bytes=2 * size + 1, backups=2)  # two lines per file
    for record in records[:5]:
        sink.write([record])
    sink.write(records[5:])  # rotation also happens inside a batch
    sink.close()
    assert ids(path) == ["rec-08", "rec-09"]
    assert ids(path.with_name("ops.jsonl.1")) == ["rec-06", "rec-07"]
    assert ids(path.with_name("ops.jsonl.2")) == ["rec-04", "rec-05"]
    assert not path.with_name("ops.jsonl.3").exists()
    for file in tmp_path.iterdir():
        assert file.stat().st_size <= 2 * size + 1


def test_a_batch_is_one_write_call_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each write call lets go of the interpreter lock, which a writer behind busy app threads gets
    # back only after a switch interval (5 ms): a line a call made a batch take a second.
    calls: list[int] = []
    sink = JsonlSink(tmp_path / "ops.jsonl", max_bytes=10_000_000)
    opened = sink._open

    class CountingFile:
        def __init__(self, file: Any) -> None:
            self.file = file

        def write(self, data: bytes) -> int:
            calls.append(len(data))
            return int(self.file.write(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

    monkeypatch.setattr(sink, "_open", lambda: CountingFile(opened()))
    records = [bare_record(f"r{i:03}", i) for i in range(300)]
    sink.write(records)
    assert calls == [sum(map(line_bytes, records))]
    sink.max_bytes = 100 * line_bytes(records[0])  # the next batch fills two files and starts one
    calls.clear()
    sink.write(records[:250])
    sink.close()
    assert len(calls) == 3 and sum(calls) == sum(map(line_bytes, records[:250]))
    assert len(ids(tmp_path / "ops.jsonl")) + len(ids(tmp_path / "ops.jsonl.1")) <= 250


def test_rotation_counts_what_the_file_held_before_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    records = [bare_record(f"rec-{i}", i) for i in range(3)]
    size = line_bytes(records[0])
    JsonlSink(path).write(records[:2])
    sink = JsonlSink(path, max_bytes=2 * size, backups=1)
    sink.write(records[2:])
    sink.close()
    assert ids(path.with_name("ops.jsonl.1")) == ["rec-0", "rec-1"]
    assert ids(path) == ["rec-2"]


def test_a_line_larger_than_max_bytes_is_written_alone(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    sink = JsonlSink(path, max_bytes=100, backups=3)
    sink.write([bare_record("small", 1), full_record("huge"), bare_record("next", 2)])
    sink.close()
    assert ids(path.with_name("ops.jsonl.2")) == ["small"]
    assert ids(path.with_name("ops.jsonl.1")) == ["huge"]
    assert ids(path) == ["next"]


def test_no_backups_keeps_only_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "ops.jsonl"
    records = [bare_record(f"rec-{i}", i) for i in range(5)]
    sink = JsonlSink(path, max_bytes=line_bytes(records[0]), backups=0)
    sink.write(records)
    sink.close()
    assert ids(path) == ["rec-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.jsonl"]


def test_an_unserializable_record_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ops.jsonl"
    bad = bare_record("bad", 1, route=object())
    sink = JsonlSink(path)
    with caplog.at_level(logging.ERROR, logger="upstream_ops.sinks.jsonl"):
        sink.write([bare_record("a", 1), bad, bare_record("b", 2)])
    assert ids(path) == ["a", "b"]
    assert "id='bad'" in caplog.text
    with pytest.raises(TypeError):
        sink.write([bad])  # nothing in the batch could be written
    sink.close()
    assert ids(path) == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"path": ""}, "path"),
        ({"path": None}, "path"),
        ({"path": "x.jsonl", "max_bytes": 0}, "max_bytes"),
        ({"path": "x.jsonl", "max_bytes": True}, "max_bytes"),
        ({"path": "x.jsonl", "max_bytes": "10"}, "max_bytes"),
        ({"path": "x.jsonl", "backups": -1}, "backups"),
        ({"path": "x.jsonl", "backups": 1.5}, "backups"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        JsonlSink(**kwargs)
