"""``python -m bench [--quick] [--only PARTS] [--variants NAMES] [--docs]`` (what ``make bench`` runs).

Runs the in-process and server comparisons, the micro-benchmarks and the sink throughput, prints
the tables, writes ``bench/results/<time>-<mode>.json`` and ``bench/results/latest.json``, and with
``--docs`` puts the tables into ``docs/performance.md``. Exits 1 when a variant failed its checks
(a broken variant must not pass for a fast one); budgets that do not hold are reported, not fatal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import have_wrk
from bench.micro import run_micro
from bench.modes import run_in_process, run_server
from bench.procs import ROOT
from bench.sinks import run_sinks
from bench.variants import VARIANTS

PARTS = ("inprocess", "server", "micro", "sinks")

#: Full and quick settings: about 14 and 3 minutes on 2 cores. Nine server rounds: with five, one
#: round's drift (±10% of a bare app's rate on a shared machine) moved the medians' ratios by as much.
SETTINGS = {
    "full": {
        "in_process_rounds": 15,
        "in_process_seconds": 0.25,
        "in_process_slices": 10,
        "server_rounds": 9,
        "server_seconds": 4,
        "server_slices": 4,
        "server_turn_seconds": 2,
        "connections": 32,
        "micro_samples": 9,
        "micro_seconds": 0.05,
        "sink_records": 10_000,
        "sink_samples": 3,
    },
    "quick": {
        "in_process_rounds": 5,
        "in_process_seconds": 0.1,
        "in_process_slices": 4,
        "server_rounds": 1,
        "server_seconds": 3,
        "server_slices": 3,
        "server_turn_seconds": 1,
        "connections": 32,
        "micro_samples": 5,
        "micro_seconds": 0.02,
        "sink_records": 3_000,
        "sink_samples": 2,
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs (~3 min)")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}"
    )
    parser.add_argument(
        "--variants", default="", help="comma-separated variant names (default: all)"
    )
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--docs", action="store_true", help="write the tables into docs/performance.md"
    )
    args = parser.parse_args(argv)

    mode = "quick" if args.quick else "full"
    settings: dict[str, Any] = {"mode": mode, **SETTINGS[mode]}
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    variants = [v for v in VARIANTS if not wanted or v.name in wanted or v.name.endswith(".bare")]
    skipped = {v.name: v.missing() for v in variants if v.missing()}
    variants = [v for v in variants if v.name not in skipped]
    tool = ("wrk" if have_wrk() else "python") if args.load == "auto" else args.load
    settings["load_generator"] = tool

    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {"machine": report.machine(), "settings": settings}
    if skipped:
        result["skipped_variants"] = skipped
        for name, modules in skipped.items():
            progress(f"skipping {name}: needs {', '.join(modules)}")
    if "inprocess" in parts:
        progress("in-process comparison")
        raw = run_in_process(
            variants,
            rounds=settings["in_process_rounds"],
            seconds_per_run=settings["in_process_seconds"],
            progress=progress,
            slices=settings["in_process_slices"],
        )
        result["in_process"] = report.summarize_in_process(raw)
    if "server" in parts:
        progress(f"server comparison ({tool})")
        raw = run_server(
            variants,
            rounds=settings["server_rounds"],
            seconds_per_run=settings["server_seconds"],
            connections=settings["connections"],
            tool=tool,
            progress=progress,
            slices=settings["server_slices"],
            turn_seconds=settings["server_turn_seconds"],
        )
        result["server"] = report.summarize_server(raw)
    if "micro" in parts:
        progress("micro-benchmarks")
        result["micro"] = run_micro(settings["micro_samples"], settings["micro_seconds"])
    if "sinks" in parts:
        progress("sink throughput")
        result["sinks"] = run_sinks(settings["sink_records"], settings["sink_samples"])
    result["budgets"] = report.budgets(result)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    path = report.write(result, args.out)
    print(report.table(result))
    print(f"written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if args.docs:
        report.update_docs(result, ROOT / "docs" / "performance.md")
        print("docs/performance.md updated")
    failed = [
        name
        for section in ("in_process", "server")
        for name, row in result.get(section, {}).items()
        if not row["ok"]
    ]
    if failed:
        print(f"FAILED checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
