"""``upstream-ops serve | query | tail | stats`` (``_ops_cli.py``): the installed entry point, run as
a subprocess against SQLite files holding the known records of ``ops_records.py``."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.ops_records import MINUTE, ops_dataset
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import SQLiteSink

CLI = str(Path(sys.executable).parent / "upstream-ops")
ENV = {**os.environ, "COLUMNS": "80", "LC_ALL": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
ENV.pop("UPSTREAM_OPS_SINK", None)
ENV.pop("UPSTREAM_OPS_TOKEN", None)


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=60, env=env or ENV, cwd=cwd
    )


@pytest.fixture(scope="module")
def base_ms() -> int:
    now = int(time.time() * 1000)
    return now - now % MINUTE - 10 * MINUTE


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, base_ms: int) -> Path:
    path = tmp_path_factory.mktemp("cli") / "ops.db"
    sink = SQLiteSink(path)
    sink.write(ops_dataset(base_ms))
    sink.close()
    return path


def sink(db: Path) -> str:
    return f"sqlite:///{db}"


def lines_fit(text: str, width: int = 80) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert too_long == [], too_long


# --- query ------------------------------------------------------------------------------------


def test_query_table_fits_80_columns(db: Path) -> None:
    result = run("query", "--sink", sink(db))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "TIME",
        "(UTC)",
        "ST",
        "UP",
        "REC",
        "PLATFORM",
        "KIND",
        "ROUTE",
        "MESSAGE",
    ]
    assert lines[-1] == "(6 requests, newest first)"
    rows = lines[1:-1]
    assert len(rows) == 6
    assert rows[1].split()[2:5] == ["200", "503+", "yes"]  # r5: several statuses, recovered
    assert "Overloaded" in rows[5] and "openai,a…" in rows[5]
    assert "<script>window._" in rows[0]
    lines_fit(result.stdout)
    assert result.stderr == ""


def test_query_json_is_the_full_records_newest_first(db: Path, base_ms: int) -> None:
    result = run("query", "--sink", sink(db), "--format", "json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["id"] for r in records] == ["r6", "r5", "r4", "r3", "r2", "r1"]
    by_id = {r.id: r.to_dict() for r in ops_dataset(base_ms)}
    assert all(r == by_id[r["id"]] for r in records)  # every field, details included
    assert result.stdout.isascii()


def test_query_jsonl_one_record_per_line(db: Path) -> None:
    result = run("query", "--sink", sink(db), "--format", "jsonl", "--platform", "openai")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["r5", "r2", "r1"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--status", "504", "--status", "429"], ["r2", "r1"]),
        (["--kind", "retry"], ["r5", "r3"]),
        (["--failed"], ["r4", "r2"]),
        (["--recovered", "--route", "/v1/images"], ["r3"]),
        (["--account", "2"], ["r6", "r1"]),
        (["--search", "RATE limit"], ["r1"]),
        (["--limit", "2"], ["r6", "r5"]),
        (["--since", "1m"], []),
    ],
)
def test_query_filters(db: Path, args: list[str], expected: list[str]) -> None:
    result = run("query", "--sink", sink(db), "--format", "jsonl", *args)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == expected


def test_query_window_by_start_and_end(db: Path, base_ms: int) -> None:
    start, end = base_ms + MINUTE, base_ms + 3 * MINUTE
    rfc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end / 1000))
    result = run(
        "query", "--sink", sink(db), "--format", "jsonl", "--start", str(start), "--end", rfc
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["r4", "r3", "r2"]


def test_query_events(db: Path) -> None:
    result = run(
        "query", "--sink", sink(db), "--events", "--format", "jsonl", "--kind", "request_error"
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["record_id"], e["seq"]) for e in events] == [("r5", 2), ("r2", 0)]
    assert events[0]["error_class"] == "connection_timeout"
    table = run("query", "--sink", sink(db), "--events")
    assert table.returncode == 0 and table.stdout.splitlines()[-1] == "(9 events, newest first)"
    lines_fit(table.stdout)


def test_query_pages_past_the_store_limit(tmp_path: Path) -> None:
    db = tmp_path / "many.db"
    now = int(time.time() * 1000)
    store = SQLiteSink(db)
    store.write(
        [
            RequestRecord(id=f"m{i:04d}", request_id=f"m{i}", started_at_ms=now - i)
            for i in range(620)
        ]
    )
    store.close()
    result = run("query", "--sink", sink(db), "--format", "jsonl", "--limit", "600")
    ids = [json.loads(line)["id"] for line in result.stdout.splitlines()]
    assert ids == [f"m{i:04d}" for i in range(600)]


def test_the_sink_comes_from_the_environment(db: Path) -> None:
    result = run(
        "query", "--format", "jsonl", "--limit", "1", env={**ENV, "UPSTREAM_OPS_SINK": sink(db)}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == "r6"


def test_control_characters_never_reach_the_terminal(tmp_path: Path) -> None:
    db = tmp_path / "ctl.db"
    store = SQLiteSink(db)
    hostile = "first line\nsecond\x1b[2J\x1b]0;pwned\x07 \u202eevil"
    store.write(
        [
            RequestRecord(
                id="c1",
                request_id="c1",
                started_at_ms=int(time.time() * 1000) - 1000,
                upstream_errors=[UpstreamErrorEvent(at_unix_ms=1, platform="p", message=hostile)],
            )
        ]
    )
    store.close()
    for args in (["query"], ["tail"], ["stats"], ["query", "--events"]):
        result = run(*args, "--sink", sink(db))
        assert result.returncode == 0, result.stderr
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", result.stdout), (
            args,
            result.stdout,
        )
    jsonl = run("query", "--sink", sink(db), "--format", "jsonl").stdout
    assert "\\u001b" in jsonl and json.loads(jsonl)["upstream_errors"][0]["message"] == hostile


# --- tail -------------------------------------------------------------------------------------


def test_tail_shows_the_newest_oldest_first(db: Path) -> None:
    result = run("tail", "--sink", sink(db), "-n", "3", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["r4", "r5", "r6"]
    table = run("tail", "--sink", sink(db), "-n", "2")
    assert len(table.stdout.splitlines()) == 3  # header and two rows
    lines_fit(table.stdout)


def _reader(stream: IO[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next(lines: queue.Queue[str], timeout: float = 10) -> str:
    return lines.get(timeout=timeout)


def test_tail_follow_prints_new_and_late_records_once(tmp_path: Path) -> None:
    db = tmp_path / "follow.db"
    now = int(time.time() * 1000)
    store = SQLiteSink(db)
    store.write([RequestRecord(id="old", request_id="old", started_at_ms=now - 60_000)])
    process = subprocess.Popen(
        [CLI, "tail", "--follow", "--sink", sink(db), "--format", "jsonl", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        lines = _reader(process.stdout)  # type: ignore[arg-type]
        assert json.loads(_next(lines))["id"] == "old"
        store.write([RequestRecord(id="new", request_id="new", started_at_ms=now)])
        assert json.loads(_next(lines))["id"] == "new"
        # a long request finishing now: it started before "new", within the look-back
        store.write([RequestRecord(id="late", request_id="late", started_at_ms=now - 30_000)])
        assert json.loads(_next(lines))["id"] == "late"
        time.sleep(0.3)  # several polls: nothing is printed twice
        assert lines.empty()
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
        store.close()
    assert process.returncode == 130
    assert "Traceback" not in stderr


# --- stats ------------------------------------------------------------------------------------


def test_stats_table(db: Path) -> None:
    result = run(
        "stats", "--sink", sink(db), "--since", "30m", "--bucket", "1m", "--by", "platform"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines_fit(out)
    lines = out.splitlines()
    assert lines[1] == "events 9   requests 6   recovered 4 (67%)"
    assert lines[2].startswith("trend per 1m: ") and lines[2].endswith("peak 3")
    header = next(
        i for i, line in enumerate(lines) if line.split() == ["PLATFORM", "EVENTS", "SHARE"]
    )
    table = lines[header + 1 :]
    assert [row.split()[:3] for row in table[:3]] == [
        ["openai", "5", "56%"],
        ["anthropic", "2", "22%"],
        ["gemini", "2", "22%"],
    ]
    assert "TOP UPSTREAM MESSAGES" in lines
    assert lines[lines.index("TOP UPSTREAM MESSAGES") + 1].split() == ["2", "Overloaded"]


@pytest.mark.parametrize(
    ("by", "first"),
    [("status", ["(none)", "3"]), ("kind", ["http_error", "4"]), ("category", ["overloaded", "3"])],
)
def test_stats_by(db: Path, by: str, first: list[str]) -> None:
    result = run("stats", "--sink", sink(db), "--by", by, "--top", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[1:] == ["EVENTS", "SHARE"])
    assert lines[header + 1].split()[:2] == first
    assert "TOP UPSTREAM MESSAGES" not in lines


def test_stats_json_matches_the_api_shape(db: Path) -> None:
    result = run("stats", "--sink", sink(db), "--by", "kind", "--bucket", "1h", "--format", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["group_by"] == "kind" and body["bucket_ms"] == 3_600_000
    assert body["totals"] == {
        "events": 9,
        "records": 6,
        "recovered_records": 4,
        "recovered_ratio": 4 / 6,
    }
    assert body["groups"][0] == {"group": "http_error", "count": 4}
    assert len(body["buckets"]) in (24, 25)


# --- bad arguments and sinks ------------------------------------------------------------------

BAD_ARGS = [
    ["query", "--since", "40d"],
    ["query", "--since", "5x"],
    ["query", "--since", "1h", "--start", "2026-01-01T00:00:00Z"],
    ["query", "--start", "yesterday"],
    ["query", "--start", "2026-01-02T00:00:00Z", "--end", "2026-01-01T00:00:00Z"],
    ["query", "--status", "abc"],
    ["query", "--status", "99"],
    ["query", "--account", "0"],
    ["query", "--limit", "0"],
    ["query", "--format", "xml"],
    ["query", "--recovered", "--failed"],
    ["query", "--search", "x" * 201],
    ["query", "--sink", "memory://"],
    ["query", "--sink", "bogus://x"],
    ["tail", "--interval", "0"],
    ["tail", "--format", "json"],
    ["stats", "--by", "nope"],
    ["stats", "--since", "30d", "--bucket", "1s"],
    ["serve", "--port", "70000"],
    ["serve", "--token", ""],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a)[:40])
def test_bad_arguments_give_one_line_and_exit_2(db: Path, args: list[str]) -> None:
    if "--sink" not in args:
        args = [*args, "--sink", sink(db)]
    result = run(*args)
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("upstream-ops: ")
    assert result.stdout == ""


def _unreadable(tmp_path: Path) -> Iterator[tuple[str, str]]:
    yield f"sqlite:///{tmp_path / 'missing.db'}", "no SQLite database"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 200)
    yield f"sqlite:///{garbage}", "DatabaseError"
    folder = tmp_path / "folder.db"
    folder.mkdir()
    yield f"sqlite:///{folder}", "no SQLite database"


@pytest.mark.parametrize("command", ["query", "tail", "stats", "serve"])
def test_unreadable_sinks_give_one_line_and_exit_1(tmp_path: Path, command: str) -> None:
    for url, says in _unreadable(tmp_path):
        result = (
            run(command, "--sink", url, "--port", "0")
            if command == "serve"
            else run(command, "--sink", url)
        )
        assert result.returncode == 1, (url, result.stderr)
        assert "Traceback" not in result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"upstream-ops: cannot read {url}") and says in line, line
        assert not (tmp_path / "missing.db").exists()  # reading never creates a database


def test_default_sink_is_the_default_database_in_the_cwd(tmp_path: Path) -> None:
    result = run("query", cwd=tmp_path)
    assert result.returncode == 1
    assert "no SQLite database at upstream_ops.db" in result.stderr


def test_passwords_stay_out_of_messages() -> None:
    result = run("query", "--sink", "postgresql://ops:hunter2@127.0.0.1:1/ops")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


# --- serve ------------------------------------------------------------------------------------


def _serve(db: Path, *extra: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    process = subprocess.Popen(
        [CLI, "serve", "--sink", sink(db), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    errors = _reader(process.stderr)  # type: ignore[arg-type]
    return process, errors


def _listening(errors: queue.Queue[str]) -> str:
    for _ in range(3):
        line = _next(errors)
        match = re.search(r"on (http://127\.0\.0\.1:\d+/) ", line)
        if match:
            return match[1]
    raise AssertionError("serve did not say where it listens")


def _stop(process: subprocess.Popen[str], errors: queue.Queue[str]) -> list[str]:
    process.send_signal(signal.SIGINT)
    process.wait(10)
    rest = []
    while not errors.empty():
        rest.append(errors.get())
    return rest


def test_serve_with_a_token(db: Path) -> None:
    process, errors = _serve(db, "--token", "cli-token", "--jaeger-url", "http://jaeger:16686")
    try:
        url = _listening(errors)
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("api/records").status_code == 401
            response = client.get(
                "api/records/req-r1", headers={"Authorization": "Bearer cli-token"}
            )
            assert response.status_code == 200
            assert response.json()["trace_url"].startswith("http://jaeger:16686/trace/")
            assert "<title>upstream-ops</title>" in client.get("").text
    finally:
        rest = _stop(process, errors)
    assert process.returncode == 130  # stopped by Ctrl-C, like tail --follow
    assert not any("Traceback" in line for line in rest)


def test_serve_without_a_token_makes_one_and_says_it(db: Path) -> None:
    process, errors = _serve(db)
    try:
        token_line = _next(errors)
        assert "this run's API token: " in token_line
        token = token_line.rsplit(" ", 1)[1].strip()
        url = _listening(errors)
        with httpx.Client(base_url=url, timeout=10) as client:
            ok = client.get("api/stats", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json()["totals"]["events"] == 9
    finally:
        _stop(process, errors)
    assert process.returncode == 130


def test_serve_on_a_busy_port_is_one_line(db: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--sink", sink(db), "--port", str(port), "--token", "t")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"upstream-ops: cannot listen on 127.0.0.1:{port}")


def test_serve_without_uvicorn_says_which_extra(db: Path) -> None:
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from upstream_ops.cli import main\n"
        f"sys.exit(main(['serve', '--sink', {sink(db)!r}, '--token', 't']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "upstream-ops: serve needs uvicorn: pip install 'upstream-ops[demo]' (or add uvicorn)"
    )


def test_help_lists_the_ops_commands() -> None:
    result = run("--help")
    for command in ("demo", "serve", "query", "tail", "stats"):
        assert command in result.stdout
    assert run("query", "--help").returncode == 0
