"""The parts of the documentation that are rendered from the code's own tables.

``docs/reference/errors.md`` (kinds, error classes, phases, retry rules, request-id headers, provider
error envelopes) is a whole generated page; the redaction rules on ``docs/security.md`` and the
limits and command-line options on ``docs/configuration.md`` are generated sections between
``<!-- BEGIN GENERATED: name ... -->`` and ``<!-- END GENERATED: name -->`` in hand-written pages.
The tables stay the single source: ``tests/test_docs_reference.py`` fails when a committed file no
longer matches them.

    python -m upstream_ops.docs            # rewrite the generated parts under ./docs
    python -m upstream_ops.docs --check    # exit 1 naming the stale files
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

from upstream_ops import classify, defaults, envelopes, events, sanitize

__all__ = [
    "GENERATED_PAGES",
    "GENERATED_SECTIONS",
    "main",
    "render_cli",
    "render_errors",
    "render_limits",
    "render_redaction_rules",
    "stale_files",
    "write",
]

_COMMAND: Final = "python -m upstream_ops.docs"

#: What each canonical kind means; every name in ``events.KINDS`` must have an entry.
_KIND_MEANINGS: Final = {
    events.HTTP_ERROR: "The upstream answered with an error status (by default 400-599).",
    events.REQUEST_ERROR: "No response: connecting, TLS, sending or waiting failed, or a timeout "
    "or cancellation cut the attempt short.",
    events.RETRY: "The code decided to try again (after an attempt failed, before the wait).",
    events.RETRY_EXHAUSTED: "The code gave up retrying: every attempt failed.",
    events.FAILOVER: "The code switched to another account, key, region or provider.",
    events.STREAM_ERROR: "A successful response failed while its body was read, or an event "
    "stream carried an error event.",
    events.CIRCUIT_OPEN: "A circuit breaker refused to call the upstream at all.",
}
_KIND_SOURCES: Final = {
    events.HTTP_ERROR: "capture transports and adapter; `append_upstream_error`",
    events.REQUEST_ERROR: "capture transports and adapter; `append_upstream_error`",
    events.RETRY: "`record_retry`, tenacity's `record_before_sleep`",
    events.RETRY_EXHAUSTED: "`record_retry_exhausted`, tenacity's `record_retry_error`",
    events.FAILOVER: "`record_failover`",
    events.STREAM_ERROR: "capture transports and adapter",
    events.CIRCUIT_OPEN: "`append_upstream_error(kind=CIRCUIT_OPEN, ...)` from your breaker",
}

#: What each shape rule of ``sanitize.BLOCK_RULES`` and ``sanitize.TOKEN_RULES`` recognises, and an
#: input that shows it (the page shows what the sanitizer really stores for it).
_SHAPE_RULES: Final = {
    "private_key": (
        "PEM private key blocks, whole (an unterminated block to the end of the text)",
        "-----BEGIN RSA PRIVATE KEY----- MIIEowIBAAKCAQEA -----END RSA PRIVATE KEY-----",
    ),
    "url_userinfo": (
        "the `user:password@` part of any `scheme://` URL",
        "postgresql://app:hunter2@db.internal:5432/ops",
    ),
    "bearer_or_basic_credential": (
        "a credential after a bare `Bearer` or `Basic`, outside any key/value pair",
        "upstream said: Bearer abcdefghijklmnop12345",
    ),
    "openai_anthropic_stripe_key": (
        "`sk-...`, `sk-proj-...`, `sk-svcacct-...`, `sk-admin-...`, `sk-ant-api03-...`, "
        "`sk_live_...`, `sk_test_...`",
        "invalid key sk-proj-abcdefghijklmnopqrstuvwxyz0123",
    ),
    "aws_access_key_id_or_google_api_key": (
        "AWS access key ids (`AKIA...`, `ASIA...`) and Google API keys (`AIza...`)",
        "key AKIAIOSFODNN7EXAMPLE rejected",
    ),
    "google_oauth_token": (
        "Google OAuth access tokens (`ya29....`)",
        "ya29.a0AfH6SMBabcdefghijklmnop",
    ),
    "github_or_huggingface_token": (
        "GitHub (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`) and Hugging Face (`hf_`) tokens",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789 revoked",
    ),
    "slack_token": (
        "Slack tokens (`xoxb-`, `xoxp-`, `xoxa-`, ..., `xapp-`)",
        "xoxb-1234567890-abcdefghij revoked",
    ),
    "jwt": (
        "JSON Web Tokens (`eyJ...` header, payload and signature), whole",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl rejected",
    ),
}

#: Inputs for the key/value rules, each shown with what the sanitizer stores for it.
_PAIR_EXAMPLES: Final = (
    "api_token=abc123&user=ann",
    '{"client_secret": "s3cr3t", "max_tokens": 4096}',
    "{'apiKey': 'k-123', 'model': 'gpt-4o'}",
    "X-Amz-Signature=abcdef0123&X-Amz-Date=20260101",
    'Authorization: Digest username="ann", response="6629fae4"',
    "Cookie: session=abc; theme=dark",
    "password_length=12 token_count=7 secret_name=prod",
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """``text`` as one inline code span, whatever backticks it holds."""
    text = " ".join(text.split())
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _words(words: Iterable[str]) -> str:
    return ", ".join(_code(w) for w in sorted(words))


def _checked_keys(table: Mapping[str, object], names: Iterable[str], what: str) -> None:
    """Fail when the prose table and the code's table name different things."""
    names = set(names)
    missing, extra = names - table.keys(), table.keys() - names
    if missing or extra:
        raise ValueError(
            f"upstream_ops.docs: {what} out of date: "
            f"undocumented {sorted(missing)}, no longer in the code {sorted(extra)}"
        )


