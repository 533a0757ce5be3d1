"""One variant in a process of its own, driven by the harness over stdin/stdout (JSON lines).

    python -m bench.worker inprocess NAME   # answers {"run": N} with the time of N requests
    python -m bench.worker serve NAME       # serves on 127.0.0.1 (uvicorn / gunicorn), prints the port

Both answer ``{"facts": true}`` with what the variant says about itself (records enqueued ...) and
stop on ``{"quit": true}`` or at the end of their input.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from bench.drive import driver_for
from bench.variants import BY_NAME, Built, build

#: Requests served before the first timed run (imports, caches, the dispatcher thread ...).
WARMUP_REQUESTS = 300


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _facts(built: Built) -> dict[str, Any]:
    try:
        return dict(built.facts())
    except Exception as exc:
        return {"error": repr(exc)}


def in_process(name: str) -> None:
    variant = BY_NAME[name]
    built = build(name)
    driver = driver_for(variant.family, built.app)
    warm = driver.run(WARMUP_REQUESTS)
    _reply({"ready": True, "bad": warm.bad, "first_bad": warm.first_bad})
    for line in sys.stdin:
        command = json.loads(line)
        if "run" in command:
            result = driver.run(int(command["run"]))
            _reply(
                {
                    "requests": result.requests,
                    "elapsed_ns": result.elapsed_ns,
                    "bad": result.bad,
                    "first_bad": result.first_bad,
                }
            )
        elif "facts" in command:
            _reply({"facts": {**_facts(built), "threads": threading.active_count()}})
        else:
            break
    driver.close()
    built.close()


def serve(name: str) -> None:
    if BY_NAME[name].family == "asgi":
        _serve_uvicorn(name)
    else:
        _serve_gunicorn(name)


def _serve_uvicorn(name: str) -> None:
    built = build(name)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket's proto says TCP; with proto 0 every response would wait for delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()
    run, request_stop = _uvicorn(built.app, sock, stop)
    _follow_commands(built, request_stop)
    run()
    built.close()


def _follow_commands(built: Built, request_stop: Callable[[], None]) -> None:
    """Answer the harness's commands from a thread; stop the server on quit or end of input."""

    def commands() -> None:
        for line in sys.stdin:
            command = json.loads(line)
            if "facts" in command:
                _reply({"facts": _facts(built)})
            else:
                break
        request_stop()

    threading.Thread(target=commands, daemon=True).start()


def _uvicorn(app: Any, sock: socket.socket, stop: threading.Event) -> tuple[Any, Any]:
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", http="h11", loop="asyncio"
    )
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started and not stop.is_set():
            stop.wait(0.01)
        _reply({"port": sock.getsockname()[1]})

    threading.Thread(target=announce, daemon=True).start()

    def request_stop() -> None:
        stop.set()
        server.should_exit = True

    return (lambda: server.run(sockets=[sock])), request_stop


def _serve_gunicorn(name: str) -> None:
    """Serve under gunicorn: its master in this process, one gthread worker of 4 threads forked
    from it, which builds the variant and answers the harness (it inherits stdin and stdout).

    Not waitress: its main loop polls in a tight loop while a worker thread writes a response, and
    the loop holds the GIL the writer needs, so from 8 connections on a round either ran normally
    or collapsed (a bare Flask app: 6,700 req/s on one connection, 260 on eight, p99 over 100 ms)
    and the medians said more about which rounds collapsed than about the app.
    """
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

    built: list[Built] = []

    def post_worker_init(worker: Worker) -> None:
        master = worker.ppid
        _follow_commands(built[0], lambda: os.kill(master, signal.SIGTERM))
        _reply({"port": worker.sockets[0].getsockname()[1]})

    def worker_exit(arbiter: Arbiter, worker: Worker) -> None:
        if built:
            built[0].close()

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = {
                "bind": ["127.0.0.1:0"],
                "workers": 1,
                "worker_class": "gthread",
                "threads": 4,
                "loglevel": "warning",
                "post_worker_init": post_worker_init,
                "worker_exit": worker_exit,
            }
            if "control_socket_disable" in self.cfg.settings:  # newer gunicorn releases
                settings["control_socket_disable"] = True  # no socket file in the home directory
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            built.append(build(name))
            return built[0].app

    Server().run()


def main(argv: list[str]) -> None:
    mode, name = argv
    try:
        (in_process if mode == "inprocess" else serve)(name)
    except Exception:
        _reply({"error": traceback.format_exc()})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1:])
