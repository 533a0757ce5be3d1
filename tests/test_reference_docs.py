"""docs/reference/error-classes.md is rendered from the tables in classify.py and envelopes.py.

The tables are the single source; this test fails when the page no longer matches them. To
regenerate it: ``UPSTREAM_OPS_WRITE_DOCS=1 pytest tests/test_reference_docs.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from upstream_ops.classify import (
    ERROR_CLASSES,
    EXCEPTION_RULES,
    PHASES,
    REQUEST_ID_HEADERS,
    RETRY_AFTER_MAX_MS,
    RETRY_RULES,
)
from upstream_ops.envelopes import ENVELOPE_FORMATS

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "error-classes.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def render() -> str:
    phase_of = {cls: phase for phase, _, classes in PHASES for cls in classes}
    exceptions: dict[str, list[str]] = {}
    for rule in EXCEPTION_RULES:
        if rule.error_class:
            exceptions.setdefault(rule.error_class, []).append(f"`{rule.exception}`")
    lines = [
        "# Error classes, phases, retry rules and request ids",
        "",
        "<!-- Generated from upstream_ops.classify and upstream_ops.envelopes by",
        "     tests/test_reference_docs.py (UPSTREAM_OPS_WRITE_DOCS=1 rewrites it). Do not edit. -->",
        "",
        "Every event recorded by a capture integration has an `error_class`: for an HTTP status a",
        "class of its own, for a transport failure the RFC 9209 (Proxy-Status) error type, seen from",
        "the calling side. `error_type` is the OpenTelemetry `error.type`: the status code as a",
        "string, or the exception's qualified class name. A `connection_terminated` that happens",
        "after the response headers arrived is recorded as `http_response_incomplete`, phase `body`.",
        "",
        "## Error classes",
        "",
    ]
    lines += _table(
        ("error_class", "applies to", "phase", "meaning", "raised for"),
        [
            (
                f"`{name}`",
                applies,
                f"`{phase_of[name]}`" if name in phase_of else "",
                meaning,
                ", ".join(exceptions.get(name, [])),
            )
            for name, applies, meaning in ERROR_CLASSES
        ],
    )
    lines += ["## Phases", ""]
    lines += _table(("phase", "meaning"), [(f"`{phase}`", meaning) for phase, meaning, _ in PHASES])
    lines += [
        "## Retry rules",
        "",
        "`retryable` follows the defaults of the OpenAI and Anthropic SDKs; the first rule that",
        "applies decides.",
        "",
    ]
    lines += _table(("rule", "retryable", "why"), list(RETRY_RULES))
    lines += [
        "`retry_after_ms` comes from `retry-after-ms` (milliseconds) if present, else from",
        "`retry-after` (seconds, or an HTTP date); negative waits are 0 and waits are capped at",
        f"{RETRY_AFTER_MAX_MS} ms (a day).",
        "",
        "## Upstream request ids",
        "",
        "`upstream_request_id` is the value of the first of these response headers present:",
        "",
    ]
    lines += [f"{n}. `{header}`" for n, header in enumerate(REQUEST_ID_HEADERS, 1)]
    lines += ["", "## Provider error envelopes", ""]
    lines += [
        "`provider_error_type`, `provider_error_code`, `origin` and the event's `message` are read",
        "from the error body by `upstream_ops.envelopes.parse_error_body`, trying these formats",
        "in order:",
        "",
    ]
    lines += _table(
        ("format", "what it recognizes", "example"),
        [(f"`{name}`", text, f"`{example}`") for name, text, example in ENVELOPE_FORMATS],
    )
    return "\n".join(lines).rstrip("\n") + "\n"


def test_the_reference_page_matches_the_tables() -> None:
    text = render()
    if os.environ.get("UPSTREAM_OPS_WRITE_DOCS"):
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        PAGE.write_text(text, encoding="utf-8")
    assert PAGE.read_text(encoding="utf-8") == text, (
        "docs/reference/error-classes.md is stale: UPSTREAM_OPS_WRITE_DOCS=1 pytest "
        "tests/test_reference_docs.py"
    )
