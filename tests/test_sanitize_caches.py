"""The sanitizer's caches of results, and ``Sanitizer.clean``: the same text out as the rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from upstream_ops import sanitize as sanitize_module
from upstream_ops._sanitize_text import _TEXT_CONTROLS
from upstream_ops.collector import _TEXT_KINDS
from upstream_ops.defaults import DETAIL_MAX_BYTES, MESSAGE_MAX_BYTES
from upstream_ops.sanitize import (
    DETAIL_TEXT,
    LABEL_TEXT,
    MESSAGE_TEXT,
    REDACTED,
    URL_TEXT,
    Sanitizer,
)

SECRET_TEXTS = [
    "upstream returned 503; Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    '{"error": {"message": "bad key", "api_key": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx"}}',
    "https://user:s3cr3t@example.com/v1?token=abcdef0123456789",
]
texts = st.one_of(
    st.text(max_size=600),
    st.sampled_from(SECRET_TEXTS),
    st.builds(lambda a, b: a + b, st.sampled_from(SECRET_TEXTS), st.text(max_size=40)),
)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_cached_messages_and_details_are_what_the_rules_give(text: str) -> None:
    sanitizer = Sanitizer()
    first_message, first_detail = sanitizer.message(text), sanitizer.detail(text)
    assert sanitizer.message(text) == first_message  # now from the cache
    assert sanitizer.detail(text) == first_detail
    fresh = Sanitizer()
    assert first_message == fresh._clean(text, MESSAGE_MAX_BYTES, _TEXT_CONTROLS)
    assert first_detail == fresh._clean(text, DETAIL_MAX_BYTES, _TEXT_CONTROLS)


def test_a_cached_secret_stays_redacted() -> None:
    sanitizer = Sanitizer()
    for _ in range(3):
        for text in SECRET_TEXTS:
            for out in (sanitizer.message(text), sanitizer.detail(text), sanitizer.url(text)):
                assert REDACTED in out
                assert "s3cr3t" not in out and "AbCdEfGhIj" not in out and "c2lnbmF0dXJl" not in out


def test_another_limit_is_not_served_from_the_cache() -> None:
    sanitizer = Sanitizer()
    text = "upstream returned 429 Too Many Requests " * 3
    assert sanitizer.message(text) == text.strip()
    short = sanitizer.message(text, 40)
    assert len(short.encode()) <= 40 and short != text.strip()
    assert sanitizer.detail(text, 40) == short


def test_caches_stay_bounded() -> None:
    sanitizer = Sanitizer()
    for i in range(sanitize_module._KEY_CACHE_SIZE * 2 + 7):
        sanitizer.message(f"upstream returned 503 for request {i}")
        sanitizer.detail(f'{{"error": "overloaded", "request": {i}}}')
    assert all(len(cache) <= sanitize_module._KEY_CACHE_SIZE for cache in sanitizer._caches)
    assert sanitizer.message("upstream returned 503 for request 3") == (
        "upstream returned 503 for request 3"
    )


def test_long_texts_are_not_kept() -> None:
    sanitizer = Sanitizer()
    text = "x" * (sanitize_module._CACHED_CHARS + 1)
    assert sanitizer.message(text) == text
    assert sanitizer.detail(text) == text
    assert not any(sanitizer._caches)


METHODS = {LABEL_TEXT: "label", MESSAGE_TEXT: "message", DETAIL_TEXT: "detail", URL_TEXT: "url"}


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_clean_cleans_each_kind_as_its_method_does(text: str) -> None:
    sanitizer, reference = Sanitizer(), Sanitizer()
    for kind, method in METHODS.items():
        assert sanitizer.clean(kind, text) == getattr(reference, method)(text)
        cached = sanitizer.cached_results()[kind]
        if len(text) <= sanitize_module._CACHED_CHARS:
            assert cached[text] == getattr(reference, method)(text)
        else:
            assert text not in cached


def test_a_subclass_has_no_cached_results_so_its_methods_see_every_text() -> None:
    seen: list[str] = []

    class Counting(Sanitizer):
        def message(self, text: str | bytes | None, max_bytes: int = MESSAGE_MAX_BYTES) -> str:
            seen.append(str(text))
            return "<" + super().message(text, max_bytes) + ">"

    sanitizer = Counting()
    for _ in range(2):
        assert not any(sanitizer.cached_results())
        assert sanitizer.clean(MESSAGE_TEXT, "token=abc123 failed") == f"<token={REDACTED} failed>"
    assert seen == ["token=abc123 failed"] * 2


def test_an_appended_event_is_cleaned_by_a_subclass_every_time() -> None:
    from upstream_ops import Collector, UpstreamErrorEvent, append_upstream_error, current_collector
    from upstream_ops.collector import _activate, _deactivate
    from upstream_ops.sanitize import get_default_sanitizer, set_default_sanitizer

    class Shouting(Sanitizer):
        def label(self, text: str | bytes | None, max_bytes: int = 512) -> str:
            return super().label(text, max_bytes).upper()

    before = get_default_sanitizer()
    set_default_sanitizer(Shouting())
    token = _activate(Collector("r"))
    try:
        for _ in range(2):
            event = append_upstream_error(platform="openai", message="token=abc failed", attempt=1)
            assert event is not None
            assert event.platform == "OPENAI"
            assert event.message == f"token={REDACTED} failed"
            # An event object is cleaned by the subclass every time too.
            stored = current_collector().append(  # type: ignore[union-attr]
                UpstreamErrorEvent(platform="anthropic", message="token=abc failed")
            )
            assert stored is not None
            assert stored.platform == "ANTHROPIC"
            assert stored.message == f"token={REDACTED} failed"
    finally:
        _deactivate(token)
        set_default_sanitizer(before)


def test_the_collector_cleans_every_text_field_of_an_event() -> None:
    from upstream_ops.events import FIELD_TYPES

    text_fields = {name for name, kind in FIELD_TYPES.items() if kind is str}
    assert set(_TEXT_KINDS) == text_fields
