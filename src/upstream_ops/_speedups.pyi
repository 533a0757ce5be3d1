"""Types of the optional C extension built from ``_speedups.c``."""

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, final

TOKEN_ANCHOR_RULES: tuple[str, ...]

def has_controls(text: str, /) -> bool: ...
def pair_matches(text: str, /) -> list[tuple[int, str]]: ...
def token_anchors(text: str, /) -> int: ...
def redact_values(
    text: str,
    hits: list[tuple[int, int]],
    scheme_match: Callable[..., Any],
    inner_checks: int,
    redacted: str,
    /,
) -> str: ...
def event_from_fields(
    fields: dict[str, Any],
    rules: dict[str, tuple[type, int | None, int]],
    cached: tuple[Mapping[str, str], ...],
    event_type: type[Any],
    slots: tuple[tuple[str, Any, Any, int], ...],
    /,
) -> Any: ...
def uuid7_hex() -> str: ...
def ordered_uuid7_hex() -> str: ...
def forget_random_bits() -> None: ...
def event_key(values: tuple[Any, ...], types: tuple[type, ...], optional: int, /) -> int: ...

@final
class KeyModes:
    def __reduce__(self) -> tuple[type[KeyModes], tuple[()]]: ...
    def secret_separators(
        self, text: str, modes: Mapping[str, int], /
    ) -> list[tuple[int, int]]: ...

@final
class Appender:
    def __new__(
        cls,
        fallback: Callable[..., Any],
        collector_var: ContextVar[Any],
        labels_var: ContextVar[Any],
        no_labels: object,
        collector_type: type[Any],
        collector_globals: dict[str, Any],
        sanitize_globals: dict[str, Any],
        sanitizer_type: type[Any],
        rules: dict[str, tuple[type, int | None, int]],
        event_type: type[Any],
        slots: tuple[tuple[str, Any, Any, int], ...],
        deque_type: type[Any],
        clean_label: Callable[[str], str],
    ) -> Appender: ...
    def __call__(self, *args: Any, **fields: Any) -> Any: ...
    def __reduce__(self) -> str: ...
