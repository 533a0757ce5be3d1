"""Fixtures that build real things: servers on 127.0.0.1, files in tmp_path, PostgreSQL schemas."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

from upstream_ops.dispatcher import Dispatcher
from upstream_ops.sinks import MemorySink

if TYPE_CHECKING:
    from upstream_ops.sinks.postgres import PostgresSink


@contextmanager
def serve_asgi(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on 127.0.0.1; yields its base URL."""
    import uvicorn

    # IPPROTO_TCP, not 0: asyncio disables Nagle only on sockets that say they are TCP; without it
    # every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """Run ``app`` under a real waitress server on 127.0.0.1; yields its base URL."""
    from waitress.server import create_server

    server = create_server(app, host="127.0.0.1", port=0, threads=8)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(10)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def memory_sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def dispatcher(memory_sink: MemorySink) -> Iterator[Dispatcher]:
    d = Dispatcher(memory_sink, batch_interval=0.02)
    yield d
    d.close(timeout=5)


# --- PostgreSQL -----------------------------------------------------------------------------------

PG_DSN_ENV = "UPSTREAM_OPS_TEST_PG_DSN"
PG_DSN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The test server's DSN. Absent server: the test fails in CI, and is skipped elsewhere."""
    dsn = os.environ.get(PG_DSN_ENV) or PG_DSN_DEFAULT
    try:
        import psycopg

        psycopg.connect(dsn, connect_timeout=3).close()
    except Exception as exc:
        why = " ".join(str(exc).split())  # libpq's messages span lines
        reason = f"PostgreSQL is not reachable at {dsn} ({type(exc).__name__}: {why})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI needs it (start it, or set {PG_DSN_ENV})", pytrace=False)
        pytest.skip(f"{reason}; start it or set {PG_DSN_ENV} to run the PostgreSQL tests")
    return dsn


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name for one test, dropped afterwards, so runs never collide."""
    import psycopg
    from psycopg import sql

    name = f"upstream_ops_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_sink(pg_dsn: str, pg_schema: str) -> Iterator[PostgresSink]:
    from upstream_ops.sinks.postgres import PostgresSink

    sink = PostgresSink(pg_dsn, schema=pg_schema)
    yield sink
    sink.close()


def pg_rows(dsn: str, schema: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    """Run ``query`` in ``schema`` on a connection of its own."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return connection.execute(query, params).fetchall()  # type: ignore[arg-type]
