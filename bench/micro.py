"""Micro-benchmarks of the request path's pieces, timed in this process.

* ``sanitize_message`` on 200 B, 2 KiB and 64 KiB of upstream error text of two shapes (log
  sentences; a quoted JSON error body and headers dict), with four secrets and without any; the
  2 KiB texts with secrets again without the C extension (``upstream_ops._speedups``); and the
  JSON shape from 2 KiB up to 1 MiB, to show the work grows linearly with the input.
* one ``append_upstream_error`` inside a request (sanitizing the event's fields included);
* one successful attempt (send, read the streamed body, close) through ``UpstreamOpsTransport``
  against the same attempt through the bare transport, inside a request and outside any;
* the middleware's OpenTelemetry step with no SDK configured (``ServerTelemetry.start``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from itertools import cycle
from typing import Any

from bench.apps import UPSTREAM_ERRORS

#: Distinct texts enough to miss the sanitizer's caches (4,096 results per kind) on every call ...
_UNSEEN_TEXTS = 3 * 4096
#: ... which keep the results of texts up to this long.
_CACHED_TEXT_CHARS = 512

#: Two shapes of upstream error text: what a service logs about a failed call (sentences, a few
#: key=value fields), and the JSON error body and headers dict it quotes (a ``key: value`` pair every
#: thirty characters, the sanitizer's most expensive input).
PARAGRAPHS = {
    "log": (
        "upstream call to api.example.com failed after 3 attempts, connection reset by peer while "
        "reading the response; retrying with the fallback account in 2 seconds. Request "
        "req_8f14e45fceea167a for model gpt-4o-mini in region eu-west-1 took 842 ms in all.\n"
    ),
    "json": (
        "upstream POST https://api.example.com/v1/chat/completions failed: 429 Too Many Requests; "
        'response: {"error": {"message": "Rate limit reached for requests in organization org-7Qx on '
        'tokens per min (TPM): Limit 30000, Used 29800, Requested 512.", "type": "requests", '
        '"param": null, "code": "rate_limit_exceeded"}, "retry_after_ms": 1200, "region": "eu-west-1"} '
        "headers: {'Content-Type': 'application/json', 'X-Request-Id': 'req_8f14e45fceea167a', "
        "'Retry-After': '2'}; attempt=3 elapsed_ms=842.5 model=gpt-4o-mini\n"
    ),
}
#: Four secrets of different kinds: a bearer JWT, URL userinfo plus a Google key in a query, a JSON
#: object with two secret keys, a bare provider key.
SECRETS = (
    "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVPmB92K27uhbUJU\n",
    "url=https://user:s3cr3tpass@db.internal:5432/app?api_key=AIzaSyA1234567890abcdefghijklmnopqrstu\n",
    '{"client_secret": "9f86d081884c7d659a2feaa0c55ad015", "password": "correct horse battery"}\n',
    "retrying with key sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789 after 429\n",
)
SECRET_VALUES = (
    "dBjftJeZ4CVPmB92K27uhbUJU",
    "s3cr3tpass",
    "AIzaSyA1234567890abcdefghijklmnopqrstu"[4:],
    "9f86d081884c7d659a2feaa0c55ad015",
    "correct horse battery",
    "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
)


def error_text(size: int, *, secrets: bool, shape: str = "json") -> str:
    """``size`` characters of upstream error text, the secrets spread through it when asked for."""
    planted = list(SECRETS) if secrets else []
    room = max(0, size - sum(map(len, planted)))
    paragraph = PARAGRAPHS[shape]
    filler = (paragraph * (room // len(paragraph) + 1))[:room]
    if not planted:
        return filler
    step = len(filler) // len(planted)
    pieces: list[str] = []
    for i, secret in enumerate(planted):
        pieces += (filler[i * step : (i + 1) * step], secret)
    pieces.append(filler[len(planted) * step :])
    return "".join(pieces)[: max(size, sum(map(len, planted)))]


def _sanitize_next(sanitize: Callable[[str], str], texts: Iterator[str]) -> str:
    return sanitize(next(texts))


def _time_calls(call: Callable[[], object], samples: int, sample_seconds: float) -> list[float]:
    """Microseconds per call: ``samples`` samples of a loop lasting about ``sample_seconds``."""
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < 0.02 or count < 3:
        call()
        count += 1
    per_call = (time.perf_counter() - started) / count
    loops = max(1, min(1_000_000, int(sample_seconds / per_call)))
    results = []
    for _ in range(samples):
        started_ns = time.perf_counter_ns()
        for _ in range(loops):
            call()
        results.append((time.perf_counter_ns() - started_ns) / loops / 1000)
    return results


def _summary(samples: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "median_us": statistics.median(samples),
        "min_us": min(samples),
        "max_us": max(samples),
        "samples_us": samples,
        **extra,
    }


def sanitize_cases(samples: int, sample_seconds: float) -> dict[str, dict[str, Any]]:
    from upstream_ops.sanitize import Sanitizer, _patterns_only, sanitize_message

    results: dict[str, dict[str, Any]] = {}
    for shape in PARAGRAPHS:
        for size, label in ((200, "200 B"), (2048, "2 KiB"), (65536, "64 KiB")):
            for secrets in (False, True):
                text = error_text(size, secrets=secrets, shape=shape)
                if secrets and size == 200:  # one secret fits
                    text = SECRETS[0] + error_text(
                        200 - len(SECRETS[0]), secrets=False, shape=shape
                    )
                out = sanitize_message(text)
                leaked = [s for s in SECRET_VALUES if s in text and s in out]
                name = (
                    f"sanitize_message {label} {shape} {'with' if secrets else 'without'} secrets"
                )
                if leaked:
                    raise AssertionError(f"{name}: secrets left in the output: {leaked}")
                # What is timed is the rules' work: a text short enough for the sanitizer to keep
                # its result is timed in variants it has not seen lately (the last characters, all
                # filler, numbered), so that no call is answered from that cache.
                call: Callable[[], object] = partial(sanitize_message, text)
                if len(text) <= _CACHED_TEXT_CHARS:
                    unseen = cycle([f"{text[:-7]} {i:06x}" for i in range(_UNSEEN_TEXTS)])
                    call = partial(_sanitize_next, sanitize_message, unseen)
                results[name] = _summary(
                    _time_calls(call, samples, sample_seconds),
                    input_chars=len(text),
                    shape=shape,
                )
    # What an install without a C compiler gets: the same 2 KiB with secrets, the patterns alone.
    sanitizer = _patterns_only(Sanitizer())
    for shape in PARAGRAPHS:
        text = error_text(2048, secrets=True, shape=shape)
        if sanitizer.message(text) != sanitize_message(text):
            raise AssertionError(f"{shape}: the patterns alone give another text")
        results[f"sanitize_message 2 KiB {shape} with secrets, patterns only"] = _summary(
            _time_calls(partial(sanitizer.message, text), samples, sample_seconds),
            input_chars=len(text),
            shape=shape,
        )
    return results


def sanitize_linearity(samples: int, sample_seconds: float) -> dict[str, Any]:
    """µs per KiB from 2 KiB to 1 MiB, with sanitize_message's limit and with a 1 MiB limit."""
    from upstream_ops.sanitize import Sanitizer, sanitize_message

    whole = Sanitizer()
    sizes = (2048, 16384, 131072, 1 << 20)
    rows: dict[str, Any] = {}
    for size in sizes:
        text = error_text(size, secrets=True)
        default = statistics.median(
            _time_calls(partial(sanitize_message, text), samples, sample_seconds)
        )
        unbounded = statistics.median(
            _time_calls(partial(whole.message, text, 1 << 20), samples, sample_seconds)
        )
        rows[str(size)] = {
            "sanitize_message_us": default,
            "sanitize_message_us_per_kib": default / (size / 1024),
            "limit_1mib_us": unbounded,
            "limit_1mib_us_per_kib": unbounded / (size / 1024),
        }
    per_kib = [row["limit_1mib_us_per_kib"] for row in rows.values()]
    return {
        "sizes": rows,
        # Linear: the cost of one KiB at 1 MiB is within 2x of its cost at 16 KiB (2 KiB carries the
        # fixed cost of a call, so it is not the reference).
        "linear": per_kib[-1] <= 2 * per_kib[1],
    }


