"""Types of the optional C extension built from ``_speedups.c``."""

from collections.abc import Mapping
from typing import final

TOKEN_ANCHOR_RULES: tuple[str, ...]

def pair_matches(text: str, /) -> list[tuple[int, str]]: ...
def token_anchors(text: str, /) -> int: ...

@final
class KeyModes:
    def __reduce__(self) -> tuple[type[KeyModes], tuple[()]]: ...
    def secret_separators(
        self, text: str, modes: Mapping[str, int], /
    ) -> list[tuple[int, int]]: ...
