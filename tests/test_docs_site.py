"""The documentation site builds with warnings as errors, as ``make docs`` does, so CI catches a dead
link, a missing anchor, a page left out of the nav or an API page whose object is gone; and the site
loads nothing from elsewhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import upstream_ops

ROOT = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly_and_is_self_contained(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    pages = list(site.rglob("*.html"))
    assert len(pages) > 15
    for page in pages:
        html = page.read_text(encoding="utf-8")
        # Fetched resources (scripts, styles, fonts, images) are all local; plain links may leave.
        remote = re.findall(r'<(?:script|link|img)\b[^>]*(?:src|href)="(?:https?:)?//[^"]*"', html)
        assert remote == [], f"{page.relative_to(site)} loads {remote}"
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html
    api = (site / "api" / "recording" / "index.html").read_text(encoding="utf-8")
    assert "append_upstream_error" in api  # mkdocstrings rendered the docstrings
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    assert upstream_ops.__version__ in changelog


def test_the_changelog_has_the_version_the_package_reports() -> None:
    from importlib.metadata import version

    assert version("upstream-ops") == upstream_ops.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(upstream_ops.__version__)}\]", changelog, re.MULTILINE)
