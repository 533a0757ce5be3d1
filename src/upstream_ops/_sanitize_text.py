"""Text before and after redaction: any value made ``str``, control characters dropped, a byte limit.

These steps know nothing of secrets; ``Sanitizer`` runs the redaction rules between them. Each is
linear in its input and never raises for a value of the types it takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

# --- Control characters and limits ------------------------------------------------------------------
# Stripped on the UTF-8 bytes: bytes.translate is far faster than str.translate, and ASCII bytes never
# occur inside a multi-byte sequence. C1 controls, bidi overrides and lone surrogates are multi-byte.
_ASCII_CONTROLS = bytes((*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F))
_TEXT_CONTROLS: Final = (None, _ASCII_CONTROLS)
_LABEL_CONTROLS: Final = (bytes.maketrans(b"\t\n", b"  "), _ASCII_CONTROLS)
_URL_CONTROLS: Final = (None, _ASCII_CONTROLS + b"\t\n")
_UNICODE_CONTROLS: Final = (
    (b"\xc2", re.compile(rb"\xc2[\x80-\x9f]"), b""),  # C1, U+0080..U+009F
    (b"\xe2", re.compile(rb"\xe2(?:\x80[\xaa-\xae]|\x81[\xa6-\xa9])"), b""),  # U+202A.., U+2066..
    (b"\xed", re.compile(rb"\xed[\xa0-\xbf][\x80-\xbf]"), "\ufffd".encode()),  # lone surrogates
)
_SCAN_FACTOR = 64  # input beyond this many times the limit is cut before the pattern pass ...
_SCAN_MIN_CHARS = 4096
_SCAN_MAX_CHARS = 1 << 20  # ... and never more than 1 MiB is scanned
_WORD_TAIL = re.compile(r"[A-Za-z0-9+/=_.~%\\-]{0,4096}+")
_MARKER = "…[truncated {} bytes]"


def _scan_limit(max_bytes: int) -> int:
    return min(_SCAN_MAX_CHARS, max(_SCAN_FACTOR * max_bytes, _SCAN_MIN_CHARS))


def _coerce(value: object, limit: int) -> tuple[str, int]:
    """The text of ``value``, at most ``limit`` characters, and how many UTF-8 bytes were cut off.

    A cut also drops the credential-like run it lands in, so that half a secret, too short for its
    pattern, is not kept.
    """
    dropped = 0
    if value is None:
        return "", 0
    if isinstance(value, str):
        text = value if type(value) is str else str.__str__(value)  # no overridden methods
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) > limit:
            dropped = len(data) - limit
            data = data[:limit]
        text = data.decode("utf-8", "replace")
    else:
        try:
            text = str(value)
        except Exception:  # an object whose __str__ fails is stored as ""
            return "", 0
    if len(text) > limit:
        dropped += _utf8_size(text[limit:])
        text = text[:limit]
    if dropped:
        tail = _WORD_TAIL.match(text[-4096:][::-1])
        if tail and tail.end():
            dropped += _utf8_size(text[-tail.end() :])
            text = text[: -tail.end()]
    return text, dropped


def _strip_controls(
    text: str,
    controls: tuple[bytes | None, bytes],
    has_controls: Callable[[str], bool] | None = None,
) -> str:
    """``text`` without the ``controls``. ``has_controls``: the C extension's test of whether message
    text (``_TEXT_CONTROLS``) holds anything to strip, one pass over the characters; most texts hold
    nothing, and the bytes' translate and comparison cost 1.5 µs on 2 KiB."""
    if len(text) < 64 and text.isprintable():  # isprintable costs more per character than translate
        return text
    if has_controls is not None and controls is _TEXT_CONTROLS and not has_controls(text):
        return text
    data = text.encode("utf-8", "surrogatepass")
    cleaned = data.translate(*controls)
    if not text.isascii():
        for gate, pattern, replacement in _UNICODE_CONTROLS:
            if gate in cleaned:
                cleaned = pattern.sub(replacement, cleaned)
    return text if cleaned == data else cleaned.decode("utf-8", "replace")


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _fit(text: str, max_bytes: int, dropped: int) -> str:
    """``text`` cut to ``max_bytes`` UTF-8 bytes on a code-point boundary, the marker included."""
    if not dropped and len(text) * 4 <= max_bytes:
        return text
    data = text.encode("utf-8", "replace")
    if not dropped and len(data) <= max_bytes:
        return text
    total = len(data) + dropped
    marker_size = len(_MARKER.format(total).encode())  # the most digits the count can have
    if 2 * marker_size > max_bytes:  # no room for a useful marker: just cut
        return _head(data, max(max_bytes, 0))[0]
    if len(data) + marker_size <= max_bytes:  # only the pre-scan cut is missing
        return text + _MARKER.format(dropped)
    head, kept = _head(data, max_bytes - marker_size)
    return head + _MARKER.format(total - kept)


def _head(data: bytes, size: int) -> tuple[str, int]:
    """The first ``size`` bytes of UTF-8 ``data`` without a split code point, and their number."""
    if size < len(data):
        while size > 0 and data[size] & 0xC0 == 0x80:  # a continuation byte: back up
            size -= 1
    size = min(size, len(data))
    return data[:size].decode("utf-8", "replace"), size