def append_upstream_error_case(
    samples: int, sample_seconds: float, *, unseen_texts: bool = False
) -> dict[str, Any]:
    """One event appended (the first bench event); with ``unseen_texts``, its message and detail
    are ones the sanitizer has not seen lately, so that none of its results comes from a cache."""
    from upstream_ops import Collector, append_upstream_error
    from upstream_ops.collector import _activate, _deactivate

    base = UPSTREAM_ERRORS[0]
    if unseen_texts:
        variants = cycle(
            [
                dict(
                    base,
                    message=f"{base['message']} (request req_{i:08x})",
                    detail=base["detail"].replace("requests", f"requests of org-{i:06x}", 1),
                )
                for i in range(_UNSEEN_TEXTS)
            ]
        )
    else:
        variants = cycle([base])
    state: dict[str, Any] = {"left": 0, "token": None}

    def one() -> None:
        if state["left"] == 0:  # a fresh request every 16 events (the default max per request)
            if state["token"] is not None:
                _deactivate(state["token"])
            state["token"] = _activate(Collector("bench"))
            state["left"] = 16
        state["left"] -= 1
        append_upstream_error(**next(variants))

    def reference() -> None:  # the same bookkeeping without the append
        if state["left"] == 0:
            if state["token"] is not None:
                _deactivate(state["token"])
            state["token"] = _activate(Collector("bench"))
            state["left"] = 16
        state["left"] -= 1
        next(variants)

    with_append = _time_calls(one, samples, sample_seconds)
    without = _time_calls(reference, samples, sample_seconds)
    if state["token"] is not None:
        _deactivate(state["token"])
    added = [a - b for a, b in zip(with_append, without, strict=True)]
    return _summary(added)


