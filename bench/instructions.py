"""Instructions per request of an in-process variant, counted by valgrind's callgrind.

    python -m bench.instructions asgi.bare asgi.ours wsgi.bare wsgi.ours [--requests 1000]

Time on a shared machine moves by ±20% between runs; the number of instructions a request executes
does not depend on what else the machine is doing. For each variant the worker's process runs under
``valgrind --tool=callgrind`` twice, after the same warm-up: once with no timed requests and once with
``--requests``; the difference divided by the request count is what one request costs, imports and
start-up cancelled out. It counts instructions, not cycles (a cache miss costs nothing here), so it
ranks changes to the request path, while ``make bench`` says what they are worth in time. Needs
valgrind (Debian's ``valgrind`` package).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from bench.procs import ROOT, child_env
from bench.variants import BY_NAME

_COLLECTED = re.compile(r"Collected : (\d+)")

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


def instructions(name: str, requests: int) -> int:
    """Instructions the process executed for ``name`` with ``requests`` timed requests."""
    completed = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            _PROGRAM,
            name,
            str(requests),
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    found = _COLLECTED.search(completed.stderr)
    if completed.returncode != 0 or found is None:
        raise SystemExit(f"{name}: the measured process failed:\n{completed.stderr[-2000:]}")
    return int(found.group(1))


def per_request(name: str, requests: int) -> float:
    return (instructions(name, requests) - instructions(name, 0)) / requests


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
    for name, count in zip(args.variants, counts, strict=True):
        print(f"{name:<28} {count:>12,.0f} instructions per request")


if __name__ == "__main__":
    main()
