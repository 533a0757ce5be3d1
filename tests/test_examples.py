"""Every file in examples/ runs, as a user would run it, and its records land."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


def run_server_and_post(
    command: list[str], tmp_path: Path, stop: signal.Signals = signal.SIGTERM
) -> list[tuple[object, ...]]:
    db = tmp_path / "ops.db"
    port = free_port()
    env = {
        **os.environ,
        "UPSTREAM_OPS_SINK": f"sqlite:///{db}",
        "UPSTREAM_URL": "http://127.0.0.1:9",
    }
    proc = subprocess.Popen(
        [part.replace("{port}", str(port)) for part in command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", proc)
        response = httpx.post(f"http://127.0.0.1:{port}/generate", headers={"X-Request-ID": "ex-1"})
        assert response.status_code == 200 and response.json()["ok"] is True
    finally:
        proc.send_signal(stop)  # a graceful stop drains the queue
        proc.wait(timeout=20)
    with sqlite3.connect(db) as conn:
        return conn.execute(  # each record with its events' JSON, as the quickstart shows them
            "select r.request_id, r.status_code, r.recovered, group_concat(e.event, ',') "
            "from ops_error_logs r left join ops_upstream_error_events e on e.record_id = r.id "
            "group by r.id"
        ).fetchall()


def test_fastapi_example_under_uvicorn(tmp_path: Path) -> None:
    rows = run_server_and_post(
        [str(BIN / "uvicorn"), "examples.fastapi_app:app", "--port", "{port}"], tmp_path
    )
    [(request_id, status, recovered, events)] = rows
    assert (request_id, status, recovered) == ("ex-1", 200, 1)
    assert '"kind":"request_error"' in events and "ConnectError" in events


def test_flask_example_under_waitress(tmp_path: Path) -> None:
    rows = run_server_and_post(
        [str(BIN / "waitress-serve"), "--listen=127.0.0.1:{port}", "examples.flask_app:app"],
        tmp_path,
        stop=signal.SIGINT,  # waitress-serve has no SIGTERM handler: Ctrl-C is its graceful stop
    )
    [(request_id, status, recovered, events)] = rows
    assert (request_id, status, recovered) == ("ex-1", 200, 1)
    assert '"platform":"rix"' in events


def test_custom_sink_example(tmp_path: Path) -> None:
    out = tmp_path / "attempts.csv"
    result = subprocess.run(
        [sys.executable, "examples/custom_sink.py", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "client saw 200" in result.stdout
    assert out.read_text().splitlines() == [
        "custom-sink-demo,429,http_error,rate limited",
        "custom-sink-demo,200,failover,backup account ok",
    ]


def test_capture_failover_example() -> None:
    result = subprocess.run(
        [sys.executable, "examples/capture_failover.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "client saw 200 {'ok': True, 'account': 3}",
        "1 http_error 429 primary rate_limited Rate limit reached for requests",
        "1 failover       primary -            failover from account 1 to account 2: HTTP 429",
        "2 http_error 529 backup  overloaded   Overloaded",
        "2 failover       backup  -            failover from account 2 to account 3: HTTP 529",
    ]
