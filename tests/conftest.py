"""Fixtures that build real things: servers on 127.0.0.1, files in tmp_path."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from upstream_ops.dispatcher import Dispatcher
from upstream_ops.sinks import MemorySink, SQLiteSink
from upstream_ops.store import Store


@contextmanager
def serve_asgi(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on 127.0.0.1; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    sink = SQLiteSink(tmp_path / "store.db")
    try:
        yield sink
    finally:
        sink.close()


#: The queryable stores that the read-side tests (test_store.py, test_ops_app.py) run against, each
#: built empty. PostgreSQL joins this table when its store is on this branch.
STORES: dict[str, Callable[[Path], AbstractContextManager[Store]]] = {"sqlite": sqlite_store}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store of each kind in ``STORES``."""
    with STORES[request.param](tmp_path) as built:
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