def _paired_added(
    variant: Callable[[], object],
    reference: Callable[[], object],
    samples: int,
    sample_seconds: float,
    block_seconds: float = 0.0005,
) -> dict[str, Any]:
    """µs per call that ``variant`` adds over ``reference``, from blocks that alternate every
    ``block_seconds`` (A B, then B A): load from other processes, which comes and goes over
    milliseconds, hits both alike. Each sample is the median over its block pairs of the difference;
    a pause (preemption, a collection) lands in one block and is outvoted, not subtracted."""
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < 0.02 or count < 3:
        reference()
        count += 1
    calls = max(1, int(block_seconds / ((time.perf_counter() - started) / count)))
    pairs = max(5, int(sample_seconds / (2 * block_seconds)))
    clock = time.perf_counter_ns

    def block(call: Callable[[], object]) -> float:
        begun = clock()
        for _ in range(calls):
            call()
        return (clock() - begun) / calls / 1000

    added: list[float] = []
    variant_us: list[float] = []
    reference_us: list[float] = []
    for _ in range(samples):
        differences, variant_blocks, reference_blocks = [], [], []
        for i in range(pairs):
            if i % 2:
                b, a = block(reference), block(variant)
            else:
                a, b = block(variant), block(reference)
            differences.append(a - b)
            variant_blocks.append(a)
            reference_blocks.append(b)
        added.append(statistics.median(differences))
        variant_us.append(statistics.median(variant_blocks))
        reference_us.append(statistics.median(reference_blocks))
    return _summary(
        added,
        bare_median_us=statistics.median(reference_us),
        capture_median_us=statistics.median(variant_us),
    )


#: A provider's rate-limit answer as it arrives: the status, a JSON error body and the headers an API
#: behind a CDN sends with it (the failed attempt of ``httpx_capture_case(failed=True)``).
FAILED_BODY = (
    b'{"error": {"message": "Rate limit reached for requests", "type": "requests", '
    b'"code": "rate_limit_exceeded"}}'
)
FAILED_HEADERS = {
    "date": "Mon, 07 Dec 2026 07:00:00 GMT",
    "content-type": "application/json",
    "content-length": str(len(FAILED_BODY)),
    "connection": "keep-alive",
    "retry-after": "2",
    "x-request-id": "req_8f14e45fceea167a",
    "server": "cloudflare",
    "cf-ray": "8f1a2b3c4d5e6f70-FRA",
}


