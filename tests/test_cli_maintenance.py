"""``upstream-ops migrate`` and ``upstream-ops purge``, run as the installed entry point."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import pg_rows
from tests.sink_records import bare_record
from upstream_ops import cli
from upstream_ops.sinks import SQLiteSink
from upstream_ops.sinks._query import SCHEMA_VERSION

CLI = str(Path(sys.executable).parent / "upstream-ops")
DAY_MS = 86_400_000


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60)


def one_clear_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("upstream-ops: ")
    return lines[0]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_migrate_and_purge_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "ops.db"
    result = run("migrate", "--sink", f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    assert f"schema at version {SCHEMA_VERSION}" in result.stdout
    sink = SQLiteSink(db)
    sink.write([bare_record(f"old-{i}", now_ms() - 40 * DAY_MS + i) for i in range(7)])
    sink.write([bare_record("recent", now_ms() - DAY_MS)])
    sink.close()
    result = run("purge", "--older-than", "30d", "--sink", f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    assert "purged 7 records older than 30d" in result.stdout
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT id FROM ops_error_logs").fetchall() == [("recent",)]


def test_purge_uses_the_environment_sink(tmp_path: Path) -> None:
    db = tmp_path / "env.db"
    env_run = subprocess.run(
        [CLI, "purge", "--older-than", "2w"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"UPSTREAM_OPS_SINK": f"sqlite:///{db}", "PATH": ""},
    )
    assert env_run.returncode == 0, env_run.stderr
    assert str(db) in env_run.stdout


@pytest.mark.postgres
def test_migrate_and_purge_postgres(pg_dsn: str, pg_schema: str) -> None:
    url = f"{pg_dsn}?schema={pg_schema}"
    result = run("migrate", "--sink", url)
    assert result.returncode == 0, result.stderr
    assert (
        f"schema at version {SCHEMA_VERSION}" in result.stdout and "password" not in result.stdout
    )
    assert pg_rows(pg_dsn, pg_schema, "SELECT version FROM upstream_ops_schema") == [
        (SCHEMA_VERSION,)
    ]
    from upstream_ops.sinks.postgres import PostgresSink

    sink = PostgresSink(url)
    sink.write([bare_record(f"old-{i}", now_ms() - 2 * DAY_MS + i) for i in range(12)])
    sink.write([bare_record("recent", now_ms())])
    sink.close()
    result = run("purge", "--older-than", "36h", "--sink", url)
    assert result.returncode == 0, result.stderr
    assert "purged 12 records older than 36h" in result.stdout
    assert pg_rows(pg_dsn, pg_schema, "SELECT id FROM ops_error_logs") == [("recent",)]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["purge", "--older-than", "30x"], 2, "--older-than must be a duration"),
        (["purge", "--older-than", "0d"], 2, "--older-than must be a positive duration"),
        (["purge"], 2, "--older-than"),
        (["migrate"], 2, "--sink"),
        (["migrate", "--sink", "memory://"], 2, "MemorySink cannot migrate"),
        (["purge", "--older-than", "1d", "--sink", "jsonl:///tmp/x.jsonl"], 2, "cannot purge"),
        (["migrate", "--sink", "ftp://x"], 2, "--sink: url must use one of the schemes"),
        (["migrate", "--sink", "postgresql://db/x?schema=1x"], 2, "schema must be a name"),
        (["migrate", "--sink", "postgresql://u:pw@127.0.0.1:1/x"], 1, "Connection refused"),
        (["purge", "--older-than", "1d", "--sink", "postgresql://127.0.0.1:1/x"], 1, "refused"),
    ],
)
def test_bad_input_or_unreachable_sink_gives_one_line(
    args: list[str], code: int, says: str
) -> None:
    line = one_clear_line(run(*args), code)
    assert says in line
    assert ":pw@" not in line  # no password in messages


def test_purge_shows_progress_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    shown = cli._ProgressLine()
    for deleted, at in ((5000, 100.5), (10_000, 101.2), (15_000, 101.9), (20_000, 102.3)):
        clock[0] = at
        shown.update(deleted)
    shown.end()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "upstream-ops: purged 10000 records so far...",
        "upstream-ops: purged 20000 records so far...",
    ]
