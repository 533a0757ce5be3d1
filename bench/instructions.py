"""Instructions per request of an in-process variant, counted by valgrind's callgrind.

    python -m bench.instructions asgi.bare asgi.ours wsgi.bare wsgi.ours [--requests 1000]

Time on a shared machine moves by ±20% between runs; the number of instructions a request executes
does not depend on what else the machine is doing. For each variant the worker's process runs under
``valgrind --tool=callgrind`` twice, after the same warm-up: once with no timed requests and once with
``--requests``; the difference divided by the request count is what one request costs, imports and
start-up cancelled out. It counts instructions, not cycles (a cache miss costs nothing here), so it
ranks changes to the request path, while ``make bench`` says what they are worth in time. Needs
valgrind (Debian's ``valgrind`` package).

Two figures per variant: the main thread's, which ran the requests, and all threads'. Where no
other thread works (the happy paths) they agree and do not move between runs. Where the dispatcher's
threads work (the variants with upstream errors), both depend on when those threads ran: they work
on a timer (a batch every 0.2 s of wall time) and valgrind runs fifty times slower, so the batches'
sizes, the wake-ups and the interpreter lock's hand-overs differ from run to run. For the same code
on 2026-12-07 the main thread counted 218,000-245,000 instructions a request and all threads
223,000-279,000: compare such variants over several runs, or count their pieces without threads.
String hashes are random in each process, and dict layouts with them; the runs are given
``PYTHONHASHSEED=0`` unless it is set.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from bench.procs import ROOT, child_env
from bench.variants import BY_NAME

_SUMMARY = re.compile(r"^summary: (\d+)", re.MULTILINE)

# Runs in the measured process: build the variant, warm it up, then serve the requests counted.
_PROGRAM = """
import sys
from bench.drive import driver_for
from bench.variants import BY_NAME, build
name, count = sys.argv[1], int(sys.argv[2])
driver = driver_for(BY_NAME[name].family, build(name).app)
result = driver.run(300)
if count:
    result = driver.run(count)
sys.exit(1 if result.bad else 0)
"""


class Counts(NamedTuple):
    """Instructions of the main thread (which serves the requests) and of all threads."""

    main_thread: float
    all_threads: float


def instructions(name: str, requests: int) -> Counts:
    """Instructions the process executed for ``name`` with ``requests`` timed requests."""
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as directory:
        out = Path(directory) / "callgrind.out"
        completed = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",  # one file a thread: out-01 is the main thread's
                f"--callgrind-out-file={out}",
                "--dump-line=no",
                sys.executable,
                "-c",
                _PROGRAM,
                name,
                str(requests),
            ],
            cwd=ROOT,
            env={"PYTHONHASHSEED": "0", **child_env()},  # the same dict layouts in every run
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        per_thread = {}
        for path in sorted(Path(directory).glob("callgrind.out-*")):
            found = _SUMMARY.search(path.read_text(errors="replace"))
            if found is not None:
                per_thread[path.name] = int(found.group(1))
    main_thread = per_thread.get("callgrind.out-01")
    if completed.returncode != 0 or main_thread is None:
        raise SystemExit(f"{name}: the measured process failed:\n{completed.stderr[-2000:]}")
    return Counts(main_thread, sum(per_thread.values()))


def per_request(name: str, requests: int) -> Counts:
    counted, baseline = instructions(name, requests), instructions(name, 0)
    return Counts(
        (counted.main_thread - baseline.main_thread) / requests,
        (counted.all_threads - baseline.all_threads) / requests,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("variants", nargs="+", choices=sorted(BY_NAME), metavar="VARIANT")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = list(pool.map(lambda name: per_request(name, args.requests), args.variants))
    print(f"{'instructions per request':<28} {'main thread':>12} {'all threads':>12}")
    for name, count in zip(args.variants, counts, strict=True):
        print(f"{name:<28} {count.main_thread:>12,.0f} {count.all_threads:>12,.0f}")


if __name__ == "__main__":
    main()
