"""docs/configuration.md names every option with its real default, and every environment variable.

Each option table follows a ``<!-- options: dotted.path ... -->`` comment naming the callables it
documents. The first cell starts with the option name in backticks; the second starts with the default
in backticks (evaluated and compared with the signature's) or says ``required``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"

#: Every public callable a user configures; each must have a checked table on the page.
REQUIRED = {
    "upstream_ops.asgi.UpstreamOpsMiddleware",
    "upstream_ops.wsgi.UpstreamOpsWSGIMiddleware",
    "upstream_ops.Dispatcher",
    "upstream_ops.flush",
    "upstream_ops.sinks.SQLiteSink",
    "upstream_ops.sinks.PostgresSink",
    "upstream_ops.sinks.JsonlSink",
    "upstream_ops.sinks.LoggingSink",
    "upstream_ops.httpx.UpstreamOpsTransport",
    "upstream_ops.httpx.AsyncUpstreamOpsTransport",
    "upstream_ops.httpx.instrument_client",
    "upstream_ops.requests.UpstreamOpsAdapter",
    "upstream_ops.upstream",
    "upstream_ops.Sanitizer",
    "upstream_ops.ops_app.create_ops_app",
    "upstream_ops.telemetry.configure",
}
#: Parameters that are not options: the app a middleware wraps.
NOT_OPTIONS = {"app"}
#: Names a documented default may use besides literals.
DEFAULT_NAMES: dict[str, Any] = {"range": range, "logging": logging}

_TABLE = re.compile(r"<!-- options: (?P<paths>[^>]+?) -->\n(?P<table>(?:\|[^\n]*\|\n)+)")
_CODE = re.compile(r"`([^`]+)`")


def resolve(path: str) -> Any:
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def cells(row: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def option_tables() -> Iterator[tuple[list[str], dict[str, str]]]:
    for match in _TABLE.finditer(PAGE.read_text(encoding="utf-8")):
        rows = match["table"].splitlines()[2:]  # after the header and the |---| line
        documented: dict[str, str] = {}
        for row in rows:
            name_cell, default_cell, *_ = cells(row)
            name = _CODE.match(name_cell)
            assert name, f"{row!r}: the first cell must start with the option in backticks"
            assert name[1] not in documented, f"{name[1]} is documented twice"
            documented[name[1]] = default_cell
        yield match["paths"].split(), documented


def options(target: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return {
        name: parameter
        for name, parameter in inspect.signature(target).parameters.items()
        if name not in NOT_OPTIONS
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def documented_default(cell: str) -> object:
    code = _CODE.match(cell)
    assert code, f"default {cell!r} must start with the value in backticks, or say 'required'"
    return eval(code[1], {"__builtins__": {}}, dict(DEFAULT_NAMES))


def test_every_required_callable_has_a_table() -> None:
    covered = {path for paths, _ in option_tables() for path in paths}
    assert covered >= REQUIRED, f"no options table for {sorted(REQUIRED - covered)}"


@pytest.mark.parametrize(
    ("paths", "documented"),
    list(option_tables()),
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_the_options_and_defaults_match_the_signatures(
    paths: list[str], documented: dict[str, str]
) -> None:
    real: dict[str, list[inspect.Parameter]] = {}
    for path in paths:
        for name, parameter in options(resolve(path)).items():
            real.setdefault(name, []).append(parameter)
    assert sorted(documented) == sorted(real), f"documented options differ from {paths}"
    for name, parameters in real.items():
        cell = documented[name]
        for parameter in parameters:
            if parameter.default is parameter.empty:
                assert cell.startswith("required"), f"{name} has no default: say 'required'"
            else:
                assert documented_default(cell) == parameter.default, (
                    f"{name}: documented {cell!r}, real default {parameter.default!r}"
                )


def source_strings() -> set[str]:
    found = set()
    for file in (ROOT / "src" / "upstream_ops").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    page = PAGE.read_text(encoding="utf-8")
    table = page[page.index("<!-- env -->") :].split("\n\n", 1)[0]
    variables = {
        s for s in source_strings() if re.fullmatch(r"(?:UPSTREAM_OPS|OTEL)_[A-Z0-9_]+", s)
    }
    assert variables, "found no environment variables in src"
    missing = sorted(v for v in variables if f"`{v}`" not in table)
    assert missing == [], f"environment variables missing from configuration.md: {missing}"


def test_every_sink_url_scheme_is_documented() -> None:
    page = PAGE.read_text(encoding="utf-8")
    marker = re.search(r"<!-- schemes: (\S+) -->\n((?:\|[^\n]*\|\n)+)", page)
    assert marker, "no '<!-- schemes: ... -->' table"
    urls = {code for row in marker[2].splitlines()[2:] for code in _CODE.findall(cells(row)[0])}
    for scheme in resolve(marker[1]):
        assert any(url.startswith(f"{scheme}:") for url in urls), f"sink URL scheme {scheme}"
