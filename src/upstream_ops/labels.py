"""Labels for upstream attempts: which platform, account and model a call was made for.

``upstream(...)`` puts labels into a ``ContextVar`` for the code inside it, sync or async; every event
recorded there (by a capture transport, the retry helpers or ``append_upstream_error``) gets them for
the fields it leaves empty. Nested blocks override the outer values they set and keep the others, so a
failover loop can set ``account_id`` per iteration inside one ``upstream(platform=..., model=...)``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar, cast

from upstream_ops.events import UpstreamErrorEvent

__all__ = ["UpstreamLabels", "current_labels", "upstream"]

logger = logging.getLogger("upstream_ops")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class UpstreamLabels:
    """The label fields of an event; empty values mean "not set"."""

    platform: str = ""
    account_id: int = 0
    account_name: str = ""
    model: str = ""

    def __bool__(self) -> bool:
        return bool(self.platform or self.account_id or self.account_name or self.model)

    def override(self, inner: UpstreamLabels) -> UpstreamLabels:
        """These labels with every value ``inner`` sets taking precedence."""
        if not inner:
            return self
        if not self:
            return inner
        return UpstreamLabels(
            platform=inner.platform or self.platform,
            account_id=inner.account_id or self.account_id,
            account_name=inner.account_name or self.account_name,
            model=inner.model or self.model,
        )

    def fill(self, event: UpstreamErrorEvent, clean: Callable[[str], str] = str) -> None:
        """Set the label fields that ``event`` leaves empty (in place), each text passed through
        ``clean`` (the collector passes the sanitizer: the event it fills is already clean)."""
        if self.platform and not event.platform:
            event.platform = clean(self.platform)
        if self.account_id and not event.account_id:
            event.account_id = self.account_id
        if self.account_name and not event.account_name:
            event.account_name = clean(self.account_name)
        if self.model and not event.model:
            event.model = clean(self.model)


NO_LABELS: Final = UpstreamLabels()

_current: contextvars.ContextVar[UpstreamLabels] = contextvars.ContextVar(
    "upstream_ops_labels", default=NO_LABELS
)


def current_labels() -> UpstreamLabels:
    """The labels in effect here (``NO_LABELS`` outside any ``upstream`` block)."""
    return _current.get()


def make_labels(
    platform: object = None,
    account_id: object = None,
    account_name: object = None,
    model: object = None,
) -> UpstreamLabels:
    """Labels from user input. Never raises: a value that cannot be a label is logged and ignored.

    ``account_id`` takes an integer or a string of digits; the text labels take any value (``str`` is
    applied). The sanitizer runs when an event is stored, not here.
    """
    return UpstreamLabels(
        platform=_text("platform", platform),
        account_id=_account_id(account_id),
        account_name=_text("account_name", account_name),
        model=_text("model", model),
    )


def _text(name: str, value: object) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    try:
        return str(value)
    except Exception:
        logger.warning("upstream_ops: label %s ignored: its str() failed", name)
        return ""


def _account_id(value: object) -> int:
    if value is None or value == "":
        return 0
    try:
        # the event applies its own coercion rules ("42" -> 42) and names the field when it fails
        return UpstreamErrorEvent(account_id=cast(int, value)).account_id
    except ValueError as exc:
        logger.warning("upstream_ops: label ignored: %s", exc)
        return 0


class upstream:  # lower case, like contextlib.suppress: it reads as a block, not a thing
    """Label the upstream attempts made inside: ``with upstream(account_id=7, model="gpt-4o"): ...``.

    Works with ``with`` and ``async with`` (a ``ContextVar`` follows tasks and ``wrap_context``), and as
    a decorator of plain and ``async`` functions. Values given here override the enclosing block's; the
    values not given are inherited. Entering returns the labels now in effect. An instance can be
    entered again after it was left, and nested in itself, but not shared by concurrent tasks: create
    one per block (as the ``with`` statement does naturally).
    """

    __slots__ = ("_labels", "_tokens")

    def __init__(
        self,
        *,
        platform: str | None = None,
        account_id: int | str | None = None,
        account_name: str | None = None,
        model: str | None = None,
    ) -> None:
        self._labels = make_labels(platform, account_id, account_name, model)
        self._tokens: list[contextvars.Token[UpstreamLabels]] = []

    def __enter__(self) -> UpstreamLabels:
        labels = _current.get().override(self._labels)
        self._tokens.append(_current.set(labels))
        return labels

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._tokens:
            return
        token = self._tokens.pop()
        try:
            _current.reset(token)
        except ValueError:  # left in another context than it was entered in
            previous = token.old_value
            _current.set(NO_LABELS if previous is contextvars.Token.MISSING else previous)

    async def __aenter__(self) -> UpstreamLabels:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn``: each call runs inside its own ``upstream`` block with these labels."""
        labels = self._labels
        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def labelled_coroutine(*args: P.args, **kwargs: P.kwargs) -> Any:
                with _entered(labels):
                    return await async_fn(*args, **kwargs)

            return cast(Callable[P, R], labelled_coroutine)

        @functools.wraps(fn)
        def labelled(*args: P.args, **kwargs: P.kwargs) -> R:
            with _entered(labels):
                return fn(*args, **kwargs)

        return labelled

    def __repr__(self) -> str:
        return f"upstream({self._labels!r})"


def _entered(labels: UpstreamLabels) -> upstream:
    block = upstream.__new__(upstream)
    block._labels = labels
    block._tokens = []
    return block
