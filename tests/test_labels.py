"""upstream(...): labels for the attempts made inside a block, in sync, async and threaded code."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from upstream_ops import UpstreamErrorEvent, append_upstream_error, upstream, wrap_context
from upstream_ops.labels import NO_LABELS, UpstreamLabels, current_labels, make_labels
from upstream_ops.testing import collecting


def test_nested_blocks_override_what_they_set_and_inherit_the_rest() -> None:
    assert current_labels() is NO_LABELS
    with upstream(platform="openai", model="gpt-4o") as outer:
        assert outer == UpstreamLabels(platform="openai", model="gpt-4o")
        with upstream(account_id=7, account_name="primary", model="gpt-4o-mini") as inner:
            assert inner == UpstreamLabels("openai", 7, "primary", "gpt-4o-mini")
            with upstream(account_id=8) as innermost:
                assert innermost == UpstreamLabels("openai", 8, "primary", "gpt-4o-mini")
            assert current_labels() == inner
        assert current_labels() == outer
    assert current_labels() is NO_LABELS


def test_labels_are_restored_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), upstream(platform="x"):
        raise RuntimeError("boom")
    assert current_labels() is NO_LABELS


def test_manual_append_takes_labels_for_the_fields_it_leaves_empty() -> None:
    with collecting() as collector, upstream(platform="rix", account_id=3, model="img"):
        given = UpstreamErrorEvent(upstream_status_code=504, account_id=9)
        append_upstream_error(given)
        append_upstream_error(upstream_status_code=429, platform="other")
    first, second = collector.events
    assert (first.platform, first.account_id, first.model) == ("rix", 9, "img")
    assert (second.platform, second.account_id, second.model) == ("other", 3, "img")
    assert given.platform == ""  # the caller's event object is left alone


def test_concurrent_tasks_keep_their_own_labels() -> None:
    async def call(account: int) -> list[int]:
        seen = []
        with upstream(account_id=account):
            for _ in range(3):
                await asyncio.sleep(0)
                seen.append(current_labels().account_id)
        return seen

    async def main() -> list[list[int]]:
        async with upstream(platform="p"):
            return list(await asyncio.gather(*(call(n) for n in (1, 2, 3))))

    assert asyncio.run(main()) == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]


def test_labels_follow_wrap_context_into_threads() -> None:
    seen: list[UpstreamLabels] = []
    with upstream(platform="threads", account_id=4):
        worker = threading.Thread(target=wrap_context(lambda: seen.append(current_labels())))
    worker.start()
    worker.join()
    assert seen == [UpstreamLabels(platform="threads", account_id=4)]


def test_decorator_on_plain_and_async_functions() -> None:
    @upstream(platform="dify")
    def sync_call(extra: int) -> tuple[str, int]:
        with upstream(account_id=extra):
            return current_labels().platform, current_labels().account_id

    @upstream(model="claude")
    async def async_call() -> str:
        await asyncio.sleep(0)
        return current_labels().model

    assert sync_call(5) == ("dify", 5)
    assert asyncio.run(async_call()) == "claude"
    assert sync_call.__name__ == "sync_call" and asyncio.iscoroutinefunction(async_call)
    assert current_labels() is NO_LABELS


def test_one_instance_can_be_entered_again_and_nested_in_itself() -> None:
    block = upstream(account_id=1)
    with block:
        with block:
            assert current_labels().account_id == 1
        assert current_labels().account_id == 1
    with block:
        assert current_labels().account_id == 1
    assert current_labels() is NO_LABELS


def test_account_ids_are_coerced_and_bad_values_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert make_labels(account_id="42").account_id == 42
    with caplog.at_level(logging.WARNING, "upstream_ops"):
        labels = make_labels(platform="p", account_id="acct-xyz")
    assert labels == UpstreamLabels(platform="p")
    assert "account_id" in caplog.text
    assert make_labels(model=123).model == "123"  # type: ignore[arg-type]


def test_override_and_fill() -> None:
    base = UpstreamLabels(platform="a", account_id=1)
    assert base.override(NO_LABELS) is base
    assert NO_LABELS.override(base) is base
    assert base.override(UpstreamLabels(model="m")) == UpstreamLabels("a", 1, "", "m")
    event = UpstreamErrorEvent(platform="keep")
    base.fill(event)
    assert (event.platform, event.account_id) == ("keep", 1)
    assert not NO_LABELS and base
