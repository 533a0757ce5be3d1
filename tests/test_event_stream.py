"""EventStreamScanner: error events found however the stream is cut into chunks, in bounded memory."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from upstream_ops._event_stream import EventStreamScanner

from .upstream_servers import SSE_ANTHROPIC_ERROR, SSE_OK, SSE_OPENAI_ERROR

ANTHROPIC_DATA = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
OPENAI_DATA = b'{"error":{"message":"The server had an error","type":"server_error","code":"500"}}'


def scan(chunks: list[bytes], data_max: int = 2048, line_max: int = 1024) -> bytes | None:
    scanner = EventStreamScanner(data_max=data_max, line_max=line_max)
    for chunk in chunks:
        found = scanner.feed(chunk)
        if found is not None:
            return found
    return scanner.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_chunking_finds_the_same_error(cuts: list[int]) -> None:
    assert scan(split(SSE_ANTHROPIC_ERROR, cuts)) == ANTHROPIC_DATA
    assert scan(split(SSE_OPENAI_ERROR, cuts)) == OPENAI_DATA
    assert scan(split(SSE_OK, cuts)) is None


def test_event_named_error_without_data_and_multi_line_data() -> None:
    assert scan([b"event: error\n\n"]) == b"error"
    assert scan([b"event:error\ndata: line one\ndata:line two\n\n"]) == b"line one\nline two"


def test_error_members_must_be_real_json_and_non_empty() -> None:
    assert scan([b'data: {"error": null, "x": 1}\n\n']) is None
    assert scan([b'data: "an \\"error\\" string"\n\n']) is None
    assert scan([b'data: {"error": {"message": "x"}\n\n']) is None  # broken JSON
    assert scan([b': comment with "error"\nid: 1\nretry: 10\n\n']) is None


def test_an_unterminated_last_event_counts_at_the_end() -> None:
    assert scan([b"event: error\ndata: late"]) == b"late"


def test_over_long_lines_are_skipped_in_bounded_memory() -> None:
    scanner = EventStreamScanner(data_max=64, line_max=100)
    for _ in range(1000):
        assert scanner.feed(b"x" * 1000) is None  # one endless line
    assert len(scanner._partial) <= 100
    # the over-long line's end is skipped; the next event is read again
    assert scanner.feed(b'y\n\ndata: {"error": "late"}\n\n') == b'{"error": "late"}'


def test_event_data_is_capped() -> None:
    found = scan([b"event: error\ndata: " + b"z" * 5000 + b"\n\n"], data_max=64, line_max=10_000)
    assert found == b"z" * 64
