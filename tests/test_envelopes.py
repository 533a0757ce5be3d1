"""parse_error_body: every envelope of ENVELOPE_FORMATS, and what upstreams send when things go badly."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPHeaderDict

import upstream_ops.envelopes
from upstream_ops.defaults import LABEL_MAX_BYTES, MESSAGE_MAX_BYTES
from upstream_ops.envelopes import (
    ENVELOPE_FORMATS,
    JSON_SCAN_MAX_BYTES,
    ProviderError,
    parse_error_body,
)

PE = ProviderError
AWS_THROTTLING = (
    "ThrottlingException:http://internal.amazon.com/coral/com.amazon.coral.availability/"
)
NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


ENVELOPES = [
    pytest.param(
        {
            "error": {
                "message": "Rate limit reached for gpt-4o",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        PE(
            message="Rate limit reached for gpt-4o",
            type="requests",
            code="rate_limit_exceeded",
            format="openai",
        ),
        id="openai",
    ),
    pytest.param(
        # The reference failure: a 504 whose envelope has no message at all.
        {
            "error": {
                "message": "",
                "type": "rix_api_error",
                "param": "",
                "code": "bade_status_code",
            }
        },
        PE(type="rix_api_error", code="bade_status_code", format="openai"),
        id="openai-empty-message",
    ),
    pytest.param(
        {"error": {"message": "bad request", "type": "invalid_request_error", "code": 400}},
        PE(message="bad request", type="invalid_request_error", code="400", format="openai"),
        id="openai-numeric-code",
    ),
    pytest.param(
        {"error": {"code": "content_filter", "message": "The response was filtered"}},
        PE(message="The response was filtered", code="content_filter", format="openai"),
        id="azure-openai",
    ),
    pytest.param(
        {
            "error": {
                "message": json.dumps(
                    {"error": {"message": "Overloaded", "type": "overloaded_error", "code": 529}}
                ),
                "type": "upstream_error",
                "param": "",
                "code": "",
            }
        },
        PE(message="Overloaded", type="upstream_error", code="529", format="openai"),
        id="openai-nested-json-message",
    ),
    pytest.param(
        {"error": {"message": '{"type":"error","error":{"type":"x","message":"inner"}}'}},
        PE(message="inner", type="x", format="openai"),
        id="openai-nested-anthropic",
    ),
    pytest.param(
        {"error": {"message": "{not json", "type": "t"}},
        PE(message="{not json", type="t", format="openai"),
        id="openai-message-looks-like-json",
    ),
    pytest.param(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        PE(message="Overloaded", type="overloaded_error", format="anthropic"),
        id="anthropic",
    ),
    pytest.param(
        {
            "error": {
                "code": 429,
                "message": "Resource has been exhausted (e.g. check quota).",
                "status": "RESOURCE_EXHAUSTED",
            }
        },
        PE(
            message="Resource has been exhausted (e.g. check quota).",
            type="RESOURCE_EXHAUSTED",
            code="429",
            format="google",
        ),
        id="google",
    ),
    pytest.param(
        [{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}],
        PE(message="The model is overloaded.", type="UNAVAILABLE", code="503", format="google"),
        id="google-stream-array",
    ),
    pytest.param(
        {
            "__type": "com.amazon.coral.validate#ValidationException",
            "message": "1 validation error detected",
        },
        PE(message="1 validation error detected", type="ValidationException", format="aws"),
        id="aws-json",
    ),
    pytest.param(
        {"__type": "ResourceNotFoundException", "Message": "Requested resource not found"},
        PE(message="Requested resource not found", type="ResourceNotFoundException", format="aws"),
        id="aws-json-capital-message",
    ),
    pytest.param(
        {
            "code": 1640001,
            "data": None,
            "code_name": "INVALID_ARGS",
            "message": 'Parameters error [reason="app code cannot be empty"]',
            "result": False,
        },
        PE(
            message='Parameters error [reason="app code cannot be empty"]',
            type="INVALID_ARGS",
            code="1640001",
            format="bkapi",
            origin="gateway",
        ),
        id="bkapi-gateway-code",
    ),
    pytest.param(
        {"result": False, "code": 40001, "message": "backend says no", "data": None},
        PE(message="backend says no", code="40001", format="bkapi"),
        id="bkapi-shaped-backend",
    ),
    pytest.param(
        {"errcode": -2002, "errmsg": "Token已失效"},
        PE(message="Token已失效", code="-2002", format="kimi"),
        id="kimi",
    ),
    pytest.param(
        {"code": "invalid_param", "message": "Model is not configured", "status": 400},
        PE(message="Model is not configured", code="invalid_param", format="dify"),
        id="dify",
    ),
    pytest.param(
        {
            "type": "https://example.com/probs/out-of-credit",
            "title": "You do not have enough credit.",
            "status": 403,
            "detail": "Your current balance is 30, but that costs 50.",
        },
        PE(
            message="Your current balance is 30, but that costs 50.",
            type="https://example.com/probs/out-of-credit",
            format="problem",
        ),
        id="problem",
    ),
    pytest.param(
        {"type": "about:blank", "title": "Not Found", "status": 404},
        PE(message="Not Found", format="problem"),
        id="problem-about-blank",
    ),
    pytest.param({"detail": "Not Found"}, PE(message="Not Found", format="fastapi"), id="fastapi"),
    pytest.param(
        {
            "detail": [
                {"type": "missing", "loc": ["body", "model"], "msg": "Field required", "input": {}},
                {"type": "list_type", "loc": ["body", "messages"], "msg": "Input should be a list"},
            ]
        },
        PE(
            message="body.model: Field required; body.messages: Input should be a list",
            type="missing",
            format="fastapi",
        ),
        id="fastapi-validation",
    ),
    pytest.param(
        {"detail": {"error": {"message": "wrapped", "type": "t"}}},
        PE(message="wrapped", type="t", format="openai"),
        id="fastapi-detail-object",
    ),
    pytest.param(
        {"message": "Internal server error"},
        PE(message="Internal server error", format="generic"),
        id="generic-message",
    ),
    pytest.param(
        {"error": "invalid_api_key"},
        PE(message="invalid_api_key", format="generic"),
        id="generic-error-string",
    ),
    pytest.param(
        {"error": "invalid_grant", "error_description": "Refresh token expired"},
        PE(message="Refresh token expired", code="invalid_grant", format="generic"),
        id="oauth",
    ),
    pytest.param(
        {"error_description": "Bad client credentials"},
        PE(message="Bad client credentials", format="generic"),
        id="oauth-description-only",
    ),
    pytest.param(
        {"statusCode": 400, "message": ["name must be a string", "age must be > 0"]},
        PE(message="name must be a string; age must be > 0", format="generic"),
        id="nestjs-message-list",
    ),
    pytest.param(
        {"success": False, "errors": [{"code": 10000, "message": "Authentication error"}]},
        PE(message="Authentication error", code="10000", format="generic"),
        id="errors-list",
    ),
]


@pytest.mark.parametrize(("data", "expected"), ENVELOPES)
def test_json_envelopes(data: object, expected: ProviderError) -> None:
    assert parse_error_body(_json(data), "application/json") == expected
    # Same answer for a str body, with no content type, and with a lying one.
    assert parse_error_body(json.dumps(data)) == expected
    assert parse_error_body(_json(data), "text/html; charset=utf-8") == expected


@pytest.mark.parametrize(("name", "description", "example"), ENVELOPE_FORMATS)
def test_every_documented_format_parses_its_example(
    name: str, description: str, example: str
) -> None:
    found = parse_error_body(example)
    assert found is not None and found.format == name
    assert description


def test_format_names_are_unique() -> None:
    names = [name for name, _, _ in ENVELOPE_FORMATS]
    assert len(names) == len(set(names))


# --- headers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Amzn-ErrorType": AWS_THROTTLING},
        {"x-amzn-errortype": AWS_THROTTLING},
        httpx.Headers({"X-AMZN-ERRORTYPE": AWS_THROTTLING}),
        CaseInsensitiveDict({"x-Amzn-ErrorType": AWS_THROTTLING}),
    ],
    ids=["dict-canonical", "dict-lower", "httpx-headers", "requests-headers"],
)
def test_aws_header_only(headers: dict[str, str]) -> None:
    assert parse_error_body(b"", None, headers) == PE(type="ThrottlingException", format="aws")


def test_aws_header_names_the_type_of_a_plain_message() -> None:
    # API Gateway and Bedrock: {"message": ...} with the type in the header.
    found = parse_error_body(
        b'{"message":"Too many requests, please wait before trying again."}',
        "application/json",
        {"X-Amzn-ErrorType": "ThrottlingException"},
    )
    assert found == PE(
        message="Too many requests, please wait before trying again.",
        type="ThrottlingException",
        format="aws",
    )


def test_aws_xml_error() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
        b"<Message>The specified key does not exist.</Message><Key>a.png</Key></Error>"
    )
    assert parse_error_body(body, "application/xml") == PE(
        message="The specified key does not exist.", type="NoSuchKey", format="aws"
    )


def test_bkapi_header_only_means_the_gateway_answered() -> None:
    headers = {
        "X-Bkapi-Error-Code": "1650401",
        "X-Bkapi-Error-Message": "Request backend service timeout",
    }
    assert parse_error_body(None, None, headers) == PE(
        message="Request backend service timeout",
        code="1650401",
        format="bkapi",
        origin="gateway",
    )


def test_bkapi_header_marks_a_body_without_gateway_code() -> None:
    body = {"code": 1234, "code_name": "X", "message": "m", "result": False, "data": None}
    found = parse_error_body(_json(body), None, {"x-bkapi-error-code": "1234"})
    assert found == PE(message="m", type="X", code="1234", format="bkapi", origin="gateway")


def test_bkapi_header_wins_over_a_non_bk_body() -> None:
    found = parse_error_body(NGINX_502, "text/html", {"X-Bkapi-Error-Code": "1650200"})
    assert found == PE(message="502 Bad Gateway", code="1650200", format="bkapi", origin="gateway")


def test_empty_bkapi_header_is_ignored() -> None:
    found = parse_error_body(b'{"message":"m"}', None, {"X-Bkapi-Error-Code": " "})
    assert found == PE(message="m", format="generic")


def test_headers_that_are_not_a_mapping_keep_the_body_answer() -> None:
    headers = [("X-Amzn-ErrorType", "ThrottlingException")]
    found = parse_error_body(b'{"message":"m"}', None, headers)  # type: ignore[arg-type]
    assert found == PE(message="m", format="generic")


# --- HTML, text, event streams ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(NGINX_502, "502 Bad Gateway", id="nginx"),
        pytest.param(
            b"<!DOCTYPE html><html><head><meta charset='utf-8'>\n<TITLE>\n  Service\n"
            b"  Unavailable &amp; down &#8212; retry </TITLE></head></html>",
            "Service Unavailable & down \u2014 retry",
            id="title-entities-whitespace",
        ),
        pytest.param(
            b"<html><body><h1>Gateway <b>Timeout</b></h1><p>later</p></body></html>",
            "Gateway Timeout",
            id="h1-without-title",
        ),
        pytest.param(
            b"<html><head><style>body{color:red}</style></head><body>\n  Upstream down\n"
            b"</body></html>",
            "Upstream down",
            id="text-without-title-or-h1",
        ),
    ],
)
def test_html_pages(body: bytes, expected: str) -> None:
    assert parse_error_body(body, "text/html") == PE(message=expected, format="html")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b"\n\n  upstream connect error or disconnect/reset before headers. reset reason: "
            b"connection failure\nsecond line\n",
            "upstream connect error or disconnect/reset before headers. reset reason: "
            "connection failure",
            id="envoy",
        ),
        pytest.param(b"404 page not found\n", "404 page not found", id="go-default"),
        pytest.param(b"<nil>", "<nil>", id="angle-brackets-not-markup"),
        pytest.param(b'"Unauthorized"', "Unauthorized", id="json-string"),
        pytest.param(b"{'error': 'python repr'}", "{'error': 'python repr'}", id="not-json"),
    ],
)
def test_plain_text(body: bytes, expected: str) -> None:
    assert parse_error_body(body, "text/plain") == PE(message=expected, format="text")


def test_text_is_bounded_by_max_bytes() -> None:
    found = parse_error_body(b"x" * 10_000, max_bytes=100)
    assert found == PE(message="x" * 100, format="text")


def test_event_stream_error() -> None:
    body = (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    assert parse_error_body(body, "text/event-stream") == PE(
        message="Overloaded", type="overloaded_error", format="anthropic"
    )


# --- content types, charsets, lies --------------------------------------------------------------


def test_html_sent_as_json() -> None:
    assert parse_error_body(NGINX_502, "application/json") == PE(
        message="502 Bad Gateway", format="html"
    )


def test_charset_from_content_type() -> None:
    body = '{"errcode": -1000, "errmsg": "系统异常"}'.encode("gbk")
    assert parse_error_body(body, "application/json; charset=GBK") == PE(
        message="系统异常", code="-1000", format="kimi"
    )


def test_unknown_charset_falls_back_to_utf8() -> None:
    found = parse_error_body(b'{"message":"ok"}', "text/plain; charset=rot13")
    assert found == PE(message="ok", format="generic")


def test_invalid_utf8_is_replaced() -> None:
    found = parse_error_body(b'{"error":{"message":"caf\xe9 \xff down"}}')
    assert found == PE(message="caf\ufffd \ufffd down", format="openai")


def test_bom_and_whitespace_before_json() -> None:
    found = parse_error_body(b'\xef\xbb\xbf \r\n {"message":"m"}')
    assert found == PE(message="m", format="generic")


# --- nothing useful -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(None, id="none"),
        pytest.param(b"", id="empty-bytes"),
        pytest.param("", id="empty-str"),
        pytest.param(b" \r\n\t ", id="whitespace"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), id="png"),
        pytest.param(bytes(range(256)) * 4, id="binary"),
        pytest.param(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\xc9\x07", id="gzip"),
        pytest.param(b"\xff\xfe\xfd\xfc" * 64, id="invalid-utf8-only"),
        pytest.param(b"[1, 2, 3]", id="json-array"),
        pytest.param(b"[]", id="empty-array"),
        pytest.param(b"{}", id="empty-object"),
        pytest.param(b'{"foo": 1, "bar": [1, 2]}', id="unknown-object"),
        pytest.param(b'{"message": ""}', id="empty-message"),
        pytest.param(b"42", id="json-number"),
        pytest.param(b"null", id="json-null"),
        pytest.param(b"true", id="json-true"),
        pytest.param(b"[" * 10_000 + b"]" * 10_000, id="nested-arrays-10k"),
        pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, id="nested-objects-10k"),
        pytest.param(b"[" * 1_000_000, id="open-brackets-1m"),
        pytest.param(b"<html><head></head><body>   </body></html>", id="empty-html"),
    ],
)
def test_nothing_useful_gives_none(body: bytes | str | None) -> None:
    assert parse_error_body(body, "application/json") is None


def test_nesting_within_limits_still_parses() -> None:
    body = {"error": {"message": "deep", "type": "t"}, "pad": json.loads("[" * 200 + "]" * 200)}
    assert parse_error_body(_json(body)) == PE(message="deep", type="t", format="openai")


# --- size bounds --------------------------------------------------------------------------------


def _fastest(body: bytes) -> tuple[ProviderError | None, float]:
    found, best = None, float("inf")
    for _ in range(3):
        start = time.perf_counter()
        found = parse_error_body(body)
        best = min(best, time.perf_counter() - start)
    return found, best


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b'{"error":{"message":"too big","pad":"' + b"a" * 10_000_000 + b'"}}',
            PE(message="too big", format="generic"),
            id="json-envelope-salvaged",
        ),
        pytest.param(b"x" * 10_000_000, PE(message="x" * 2048, format="text"), id="text"),
        pytest.param(
            b"<html><head><title>big</title></head>" + b"<p>a</p>" * 1_250_000,
            PE(message="big", format="html"),
            id="html",
        ),
        pytest.param(b"[" * 10_000_000, None, id="brackets"),
        pytest.param(b"\x00" * 10_000_000, None, id="binary"),
    ],
)
def test_ten_megabyte_body_is_read_only_at_its_head(
    body: bytes, expected: ProviderError | None
) -> None:
    found, seconds = _fastest(body)
    assert found == expected
    assert seconds < 0.05


def test_json_envelope_larger_than_max_bytes_still_parses() -> None:
    message = "m" * 10_000
    body = _json({"error": {"message": message, "type": "t", "code": "c" * 5_000}})
    assert 2048 < len(body) < JSON_SCAN_MAX_BYTES
    found = parse_error_body(body, max_bytes=2048)
    assert found == PE(
        message="m" * MESSAGE_MAX_BYTES, type="t", code="c" * LABEL_MAX_BYTES, format="openai"
    )


def test_broken_json_object_gives_its_message() -> None:
    found = parse_error_body(b'{"error": {"message": "cut short", "type": "t"')
    assert found == PE(message="cut short", format="generic")


def test_salvaged_message_from_a_cut_envelope_unescapes() -> None:
    body = b'{"error":{"message":"caf\\u00e9 \\"quoted\\"","pad":"' + b"a" * JSON_SCAN_MAX_BYTES
    assert parse_error_body(body) == PE(message='caf\u00e9 "quoted"', format="generic")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=4096), st.text(max_size=4096)))
def test_never_raises_and_stays_bounded(body: bytes | str) -> None:
    found = parse_error_body(body, "application/json", {"X-Bkapi-Error-Code": "1"})
    assert found is None or isinstance(found, ProviderError)
    if found is not None:
        assert len(found.message) <= MESSAGE_MAX_BYTES
        assert len(found.type) <= LABEL_MAX_BYTES and len(found.code) <= LABEL_MAX_BYTES


ENVELOPE_KEYS = [
    "error",
    "message",
    "type",
    "code",
    "detail",
    "errors",
    "status",
    "title",
    "__type",
]


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(ENVELOPE_KEYS),
                children,
                max_size=5,
            )
        ),
        max_leaves=20,
    )
)
def test_never_raises_on_arbitrary_json(data: object) -> None:
    found = parse_error_body(json.dumps(data))
    assert found is None or isinstance(found, ProviderError)


def test_module_imports_no_http_client() -> None:
    tree = ast.parse(Path(upstream_ops.envelopes.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"httpx", "httpcore", "requests", "urllib3"}


# --- reading headers once, and telling binary from text ---------------------------------------------

#: Header names that the envelopes and the classifier ask for, in several spellings.
_ASKED = (
    "content-type",
    "retry-after",
    "retry-after-ms",
    "x-request-id",
    "x-should-retry",
    "x-amzn-errortype",
    "x-bkapi-error-code",
)
_SPELLINGS = st.sampled_from(
    [spelling for name in _ASKED for spelling in (name, name.upper(), name.title())]
    + ["x-other", "X-Other"]
)
_VALUES = st.one_of(st.text(max_size=8), st.binary(max_size=8), st.none(), st.integers(-5, 5))


def _lower_case_headers(headers: object) -> dict[str, str]:
    from upstream_ops.envelopes import _LowerCaseHeaders

    return _LowerCaseHeaders.of(headers)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_SPELLINGS, _VALUES), max_size=6))
def test_headers_read_once_answer_every_lookup_as_the_headers_do(
    pairs: list[tuple[str, object]],
) -> None:
    from upstream_ops.envelopes import _header

    plain = dict(pairs)
    readable = _lower_case_headers(plain)
    for name in _ASKED:
        assert _header(readable, name) == _header(plain, name), name  # type: ignore[arg-type]
    text_pairs = [
        (k, v) for k, v in pairs if isinstance(v, str) and v.isascii() and v.isprintable()
    ]
    repeated = HTTPHeaderDict()  # urllib3's: items() gives a repeated name once a value
    for key, value in text_pairs:
        repeated.add(key, value)
    for mapping in (httpx.Headers(text_pairs), CaseInsensitiveDict(dict(text_pairs)), repeated):
        readable = _lower_case_headers(mapping)
        for name in _ASKED:
            assert _header(readable, name) == _header(mapping, name), (type(mapping), name)


@pytest.mark.parametrize("kind", ["httpx", "urllib3"])
def test_headers_read_once_join_a_repeated_header_as_a_lookup_does(kind: str) -> None:
    from upstream_ops.envelopes import _header

    pairs = [("X-Request-Id", "a"), ("x-request-id", "b"), ("Retry-After", "2")]
    headers: httpx.Headers | HTTPHeaderDict = httpx.Headers(pairs)
    if kind == "urllib3":
        headers = HTTPHeaderDict()
        for key, value in pairs:
            headers.add(key, value)
    readable = _lower_case_headers(headers)
    assert readable == {"x-request-id": "a, b", "retry-after": "2"}
    assert _header(readable, "x-request-id") == headers["x-request-id"] == "a, b"
    assert _header(readable, "x-missing") == ""


def test_headers_read_once_take_the_lower_case_spelling_first_as_a_lookup_does() -> None:
    readable = _lower_case_headers({"Retry-After": "1", "retry-after": "2", b"X-Id": b"\xe9"})
    assert readable == {"retry-after": "2", "b'x-id'": "\xe9"}
    assert _lower_case_headers({"RETRY-AFTER": 3, "Retry-After": "4", "x": None}) == {
        "retry-after": "3"
    }


def _looks_binary_by_definition(text: str) -> bool:
    sample = text[:1024]
    bad = sum(1 for ch in sample if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r\f\v"))
    return "\x00" in sample or bad * 10 > len(sample)


@settings(max_examples=500, deadline=None)
@given(
    st.text(
        st.one_of(
            st.characters(max_codepoint=0x7F),
            st.sampled_from(["\ufffd", "\u00e9", "\u2028", "\x0b", "\x0c", "\x1f", "\x7f"]),
        ),
        max_size=1500,
    )
)
def test_binary_text_is_told_by_its_definition(text: str) -> None:
    from upstream_ops.envelopes import _looks_binary

    assert _looks_binary(text) == _looks_binary_by_definition(text)


@pytest.mark.parametrize(
    ("text", "binary"),
    [
        ("a" * 90 + "\x01" * 10, False),  # one in ten: still text
        ("a" * 89 + "\x01" * 11, True),
        ("a" * 89 + "\ufffd" * 11, True),  # not ASCII: counted the other way
        ("\u00e9" * 89 + "\x01" * 10 + "\ufffd", True),
        ("\t\n\r\x0b\x0c" * 20, False),  # whitespace controls are text
        ("\x7f" * 50, False),  # DEL is not counted
        ("a" * 1024 + "\x01" * 500, False),  # only the first 1,024 characters are looked at
    ],
)
def test_binary_text_at_the_edges(text: str, binary: bool) -> None:
    from upstream_ops.envelopes import _looks_binary

    assert _looks_binary(text) is binary
