"""One variant in a process of its own, driven by the harness over stdin/stdout (JSON lines).

    python -m bench.worker inprocess NAME   # answers {"run": N} with the time of N requests
    python -m bench.worker serve NAME       # serves on 127.0.0.1 (uvicorn / waitress), prints the port

Both answer ``{"facts": true}`` with what the variant says about itself (records enqueued ...) and
stop on ``{"quit": true}`` or at the end of their input.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import traceback
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
            _reply({"facts": _facts(built)})
        else:
            break
    driver.close()
    built.close()


def serve(name: str) -> None:
    variant = BY_NAME[name]
    built = build(name)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket's proto says TCP; with proto 0 every response would wait for delayed ACKs.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()
    if variant.family == "asgi":
        run, request_stop = _uvicorn(built.app, sock, stop)
    else:
        run, request_stop = _waitress(built.app, sock, stop)

    def commands() -> None:
        for line in sys.stdin:
            command = json.loads(line)
            if "facts" in command:
                _reply({"facts": _facts(built)})
            else:
                break
        request_stop()

    threading.Thread(target=commands, daemon=True).start()
    run()
    built.close()


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


def _waitress(app: Any, sock: socket.socket, stop: threading.Event) -> tuple[Any, Any]:
    from waitress.server import create_server

    sock.listen(1024)
    server = create_server(app, sockets=[sock], threads=4, clear_untrusted_proxy_headers=True)

    def run() -> None:
        _reply({"port": sock.getsockname()[1]})
        # waitress has no stop(): serve in short slices and look at the flag in between.
        while not stop.is_set():
            server.asyncore.loop(timeout=0.05, map=server._map, count=1)
        server.close()
        server.task_dispatcher.shutdown()

    return run, stop.set


def main(argv: list[str]) -> None:
    mode, name = argv
    try:
        (in_process if mode == "inprocess" else serve)(name)
    except Exception:
        _reply({"error": traceback.format_exc()})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1:])
