"""What the OpenTelemetry work costs per request, in-process (no server, no network).

    .venv/bin/python bench/bench_telemetry.py [--requests N] [--repeat R]

A minimal ASGI app answers a happy-path request (no upstream failure); each variant wraps it, and
the table shows the cost each wrapper adds per request (best of R runs of N requests):

- ``upstream-ops, no SDK``: the whole middleware with no tracer or meter provider set (the default);
  ``of which OpenTelemetry`` is that minus the same middleware with its telemetry step removed (a
  difference of two timings, so noisy: the step is also timed alone below the table).
- ``upstream-ops + SDK``: the middleware starting its own SERVER span on an SDK tracer provider with a
  batch span processor (its exporter discards).
- ``OpenTelemetry ASGI + SDK``: opentelemetry-instrumentation-asgi's middleware on the same provider,
  as shipped (it also makes ``http send`` spans) and with ``exclude_spans=["send", "receive"]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit
from collections.abc import Sequence
from typing import Any

from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from upstream_ops import Collector, UpstreamOpsMiddleware
from upstream_ops.asgi import _describe
from upstream_ops.sinks import MemorySink
from upstream_ops.telemetry._server import ServerTelemetry

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/items/42",
    "raw_path": b"/items/42",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench.example"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
BODY = {"type": "http.response.body", "body": b"ok"}


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send(START)
    await send(BODY)


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    pass


class DiscardingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NoTelemetry:
    """The middleware's telemetry step removed: what the rest of the middleware costs."""

    def start(self, *args: Any, **kwargs: Any) -> None:
        return None


def best_per_request_ns(variants: dict[str, Any], requests: int, repeat: int) -> dict[str, float]:
    """Nanoseconds per request through each ASGI app: best of ``repeat`` runs of ``requests``.

    The variants take turns run by run, so a burst of load on the machine hits them all alike.
    """

    async def one_run(asgi: Any, count: int) -> float:
        started = time.perf_counter_ns()
        for _ in range(count):
            await asgi(dict(SCOPE), receive, send)
        return (time.perf_counter_ns() - started) / count

    async def run() -> dict[str, float]:
        for asgi in variants.values():
            await one_run(asgi, min(requests, 2000))  # warm up
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(repeat):
            for name, asgi in variants.items():
                best[name] = min(best[name], await one_run(asgi, requests))
        return best

    return asyncio.run(run())


def telemetry_step_ns() -> float:
    """What the middleware's OpenTelemetry step costs with no SDK: timed alone, free of the noise
    of subtracting two whole-middleware timings."""
    telemetry = ServerTelemetry()
    collector = Collector("bench")
    runs = timeit.repeat(
        lambda: telemetry.start(collector, _describe, SCOPE), number=100_000, repeat=7
    )
    return min(runs) / 100_000 * 1e9


def upstream_ops_middleware(**options: Any) -> UpstreamOpsMiddleware:
    return UpstreamOpsMiddleware(app, sink=MemorySink(), request_id_header=None, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DiscardingExporter(), max_queue_size=65536))
    without_telemetry = upstream_ops_middleware()
    without_telemetry.telemetry = NoTelemetry()  # type: ignore[assignment]
    best = best_per_request_ns(
        {
            "bare": app,
            "ours_no_sdk": upstream_ops_middleware(),
            "ours_no_telemetry": without_telemetry,
            "ours_sdk": upstream_ops_middleware(tracer_provider=provider),
            "otel": OpenTelemetryMiddleware(app, tracer_provider=provider),
            "otel_lean": OpenTelemetryMiddleware(
                app, tracer_provider=provider, exclude_spans=["send", "receive"]
            ),
        },
        args.requests,
        args.repeat,
    )
    provider.shutdown()
    bare, ours_no_sdk, ours_no_telemetry = (
        best["bare"],
        best["ours_no_sdk"],
        best["ours_no_telemetry"],
    )
    ours_sdk, otel, otel_lean = best["ours_sdk"], best["otel"], best["otel_lean"]

    rows = [
        ("bare app (baseline)", bare, None),
        ("upstream-ops, no SDK", ours_no_sdk, ours_no_sdk - bare),
        ("  of which OpenTelemetry", None, ours_no_sdk - ours_no_telemetry),
        ("upstream-ops + SDK (own SERVER span)", ours_sdk, ours_sdk - bare),
        ("OpenTelemetry ASGI + SDK", otel, otel - bare),
        ("OpenTelemetry ASGI + SDK, no send/receive spans", otel_lean, otel_lean - bare),
    ]
    print(f"{'variant':<50} {'per request':>12} {'added':>10}")
    for name, total, added in rows:
        total_text = f"{total / 1000:.2f} µs" if total is not None else ""
        added_text = f"{added / 1000:+.2f} µs" if added is not None else ""
        print(f"{name:<50} {total_text:>12} {added_text:>10}")
    step = telemetry_step_ns()
    print(f"\nthe telemetry step alone, no SDK (ServerTelemetry.start): {step:.0f} ns per request")
    ratio = (ours_sdk - bare) / (otel - bare)
    lean_ratio = (ours_sdk - bare) / (otel_lean - bare)
    print(f"\nupstream-ops + SDK adds {ratio:.0%} of what the OpenTelemetry ASGI middleware adds")
    print(f"({lean_ratio:.0%} of it without its send/receive spans)")


if __name__ == "__main__":
    main()