# --- docs/reference/errors.md -------------------------------------------------------------------


def render_errors() -> str:
    """The whole reference page of kinds, error classes, phases, retry rules and envelopes."""
    _checked_keys(_KIND_MEANINGS, events.KINDS, "kind meanings")
    phase_of = {cls: phase for phase, _, classes in classify.PHASES for cls in classes}
    exceptions: dict[str, list[str]] = {}
    for rule in classify.EXCEPTION_RULES:
        if rule.error_class:
            exceptions.setdefault(rule.error_class, []).append(f"`{rule.exception}`")
    lines = [
        "# Kinds, error classes, retry rules and request ids",
        "",
        "<!-- Generated from upstream_ops.events, upstream_ops.classify and upstream_ops.envelopes",
        f"     by `{_COMMAND}`. Do not edit: change the tables and run it again. -->",
        "",
        "Every event has a `kind`: what happened. Events recorded by a capture integration also",
        "have an `error_class`: for an HTTP status a class of its own, for a transport failure the",
        "RFC 9209 (Proxy-Status) error type, seen from the calling side. `error_type` is the",
        "OpenTelemetry `error.type`: the status code as a string, or the exception's qualified class",
        "name. A `connection_terminated` that happens after the response headers arrived is recorded",
        "as `http_response_incomplete`, phase `body`.",
        "",
        "## Kinds",
        "",
        "The canonical kinds are exported as constants (`upstream_ops.HTTP_ERROR` ...); any other",
        "string is accepted too.",
        "",
    ]
    lines += _table(
        ("kind", "constant", "meaning", "recorded by"),
        [
            (f"`{kind}`", f"`{kind.upper()}`", _KIND_MEANINGS[kind], _KIND_SOURCES[kind])
            for kind in events.KINDS
        ],
    )
    lines += ["## Error classes", ""]
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
            for name, applies, meaning in classify.ERROR_CLASSES
        ],
    )
    lines += ["## Phases", ""]
    lines += _table(
        ("phase", "meaning"), [(f"`{phase}`", meaning) for phase, meaning, _ in classify.PHASES]
    )
    lines += [
        "## Retry rules",
        "",
        "`retryable` follows the defaults of the OpenAI and Anthropic SDKs; the first rule that",
        "applies decides.",
        "",
    ]
    lines += _table(("rule", "retryable", "why"), classify.RETRY_RULES)
    lines += [
        "`retry_after_ms` comes from `retry-after-ms` (milliseconds) if present, else from",
        "`retry-after` (seconds, or an HTTP date); negative waits are 0 and waits are capped at",
        f"{classify.RETRY_AFTER_MAX_MS} ms (a day).",
        "",
        "## Upstream request ids",
        "",
        "`upstream_request_id` is the value of the first of these response headers present:",
        "",
    ]
    lines += [f"{n}. `{header}`" for n, header in enumerate(classify.REQUEST_ID_HEADERS, 1)]
    lines += [
        "",
        "## Provider error envelopes",
        "",
        "`provider_error_type`, `provider_error_code`, `origin` and the event's `message` are read",
        "from the error body by `upstream_ops.envelopes.parse_error_body`, trying these formats",
        "in order:",
        "",
    ]
    lines += _table(
        ("format", "what it recognizes", "example"),
        [(f"`{name}`", text, _code(example)) for name, text, example in envelopes.ENVELOPE_FORMATS],
    )
    return "\n".join(lines).rstrip("\n") + "\n"


# --- docs/security.md: the redaction rules --------------------------------------------------------


