"""Fixtures that build real things: servers on 127.0.0.1, files in tmp_path, PostgreSQL schemas."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from upstream_ops.dispatcher import Dispatcher
from upstream_ops.sinks import MemorySink, SQLiteSink
from upstream_ops.store import Store

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
    stop = threading.Event()

    def loop() -> None:
        # server.run() has no stop; closing its sockets under select() raises in the thread.
        while not stop.is_set():
            server.asyncore.loop(timeout=0.05, map=server._map, count=1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        stop.set()
        thread.join(10)
        server.close()
        server.task_dispatcher.shutdown()


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


@contextmanager
def sqlite_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    sink = SQLiteSink(tmp_path / "store.db")
    try:
        yield sink
    finally:
        sink.close()


@contextmanager
def postgres_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The machine's PostgreSQL, in a schema of this test's own (see ``pg_dsn``)."""
    from upstream_ops.sinks.postgres import PostgresSink

    sink = PostgresSink(
        request.getfixturevalue("pg_dsn"), schema=request.getfixturevalue("pg_schema")
    )
    try:
        yield sink
    finally:
        sink.close()


#: The queryable stores that the store tests (test_store.py, test_database_stores.py,
#: test_ops_app.py) run against, each built empty.
STORES: dict[str, Callable[[pytest.FixtureRequest, Path], AbstractContextManager[Store]]] = {
    "sqlite": sqlite_store,
    "postgres": postgres_store,
}
STORE_PARAMS = [
    pytest.param(name, marks=[pytest.mark.postgres] if name == "postgres" else [])
    for name in sorted(STORES)
]


@pytest.fixture(params=STORE_PARAMS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store of each kind in ``STORES``."""
    with STORES[request.param](request, tmp_path) as built:
        yield built


class OTel:
    """An SDK tracer and meter provider that keep what they record, for one test."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def providers(self) -> dict[str, Any]:
        """Keyword arguments for the middleware."""
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())

    def server_spans(self) -> list[Any]:
        from opentelemetry.trace import SpanKind

        return [span for span in self.spans() if span.kind is SpanKind.SERVER]

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, value)`` of every data point of metric ``name``."""
        data = self.reader.get_metrics_data()
        points = []
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        points += [(dict(p.attributes), p.value) for p in metric.data.data_points]
        return points

    def exported_text(self) -> str:
        """Every span and metric as JSON: what a planted secret must never appear in."""
        data = self.reader.get_metrics_data()
        return "\n".join(
            [span.to_json() for span in self.spans()] + [data.to_json() if data else ""]
        )

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[OTel]:
    telemetry = OTel()
    yield telemetry
    telemetry.shutdown()


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
