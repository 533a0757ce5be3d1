"""The generated parts of docs/ match the code's tables (``upstream_ops.docs``).

``docs/reference/errors.md`` and the generated sections of ``docs/security.md`` and
``docs/configuration.md`` are rendered from the tables; when a table changes, run
``python -m upstream_ops.docs`` and commit the result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from upstream_ops import docs, events, sanitize
from upstream_ops.sanitize import REDACTED

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_generated_docs_match_the_code() -> None:
    stale = [str(path.relative_to(DOCS.parent)) for path in docs.stale_files(DOCS)]
    assert stale == [], f"stale generated docs {stale}: run python -m upstream_ops.docs"


def test_check_mode_reports_a_stale_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in {*docs.GENERATED_PAGES, *(path for path, _ in docs.GENERATED_SECTIONS)}:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((DOCS / path).read_text(encoding="utf-8"), encoding="utf-8")
    assert docs.main(["--check", str(tmp_path)]) == 0
    page = tmp_path / "configuration.md"
    page.write_text(page.read_text().replace("`QUEUE_SIZE`", "`QUEUE_LENGTH`"), encoding="utf-8")
    assert docs.main(["--check", str(tmp_path)]) == 1
    assert "configuration.md" in capsys.readouterr().err
    assert docs.main([str(tmp_path)]) == 0  # rewrites it
    assert page.read_text() == (DOCS / "configuration.md").read_text()


def test_a_section_without_its_markers_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "security.md").write_text("# Security\n", encoding="utf-8")
    with pytest.raises(ValueError, match="redaction-rules"):
        docs.stale_files(tmp_path)


def test_every_kind_and_every_redaction_rule_is_described() -> None:
    errors = docs.render_errors()
    for kind in events.KINDS:
        assert f"| `{kind}` |" in errors
    rules = docs.render_redaction_rules()
    for rule in (*sanitize.BLOCK_RULES, *sanitize.TOKEN_RULES):
        assert f"| `{rule.name}` |" in rules
    for words in (
        sanitize.SECRET_KEY_SEGMENTS,
        sanitize.SECRET_KEY_SUFFIXES,
        sanitize.NON_SECRET_KEY_QUALIFIERS,
        sanitize.SECRET_HEADERS,
        sanitize.AUTH_SCHEMES,
    ):
        for word in words:
            assert f"`{word}`" in rules


def test_every_shape_example_is_really_redacted() -> None:
    for rule in (*sanitize.BLOCK_RULES, *sanitize.TOKEN_RULES):
        _, example = docs._SHAPE_RULES[rule.name]
        assert rule.pattern.search(example), f"{rule.name}: its example does not match it"
        assert REDACTED in sanitize.sanitize_detail(example), rule.name


def test_every_constant_in_defaults_is_in_the_limits_table() -> None:
    limits = docs.render_limits()
    for name in dir(docs.defaults):
        if name.isupper():
            assert f"`{name}`" in limits