def render_redaction_rules() -> str:
    """Every redaction rule of ``upstream_ops.sanitize``, with what it really stores for an input."""
    rules = (*sanitize.BLOCK_RULES, *sanitize.TOKEN_RULES)
    _checked_keys(_SHAPE_RULES, (rule.name for rule in rules), "redaction rule descriptions")
    message = sanitize.Sanitizer().detail
    lines = [
        "Redaction runs in three passes, in this order, on every string before it is stored,",
        "exported or logged.",
        "",
        "**1. Blocks** (`BLOCK_RULES`), before anything else:",
        "",
    ]
    lines += _table(
        ("rule", "redacts", "example", "stored as"),
        [
            (f"`{r.name}`", _SHAPE_RULES[r.name][0], _code(_SHAPE_RULES[r.name][1]),
             _code(message(_SHAPE_RULES[r.name][1])))
            for r in sanitize.BLOCK_RULES
        ],
    )  # fmt: skip
    lines += [
        "**2. Key/value pairs.** The value after `key=`, `key: `, `\"key\": `, `'key': `, `key=>`",
        "(and URL-encoded `%3D` / `%3A`, where the key starts after the previous `%3D`, `%3A` or",
        f"`%26`: `user%3Dbob%26password%3Dhunter2` is stored as `{message('user%3Dbob%26password%3Dhunter2')}`)",
        "is replaced when the key is secret. A key is split into segments on non-alphanumerics and",
        "camelCase (`X-Amz-Signature`: `x`, `amz`, `signature`; `clientSecret`: `client`, `secret`),",
        "lowercased. It is **secret** when a segment",
        "",
        f"- is one of `SECRET_KEY_SEGMENTS`: {_words(sanitize.SECRET_KEY_SEGMENTS)};",
        f"- or ends with one of `SECRET_KEY_SUFFIXES`: {_words(sanitize.SECRET_KEY_SUFFIXES)};",
        "",
        "unless a segment is one of `NON_SECRET_KEY_QUALIFIERS`, which describe a secret instead",
        f"of holding one: {_words(sanitize.NON_SECRET_KEY_QUALIFIERS)}. When the key's last segment",
        f"is one of `WHOLE_VALUE_KEY_SEGMENTS` ({_words(sanitize.WHOLE_VALUE_KEY_SEGMENTS)}), the",
        "whole value to the end of the line is the secret. A scheme word in front of a credential",
        f"is kept (`AUTH_SCHEMES`: {_words(sanitize.AUTH_SCHEMES)}); after several scheme words",
        "(`token=Basic Bearer abc`) the first is kept and the credential after the last is redacted.",
        "`null`, `true`, `false` and",
        '`""` are kept: whether a secret was missing is worth seeing.',
        "",
    ]
    lines += _table(
        ("example", "stored as"), [(_code(e), _code(message(e))) for e in _PAIR_EXAMPLES]
    )
    lines += ["**3. Token shapes** (`TOKEN_RULES`), anywhere in the text, in this order:", ""]
    lines += _table(
        ("rule", "redacts", "example", "stored as"),
        [
            (f"`{r.name}`", _SHAPE_RULES[r.name][0], _code(_SHAPE_RULES[r.name][1]),
             _code(message(_SHAPE_RULES[r.name][1])))
            for r in sanitize.TOKEN_RULES
        ],
    )  # fmt: skip
    url = "https://ann:pw@api.example.com/v1?api_key=abc&q=cats#access_token=xyz"
    headers = {"Authorization": "Bearer abc", "X-Request-Token": "t", "Accept": "text/plain"}
    lines += [
        "**URLs** (`upstream_url`) lose their userinfo, and the values of secret query and",
        "fragment parameters are replaced, by the same key rules:",
        f"{_code(url)} is stored as {_code(sanitize.sanitize_url(url))}.",
        "",
        "**Headers** (`sanitize_headers`): the values of `SECRET_HEADERS`",
        f"({_words(sanitize.SECRET_HEADERS)}) and of every header whose name is secret by the key",
        f"rules are replaced: {_code(repr(headers))} becomes",
        f"{_code(repr(sanitize.sanitize_headers(headers)))}.",
    ]
    return "\n".join(lines)


# --- docs/configuration.md: defaults.py and the command line ---------------------------------------


