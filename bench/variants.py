"""The variants: what each one wraps around the same app, and how to tell that it really did.

Each variant is built in a process of its own (``bench.worker``), because sentry-sdk and the
OpenTelemetry SDK patch and configure process-wide state. ``VARIANTS`` is the list the harness runs, in
this order, family by family; the first variant of a family is the bare app the others are compared
with.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import apps

ASGI, WSGI = "asgi", "wsgi"
IN_PROCESS, SERVER = "inprocess", "server"

#: How long the isolation variant's sink sleeps per batch.
SLOW_SINK_SECONDS = 0.2


@dataclass
class Built:
    """A variant's app in this process, and what it can say about itself after a run."""

    app: Any
    facts: Callable[[], dict[str, Any]] = dict
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Variant:
    name: str  # "asgi.ours_errors"
    title: str
    build: Callable[[], Built]
    modes: tuple[str, ...] = (IN_PROCESS, SERVER)
    #: Modules that must be importable (bench extra, or a feature branch not merged yet).
    requires: tuple[str, ...] = ()
    #: Facts that must hold after a run: name -> check of (facts, requests served).
    expect: Mapping[str, Callable[[dict[str, Any], int], bool]] = field(default_factory=dict)
    #: Works outside its requests (an SDK's exporter, a dispatcher writing records): in-process it
    #: is timed in a run of its own after the wait for quiet. A variant without such work is timed
    #: in slices that alternate with its bare app's (``modes.measurement_groups``), and its worker
    #: must have no thread besides the main one (checked after the run).
    background: bool = False

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    def missing(self) -> list[str]:
        """The required modules this environment lacks (the variant is then skipped, and says why)."""
        return [m for m in self.requires if importlib.util.find_spec(m.split(":")[0]) is None]


# --- sinks ---------------------------------------------------------------------------------------


class CountingSink:
    """Keeps nothing, counts records: the "memory sink" of the isolation check, without growing."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.records = 0
        self.batches = 0
        self._lock = threading.Lock()

    def write(self, records: Sequence[Any], /) -> None:
        if self.sleep:
            time.sleep(self.sleep)
        with self._lock:
            self.records += len(records)
            self.batches += 1


def _sqlite_sink() -> Any:
    from upstream_ops.sinks import SQLiteSink

    directory = tempfile.mkdtemp(prefix="upstream-ops-bench-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return SQLiteSink(Path(directory) / "records.db")


def _closer(*steps: Callable[[], object]) -> Callable[[], None]:
    def close() -> None:
        for step in steps:
            step()

    return close


def _dispatcher_facts(middleware: Any) -> Callable[[], dict[str, Any]]:
    def facts() -> dict[str, Any]:
        stats = middleware.dispatcher.stats()
        return {
            "records_enqueued": stats.enqueued,
            "records_dropped": stats.dropped,
            "records_written": stats.written,
            "records_failed": stats.failed,
        }

    return facts


def _every_request_recorded(facts: dict[str, Any], requests: int) -> bool:
    return int(facts["records_enqueued"]) + int(facts["records_dropped"]) >= requests


def _no_request_recorded(facts: dict[str, Any], requests: int) -> bool:
    return int(facts["records_enqueued"]) == 0 and int(facts["records_dropped"]) == 0


# --- OpenTelemetry and sentry ----------------------------------------------------------------------


def _tracer_provider() -> Any:
    """An SDK tracer provider whose batch processor hands spans to an exporter that discards them."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DiscardingExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DiscardingExporter(), max_queue_size=65536))
    return provider


# Probes are built once per variant, with what they call already imported: the endpoint pays the
# same few tens of nanoseconds in every variant.


def _span_probe() -> apps.Probe:
    from opentelemetry.trace import get_current_span

    return lambda: get_current_span().is_recording()


def _init_sentry() -> None:
    """sentry-sdk with performance tracing on every request and a transport that discards."""
    import sentry_sdk
    from sentry_sdk.transport import Transport

    # Transport is Any where sentry-sdk is not installed (it is only in the bench extra).
    class DiscardingTransport(Transport):  # type: ignore[misc, unused-ignore]
        def capture_envelope(self, envelope: Any) -> None:
            pass

    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",  # never contacted: the transport discards
        transport=DiscardingTransport,
        traces_sample_rate=1.0,
        default_integrations=True,
    )


