"""The two ways the variants are measured, both in interleaved rounds (A B C A B C ...).

* in-process: each variant's worker drives its app directly; a round asks every worker in turn for
  one timed run of its request count. Result: microseconds per request.
* server: each variant's worker serves on 127.0.0.1 (uvicorn for ASGI, gunicorn for WSGI); a round
  points the load generator at every server in turn. Result: requests per second, p50 and p99.

Machine drift (another process, a CPU frequency change) then hits every variant alike instead of
whichever happened to run at the time. Within a family the bare app runs next to upstream-ops'
variants, the peers after them, and every other round runs in the reverse order (see
``round_order``). A bare app and the variants of its family that do no work outside their
requests run their round's share in slices that alternate (A B A B ...; see
``measurement_groups``), so that the machine's slow spells (mostly a few to a hundred
milliseconds long on the shared machines this runs on) and its drift over seconds fall on both
alike.
"""

from __future__ import annotations

import http.client
import math
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.apps import EXPECTED_BODY, EXPECTED_STATUS, PATH
from bench.loadgen import LoadResult, run_load
from bench.procs import Worker, WorkerError, wait_until_quiet
from bench.variants import IN_PROCESS, SERVER, Variant

Progress = Callable[[str], None]


def round_order(variants: Sequence[Variant], round_no: int) -> list[Variant]:
    """The order of one round: family by family, each family's bare app, then upstream-ops'
    variants, then the peers'; every other round reversed within each family.

    "added" pairs each variant with the bare app's run of the same round. On this kind of shared
    machine the speed moves within seconds, and a peer's run with the wait for its exporter to go
    quiet can last that long: next to the bare app, the pair sees the same spell. Reversing every
    other round (A B C, C B A) cancels a drift that is steady over a round.
    """
    families: dict[str, list[Variant]] = {}
    for variant in variants:
        families.setdefault(variant.family, []).append(variant)
    ordered: list[Variant] = []
    for members in families.values():
        bare, rest = members[:1], members[1:]
        ours = [v for v in rest if v.name.split(".", 1)[1].startswith("ours")]
        family = bare + ours + [v for v in rest if v not in ours]
        ordered += family if round_no % 2 == 0 else family[::-1]
    return ordered


def measurement_groups(order: Sequence[Variant]) -> list[list[Variant]]:
    """The round's order cut into what is timed together: each run of consecutive variants of one
    family with no work outside their requests (``Variant.background`` false; the bare app first
    or last) is one group, timed in alternating slices; any other variant is a group of its own.

    In-process a slice is a tenth of a run (``bench.__main__.SETTINGS``): about 25 ms, longer than
    most slow spells seen here and long enough that a worker's first requests after the other's,
    on cold caches, weigh little. Under a server it is a quarter of a run (1 s of wrk), which pairs
    the variants against the drift over seconds that a server's throughput follows. Each
    variant's figure for the round is still its whole run's requests over its whole run's time;
    the slices only interleave it with its bare app's. A variant with work outside its requests
    (an exporter, a dispatcher's writes) cannot be sliced: that work would fall in the other
    variant's slices, so it keeps a run of its own, after the wait for quiet.
    """
    groups: list[list[Variant]] = []
    for variant in order:
        last = groups[-1] if groups else None
        if (
            last is not None
            and not variant.background
            and not last[-1].background
            and last[-1].family == variant.family
        ):
            last.append(variant)
        else:
            groups.append([variant])
    return groups


def _check_facts(variant: Variant, facts: dict[str, Any], requests: int) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    for name, holds in variant.expect.items():
        try:
            checks[name] = bool(holds(facts, requests))
        except (KeyError, TypeError, ValueError):
            checks[name] = False
    return checks


