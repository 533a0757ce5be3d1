"""Turning raw samples into the result file, the printed table and the budget verdicts.

Figures are medians over rounds with their min-max. "added" (in-process) is the median over rounds
of (variant - bare app of its family) measured in the same round, and "ratio" under a server the
median over rounds of (variant / bare app) in the same round: the rounds pair each variant with
its bare app, and the machine's drift between rounds cancels in the pair. For the variants loaded
in slices the server ratio's rates come from the round's run in turns (``modes.run_in_turns``),
where the group shares the same seconds. The in-process "ratio"
is the variant's median over the bare app's median (a rough scale; no budget reads it).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import modes
from bench.sinks import BUSY_APP_RECORDS
from bench.variants import BY_NAME, bare_of

DOCS_BEGIN = "<!-- bench:begin (written by make bench; edit outside these markers) -->"
DOCS_END = "<!-- bench:end -->"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": [round(x, 2) for x in load],
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "upstream-ops",
        "starlette",
        "flask",
        "uvicorn",
        "gunicorn",
        "httpx",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-asgi",
        "opentelemetry-instrumentation-wsgi",
        "sentry-sdk",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    if out["upstream-ops"] != "not installed":
        built = [name for name in _EXTENSIONS if importlib.util.find_spec(name) is not None]
        if len(built) == len(_EXTENSIONS):
            out["upstream-ops"] += " (with its C extensions)"
        else:
            missing = ", ".join(name for name in _EXTENSIONS if name not in built)
            out["upstream-ops"] += f" (without the C extensions {missing})"
    return out


#: The optional extensions whose absence changes the figures (see setup.py).
_EXTENSIONS = (
    "upstream_ops._speedups",
    "upstream_ops._wsgi_recording",
    "upstream_ops._asgi_recording",
)


def _spread(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def summarize_in_process(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, result in raw.items():
        bare = raw.get(bare_of(BY_NAME[name].family).name)
        row = {**result, "us": _spread(result["samples_us"])}
        if bare is not None:
            paired = [v - b for v, b in zip(result["samples_us"], bare["samples_us"], strict=True)]
            row["added_us"] = _spread(paired)
            row["ratio"] = row["us"]["median"] / statistics.median(bare["samples_us"])
        row["ok"] = result["bad"] == 0 and all(result.get("checks", {}).values())
        out[name] = row
    return out


def summarize_server(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, result in raw.items():
        bare = raw.get(bare_of(BY_NAME[name].family).name)
        row = {
            **result,
            "rps": _spread(result["samples_rps"]),
            "p50_us": _spread(result["samples_p50_us"]),
            "p99_us": _spread(result["samples_p99_us"]),
        }
        if "samples_turn_rps" in result:
            row["turn_rps"] = _spread(result["samples_turn_rps"])
            row["turn_cpu_us"] = _spread(result["samples_turn_cpu_us"])
        if bare is not None:
            row["ratio_sequential"] = _paired_ratio(result["samples_rps"], bare["samples_rps"])
            row["ratio_of_medians"] = row["rps"]["median"] / statistics.median(bare["samples_rps"])
            # From the run in turns where there is one (``modes.run_in_turns``): the group ran in
            # the same seconds, where one after the other met different spells of the machine.
            turns, bare_turns = result.get("samples_turn_rps"), bare.get("samples_turn_rps")
            row["ratio"] = (
                _paired_ratio(turns, bare_turns)
                if turns and bare_turns
                else row["ratio_sequential"]
            )
        row["ok"] = (
            result["bad"] == 0 and result["errors"] == 0 and all(result.get("checks", {}).values())
        )
        out[name] = row
    return out


def _paired_ratio(samples: list[float], bare_samples: list[float]) -> float:
    """The median over rounds of the round's ratio to the bare app."""
    return statistics.median(v / b for v, b in zip(samples, bare_samples, strict=True))


def _verdict(
    name: str, figure: float | None, limit: float, *, at_most: bool, unit: str, note: str = ""
) -> dict[str, Any]:
    if figure is None:
        return {"budget": name, "holds": None, "figure": None, "limit": limit, "note": note}
    holds = figure <= limit if at_most else figure >= limit
    return {
        "budget": name,
        "holds": holds,
        "figure": round(figure, 3),
        "limit": limit,
        "unit": unit,
        "note": note,
    }