def _sentry_probe() -> apps.Probe:
    from sentry_sdk import get_current_span

    return lambda: get_current_span() is not None


def _collector_probe() -> apps.Probe:
    from upstream_ops import current_collector

    return lambda: current_collector() is not None


# --- ASGI (Starlette) ------------------------------------------------------------------------------


def _asgi_bare() -> Built:
    return Built(apps.starlette_app())


def _asgi_otel() -> Built:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    provider = _tracer_provider()
    app = OpenTelemetryMiddleware(apps.starlette_app(_span_probe()), tracer_provider=provider)
    return Built(app, close=provider.shutdown)


def _asgi_otel_lean() -> Built:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    provider = _tracer_provider()
    app = OpenTelemetryMiddleware(
        apps.starlette_app(_span_probe()),
        tracer_provider=provider,
        exclude_spans=["send", "receive"],
    )
    return Built(app, close=provider.shutdown)


def _asgi_sentry() -> Built:
    _init_sentry()  # before the app is built: the Starlette integration patches Starlette
    return Built(apps.starlette_app(_sentry_probe()))


def _asgi_ours(probe: apps.Probe, sink: Any, **options: Any) -> Built:
    from upstream_ops import UpstreamOpsMiddleware

    middleware = UpstreamOpsMiddleware(apps.starlette_app(probe), sink=sink, **options)
    return Built(middleware, _dispatcher_facts(middleware), _closer(middleware.dispatcher.close))


def _asgi_ours_otel() -> Built:
    provider = _tracer_provider()
    built = _asgi_ours(_span_probe(), _sqlite_sink(), tracer_provider=provider)
    return Built(built.app, built.facts, _closer(built.close, provider.shutdown))


# --- WSGI (Flask) ----------------------------------------------------------------------------------


def _wsgi_bare() -> Built:
    return Built(apps.flask_app())


def _wsgi_otel() -> Built:
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    provider = _tracer_provider()
    app = apps.flask_app(_span_probe())
    app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app, tracer_provider=provider)
    return Built(app, close=provider.shutdown)


def _wsgi_sentry() -> Built:
    _init_sentry()
    return Built(apps.flask_app(_sentry_probe()))


def _wsgi_ours(probe: apps.Probe, sink: Any, **options: Any) -> Built:
    from upstream_ops.flask import UpstreamOps

    app = apps.flask_app(probe)
    middleware = UpstreamOps(app, sink=sink, **options).middleware
    assert middleware is not None
    return Built(app, _dispatcher_facts(middleware), _closer(middleware.dispatcher.close))


def _wsgi_ours_otel() -> Built:
    provider = _tracer_provider()
    built = _wsgi_ours(_span_probe(), _sqlite_sink(), tracer_provider=provider)
    return Built(built.app, built.facts, _closer(built.close, provider.shutdown))


# --- WSGI without a framework ---------------------------------------------------------------------


def _wsgi_plain_bare() -> Built:
    return Built(apps.plain_wsgi_app())


def _wsgi_plain_ours() -> Built:
    from upstream_ops import UpstreamOpsWSGIMiddleware

    middleware = UpstreamOpsWSGIMiddleware(
        apps.plain_wsgi_app(_collector_probe()), sink=_sqlite_sink()
    )
    return Built(middleware, _dispatcher_facts(middleware), _closer(middleware.dispatcher.close))


_OTEL_ASGI = ("opentelemetry.instrumentation.asgi",)
_OTEL_WSGI = ("opentelemetry.instrumentation.wsgi",)
_SENTRY = ("sentry_sdk",)
_OWN_SPAN = ("upstream_ops.telemetry",)  # our own server span (issue 4)
_RECORDED = {"every request recorded": _every_request_recorded}
_NOT_RECORDED = {"no record for a healthy request": _no_request_recorded}

