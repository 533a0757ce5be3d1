"""The code in the docs works.

A fenced ``python`` block with a ``title="name.py"`` is a complete program: it is run here, from an
empty directory, and must exit 0; when the next block is ``text title="Output"``, its output must be
exactly that. A block that includes a file (``--8<-- "examples/..."``) is one of ``examples/``, run by
``tests/test_examples.py``. Every other ``python`` block is a fragment and must at least compile.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)(?P<attrs>[^\n]*)\n(?P<body>.*?)\n(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_TITLE = re.compile(r'title="([^"]+)"')
_INCLUDE = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    lang: str
    title: str
    body: str

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks(file: Path) -> list[Block]:
    text = file.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        title = _TITLE.search(match["attrs"])
        indent = match["indent"]
        body = "\n".join(line.removeprefix(indent) for line in match["body"].splitlines())
        found.append(
            Block(
                file=file,
                line=text.count("\n", 0, match.start()) + 1,
                lang=match["lang"],
                title=title[1] if title else "",
                body=body,
            )
        )
    return found


ALL_BLOCKS = [block for file in DOC_FILES for block in blocks(file)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python" and not _INCLUDE.search(b.body)]
PROGRAMS = [b for b in PYTHON if b.title.endswith(".py")]
FRAGMENTS = [b for b in PYTHON if not b.title.endswith(".py")]
INCLUDES = [path for b in ALL_BLOCKS for path in _INCLUDE.findall(b.body)]


def expected_output(program: Block) -> str | None:
    following = ALL_BLOCKS[ALL_BLOCKS.index(program) + 1 :]
    if following and following[0].file == program.file and following[0].title == "Output":
        return following[0].body
    return None


def test_the_docs_have_programs_and_fragments() -> None:
    assert len(PROGRAMS) >= 4 and len(FRAGMENTS) >= 10


@pytest.mark.parametrize("block", FRAGMENTS, ids=str)
def test_every_fragment_compiles(block: Block) -> None:
    source = textwrap.dedent(block.body)
    try:
        compile(source, str(block), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError as exc:
        pytest.fail(f"{block}: {exc}")


@pytest.mark.parametrize("block", PROGRAMS, ids=str)
def test_every_program_runs(block: Block, tmp_path: Path) -> None:
    program = tmp_path / block.title
    program.write_text(block.body + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_OPS_")}
    result = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{block} failed:\n{result.stderr}"
    output = expected_output(block)
    if output is not None:
        assert result.stdout.rstrip("\n") == output.rstrip("\n"), f"{block}: output differs"


def test_every_included_file_exists_and_every_example_is_run() -> None:
    assert INCLUDES, "the docs include no example"
    for path in INCLUDES:
        assert (ROOT / path).is_file(), path
    tests = "".join(f.read_text(encoding="utf-8") for f in (ROOT / "tests").glob("test_*.py"))
    for example in sorted((ROOT / "examples").rglob("*.py")):
        module = example.relative_to(ROOT).with_suffix("").as_posix()
        assert f'"{module.replace("/", ".")}:' in tests or f'"{module}.py"' in tests, (
            f"{example.relative_to(ROOT)} is run by no test"
        )