def budgets(result: dict[str, Any]) -> list[dict[str, Any]]:
    inproc = result.get("in_process", {})
    server = result.get("server", {})
    micro = result.get("micro", {})
    sinks = result.get("sinks", {})

    def added(name: str) -> float | None:
        row = inproc.get(name)
        return row["added_us"]["median"] if row and row.get("ok") else None

    def ratio(name: str) -> float | None:
        row = server.get(name)
        return row["ratio"] if row and row.get("ok") else None

    verdicts = [
        _verdict(
            "ASGI happy path added in-process", added("asgi.ours"), 5, at_most=True, unit="µs"
        ),
        _verdict(
            "ASGI happy path req/s under uvicorn, of bare",
            ratio("asgi.ours"),
            0.95,
            at_most=False,
            unit="x",
        ),
        _verdict(
            "WSGI happy path added in-process", added("wsgi.ours"), 5, at_most=True, unit="µs"
        ),
        _verdict(
            "3 upstream errors added in-process (ASGI, SQLite sink)",
            added("asgi.ours_errors"),
            30,
            at_most=True,
            unit="µs",
        ),
    ]
    ours_otel, otel = added("asgi.ours_otel"), added("asgi.otel")
    verdicts.append(
        _verdict(
            "own OpenTelemetry server span added, of OTel ASGI middleware's",
            ours_otel / otel if ours_otel is not None and otel else None,
            0.5,
            at_most=True,
            unit="x",
            note=""
            if ours_otel is not None
            else "variant not in this build (OpenTelemetry branch)",
        )
    )
    for shape in ("log", "json"):
        sanitize = micro.get("sanitize", {}).get(f"sanitize_message 2 KiB {shape} with secrets")
        verdicts.append(
            _verdict(
                f"sanitize_message 2 KiB with secrets, {shape} text",
                sanitize["median_us"] if sanitize else None,
                20,
                at_most=True,
                unit="µs",
            )
        )
    linearity = micro.get("sanitize_linearity")
    if linearity:
        sizes = linearity["sizes"]
        verdicts.append(
            {
                "budget": "sanitize linear in input size up to 1 MiB",
                "holds": linearity["linear"],
                "figure": {k: round(v["limit_1mib_us_per_kib"], 3) for k, v in sizes.items()},
                "limit": "µs per KiB at 1 MiB ≤ 2 x at 16 KiB",
            }
        )
    capture = micro.get("httpx_capture_added")
    verdicts.append(
        _verdict(
            "httpx successful attempt, capture added",
            capture["median_us"] if capture else None,
            3,
            at_most=True,
            unit="µs",
        )
    )
    for sink, limit in (("SQLite", 20_000), ("PostgreSQL", 10_000)):
        row = sinks.get(sink, {})
        verdicts.append(
            _verdict(
                f"{sink} sink records/s (3 events each)",
                row.get("median_records_per_s"),
                limit,
                at_most=False,
                unit="records/s",
                note=row.get("skipped", ""),
            )
        )
    memory, slow = server.get("asgi.ours_errors_memory"), server.get("asgi.ours_errors_slow_sink")
    if memory and slow and memory.get("ok") and slow.get("ok"):
        noise = max(memory["p99_us"]["max"], 1.2 * memory["p99_us"]["median"])
        verdicts.append(
            {
                "budget": "slow sink (200 ms a batch) leaves request p99 within noise of a memory sink",
                "holds": slow["p99_us"]["median"] <= noise,
                "figure": {
                    "slow_sink_p99_us": slow["p99_us"]["median"],
                    "memory_sink_p99_us": memory["p99_us"]["median"],
                    "records_dropped_by_slow_sink": slow.get("facts", {}).get("records_dropped"),
                },
                "limit": f"≤ {noise:.0f} µs (memory sink's max p99, or its median + 20%)",
            }
        )
    return verdicts


# --- printing ----------------------------------------------------------------------------------------


def _fmt_range(spread: dict[str, float], digits: int = 1, scale: float = 1.0) -> str:
    m, lo, hi = (spread[k] * scale for k in ("median", "min", "max"))
    return f"{m:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def _sliced_note(slices: int, done: str, more: str = "") -> str:
    """The table title's words on the sliced variants (``modes.measurement_groups``)."""
    if slices <= 1:
        return ""
    return (
        f"; each bare app and the variants without background work (marked *) {done} in "
        f"{slices} alternating slices a round{more}"
    )