VARIANTS: tuple[Variant, ...] = (
    Variant("asgi.bare", "Starlette, bare", _asgi_bare),
    Variant(
        "asgi.otel",
        "+ OpenTelemetry ASGI middleware, SDK",
        _asgi_otel,
        requires=_OTEL_ASGI,
        background=True,
    ),
    Variant(
        "asgi.otel_lean",
        "+ OpenTelemetry ASGI middleware, SDK, no send/receive spans",
        _asgi_otel_lean,
        modes=(IN_PROCESS,),
        requires=_OTEL_ASGI,
        background=True,
    ),
    Variant(
        "asgi.sentry",
        "+ sentry-sdk, tracing every request",
        _asgi_sentry,
        requires=_SENTRY,
        background=True,
    ),
    Variant(
        "asgi.ours",
        "+ upstream-ops, no upstream error",
        lambda: _asgi_ours(_collector_probe(), _sqlite_sink()),
        expect=_NOT_RECORDED,
    ),
    Variant(
        "asgi.ours_echo",
        "+ upstream-ops, no upstream error, request id echoed (echo_request_id=True)",
        lambda: _asgi_ours(_collector_probe(), _sqlite_sink(), echo_request_id=True),
        expect=_NOT_RECORDED,
    ),
    Variant(
        "asgi.ours_errors",
        "+ upstream-ops, 3 upstream errors, SQLite sink",
        lambda: _asgi_ours(apps.upstream_errors_probe(), _sqlite_sink()),
        expect=_RECORDED,
        background=True,
    ),
    Variant(
        "asgi.ours_errors_memory",
        "+ upstream-ops, 3 upstream errors, memory sink",
        lambda: _asgi_ours(apps.upstream_errors_probe(), CountingSink()),
        expect=_RECORDED,
        background=True,
    ),
    Variant(
        "asgi.ours_errors_slow_sink",
        f"+ upstream-ops, 3 upstream errors, sink sleeping {SLOW_SINK_SECONDS * 1000:.0f} ms a batch",
        lambda: _asgi_ours(apps.upstream_errors_probe(), CountingSink(sleep=SLOW_SINK_SECONDS)),
        modes=(SERVER,),
        expect=_RECORDED,
        background=True,
    ),
    Variant(
        "asgi.ours_otel",
        "+ upstream-ops with its own OpenTelemetry server span, SDK",
        _asgi_ours_otel,
        requires=_OWN_SPAN,
        expect=_NOT_RECORDED,
        background=True,
    ),
    Variant("wsgi.bare", "Flask, bare", _wsgi_bare),
    Variant(
        "wsgi.otel",
        "+ OpenTelemetry WSGI middleware, SDK",
        _wsgi_otel,
        requires=_OTEL_WSGI,
        background=True,
    ),
    Variant(
        "wsgi.sentry",
        "+ sentry-sdk, tracing every request",
        _wsgi_sentry,
        requires=_SENTRY,
        background=True,
    ),
    Variant(
        "wsgi.ours",
        "+ upstream-ops, no upstream error",
        lambda: _wsgi_ours(_collector_probe(), _sqlite_sink()),
        expect=_NOT_RECORDED,
    ),
    Variant(
        "wsgi.ours_errors",
        "+ upstream-ops, 3 upstream errors, SQLite sink",
        lambda: _wsgi_ours(apps.upstream_errors_probe(), _sqlite_sink()),
        expect=_RECORDED,
        background=True,
    ),
    Variant(
        "wsgi.ours_otel",
        "+ upstream-ops with its own OpenTelemetry server span, SDK",
        _wsgi_ours_otel,
        requires=_OWN_SPAN,
        expect=_NOT_RECORDED,
        background=True,
    ),
    # The middleware around a WSGI callable with no framework: the same instructions as in Flask
    # (about 20,000 a request), at the rate they run without Flask's working set around them.
    Variant(
        "wsgi_plain.bare", "a plain WSGI callable, bare", _wsgi_plain_bare, modes=(IN_PROCESS,)
    ),
    Variant(
        "wsgi_plain.ours",
        "+ upstream-ops, no upstream error",
        _wsgi_plain_ours,
        modes=(IN_PROCESS,),
        expect=_NOT_RECORDED,
    ),
)

BY_NAME = {variant.name: variant for variant in VARIANTS}


def bare_of(family: str) -> Variant:
    return VARIANTS[[v.family for v in VARIANTS].index(family)]


def build(name: str) -> Built:
    os.environ.setdefault(
        "UPSTREAM_OPS_SINK", "memory://"
    )  # nothing falls back to ./upstream_ops.db
    return BY_NAME[name].build()
