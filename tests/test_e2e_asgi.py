"""End to end: a FastAPI gateway under a real uvicorn server, calling a real flaky upstream."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

import upstream_ops
from upstream_ops import RequestRecord, UpstreamOpsMiddleware, append_upstream_error
from upstream_ops.sinks import MemorySink, SQLiteSink

from .conftest import serve_asgi, wait_for


def flaky_upstream() -> FastAPI:
    """Answers 504 to the first call of each key, then 200."""
    upstream = FastAPI()
    seen: set[str] = set()

    @upstream.post("/v1/images/{key}")
    async def image(key: str) -> JSONResponse:
        if key not in seen:
            seen.add(key)
            return JSONResponse(
                {"error": {"message": "", "type": "rix_api_error", "code": "bade_status_code"}},
                status_code=504,
                headers={"x-request-id": f"up-{key}"},
            )
        return JSONResponse({"url": f"https://cdn.example/{key}.png"})

    return upstream


def gateway(sink: object, upstream_url: str) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        UpstreamOpsMiddleware, sink=sink, service="listing-images", echo_request_id=True
    )

    @app.post("/generate/{key}")
    async def generate(key: str) -> dict[str, object]:
        async with httpx.AsyncClient(base_url=upstream_url) as client:
            for attempt in (1, 2):
                response = await client.post(f"/v1/images/{key}")
                if response.status_code < 400:
                    return {"ok": True, "attempts": attempt}
                append_upstream_error(
                    platform="rix",
                    account_id=attempt,
                    upstream_status_code=response.status_code,
                    upstream_request_id=response.headers.get("x-request-id", ""),
                    kind="http_error",
                    message="gateway timeout",
                    detail=response.text,
                    attempt=attempt,
                )
        return {"ok": False}

    @app.post("/tagged/{tag}")
    async def tagged(tag: str) -> dict[str, str]:
        append_upstream_error(upstream_status_code=429, message=f"a-{tag}")
        await asyncio.sleep(0.001)
        append_upstream_error(upstream_status_code=503, message=f"b-{tag}")
        return {"tag": tag}

    @app.get("/slow-stream")
    async def slow_stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            append_upstream_error(upstream_status_code=504, message="upstream slow")
            for _ in range(100):
                yield b"x" * 1024
                await asyncio.sleep(0.05)

        return StreamingResponse(body())

    @app.get("/ping")
    async def ping(request: Request) -> dict[str, bool]:
        append_upstream_error(upstream_status_code=502, message="ping failed upstream")
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serve_asgi(flaky_upstream()) as url:
        yield url


def test_failing_upstream_behind_200_lands_in_sqlite(upstream_url: str, tmp_path: Path) -> None:
    sink = SQLiteSink(tmp_path / "ops.db")
    with serve_asgi(gateway(sink, upstream_url)) as url:
        response = httpx.post(f"{url}/generate/k1", headers={"X-Request-ID": "client-1"})
        assert response.status_code == 200
        assert response.json() == {"ok": True, "attempts": 2}
        assert response.headers["x-request-id"] == "client-1"
        assert upstream_ops.flush(timeout=5)
    [record] = sink.query_records(0, 2**62)
    assert record.request_id == "client-1" and record.status_code == 200 and record.recovered
    assert record.route == "/generate/{key}" and record.service == "listing-images"
    [event] = record.upstream_errors
    assert (event.platform, event.account_id, event.upstream_status_code) == ("rix", 1, 504)
    assert event.upstream_request_id == "up-k1"
    assert "bade_status_code" in event.detail
    sink.close()


def test_concurrent_requests_never_see_each_others_events(upstream_url: str) -> None:
    sink = MemorySink()

    async def drive(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(*(client.post(f"/tagged/{i}") for i in range(200)))
        return [r.status_code for r in responses]

    with serve_asgi(gateway(sink, upstream_url)) as url:
        statuses = asyncio.run(drive(url))
        assert upstream_ops.flush(timeout=10)
    assert statuses == [200] * 200
    assert len(sink.records) == 200
    for record in sink.records:
        tag = record.path.rsplit("/", 1)[1]
        assert [e.message for e in record.upstream_errors] == [f"a-{tag}", f"b-{tag}"]
    assert len({r.request_id for r in sink.records}) == 200


def test_client_disconnect_mid_stream_is_recorded_as_499(upstream_url: str) -> None:
    sink = MemorySink()
    with serve_asgi(gateway(sink, upstream_url)) as url:
        with httpx.stream("GET", f"{url}/slow-stream") as response:
            assert response.status_code == 200
            next(response.iter_bytes())
        assert wait_for(lambda: upstream_ops.flush(0.1) and len(sink.records) == 1, timeout=10)
    [record] = sink.records
    assert record.status_code == 499
    assert record.upstream_errors[0].message == "upstream slow"


class RaisingSink:
    def write(self, records: Sequence[RequestRecord]) -> None:
        raise ConnectionError("database down")


class SleepingSink(MemorySink):
    def write(self, records: Sequence[RequestRecord]) -> None:
        time.sleep(0.2)
        super().write(records)


def latencies(url: str, n: int = 40) -> list[float]:
    out = []
    with httpx.Client(base_url=url) as client:
        for _ in range(n):
            started = time.perf_counter()
            response = client.get("/ping")
            out.append(time.perf_counter() - started)
            assert response.status_code == 200 and response.json() == {"ok": True}
    return out


def test_a_raising_or_sleeping_sink_never_changes_the_response(upstream_url: str) -> None:
    results = {}
    for name, sink in (
        ("memory", MemorySink()),
        ("raising", RaisingSink()),
        ("sleeping", SleepingSink()),
    ):
        with serve_asgi(gateway(sink, upstream_url)) as url:
            latencies(url, 5)  # warm up
            results[name] = statistics.median(latencies(url))
    # A sink on the request path would add >= 200 ms per request; we allow only noise.
    assert results["sleeping"] < results["memory"] + 0.05, results
    assert results["raising"] < results["memory"] + 0.05, results
