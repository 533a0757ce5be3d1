from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from upstream_ops.sinks import JsonlSink, LoggingSink, MemorySink, SQLiteSink, sink_from_url


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///ops.db", "ops.db"),  # three slashes: relative to the cwd (SQLAlchemy)
        ("sqlite:///data/ops.db", "data/ops.db"),
        ("sqlite:////var/lib/ops/ops.db", "/var/lib/ops/ops.db"),  # four: absolute
        ("sqlite:///my%20ops.db", "my ops.db"),
        ("SQLITE:///ops.db", "ops.db"),
    ],
)
def test_sqlite(url: str, path: str) -> None:
    sink = sink_from_url(url)
    assert isinstance(sink, SQLiteSink)
    assert sink.path == Path(path)
    assert not sink.path.exists()  # nothing opened yet


def test_sqlite_relative_path_is_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sink = sink_from_url("sqlite:///sub/ops.db")
    assert isinstance(sink, SQLiteSink)
    sink.write([])
    assert sink.query_records(0, 1) == []
    sink.close()
    assert (tmp_path / "sub" / "ops.db").exists()


def test_jsonl() -> None:
    sink = sink_from_url("jsonl:ops.jsonl")
    assert isinstance(sink, JsonlSink)
    assert sink.path == Path("ops.jsonl")
    sink = sink_from_url("jsonl:///var/log/ops.jsonl?max_bytes=1000&backups=2")
    assert isinstance(sink, JsonlSink)
    assert (sink.path, sink.max_bytes, sink.backups) == (Path("/var/log/ops.jsonl"), 1000, 2)


def test_memory() -> None:
    assert isinstance(sink_from_url("memory://"), MemorySink)


def test_logging() -> None:
    sink = sink_from_url("logging://")
    assert isinstance(sink, LoggingSink)
    assert (sink.logger.name, sink.level) == ("upstream_ops.records", logging.WARNING)
    sink = sink_from_url("logging://?logger=my.app.ops&level=INFO")
    assert isinstance(sink, LoggingSink)
    assert (sink.logger.name, sink.level) == ("my.app.ops", logging.INFO)


def test_postgres_uses_the_postgres_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    class PostgresSink:
        def __init__(self, dsn: str) -> None:
            self.dsn = dsn

    def import_module(name: str) -> types.ModuleType:
        assert name == "upstream_ops.sinks.postgres"
        return types.SimpleNamespace(PostgresSink=PostgresSink)  # type: ignore[return-value]

    fake = types.SimpleNamespace(import_module=import_module)
    monkeypatch.setattr("upstream_ops.sinks.url.importlib", fake)
    sink = sink_from_url("postgresql://u@db/ops")
    assert isinstance(sink, PostgresSink)
    assert sink.dsn == "postgresql://u@db/ops"


def test_postgres_without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    def import_module(name: str) -> types.ModuleType:
        raise ModuleNotFoundError("No module named 'psycopg'", name="psycopg")

    fake = types.SimpleNamespace(import_module=import_module)
    monkeypatch.setattr("upstream_ops.sinks.url.importlib", fake)
    with pytest.raises(ImportError, match=r"upstream-ops\[postgres\]"):
        sink_from_url("postgresql://db/ops")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("", "url"),
        ("ops.db", "schemes"),
        ("ftp://host/x", "schemes.*'ftp'"),
        ("file:///tmp/ops.db", "schemes"),
        ("sqlite://", "no file path"),
        ("sqlite:///", "no file path"),
        ("sqlite://host/ops.db", "host"),
        ("sqlite:///ops.db?mode=ro", "unknown options"),
        ("jsonl://", "no file path"),
        ("jsonl:///ops.jsonl?max_bytes=big", "max_bytes"),
        ("jsonl:///ops.jsonl?max_bytes=0", "max_bytes"),
        ("jsonl:///ops.jsonl?rotate=1", "unknown options"),
        ("memory://somewhere", "memory"),
        ("memory://?x=1", "memory"),
        ("logging://name", "logging"),
        ("logging://?level=LOUD", "level"),
        ("logging://?colour=red", "unknown options"),
        ("logging://?level", "malformed|level"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sink_from_url(url)


def test_not_a_string() -> None:
    with pytest.raises(ValueError, match="url"):
        sink_from_url(None)  # type: ignore[arg-type]
