"""Error events inside a successful ``text/event-stream`` response (server-sent events).

Streaming APIs answer ``200`` and report a failure later, inside the stream: Anthropic sends
``event: error``, OpenAI-compatible servers a ``data:`` line holding ``{"error": {...}}``. The scanner
sees only the bytes the caller reads and keeps bounded state, so it never buffers a stream.
"""

from __future__ import annotations

import json

__all__ = ["EventStreamScanner"]


class EventStreamScanner:
    """Finds the first error event of an event stream, fed chunk by chunk.

    An error event is one named ``error``, or one whose data is a JSON object with a non-empty
    ``error`` member. Lines end with LF or CRLF (servers do not send bare CR in practice). A line
    longer than ``line_max`` bytes is skipped; an event keeps at most ``data_max`` bytes of data.
    """

    __slots__ = ("_data", "_data_max", "_event", "_line_max", "_partial", "_skipping")

    def __init__(self, *, data_max: int, line_max: int) -> None:
        self._data_max = data_max
        self._line_max = line_max
        self._partial = b""
        self._skipping = False  # inside a line that is too long: drop bytes until its end
        self._event = b""
        self._data = bytearray()

    def feed(self, chunk: bytes) -> bytes | None:
        """Scan ``chunk``; the data of the first error event it completes, else ``None``."""
        lines = chunk.split(b"\n")
        tail = lines.pop()  # the unfinished last line ("" when the chunk ends with a newline)
        if lines:
            if self._skipping:  # the first line ends the over-long one: neither a field nor blank
                del lines[0]
                self._skipping = False
            else:
                lines[0] = self._partial + lines[0]
            self._partial = b""
            for line in lines:
                found = self._line(line)
                if found is not None:
                    return found
        if not self._skipping:
            partial = self._partial + tail
            if len(partial) > self._line_max:
                self._partial, self._skipping = b"", True
            else:
                self._partial = partial
        return None

    def finish(self) -> bytes | None:
        """The stream ended: an unterminated last event counts too (servers often close right away)."""
        found = None
        if self._partial and not self._skipping:
            found = self._line(self._partial)
        self._partial = b""
        return found if found is not None else self._line(b"")

    def _line(self, line: bytes) -> bytes | None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return self._dispatch()
        if line.startswith(b"data:"):
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            data = self._data
            if data:
                data += b"\n"
            room = self._data_max - len(data)
            if room > 0:
                data += value[:room]
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()
        return None  # comments (":...") and the id and retry fields say nothing about errors

    def _dispatch(self) -> bytes | None:
        event, data = self._event, bytes(self._data)
        self._event = b""
        self._data.clear()
        if event == b"error":
            return data or b"error"
        if b'"error"' in data and _has_error_member(data):
            return data
        return None


def _has_error_member(data: bytes) -> bool:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and bool(value.get("error"))
