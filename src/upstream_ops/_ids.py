"""The ids upstream-ops makes: UUIDv7s (RFC 9562) as 32 lower-case hex digits, like a uuid4 hex.

Record ids and the request ids made when none came in are both stored in indexed columns. A random
id lands on a random page of its index, so every record written dirties one more page of each such
index, and the pages touched per record grow with the database; a time-ordered id lands at the
index's end, next to the previous one. (An id that comes in with the request, say a client's uuid4
``X-Request-ID``, is stored as it came.) Record ids also increase within a process
(:func:`ordered_uuid7_hex`); request ids only need the ms in front (:func:`uuid7_hex`, cheaper, as
it runs on the request path). Both take their random bits from pools filled from ``os.urandom``
256 ids at a time and emptied in a forked child. Where the C extension was built
(``upstream_ops._speedups``), its functions make the same ids at a tenth of the instructions; the
Python ones here are the fallback.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Final

try:
    from upstream_ops import _speedups
except ImportError:  # built without a C compiler: the Python functions below run
    _speedups = None  # type: ignore[assignment]

__all__ = ["ordered_uuid7_hex", "uuid7_hex"]


def _uuid7_hex() -> str:
    """A new UUIDv7 as 32 lower-case hex digits, for request ids: ordered by the ms only.

    The Unix time in ms (its hex kept while the ms lasts), then 80 bits from a pool: the version
    (7), 74 random bits and the variant. Cheaper than :func:`ordered_uuid7_hex` (no lock, no
    counter), for ids that need to be unique and to land near each other in an index, not to sort
    within a ms. List operations are atomic, so threads share the pool without a lock.
    """
    global _last
    ms = time.time_ns() // 1_000_000
    last_ms, prefix = _last
    if ms != last_ms:
        prefix = f"{ms:012x}"
        _last = (ms, prefix)  # one store: another thread reads the old pair or the new one
    while True:  # another thread may empty a refilled pool before this one pops
        try:
            return prefix + _tails.pop()
        except IndexError:
            _tails.extend(_TAILS.new())


def _ordered_uuid7_hex() -> str:
    """A new UUIDv7 as 32 lower-case hex digits, for record ids: increasing within a process.

    The Unix time in ms, then the version (7), a 12-bit counter (method 1 of RFC 9562 section 6.2:
    random at each new ms, else one up), the variant and 62 random bits from a pool. Ids increase
    within a process, even if the clock steps back.
    """
    global _ordered
    with _lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter, prefix = _ordered
        if ms > last_ms:
            counter = random.getrandbits(11)  # at least 2048 more ids in this ms
            prefix = f"{ms:012x}"
        elif counter < 0xFFF:
            ms, counter = last_ms, counter + 1
        else:
            ms, counter = last_ms + 1, 0  # 4096 ids in one ms: borrow the next one
            prefix = f"{ms:012x}"
        _ordered = (ms, counter, prefix)
        try:
            tail = _ordered_tails.pop()
        except IndexError:
            _ordered_tails.extend(_ORDERED_TAILS.new())
            tail = _ordered_tails.pop()
    return f"{prefix}{0x7000 | counter:04x}{tail}"


#: A new UUIDv7 for a request id (see ``_uuid7_hex``), in C where it was built.
uuid7_hex: Final[Callable[[], str]] = _uuid7_hex if _speedups is None else _speedups.uuid7_hex
#: A new UUIDv7 for a record id (see ``_ordered_uuid7_hex``), in C where it was built.
ordered_uuid7_hex: Final[Callable[[], str]] = (
    _ordered_uuid7_hex if _speedups is None else _speedups.ordered_uuid7_hex
)


class _RandomHex:
    """Makes ``_POOL_SIZE`` random numbers of ``size`` bytes at a time, in hex, with some bits fixed
    (a UUID's version and variant): one mask over one big number from ``os.urandom``, cut apart in C.
    """

    def __init__(self, size: int, fixed_bits: int, fixed_value: int) -> None:
        self.size = size
        every = sum(1 << (8 * size * i) for i in range(_POOL_SIZE))  # a 1 in each number's place
        self.keep = (((1 << 8 * size) - 1) ^ fixed_bits) * every
        self.set = fixed_value * every

    def new(self) -> list[str]:
        count = self.size * _POOL_SIZE
        numbers = int.from_bytes(os.urandom(count), "big") & self.keep | self.set
        return numbers.to_bytes(count, "big").hex(" ", self.size).split(" ")


_POOL_SIZE: Final = 256
# uuid7_hex's tails: 80 bits, the version nibble (7) first and the variant bits (10) 16 bits on.
_TAILS: Final = _RandomHex(10, (0xF << 76) | (0b11 << 62), (7 << 76) | (0b10 << 62))
# ordered_uuid7_hex's tails: 64 bits, the variant bits (10) first.
_ORDERED_TAILS: Final = _RandomHex(8, 0b11 << 62, 0b10 << 62)
_tails: list[str] = []
_ordered_tails: list[str] = []
_last: tuple[int, str] = (-1, "")  # uuid7_hex's last ms and its 12 hex digits
_ordered: tuple[int, int, str] = (-1, 0, "")  # ordered_uuid7_hex's last ms, counter and ms in hex
_lock = threading.Lock()


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at fork
    _tails.clear()  # random bits the parent hands out too
    _ordered_tails.clear()
    if _speedups is not None:
        _speedups.forget_random_bits()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
