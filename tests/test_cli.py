"""The installed ``upstream-ops`` entry point, run as a subprocess."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

CLI = str(Path(sys.executable).parent / "upstream-ops")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def test_demo_runs_by_itself_and_shows_hidden_failures(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    result = run("demo", "--db", str(db))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "36 client requests" in out
    assert "failures hidden behind a 200" in out
    assert "client saw 200" in out and '"upstream_status_code": 504' in out
    assert " 429 " in out and "request_error" in out
    table = [line for line in out.splitlines() if line[:1] not in (" ", "(", "[", "]", "{", "}")]
    assert max(len(line) for line in table) <= 80, table
    with sqlite3.connect(db) as conn:
        recovered = conn.execute("select count(*) from ops_error_logs where recovered=1").fetchone()
    assert recovered[0] > 10


def test_bad_arguments_give_one_line_and_non_zero_exit() -> None:
    for args in (["demo", "--requests", "0"], ["nonsense"], ["demo", "--requests", "x"]):
        result = run(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("upstream-ops: ")


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("upstream-ops ")