def run_in_process(
    variants: Sequence[Variant],
    *,
    rounds: int,
    seconds_per_run: float,
    progress: Progress,
    slices: int = 1,
) -> dict[str, dict[str, Any]]:
    """Microseconds per request of each variant, one sample per round; the variants of a
    ``measurement_groups`` group run in ``slices`` alternating slices."""
    variants = [v for v in variants if IN_PROCESS in v.modes]
    workers: dict[str, Worker] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for variant in variants:
            worker = Worker(IN_PROCESS, variant.name)
            workers[variant.name] = worker
            ready = worker.receive()
            # Calibrate: enough requests for one run to last about ``seconds_per_run``.
            probe = worker.ask({"run": 200})
            per_request_s = probe["elapsed_ns"] / 200 / 1e9
            count = int(min(50_000, max(200, seconds_per_run / per_request_s)))
            results[variant.name] = {
                "title": variant.title,
                "requests_per_run": count,
                "samples_us": [],
                "requests": WARMUP_AND_PROBE,
                "bad": int(ready["bad"]) + int(probe["bad"]),
                "first_bad": ready.get("first_bad") or probe.get("first_bad"),
            }
        for round_no in range(rounds):
            progress(f"in-process round {round_no + 1}/{rounds}")
            for group in measurement_groups(round_order(variants, round_no)):
                waited = wait_until_quiet(workers.values())
                parts = slices if len(group) > 1 else 1
                elapsed_ns = dict.fromkeys((v.name for v in group), 0)
                served = dict.fromkeys((v.name for v in group), 0)
                for part in range(parts):
                    for variant in group if part % 2 == 0 else group[::-1]:
                        result = results[variant.name]
                        count = max(1, result["requests_per_run"] // parts)
                        answer = workers[variant.name].ask({"run": count})
                        elapsed_ns[variant.name] += answer["elapsed_ns"]
                        served[variant.name] += answer["requests"]
                        result["bad"] += answer["bad"]
                        result["first_bad"] = result["first_bad"] or answer["first_bad"]
                for variant in group:
                    result = results[variant.name]
                    result.setdefault("waited_s", []).append(waited)
                    result["slices"] = parts
                    result["samples_us"].append(
                        elapsed_ns[variant.name] / served[variant.name] / 1000
                    )
                    result["requests"] += served[variant.name]
        for variant in variants:
            result = results[variant.name]
            facts = workers[variant.name].ask({"facts": True})["facts"]
            result["facts"] = facts
            result["checks"] = _check_facts(variant, facts, result["requests"])
            if result.get("slices", 1) > 1:
                # Sliced: nothing of it may run between its slices, in the other variant's time.
                result["checks"]["no thread besides the main one (timed in slices)"] = (
                    facts.get("threads") == 1
                )
    finally:
        for worker in workers.values():
            worker.stop()
    return results


#: Requests each in-process worker serves outside the timed runs (warm-up and calibration).
WARMUP_AND_PROBE = 300 + 200


def _get_once(port: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", PATH)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


#: How long one server of a group runs before the next one takes its turn (``run_in_turns``).
TURN_SECONDS = 0.05
#: Before the first turn: the load generators open their connections (the kernel accepts them
#: while the servers are paused).
_CONNECT_SECONDS = 0.3


@dataclass
class TurnsResult:
    """One server's share of a run in turns: what it answered in the time it ran."""

    load: LoadResult  # the load generator's totals (its latencies include the other turns: unused)
    seconds_run: float
    cpu_ns: int

    @property
    def requests_per_s(self) -> float:
        return self.load.requests / self.seconds_run


def run_in_turns(
    group: Sequence[Variant],
    workers: dict[str, Worker],
    ports: dict[str, int],
    *,
    seconds_each: float,
    connections: int,
    tool: str,
) -> dict[str, TurnsResult]:
    """Load every server of ``group`` at once, each with its own load generator, and let only one
    of them run at a time, in turns of ``TURN_SECONDS`` (the others paused with SIGSTOP), until
    each has run ``seconds_each``.

    The servers take turns on the same cores in the same seconds, so the machine's slow spells,
    mostly shorter than a second, fall on each alike; one after the other, even in 1 s slices, a
    bare app's req/s moved by ±15% from one slice to the next. A server answers only while it runs,
    so its rate is its requests over the time it ran.
    """
    names = [variant.name for variant in group]
    # Whole seconds (wrk's unit), long enough for every turn and the pauses between them.
    load_seconds = math.ceil(_CONNECT_SECONDS + seconds_each * len(group) * 1.15) + 1
    ran = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0)
    for name in names:
        workers[name].pause()
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            loads = {
                name: pool.submit(
                    run_load,
                    f"http://127.0.0.1:{ports[name]}{PATH}",
                    load_seconds,
                    connections,
                    tool,
                )
                for name in names
            }
            started = time.monotonic()
            time.sleep(_CONNECT_SECONDS)
            last_turn_start = started + load_seconds - 1.0 - TURN_SECONDS
            while min(ran.values()) < seconds_each and time.monotonic() < last_turn_start:
                for name in names:
                    worker = workers[name]
                    before = worker.cpu_ns()
                    turn_started = time.monotonic()
                    worker.resume()
                    time.sleep(TURN_SECONDS)
                    worker.pause()
                    ran[name] += time.monotonic() - turn_started
                    cpu[name] += worker.cpu_ns() - before
            done = {name: future.result() for name, future in loads.items()}
    finally:
        for name in names:
            workers[name].resume()
    return {name: TurnsResult(done[name], ran[name], cpu[name]) for name in names}


def run_server(
    variants: Sequence[Variant],
    *,
    rounds: int,
    seconds_per_run: float,
    connections: int,
    tool: str,
    progress: Progress,
    slices: int = 1,
    turn_seconds: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Requests per second and latency of each variant under a real server, one sample per round;
    the variants of a ``measurement_groups`` group are loaded in ``slices`` alternating slices
    (their round's p50 and p99 are then the medians of the slices'), and then, with
    ``turn_seconds``, once more ``run_in_turns`` for each one's ``samples_turn_rps``."""
    variants = [v for v in variants if SERVER in v.modes]
    workers: dict[str, Worker] = {}
    ports: dict[str, int] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for variant in variants:
            worker = Worker(SERVER, variant.name)
            workers[variant.name] = worker
            ports[variant.name] = int(worker.receive(60)["port"])
        for variant in variants:
            status, body = _get_once(ports[variant.name])
            if status != EXPECTED_STATUS or body != EXPECTED_BODY:
                raise WorkerError(f"{variant.name}: answered {status} {body[:200]!r}")
            url = f"http://127.0.0.1:{ports[variant.name]}{PATH}"
            warm = run_load(url, 1.0, connections, tool)  # warm-up, not recorded
            results[variant.name] = {
                "title": variant.title,
                "tool": tool,
                "samples_rps": [],
                "samples_p50_us": [],
                "samples_p99_us": [],
                "requests": warm.requests + 1,
                "bad": warm.bad,
                "errors": warm.errors,
            }
        for round_no in range(rounds):
            progress(f"server round {round_no + 1}/{rounds}")
            for group in measurement_groups(round_order(variants, round_no)):
                waited = wait_until_quiet(workers.values())
                parts = slices if len(group) > 1 else 1
                loads: dict[str, list[LoadResult]] = {v.name: [] for v in group}
                for part in range(parts):
                    for variant in group if part % 2 == 0 else group[::-1]:
                        url = f"http://127.0.0.1:{ports[variant.name]}{PATH}"
                        loads[variant.name].append(
                            run_load(url, seconds_per_run / parts, connections, tool)
                        )
                for variant in group:
                    result = results[variant.name]
                    done = loads[variant.name]
                    served = sum(load.requests for load in done)
                    result.setdefault("waited_s", []).append(waited)
                    result["slices"] = parts
                    result["samples_rps"].append(served / sum(load.seconds for load in done))
                    result["samples_p50_us"].append(statistics.median(x.p50_us for x in done))
                    result["samples_p99_us"].append(statistics.median(x.p99_us for x in done))
                    result["requests"] += served
                    result["bad"] += sum(load.bad for load in done)
                    result["errors"] += sum(load.errors for load in done)
                if parts > 1 and turn_seconds > 0:
                    turns = run_in_turns(
                        group,
                        workers,
                        ports,
                        seconds_each=turn_seconds,
                        connections=connections,
                        tool=tool,
                    )
                    for variant in group:
                        result = results[variant.name]
                        turn = turns[variant.name]
                        result.setdefault("samples_turn_rps", []).append(turn.requests_per_s)
                        result.setdefault("samples_turn_cpu_us", []).append(
                            turn.cpu_ns / 1000 / max(1, turn.load.requests)
                        )
                        result["requests"] += turn.load.requests
                        result["bad"] += turn.load.bad
                        result["errors"] += turn.load.errors
        for variant in variants:
            result = results[variant.name]
            facts = workers[variant.name].ask({"facts": True})["facts"]
            result["facts"] = facts
            result["checks"] = _check_facts(variant, facts, result["requests"])
    finally:
        for worker in workers.values():
            worker.stop()
    return results