def render_limits() -> str:
    """Every constant of ``upstream_ops.defaults`` with its value and its ``#:`` comment."""
    source = inspect.getsource(defaults)
    lines = source.splitlines()
    groups: list[tuple[str, list[tuple[str, str]]]] = []
    previous_end = -1
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        start = node.lineno - 1  # 0-based line of the assignment
        comment: list[str] = []
        above = start - 1
        while above >= 0 and lines[above].startswith("#:"):
            comment.insert(0, lines[above][2:].strip())
            above -= 1
        value = ast.get_source_segment(source, node.value) if node.value else None
        entry = (node.target.id, value or "")
        if comment:
            groups.append((" ".join(comment), [entry]))
        elif groups and previous_end == start - 1:
            groups[-1][1].append(entry)
        else:
            raise ValueError(f"upstream_ops.docs: defaults.{node.target.id} has no #: comment")
        previous_end = (node.end_lineno or node.lineno) - 1
    rows = [
        (", ".join(f"`{name}`" for name, _ in entries),
         ", ".join(_code(value) for _, value in entries),
         comment)
        for comment, entries in groups
    ]  # fmt: skip
    return "\n".join(_table(("constant", "value", "meaning"), rows)).rstrip("\n")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_meaning(action: argparse.Action) -> str:
    meaning = action.help or ""
    default = action.default
    if default not in (None, False, argparse.SUPPRESS) and "default" not in meaning:
        shown = f"default {_code(str(default))}"
        meaning = f"{meaning} ({shown})" if meaning else shown
    return meaning


def _option_name(action: argparse.Action) -> str:
    names = ", ".join(action.option_strings) or str(action.dest)
    if action.nargs == 0:
        return _code(names)
    if action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    elif isinstance(action.metavar, str):
        metavar = action.metavar
    else:
        metavar = str(action.dest).upper()
    return _code(f"{names} {metavar}")


def render_cli() -> str:
    """Every subcommand of ``upstream-ops`` and its options, read from the argument parser."""
    from upstream_ops.cli import build_parser

    parser = build_parser()
    lines = [
        "`upstream-ops --version` prints the version (`upstream_ops.__version__`). Subcommands:",
        "",
    ]
    helps = {
        choice.dest: choice.help or ""
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    }
    for name, sub in _subcommands(parser).items():
        summary = helps.get(name) or ""
        lines += [f"### `upstream-ops {name}`", "", summary[:1].upper() + summary[1:] + ".", ""]
        rows = [
            (_option_name(action), _option_meaning(action))
            for action in sub._actions
            if not isinstance(action, argparse._HelpAction)
        ]
        lines += _table(("option", "meaning"), rows)
    return "\n".join(lines).rstrip("\n")


# --- writing and checking -----------------------------------------------------------------------

#: Whole pages, by path under the docs directory.
GENERATED_PAGES: Final[Mapping[str, Callable[[], str]]] = {"reference/errors.md": render_errors}
#: Generated sections inside hand-written pages: ``(path, section name) -> renderer``.
GENERATED_SECTIONS: Final[Mapping[tuple[str, str], Callable[[], str]]] = {
    ("security.md", "redaction-rules"): render_redaction_rules,
    ("configuration.md", "limits"): render_limits,
    ("configuration.md", "cli"): render_cli,
}


def _section_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN GENERATED: {re.escape(name)}\b[^\n]*-->\n)(.*?)(<!-- END GENERATED: "
        rf"{re.escape(name)} -->)",
        re.DOTALL,
    )


def _rendered(docs_dir: Path) -> dict[Path, str]:
    """What every generated file should contain now."""
    texts = {docs_dir / path: render() for path, render in GENERATED_PAGES.items()}
    for (path, name), render in GENERATED_SECTIONS.items():
        file = docs_dir / path
        text = texts.get(file)
        if text is None:
            text = file.read_text(encoding="utf-8")
        section = _section_pattern(name).search(text)
        if section is None:
            raise ValueError(f"{file}: no '<!-- BEGIN GENERATED: {name} -->' section")
        body = f"\n{render()}\n\n"
        texts[file] = text[: section.start(2)] + body + text[section.end(2) :]
    return texts


def stale_files(docs_dir: Path) -> list[Path]:
    """The generated files under ``docs_dir`` that no longer match the code."""
    return [
        file
        for file, text in _rendered(docs_dir).items()
        if not file.exists() or file.read_text(encoding="utf-8") != text
    ]


def write(docs_dir: Path) -> list[Path]:
    """Rewrite the generated parts under ``docs_dir``; returns the files that changed."""
    changed = []
    for file, text in _rendered(docs_dir).items():
        if not file.exists() or file.read_text(encoding="utf-8") != text:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text, encoding="utf-8")
            changed.append(file)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_COMMAND, description="Render the documentation generated from the code's tables."
    )
    parser.add_argument("docs_dir", nargs="?", type=Path, default=Path("docs"))
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.docs_dir)
        for file in stale:
            print(f"stale: {file} (run {_COMMAND})", file=sys.stderr)
        return 1 if stale else 0
    for file in write(args.docs_dir):
        print(f"wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
