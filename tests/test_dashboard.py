"""The dashboard in a real headless Chromium (Debian's ``chromium`` driven by Playwright) against a
real uvicorn serving the ops app over a store of known records. Screenshots go to
``test-artifacts/``.

In CI (``$CI`` set) this test must run; elsewhere it is skipped, with the reason, when Playwright
or ``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import serve_asgi
from tests.ops_records import MINUTE, TRACE_ID, XSS, ops_dataset
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.ops_app import create_ops_app
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import SQLiteSink

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TOKEN = "dashboard-token"
JAEGER = "http://jaeger.example:16686"
FILLER = 50  # old 502s from another platform, so the table has a second page


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _playwright_or_skip() -> Any:
    reasons = []
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
        reasons.append("Playwright is not installed (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        reasons.append(f"{CHROMIUM} is missing (apt-get install chromium)")
    if reasons:
        reason = "; ".join(reasons)
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {reason}")
        pytest.skip(f"browser test skipped: {reason}")
    return sync_api


def _records(base_ms: int) -> list[RequestRecord]:
    filler = [
        RequestRecord(
            id=f"f{i:02d}",
            request_id=f"req-f{i:02d}",
            route="/v1/embed",
            status_code=502,
            started_at_ms=base_ms - 45 * MINUTE + i * 30_000,
            upstream_errors=[
                UpstreamErrorEvent(
                    at_unix_ms=base_ms - 45 * MINUTE + i * 30_000 + 5,
                    platform="mistral",
                    account_id=9,
                    upstream_status_code=502,
                    kind="http_error",
                    message="Bad Gateway",
                )
            ],
        )
        for i in range(FILLER)
    ]
    return filler + ops_dataset(base_ms)


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    now = int(time.time() * 1000)
    base_ms = now - now % MINUTE - 10 * MINUTE
    store = SQLiteSink(tmp_path_factory.mktemp("dashboard") / "ops.db")
    store.write(_records(base_ms))
    app = create_ops_app(store, token=TOKEN, jaeger_url=JAEGER)
    with serve_asgi(app) as url:
        yield url, base_ms
    store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = _playwright_or_skip()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, timezone_id="UTC")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(10_000)
    yield page
    context.close()
    assert errors == [], errors  # no script error on the page


def shot(page: Any, name: str, *, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=full_page)


def sign_in(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#token-panel:not([hidden])")
    assert "token" in page.text_content("#status")
    page.fill("#token-panel input[name=token]", TOKEN)
    page.click("#token-panel button[type=submit]")
    page.wait_for_selector("#records-table tbody tr")


def apply(page: Any) -> None:
    """Submit the filters and wait for the answers to be drawn."""
    page.click("#filters button[type=submit]")
    updated(page)


def updated(page: Any) -> None:
    """Wait for a refresh to finish. (Polled from outside: the page's CSP forbids eval, which
    ``wait_for_function`` with an expression would need.)"""
    expect(page.locator("#status")).to_have_text(re.compile(r"^Updated"))


def table_ids(page: Any) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        "#records-table tbody tr", "rows => rows.map(r => r.dataset.requestId)"
    )
    return ids


def chart_counts(page: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for category, count in page.eval_on_selector_all(
        "#trend-chart rect.bar", "bars => bars.map(b => [b.dataset.category, +b.dataset.count])"
    ):
        counts[category] = counts.get(category, 0) + count
    return counts


def bars(page: Any, list_id: str) -> dict[str, str]:
    rows = page.eval_on_selector_all(
        f"#{list_id} .bar-row",
        "rows => rows.map(r => [r.querySelector('.name').textContent, "
        "r.querySelector('.count').textContent])",
    )
    return dict(rows)


def attempt_heads(page: Any) -> list[list[str]]:
    heads: list[list[str]] = page.eval_on_selector_all(
        "#attempts .attempt-head",
        "heads => heads.map(h => [...h.children].map(span => span.textContent))",
    )
    return heads


def utc(ms: int, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime(fmt)


def test_overview_shows_the_known_records(page: Any, dashboard_url: tuple[str, int]) -> None:
    url, base_ms = dashboard_url
    sign_in(page, f"{url}/?time_range=1h")
    assert page.input_value("select[name=time_range]") == "1h"

    assert page.text_content("#total-events") == str(9 + FILLER)
    assert page.text_content("#total-records") == str(6 + FILLER)
    assert page.text_content("#total-recovered") == "4 (7%)"
    assert chart_counts(page) == {
        "rate_limited": 1,
        "overloaded": 3,
        "server_error": 1 + FILLER,
        "transport": 2,
        "client_error": 1,
        "other": 1,
    }
    legend = page.text_content("#trend-legend")
    assert "429 rate limited: 1" in legend and f"other 5xx: {1 + FILLER}" in legend
    assert bars(page, "by-platform") == {
        "mistral": str(FILLER),
        "openai": "5",
        "anthropic": "2",
        "gemini": "2",
    }
    assert bars(page, "by-kind")["http_error"] == str(4 + FILLER)
    assert page.text_content("#top-messages li:first-child") == f"{FILLER}\u00d7 Bad Gateway"

    # newest first, one page of 50, then the older ones
    ids = table_ids(page)
    assert len(ids) == 50
    assert ids[:6] == ["req-r6", "req-r5", "req-r4", "req-r3", "req-r2", "req-r1"]
    assert page.text_content("#time-header") == "time (UTC)"
    first = page.eval_on_selector(
        "#records-table tbody tr[data-request-id='req-r1']",
        "row => [...row.cells].map(c => c.textContent)",
    )
    assert first == [
        utc(base_ms),
        "/v1/chat",
        "200",
        "429, 529",
        "openai, anthropic",
        "primary, backup",
        "http_error, failover",
        "Overloaded",
        "yes",
    ]
    shot(page, "overview")
    page.click("#more")
    expect(page.locator("#records-table tbody tr")).to_have_count(6 + FILLER)
    assert page.is_hidden("#more")
    assert table_ids(page)[-1] == "req-f00"


def test_upstream_text_is_shown_as_text_never_run(
    page: Any, dashboard_url: tuple[str, int]
) -> None:
    url, _ = dashboard_url
    sign_in(page, f"{url}/?time_range=1h&q=xss")
    assert table_ids(page) == ["req-r6"]
    cell = "#records-table tbody tr[data-request-id='req-r6'] td.message"
    assert page.text_content(cell) == XSS
    assert page.eval_on_selector(cell, "c => c.children.length") == 0
    assert XSS in page.text_content("#top-messages")
    page.click("#records-table tbody tr[data-request-id='req-r6'] button")
    page.wait_for_selector("#detail:not([hidden])")
    assert page.text_content("#attempts .message") == XSS
    assert page.text_content("#attempts pre.detail") == XSS
    assert page.evaluate("window.__xss") is None
    assert page.eval_on_selector_all("main script, aside script, img", "nodes => nodes.length") == 0
    shot(page, "xss-as-text", full_page=False)


def test_filters_narrow_every_panel(page: Any, dashboard_url: tuple[str, int]) -> None:
    url, _ = dashboard_url
    sign_in(page, url)
    page.select_option("select[name=time_range]", "1h")
    page.fill("input[name=platform]", "openai")
    apply(page)
    assert table_ids(page) == ["req-r5", "req-r2", "req-r1"]
    assert page.text_content("#total-events") == "5"
    assert bars(page, "by-platform") == {"openai": "5"}
    assert "platform=openai" in page.url and "time_range=1h" in page.url
    shot(page, "filtered-openai")

    page.fill("input[name=platform]", "")
    page.fill("input[name=status_code]", "429, 529")
    apply(page)
    assert table_ids(page) == ["req-r6", "req-r1"]
    assert chart_counts(page) == {"rate_limited": 1, "overloaded": 2}

    page.fill("input[name=status_code]", "")
    page.select_option("select[name=recovered]", "false")
    page.fill("input[name=route]", "/v1/chat")
    apply(page)
    assert table_ids(page) == ["req-r2"]

    page.click("#reset-filters")
    updated(page)
    page.select_option("select[name=time_range]", "1h")
    apply(page)
    page.click("#by-platform .bar-row:has-text('gemini')")  # a bar is a filter
    expect(page.locator("#records-table tbody tr")).to_have_count(1)
    assert page.input_value("input[name=platform]") == "gemini"
    assert table_ids(page) == ["req-r3"]


def test_a_bad_filter_names_the_field(page: Any, dashboard_url: tuple[str, int]) -> None:
    url, _ = dashboard_url
    sign_in(page, url)
    page.fill("input[name=account_id]", "abc")
    page.click("#filters button[type=submit]")
    page.wait_for_selector("#status.error")
    assert page.text_content("#status").startswith("account_id: ")
    assert page.get_attribute("input[name=account_id]", "aria-invalid") is not None


def test_detail_shows_every_attempt_in_order_with_the_trace(
    page: Any, dashboard_url: tuple[str, int]
) -> None:
    url, base_ms = dashboard_url
    sign_in(page, f"{url}/?time_range=1h")
    page.click("#records-table tbody tr[data-request-id='req-r1'] button")
    page.wait_for_selector("#detail:not([hidden])")
    assert page.text_content("#detail-id") == "req-r1"
    assert page.get_attribute("#trace-link", "href") == f"{JAEGER}/trace/{TRACE_ID}"
    time_of = utc(base_ms)
    assert attempt_heads(page) == [
        ["#1", f"{time_of}.100", "openai", "primary", "429", "http_error"],
        ["#2", f"{time_of}.200", "anthropic", "backup", "529", "failover"],
    ]
    messages = page.eval_on_selector_all("#attempts .message", "ps => ps.map(p => p.textContent)")
    assert messages == ["Rate limit reached", "Overloaded"]
    assert page.text_content("#attempts pre.detail") == '{"error":{"type":"rate_limit_error"}}'
    assert page.text_content("#detail-fields .field-trace_id") == TRACE_ID
    assert page.text_content("#detail-fields .field-recovered") == "yes"
    assert "record=req-r1" in page.url
    shot(page, "detail", full_page=False)

    page.keyboard.press("Escape")
    assert page.is_hidden("#detail")
    assert "record=" not in page.url

    # a record without a trace id has no trace link; a deep link opens the detail directly
    page.goto(f"{url}/?time_range=1h&record=req-r2")
    page.wait_for_selector("#detail:not([hidden])")
    assert page.text_content("#detail-id") == "req-r2"
    assert page.is_hidden("#trace")
    [head] = attempt_heads(page)
    assert head[2:] == ["openai", "primary", "no status", "request_error"]