def httpx_capture_case(
    samples: int, sample_seconds: float, *, in_request: bool = True, failed: bool = False
) -> dict[str, Any]:
    """An attempt through the capture transport minus the same attempt through the bare transport:
    a 200, or with ``failed`` a 429 with a JSON error body, which the capture reads, classifies and
    records as an event.

    The response streams its body, as ``httpx.HTTPTransport``'s do: one built with ``content=`` is
    read when it is made, and the capture's part in reading the body would not be measured.
    """
    import httpx

    from upstream_ops import Collector
    from upstream_ops.collector import _activate, _deactivate
    from upstream_ops.httpx import UpstreamOpsTransport

    if failed:
        status, body, headers = 429, FAILED_BODY, FAILED_HEADERS
    else:
        status, body = 200, b'{"id":"chatcmpl-1","choices":[{"message":{"content":"ok"}}]}'
        headers = {"content-type": "application/json", "content-length": str(len(body))}

    class Body(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield body

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, stream=Body())

    bare = httpx.MockTransport(handler)
    captured = UpstreamOpsTransport(httpx.MockTransport(handler), platform="openai")
    request = httpx.Request("POST", "https://api.example.com/v1/chat/completions", content=b"{}")

    def attempt(transport: httpx.BaseTransport) -> Callable[[], None]:
        def one() -> None:
            response = transport.handle_request(request)
            response.read()
            response.close()

        return one

    collector = Collector("bench")  # keeps the last 16 events: the failed attempts' stay bounded
    token = _activate(collector) if in_request else None
    try:
        result = _paired_added(attempt(captured), attempt(bare), samples, sample_seconds)
        response = captured.handle_request(request)
        if response.read() != body:
            raise AssertionError("the capture transport changed the response body")
    finally:
        if token is not None:
            _deactivate(token)
    if in_request and not collector.next_attempt() > 1:
        raise AssertionError("the capture transport did not see the attempts")
    if failed and in_request:
        last = collector.events[-1]
        if (last.upstream_status_code, last.provider_error_code) != (429, "rate_limit_exceeded"):
            raise AssertionError(f"the failed attempt was not recorded as expected: {last}")
    return result


def telemetry_step_case(samples: int, sample_seconds: float) -> dict[str, Any]:
    """What the middleware's OpenTelemetry step costs per request with no SDK configured (the
    default): ``ServerTelemetry.start`` timed alone, free of the noise of subtracting two timings."""
    from bench.drive import SCOPE
    from upstream_ops import Collector
    from upstream_ops.asgi import _describe
    from upstream_ops.telemetry._server import ServerTelemetry

    telemetry = ServerTelemetry()
    collector = Collector("bench")
    return _summary(
        _time_calls(lambda: telemetry.start(collector, _describe, SCOPE), samples, sample_seconds)
    )


def run_micro(samples: int, sample_seconds: float) -> dict[str, Any]:
    return {
        "sanitize": sanitize_cases(samples, sample_seconds),
        "sanitize_linearity": sanitize_linearity(max(3, samples // 2), sample_seconds),
        "append_upstream_error": append_upstream_error_case(samples, sample_seconds),
        "append_upstream_error_unseen_texts": append_upstream_error_case(
            samples, sample_seconds, unseen_texts=True
        ),
        "httpx_capture_added": httpx_capture_case(samples, sample_seconds),
        "httpx_capture_added_outside_request": httpx_capture_case(
            samples, sample_seconds, in_request=False
        ),
        "httpx_capture_failed_added": httpx_capture_case(samples, sample_seconds, failed=True),
        "telemetry_step_no_sdk": telemetry_step_case(samples, sample_seconds),
    }
