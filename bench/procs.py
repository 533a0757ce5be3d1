"""The harness's side of ``bench.worker``: start a variant's process, ask it things, stop it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class WorkerError(RuntimeError):
    pass


def child_env() -> dict[str, str]:
    """The environment of a measured process: this checkout's ``src`` and ``bench`` come first.

    The package installed in the venv may be another checkout's (an editable install of a second
    work tree), and that one must not be what gets measured.
    """
    return dict(os.environ, PYTHONPATH=os.pathsep.join((str(ROOT / "src"), str(ROOT))))


class Worker:
    """A ``python -m bench.worker MODE NAME`` process; every answer must come within ``timeout``."""

    def __init__(self, mode: str, name: str, timeout: float = 120.0) -> None:
        self.name = name
        self.timeout = timeout
        env = dict(child_env(), PYTHONUNBUFFERED="1")
        env.pop("UPSTREAM_OPS_SINK", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", mode, name],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self._stderr) < 200:
                self._stderr.append(line)

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        timer = threading.Timer(timeout or self.timeout, self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            self.proc.wait(5)
            raise WorkerError(f"{self.name}: worker ended\n{''.join(self._stderr)[-3000:]}")
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise WorkerError(f"{self.name}: {message['error']}")
        return message

    def ask(self, command: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.receive(timeout)

    def pids(self) -> list[int]:
        """The worker's process and its descendants (gunicorn's worker), as far as /proc tells."""
        found: list[int] = []
        pending = [self.proc.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            try:
                for task in os.scandir(f"/proc/{pid}/task"):
                    with open(f"{task.path}/children") as children:
                        pending += map(int, children.read().split())
            except (OSError, ValueError):
                pass  # not Linux, or the process or thread ended while being read
        return found

    def cpu_ns(self) -> int:
        """CPU time the worker's threads, and those of its child processes (gunicorn's worker),
        have used so far, in ns (0 where /proc cannot tell)."""
        total = 0
        for pid in self.pids():
            try:
                for task in os.scandir(f"/proc/{pid}/task"):
                    with open(f"{task.path}/schedstat") as stat:
                        total += int(stat.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # as in ``pids``
        return total

    def pause(self) -> None:
        """Stop the worker's processes where they are (SIGSTOP), until ``resume``; returns once
        /proc shows each one stopped (a signal to a process running on the other core takes effect
        a moment later), or after a second."""
        pids = self._signal(signal.SIGSTOP)
        deadline = time.monotonic() + 1.0
        while not all(_stopped(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.0001)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, number: signal.Signals) -> list[int]:
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # ended: the next answer says so
                os.kill(pid, number)
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()  # a paused worker would not read its quit
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def _stopped(pid: int) -> bool:
    """Whether /proc shows the process stopped by a signal (or gone, or no /proc to tell)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X")
    except (OSError, IndexError):
        return True


#: A worker process whose threads use less CPU than this share of one core is quiet.
QUIET_CPU_SHARE = 0.02
_QUIET_WINDOW_S = 0.1


def wait_until_quiet(workers: Iterable[Worker], max_seconds: float = 5.0) -> float:
    """Wait until no worker is still busy (a span exporter, a sink catching up); seconds waited.

    Every variant's process stays alive for the whole run, and some keep working after their load
    ends: the OpenTelemetry SDK and sentry-sdk export what their batch processors queued, a
    dispatcher writes its backlog. On two cores that work would be billed to whichever variant is
    measured next, so the next run starts only once the others are idle.
    """
    workers = list(workers)
    started = time.monotonic()
    before = [w.cpu_ns() for w in workers]
    limit = QUIET_CPU_SHARE * _QUIET_WINDOW_S * 1e9
    while time.monotonic() - started < max_seconds:
        time.sleep(_QUIET_WINDOW_S)
        after = [w.cpu_ns() for w in workers]
        # Each worker on its own: an idle worker still uses about 0.2% of a core (its loop's
        # timers), and fifteen of them summed never went under 2%, so every wait ran to its end.
        if all(a - b <= limit for a, b in zip(after, before, strict=True)):
            break
        before = after
    return time.monotonic() - started
