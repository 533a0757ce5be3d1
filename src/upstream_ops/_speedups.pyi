"""Types of the optional C extension built from ``_speedups.c``."""

from collections.abc import Mapping
from typing import Any, final

TOKEN_ANCHOR_RULES: tuple[str, ...]

def pair_matches(text: str, /) -> list[tuple[int, str]]: ...
def token_anchors(text: str, /) -> int: ...
def clean_fields(
    fields: dict[str, Any],
    rules: dict[str, tuple[type, int | None]],
    cached: tuple[Mapping[str, str], ...],
    /,
) -> int: ...
def event_key(values: tuple[Any, ...], types: tuple[type, ...], optional: int, /) -> int: ...

@final
class KeyModes:
    def __reduce__(self) -> tuple[type[KeyModes], tuple[()]]: ...
    def secret_separators(
        self, text: str, modes: Mapping[str, int], /
    ) -> list[tuple[int, int]]: ...