def table(result: dict[str, Any]) -> str:
    """The results as Markdown tables (printed, and written into docs/performance.md)."""
    lines: list[str] = []
    info = result["machine"]
    lines += [
        f"Machine: {info['nproc']} cores, {info['cpu_model']}, {info['implementation']} "
        f"{info['python']}, {info['date']}, load average {info['loadavg_at_start'][0]} at the start"
        f" and {info.get('loadavg_at_end', ['?'])[0]} at the end, {result.get('seconds', '?')} s. "
        f"Mode: {result['settings']['mode']}.",
        "",
    ]
    versions = info.get("versions")
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    inproc = result.get("in_process")
    if inproc:
        sliced = _sliced_note(result["settings"].get("in_process_slices", 1), "timed")
        lines += [
            "**In-process** (the ASGI/WSGI callable driven directly; µs per request, median "
            f"(min-max) over {result['settings']['in_process_rounds']} interleaved rounds{sliced})",
            "",
            "| variant | µs per request | added µs | ratio to bare | checks |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for name, row in inproc.items():
            added = (
                _fmt_range(row["added_us"])
                if "added_us" in row and not name.endswith(".bare")
                else ""
            )
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
            mark = "*" if row.get("slices", 1) > 1 else ""
            lines.append(
                f"| {name}{mark}: {row['title']} | {_fmt_range(row['us'])} | {added} | {ratio} | "
                f"{_checks(row)} |"
            )
        lines.append("")
    server = result.get("server")
    if server:
        tool = next(iter(server.values()))["tool"]
        server_sliced = _sliced_note(
            result["settings"].get("server_slices", 1),
            "loaded",
            ", p50 and p99 the medians of the slices'",
        )
        turn_seconds = result["settings"].get("server_turn_seconds", 0)
        turns_note = (
            f"; for the * variants, of their rates in a run in turns: a family's * servers loaded at "
            f"once, each running {modes.TURN_SECONDS * 1000:.0f} ms at a time while the others are "
            f"paused, {turn_seconds} s each a round"
            if turn_seconds and any("turn_rps" in row for row in server.values())
            else ""
        )
        lines += [
            f"**Server** (on 127.0.0.1: uvicorn in one process; gunicorn with one worker of 4 threads; "
            f"{tool}, "
            f"{result['settings']['connections']} connections, {result['settings']['server_seconds']} s "
            f"per run, median (min-max) over {result['settings']['server_rounds']} interleaved rounds"
            f"{server_sliced}; ratio: median over rounds of the round's ratio{turns_note})",
            "",
            "| variant | req/s | ratio to bare | p50 ms | p99 ms | req/s in turns | "
            "server CPU µs per request in turns | checks |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, row in server.items():
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
            mark = "*" if row.get("slices", 1) > 1 else ""
            in_turns = (
                f"{_fmt_range(row['turn_rps'], 0)} | {_fmt_range(row['turn_cpu_us'])}"
                if "turn_rps" in row
                else " |"
            )
            lines.append(
                f"| {name}{mark}: {row['title']} | {_fmt_range(row['rps'], 0)} | {ratio} | "
                f"{_fmt_range(row['p50_us'], 2, 1e-3)} | {_fmt_range(row['p99_us'], 2, 1e-3)} | "
                f"{in_turns} | {_checks(row)} |"
            )
        lines.append("")
    micro = result.get("micro")
    if micro:
        lines += [
            "**Micro-benchmarks** (µs per call, median (min-max))",
            "",
            "| case | µs |",
            "| --- | ---: |",
        ]
        for name, row in micro["sanitize"].items():
            lines.append(f"| {name} ({row['input_chars']:,} chars) | {_fmt_range(_us(row), 2)} |")
        lines.append(
            f"| append_upstream_error, one event | {_fmt_range(_us(micro['append_upstream_error']), 2)} |"
        )
        unseen = micro.get("append_upstream_error_unseen_texts")
        if unseen:
            lines.append(
                "| append_upstream_error, one event, message and detail not seen before (no "
                f"cached result) | {_fmt_range(_us(unseen), 2)} |"
            )
        capture = micro["httpx_capture_added"]
        lines.append(
            "| httpx successful attempt, added by the capture transport (bare "
            f"{capture['bare_median_us']:.1f} µs) | {_fmt_range(_us(capture), 2)} |"
        )
        failed = micro.get("httpx_capture_failed_added")
        if failed:
            lines.append(
                "| httpx failed attempt (429, JSON error body, 8 headers), added by the capture "
                f"transport, which records its event (bare {failed['bare_median_us']:.1f} µs) | "
                f"{_fmt_range(_us(failed), 2)} |"
            )
        step = micro.get("telemetry_step_no_sdk")
        if step:
            lines.append(
                f"| the middleware's OpenTelemetry step, no SDK | {_fmt_range(_us(step), 2)} |"
            )
        lines += ["", "sanitize, µs per KiB of input (4 secrets):", ""]
        lines += [
            "| input | sanitize_message (2 KiB limit) | with a 1 MiB limit |",
            "| ---: | ---: | ---: |",
        ]
        for size, row in micro["sanitize_linearity"]["sizes"].items():
            lines.append(
                f"| {int(size) // 1024:,} KiB | {row['sanitize_message_us_per_kib']:.2f} | "
                f"{row['limit_1mib_us_per_kib']:.2f} |"
            )
        lines.append("")
    sinks = result.get("sinks")
    if sinks:
        lines += [
            "**Sinks** (records per second, 3 events each, batches of 256; median (min-max); and"
            " through a dispatcher while the app's thread runs pure Python,"
            f" {BUSY_APP_RECORDS:,} records queued)",
            "",
            "| sink | records/s | behind a busy app thread |",
            "| --- | ---: | ---: |",
        ]
        for name, row in sinks.items():
            if "skipped" in row:
                lines.append(f"| {name} | not measured: {row['skipped']} | |")
            else:
                spread = {
                    "median": row["median_records_per_s"],
                    "min": row["min_records_per_s"],
                    "max": row["max_records_per_s"],
                }
                busy = row.get("busy_app_records_per_s")
                busy_text = "" if busy is None else f"{busy:,.0f}"
                lines.append(f"| {name} | {_fmt_range(spread, 0)} | {busy_text} |")
        lines.append("")
    verdicts = result.get("budgets")
    if verdicts:
        lines += [
            "**Budgets**",
            "",
            "| budget | figure | limit | holds |",
            "| --- | ---: | ---: | --- |",
        ]
        for verdict in verdicts:
            figure = verdict["figure"]
            if isinstance(figure, float):
                figure = f"{figure:,.2f} {verdict.get('unit', '')}"
            elif isinstance(figure, dict):
                figure = ", ".join(f"{k}: {v}" for k, v in figure.items())
            elif figure is None:
                figure = verdict.get("note") or "not measured"
            holds = {True: "yes", False: "**no**", None: "pending"}[verdict["holds"]]
            lines.append(f"| {verdict['budget']} | {figure} | {verdict['limit']} | {holds} |")
        lines.append("")
    skipped = result.get("skipped_variants")
    if skipped:
        lines.append(
            "Variants not run here: "
            + "; ".join(f"{name} (needs {', '.join(mods)})" for name, mods in skipped.items())
            + "."
        )
        lines.append("")
    return "\n".join(lines)


def _us(row: dict[str, Any]) -> dict[str, float]:
    return {"median": row["median_us"], "min": row["min_us"], "max": row["max_us"]}


def _checks(row: dict[str, Any]) -> str:
    if row.get("ok"):
        return "ok"
    problems = []
    if row.get("bad"):
        problems.append(f"{row['bad']} bad responses")
    if row.get("errors"):
        problems.append(f"{row['errors']} connection errors")
    problems += [name for name, holds in row.get("checks", {}).items() if not holds]
    return "**FAILED**: " + ", ".join(problems)


def write(result: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    path = directory / f"{stamp}-{result['settings']['mode']}.json"
    text = json.dumps(result, indent=1, sort_keys=False) + "\n"
    path.write_text(text)
    (directory / "latest.json").write_text(text)
    return path


def update_docs(result: dict[str, Any], docs: Path) -> None:
    """Replace the generated part of docs/performance.md with this run's tables."""
    text = docs.read_text()
    begin, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    docs.write_text(text[:begin] + "\n" + table(result) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report [RESULT.json] [--docs]``: print a stored result, or put it in the docs."""
    import argparse

    from bench.procs import ROOT

    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("result", type=Path, nargs="?", default=ROOT / "bench/results/latest.json")
    parser.add_argument("--docs", action="store_true", help="write it into docs/performance.md")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    if args.docs:
        update_docs(result, ROOT / "docs" / "performance.md")
    else:
        print(table(result))


if __name__ == "__main__":
    main()
