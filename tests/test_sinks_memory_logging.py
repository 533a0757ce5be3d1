from __future__ import annotations

import json
import logging
import threading

import pytest

from tests.sink_records import bare_record, full_record
from upstream_ops.sinks import LoggingSink, MemorySink
from upstream_ops.sinks.base import Sink

# --- MemorySink -------------------------------------------------------------------------------


def test_memory_sink_appends_in_order_and_clears() -> None:
    sink = MemorySink()
    assert isinstance(sink, Sink)
    first, second = full_record("a"), bare_record("b", 1)
    sink.write([first])
    sink.write([second, first])  # a retried record shows up again
    assert sink.records == [first, second, first]
    sink.clear()
    assert sink.records == []


def test_memory_sink_is_thread_safe() -> None:
    sink = MemorySink()

    def writer(n: int) -> None:
        for i in range(200):
            sink.write([bare_record(f"{n}-{i}", i)])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sink.records) == 1600
    assert len({r.id for r in sink.records}) == 1600


# --- LoggingSink ------------------------------------------------------------------------------


def test_logging_sink_logs_one_compact_json_line_per_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = LoggingSink()
    assert isinstance(sink, Sink)
    records = [full_record("a"), bare_record("b", 1)]
    with caplog.at_level(logging.WARNING, logger="upstream_ops.records"):
        sink.write(records)
    assert [r.name for r in caplog.records] == ["upstream_ops.records"] * 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 2
    messages = [r.getMessage() for r in caplog.records]
    assert [json.loads(m) for m in messages] == [r.to_dict() for r in records]
    for message, record in zip(messages, records, strict=True):
        expected = json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))
        assert message == expected
        assert "\n" not in message
    assert "München 東京 🚀" in messages[0]


def test_logging_sink_takes_a_logger_and_a_level_name(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.ops")
    sink = LoggingSink(logger, level="info")
    with caplog.at_level(logging.INFO, logger="tests.ops"):
        sink.write([bare_record("a", 1)])
    [entry] = caplog.records
    assert (entry.name, entry.levelno) == ("tests.ops", logging.INFO)


def test_logging_sink_skips_work_below_the_logger_level(caplog: pytest.LogCaptureFixture) -> None:
    sink = LoggingSink("tests.quiet", level=logging.DEBUG)
    with caplog.at_level(logging.INFO, logger="tests.quiet"):
        sink.write([bare_record("a", 1)])
    assert caplog.records == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"logger": ""}, "logger"),
        ({"logger": 5}, "logger"),
        ({"level": "LOUD"}, "level"),
        ({"level": True}, "level"),
        ({"level": 2.5}, "level"),
    ],
)
def test_logging_sink_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LoggingSink(**kwargs)  # type: ignore[arg-type]
