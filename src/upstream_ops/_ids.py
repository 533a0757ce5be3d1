"""The ids upstream-ops makes: UUIDv7s (RFC 9562) as 32 lower-case hex digits, like a uuid4 hex.

Record ids and the request ids made when none came in are both stored in indexed columns. A random
id lands on a random page of its index, so every record written dirties one more page of each such
index, and the pages touched per record grow with the database; a time-ordered id lands at the
index's end, next to the previous one. (An id that comes in with the request, say a client's uuid4
``X-Request-ID``, is stored as it came.)
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Final

__all__ = ["ordered_uuid7_hex", "uuid7_hex"]


def uuid7_hex() -> str:
    """A new UUIDv7 as 32 lower-case hex digits, for request ids: ordered by the ms only.

    The Unix time in ms (its hex kept while the ms lasts), then 80 bits from a pool: the version
    (7), 74 random bits and the variant. A third of the cost of :func:`ordered_uuid7_hex` (no lock,
    no counter, no formatting of a 128-bit number), for ids that need to be unique and to land near
    each other in an index, not to sort within a ms. List operations are atomic, so threads share the
    pool without a lock; the pool is emptied in a forked child.
    """
    global _prefix
    ms = time.time_ns() // 1_000_000
    last_ms, prefix = _prefix
    if ms != last_ms:
        prefix = f"{ms:012x}"
        _prefix = (ms, prefix)  # one store: another thread reads the old pair or the new one
    try:
        return prefix + _tails.pop()
    except IndexError:
        _tails.extend(_new_tails())
        return prefix + _tails.pop()


def ordered_uuid7_hex() -> str:
    """A new UUIDv7 as 32 lower-case hex digits, for record ids: increasing within a process.

    The first 48 bits are the Unix time in ms, then the version (7), a 12-bit counter (method 1 of
    RFC 9562 section 6.2: random at each new ms, else one up), the variant and 62 random bits from a
    pool. Ids increase within a process, even if the clock steps back; the random bits (the pool is
    emptied in a forked child) keep processes apart.
    """
    with _lock:
        try:
            tail = _pool.pop()
        except IndexError:
            _pool.extend(_new_random_64s(_POOL_SIZE))
            tail = _pool.pop()
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _state
        if ms > last_ms:
            counter = tail >> 53  # 11 random bits: at least 2048 more ids in this ms
        elif counter < 0xFFF:
            ms, counter = last_ms, counter + 1
        else:
            ms, counter = last_ms + 1, 0  # 4096 ids in one ms: borrow the next one
        _state[:] = (ms, counter)
    return f"{ms << 80 | counter << 64 | tail & _TAIL_BITS | _UUID7_SET:032x}"


def _new_random_64s(count: int) -> list[int]:
    return list(struct.unpack(f"<{count}Q", os.urandom(8 * count)))


def _new_tails() -> list[str]:
    """``_POOL_SIZE`` tails (the last 80 bits of a UUIDv7) in hex: the version and variant bits set
    on all of them at once, in one big number, then cut apart in C."""
    random = int.from_bytes(os.urandom(_TAIL_BYTES * _POOL_SIZE), "big")
    tails = (random & _TAILS_KEEP | _TAILS_SET).to_bytes(_TAIL_BYTES * _POOL_SIZE, "big")
    return tails.hex(" ", _TAIL_BYTES).split(" ")


_POOL_SIZE: Final = 256
# RFC 9562 version 7: the version nibble (7) above the counter, the variant bits (10) above the tail.
_UUID7_SET: Final = (7 << 76) | (0b10 << 62)
_TAIL_BITS: Final = (1 << 62) - 1
_pool: list[int] = []
_state: list[int] = [0, 0]  # the last id's ms and counter
_lock = threading.Lock()

# uuid7_hex's tails: 80 bits, the version nibble (7) first and the variant bits (10) 16 bits on.
_TAIL_BYTES: Final = 10
_TAIL_VERSION_VARIANT: Final = (7 << 76) | (0b10 << 62)
_TAIL_FIXED: Final = (0xF << 76) | (0b11 << 62)
_TAILS_SET: Final = sum(_TAIL_VERSION_VARIANT << (80 * i) for i in range(_POOL_SIZE))
_TAILS_KEEP: Final = sum((~_TAIL_FIXED & ((1 << 80) - 1)) << (80 * i) for i in range(_POOL_SIZE))
_tails: list[str] = []
_prefix: tuple[int, str] = (-1, "")  # the last ms and its 12 hex digits


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at fork
    _pool.clear()
    _tails.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
