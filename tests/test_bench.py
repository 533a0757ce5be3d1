"""The benchmark harness (bench/): a broken variant must fail its checks, never look fast.

These run the harness's own pieces on tiny inputs (no sentry-sdk or OpenTelemetry instrumentation
needed, a few seconds in all); ``make bench`` runs the real comparison.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench import apps, report
from bench.drive import ASGIDriver, WSGIDriver
from bench.loadgen import run_python
from bench.modes import (
    TURN_SECONDS,
    WARMUP_AND_PROBE,
    _get_once,
    measurement_groups,
    round_order,
    run_in_process,
    run_in_turns,
)
from bench.procs import Worker
from bench.variants import BY_NAME, IN_PROCESS, SERVER, VARIANTS, bare_of, build
from tests.conftest import serve_asgi


def test_each_family_starts_with_its_bare_app_and_names_are_unique() -> None:
    names = [variant.name for variant in VARIANTS]
    assert len(names) == len(set(names))
    for variant in VARIANTS:
        assert variant.family in ("asgi", "wsgi", "wsgi_plain")
        assert bare_of(variant.family).name == f"{variant.family}.bare"
        assert set(variant.modes) <= {IN_PROCESS, SERVER}
    for family in ("asgi", "wsgi"):
        assert {
            f"{family}.ours",
            f"{family}.ours_errors",
            f"{family}.otel",
            f"{family}.sentry",
        } <= set(BY_NAME)
    # The framework-free pair runs in-process only (it shows the middleware's own cost).
    assert {BY_NAME["wsgi_plain.bare"].modes, BY_NAME["wsgi_plain.ours"].modes} == {(IN_PROCESS,)}


class _FakeWorker:
    """A worker whose CPU clock advances by ``share`` of a core while the wall clock does."""

    def __init__(self, share: float, busy_until: float = 0.0) -> None:
        self.share, self.busy_until = share, busy_until
        self.started = time.monotonic()

    def cpu_ns(self) -> int:
        elapsed = time.monotonic() - self.started
        busy = min(elapsed, self.busy_until)
        return int((busy * 0.5 + elapsed * self.share) * 1e9)


def test_waiting_for_quiet_judges_each_worker_on_its_own() -> None:
    from bench.procs import wait_until_quiet

    # Fifteen idle workers at 0.2% of a core each are quiet, although they sum to 3%.
    idle = [_FakeWorker(0.002) for _ in range(15)]
    assert wait_until_quiet(idle, max_seconds=2.0) < 0.5
    # One worker busy (half a core) for 0.5 s is waited for, then no longer.
    busy = [*idle, _FakeWorker(0.002, busy_until=0.5)]
    assert 0.45 < wait_until_quiet(busy, max_seconds=3.0) < 1.5
    # A worker that never goes quiet: the wait ends at its limit.
    assert wait_until_quiet([_FakeWorker(0.3)], max_seconds=0.5) >= 0.5


def test_a_round_runs_each_bare_app_next_to_our_variants_and_reverses_every_other_round() -> None:
    even, odd = round_order(VARIANTS, 0), round_order(VARIANTS, 1)
    assert sorted(v.name for v in even) == sorted(v.name for v in VARIANTS)
    for family in ("asgi", "wsgi", "wsgi_plain"):
        names = [v.name for v in even if v.family == family]
        assert names[0] == f"{family}.bare"
        ours = [n for n in names if n.split(".")[1].startswith("ours")]
        assert names[1 : 1 + len(ours)] == ours  # the peers after them
        assert [v.name for v in odd if v.family == family] == names[::-1]
    assert [v.family for v in odd] == [v.family for v in even]  # families keep their order


def test_variants_without_background_work_are_timed_in_slices_with_their_bare_app() -> None:
    even = measurement_groups(round_order(VARIANTS, 0))
    odd = measurement_groups(round_order(VARIANTS, 1))
    sliced = [[v.name for v in group] for group in even if len(group) > 1]
    assert sliced == [
        ["asgi.bare", "asgi.ours", "asgi.ours_echo"],
        ["wsgi.bare", "wsgi.ours"],
        ["wsgi_plain.bare", "wsgi_plain.ours"],
    ]
    assert [[v.name for v in group] for group in odd if len(group) > 1] == [
        names[::-1] for names in sliced
    ]
    # Every variant with work outside its requests is timed alone; every variant is timed once.
    for groups in (even, odd):
        assert all(len(group) == 1 for group in groups if any(v.background for v in group))
        assert sorted(v.name for group in groups for v in group) == sorted(v.name for v in VARIANTS)
    # A background variant between two quiet ones of a family splits them.
    bare, ours, errors = BY_NAME["asgi.bare"], BY_NAME["asgi.ours"], BY_NAME["asgi.ours_errors"]
    assert measurement_groups([bare, errors, ours]) == [[bare], [errors], [ours]]
    assert measurement_groups([bare, BY_NAME["wsgi.ours"]]) == [[bare], [BY_NAME["wsgi.ours"]]]


def test_sliced_runs_time_every_request_and_check_for_threads() -> None:
    variants = [BY_NAME["wsgi_plain.bare"], BY_NAME["wsgi_plain.ours"]]
    messages: list[str] = []
    raw = run_in_process(
        variants, rounds=2, seconds_per_run=0.02, progress=messages.append, slices=4
    )
    for variant in variants:
        result = raw[variant.name]
        assert result["slices"] == 4 and len(result["samples_us"]) == 2
        assert result["requests"] == WARMUP_AND_PROBE + 2 * 4 * max(
            1, result["requests_per_run"] // 4
        )
        assert result["facts"]["threads"] == 1
        assert result["checks"]["no thread besides the main one (timed in slices)"] is True
        assert result["bad"] == 0
    assert messages == ["in-process round 1/2", "in-process round 2/2"]


@pytest.mark.parametrize(
    "name",
    [
        "asgi.bare",
        "asgi.ours",
        "asgi.ours_errors_memory",
        "wsgi.ours",
        "wsgi_plain.bare",
        "wsgi_plain.ours",
    ],
)
def test_working_variants_pass_every_response_check(name: str) -> None:
    variant = BY_NAME[name]
    built = build(name)
    driver = ASGIDriver(built.app) if variant.family == "asgi" else WSGIDriver(built.app)
    try:
        result = driver.run(50)
    finally:
        driver.close()
        built.close()  # drains the queue: the counters are final
    assert (result.requests, result.bad, result.first_bad) == (50, 0, None)
    for check in variant.expect.values():
        assert check(built.facts(), 50)


def test_a_variant_without_its_instrumentation_fails_its_checks() -> None:
    # The "upstream-ops" endpoint without the middleware: its probe finds no collector.
    from upstream_ops import current_collector

    app = apps.starlette_app(lambda: current_collector() is not None)
    result = ASGIDriver(app).run(20)
    assert result.bad == 20 and result.first_bad is not None and "probe failed" in result.first_bad
    wsgi = WSGIDriver(apps.flask_app(apps.upstream_errors_probe())).run(20)
    assert wsgi.bad == 20
    plain = WSGIDriver(apps.plain_wsgi_app(lambda: current_collector() is not None)).run(20)
    assert plain.bad == 20 and plain.first_bad is not None and "probe failed" in plain.first_bad


def test_a_wrong_body_or_status_is_counted_bad() -> None:
    async def wrong_body(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"id":43,"ok":true}'})

    def server_error(environ: Any, start_response: Any) -> list[bytes]:
        start_response("500 Internal Server Error", [])
        return [apps.EXPECTED_BODY]

    assert ASGIDriver(wrong_body).run(10).bad == 10
    assert WSGIDriver(server_error).run(10).bad == 10


def test_python_load_generator_checks_what_it_receives() -> None:
    with serve_asgi(apps.starlette_app()) as url:
        good = run_python(url + apps.PATH, 0.5, 4)
    assert good.requests > 0 and good.bad == 0 and good.errors == 0
    assert 0 < good.p50_us <= good.p99_us
    with serve_asgi(apps.starlette_app(lambda: False)) as url:
        broken = run_python(url + apps.PATH, 0.3, 2)
    assert broken.requests > 0 and broken.bad == broken.requests


def test_a_wsgi_variant_serves_under_gunicorn_and_stops_with_its_worker() -> None:
    # As run_server drives it: the port comes from gunicorn's forked worker, which also answers
    # for facts; the CPU read before each run counts that worker; stopping ends both processes.
    worker = Worker(SERVER, "wsgi.ours_errors")
    try:
        port = int(worker.receive(60)["port"])
        with open(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children") as children:
            (forked,) = map(int, children.read().split())
        for _ in range(20):
            assert _get_once(port) == (apps.EXPECTED_STATUS, apps.EXPECTED_BODY)
        with open(f"/proc/{forked}/schedstat") as stat:
            forked_cpu_ns = int(stat.read().split()[0])
        assert worker.cpu_ns() >= forked_cpu_ns > 0
        # gunicorn's worker thread closes the response (where the record is enqueued) after the
        # client has read it, so the last record may still be on its way when the facts are asked.
        deadline = time.monotonic() + 10
        facts = worker.ask({"facts": True})["facts"]
        while facts["records_enqueued"] < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
            facts = worker.ask({"facts": True})["facts"]
        assert facts["records_enqueued"] == 20 and facts["records_dropped"] == 0
    finally:
        worker.stop()
    assert worker.proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(forked, 0)


def _state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_paused_worker_answers_nothing_until_resumed_and_stops_paused() -> None:
    # gunicorn: the master and its forked worker are both paused, or the worker would answer.
    worker = Worker(SERVER, "wsgi.ours")
    try:
        port = int(worker.receive(60)["port"])
        assert _get_once(port) == (apps.EXPECTED_STATUS, apps.EXPECTED_BODY)
        pids = worker.pids()
        assert len(pids) == 2  # the master and its worker
        worker.pause()
        assert {_state(pid) for pid in pids} == {"T"}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        connection.request("GET", apps.PATH)
        with pytest.raises(TimeoutError):
            connection.getresponse()
        worker.resume()
        connection.sock.settimeout(10)
        response = connection.getresponse()  # the request sent while paused
        assert (response.status, response.read()) == (apps.EXPECTED_STATUS, apps.EXPECTED_BODY)
        connection.close()
        worker.pause()
    finally:
        worker.stop()  # a paused worker is resumed to read its quit
    assert worker.proc.returncode == 0


def test_servers_in_turns_run_one_at_a_time_and_are_resumed_after() -> None:
    group = [BY_NAME["asgi.bare"], BY_NAME["asgi.ours"]]
    workers = {v.name: Worker(SERVER, v.name) for v in group}
    try:
        ports = {name: int(worker.receive(60)["port"]) for name, worker in workers.items()}
        busy = dict.fromkeys(workers, 0)  # times seen running, from /proc, while the other was not
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                running = [n for n, w in workers.items() if _state(w.proc.pid) != "T"]
                if len(running) == 1:
                    busy[running[0]] += 1
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            turns = run_in_turns(
                group, workers, ports, seconds_each=0.5, connections=4, tool="python"
            )
        finally:
            stop.set()
            watcher.join()
        for name, turn in turns.items():
            assert turn.load.requests > 0 and turn.load.bad == 0 and turn.load.errors == 0
            # Each ran its share, in turns of TURN_SECONDS, and only while it ran did it use CPU.
            assert 0.5 <= turn.seconds_run < 0.5 + 3 * TURN_SECONDS
            assert turn.cpu_ns > 0
            assert turn.requests_per_s == turn.load.requests / turn.seconds_run
            assert busy[name] > 10  # seen running alone, the other paused
        for worker in workers.values():
            assert _state(worker.proc.pid) != "T"
        assert workers["asgi.ours"].ask({"facts": True})["facts"]["records_enqueued"] == 0
        for port in ports.values():
            assert _get_once(port) == (apps.EXPECTED_STATUS, apps.EXPECTED_BODY)
    finally:
        for worker in workers.values():
            worker.stop()


def _raw_in_process(bad: int = 0) -> dict[str, dict[str, Any]]:
    return {
        "asgi.bare": {"title": "bare", "samples_us": [10.0, 12.0, 11.0], "bad": 0},
        "asgi.ours": {
            "title": "ours",
            "samples_us": [14.0, 15.0, 13.0],
            "bad": bad,
            "checks": {"no record for a healthy request": True},
        },
    }


def _raw_server() -> dict[str, dict[str, Any]]:
    row = {
        "tool": "python",
        "bad": 0,
        "errors": 0,
        "samples_p50_us": [900.0],
        "samples_p99_us": [2e3],
    }
    return {
        "asgi.bare": {**row, "title": "bare", "samples_rps": [5000.0]},
        "asgi.ours": {**row, "title": "ours", "samples_rps": [4900.0], "checks": {"x": True}},
    }


def test_summaries_budgets_table_and_result_file(tmp_path: Path) -> None:
    result: dict[str, Any] = {
        "machine": report.machine(),
        "settings": {"mode": "quick", "in_process_rounds": 3, "server_rounds": 1},
        "in_process": report.summarize_in_process(_raw_in_process()),
        "server": report.summarize_server(_raw_server()),
    }
    result["settings"].update(connections=32, server_seconds=3)
    ours = result["in_process"]["asgi.ours"]
    assert ours["us"] == {"median": 14.0, "min": 13.0, "max": 15.0}
    assert ours["added_us"]["median"] == 3.0  # paired by round: 4, 3, 2
    assert ours["ratio"] == pytest.approx(14.0 / 11.0) and ours["ok"]
    assert result["server"]["asgi.ours"]["ratio"] == pytest.approx(0.98)
    result["budgets"] = report.budgets(result)
    by_name = {verdict["budget"]: verdict for verdict in result["budgets"]}
    assert by_name["ASGI happy path added in-process"]["holds"] is True
    assert by_name["ASGI happy path req/s under uvicorn, of bare"]["holds"] is True
    assert by_name["WSGI happy path added in-process"]["holds"] is None  # not measured
    table = report.table(result)
    assert "| asgi.ours: ours | 14.0 (13.0-15.0) | 3.0 (2.0-4.0) | 1.27 | ok |" in table
    path = report.write(result, tmp_path)
    assert json.loads(path.read_text()) == json.loads((tmp_path / "latest.json").read_text())


def test_the_server_ratio_comes_from_the_run_in_turns_where_there_is_one() -> None:
    raw = _raw_server()
    for name, rates, cpu in (
        ("asgi.bare", [5000.0, 4000.0], 100.0),
        ("asgi.ours", [4600.0, 3900.0], 105.0),
    ):
        raw[name].update(
            samples_rps=[r * 1.1 for r in rates][::-1],  # the sequential runs: another story
            samples_p50_us=[900.0] * 2,
            samples_p99_us=[2e3] * 2,
            samples_turn_rps=rates,
            samples_turn_cpu_us=[cpu, cpu + 2],
            slices=4,
        )
    summary = report.summarize_server(raw)
    ours = summary["asgi.ours"]
    assert ours["ratio"] == pytest.approx((0.92 + 0.975) / 2)  # paired by round, in turns
    assert ours["ratio_sequential"] == pytest.approx((3900 / 4000 + 4600 / 5000) / 2)
    assert ours["turn_cpu_us"] == {"median": 106.0, "min": 105.0, "max": 107.0}
    settings = {"mode": "full", "server_rounds": 2, "connections": 32, "server_seconds": 4}
    table = report.table(
        {
            "machine": report.machine(),
            "settings": {**settings, "server_slices": 4, "server_turn_seconds": 2},
            "server": summary,
        }
    )
    assert "each running 50 ms at a time while the others are paused, 2 s each" in table
    assert "| 0.95 | 0.90 (0.90-0.90) | 2.00 (2.00-2.00) | 4,250 (3,900-4,600) | 106.0" in table


def test_a_sink_behind_a_busy_app_thread_writes_every_queued_record(tmp_path: Path) -> None:
    from bench.sinks import busy_app_rate, make_records
    from upstream_ops.sinks import JsonlSink

    sink = JsonlSink(tmp_path / "busy.jsonl")
    records = make_records(600)
    rate = busy_app_rate(sink.write, records, seconds=5.0)
    sink.close()
    lines = (tmp_path / "busy.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(r.id for r in records)
    assert rate > 0
    row = {"median_records_per_s": 9e3, "min_records_per_s": 8e3, "max_records_per_s": 1e4}
    table = report.table(
        {
            "machine": report.machine(),
            "settings": {"mode": "quick"},
            "sinks": {
                "JSONL": {**row, "busy_app_records_per_s": 4321.0},
                "spool (fsync'd appends)": {**row, "busy_app_records_per_s": None},
            },
        }
    )
    assert "| JSONL | 9,000 (8,000-10,000) | 4,321 |" in table
    assert "| spool (fsync'd appends) | 9,000 (8,000-10,000) |  |" in table


def test_a_bad_response_fails_the_variant_and_its_budget() -> None:
    summary = report.summarize_in_process(_raw_in_process(bad=1))
    assert not summary["asgi.ours"]["ok"]
    verdicts = report.budgets({"in_process": summary})
    assert verdicts[0]["holds"] is None  # a failed variant proves nothing
    assert "**FAILED**: 1 bad responses" in report._checks(summary["asgi.ours"])


@pytest.mark.parametrize(
    ("in_request", "failed"), [(True, False), (False, False), (True, True), (False, True)]
)
def test_the_httpx_capture_micro_benchmark_runs_its_checks(in_request: bool, failed: bool) -> None:
    from bench.micro import httpx_capture_case

    result = httpx_capture_case(2, 0.002, in_request=in_request, failed=failed)
    assert len(result["samples_us"]) == 2
    assert {"median_us", "min_us", "max_us", "bare_median_us", "capture_median_us"} <= set(result)


VARIANT_PAIR = ("asgi.bare", "asgi.ours")


def test_instruction_counts_rank_the_middleware_above_the_bare_app() -> None:
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from bench import instructions

    if shutil.which("valgrind") is None:
        reason = "valgrind is not installed (apt-get install valgrind)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI needs it", pytrace=False)  # like PostgreSQL and Chromium
        pytest.skip(reason)
    # 400 requests: the pools refilled now and then (ids, the allocator) average out.
    with ThreadPoolExecutor(max_workers=2) as pool:  # one valgrind per core
        bare, ours = pool.map(lambda name: instructions.per_request(name, 400), VARIANT_PAIR)
    # A Starlette request is tens of thousands of instructions; the middleware adds ~17,000. No
    # thread but the main one serves these requests, so all threads count about the same.
    main = bare.main_thread
    assert 10_000 < main < main + 5_000 < ours.main_thread < main * 2, (bare, ours)
    for counts in (bare, ours):
        assert counts.main_thread <= counts.all_threads < counts.main_thread + 2_000, counts


def test_instruction_counts_refuse_a_bad_request_count(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import instructions

    with pytest.raises(SystemExit) as exited:
        instructions.main(["asgi.bare", "--requests", "0"])
    assert exited.value.code == 2
    assert "--requests must be at least 1" in capsys.readouterr().err


def test_cold_requests_are_timed_in_turns_after_the_caches_are_written_over(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench import cold

    samples = cold.measure(["asgi.bare", "asgi.ours"], 20, 1 << 20)
    assert {name: len(times) for name, times in samples.items()} == {
        "asgi.bare": 20,
        "asgi.ours": 20,
    }
    assert all(t > 0 for times in samples.values() for t in times)
    cold.main(["wsgi_plain.bare", "wsgi_plain.ours", "--requests", "10", "--evict-mib", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("µs per request, caches evicted")
    assert lines[1].split()[0::3] == ["wsgi_plain.bare", "wsgi_plain.bare"]  # its own bare app
    assert lines[1].split()[2] == "+0.0"
    assert lines[2].split()[0] == "wsgi_plain.ours" and lines[2].split()[3] == "wsgi_plain.bare"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["asgi.bare", "asgi.otel"], "invalid choice: 'asgi.otel'"),  # patches the process
        (["asgi.bare", "asgi.bare"], "name each variant once"),
        (["asgi.bare", "--requests", "0"], "--requests must be at least 1"),
        (["asgi.bare", "--evict-mib", "-1"], "--evict-mib must not be negative"),
    ],
)
def test_cold_refuses_what_it_cannot_measure(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import cold

    with pytest.raises(SystemExit) as exit_info:
        cold.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cold_stops_at_a_response_that_fails_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import cold
    from bench.variants import Built

    # The endpoint answers 500 when its probe says the instrumentation is not active.
    monkeypatch.setattr(cold, "build", lambda name: Built(apps.starlette_app(lambda: False)))
    with pytest.raises(SystemExit, match=r"asgi\.ours: a warm-up response failed its check"):
        cold.main(["asgi.ours", "--requests", "5", "--evict-mib", "0"])
