"""What the tests of the optional C extension (``upstream_ops._speedups``) share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

NOT_BUILT = "upstream_ops._speedups was not built (no C compiler when it was installed)"


def require_extension(extension: ModuleType | None) -> None:
    """Skip without the extension; in CI, which must have built it, fail."""
    if extension is None:
        if os.environ.get("CI"):
            pytest.fail(f"{NOT_BUILT}; CI needs it", pytrace=False)
        pytest.skip(NOT_BUILT)


def with_and_without(module: ModuleType, *names: str) -> Callable[..., Any]:
    """A module-scoped, autouse fixture: every test of the test module runs once with
    ``module.<name>`` (a step of the extension; several names for steps that go together) and
    once with them set to ``None``, the Python code alone."""

    @pytest.fixture(scope="module", autouse=True, params=["c-extension", "python"])
    def extension_step(request: pytest.FixtureRequest) -> Iterator[str]:
        if request.param == "c-extension":
            if any(getattr(module, name) is None for name in names):
                pytest.skip(NOT_BUILT)
            yield request.param
            return
        with pytest.MonkeyPatch.context() as patch:
            for name in names:
                patch.setattr(module, name, None)
            yield request.param

    return extension_step


#: What a request's record says when its collector got only a summary (``set_summary``): the
#: arguments given, and the record's (status code, message, detail). A collector with only a summary
#: is not quiet (the C ``quiet_close`` and ``Collector.close`` must agree).
SUMMARIES: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {
    "status": ((502,), (502, None, None)),
    "message": ((0, "upstream said no"), (None, "upstream said no", None)),
    "detail": ((0, "", "{}"), (None, None, "{}")),
}


def summary_of(record: Any) -> tuple[Any, ...]:
    return (
        record.upstream_status_code,
        record.upstream_error_message,
        record.upstream_error_detail,
    )


#: The incoming request ids both middlewares' collector tests send: none, a valid one, a bad one.
INCOMING_IDS = (None, "req-42", "bad id\n")


def assert_made_as_init_makes_it(
    seen: list[dict[str, Any]], recorder: Any, max_events: int
) -> None:
    """The collectors a middleware made for ``INCOMING_IDS`` (their ``vars``) equal what
    ``Collector(request_id, max_events)`` makes, the request id checked by ``recorder``."""
    from upstream_ops import Collector

    python_made = [
        vars(Collector(None if rid is None else recorder.valid_request_id(rid), max_events))
        for rid in INCOMING_IDS
    ]
    assert seen == python_made
    assert seen[1]["_request_id"] == "req-42" and "_request_id" not in seen[0]
