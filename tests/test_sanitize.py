"""The sanitizer: every redaction rule, control characters, byte limits, and properties over random text.

Every test runs twice: with the C extension's key/value pass (``upstream_ops._speedups``, where it was
built) and with the patterns alone, which is what an install without a C compiler runs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from upstream_ops import sanitize as sanitize_module
from upstream_ops._sanitize_rules import _ALSO_REQUIRED, _REQUIRED_LITERAL, _VALUE
from upstream_ops.defaults import (
    DETAIL_MAX_BYTES,
    LABEL_MAX_BYTES,
    MESSAGE_MAX_BYTES,
    URL_MAX_BYTES,
)
from upstream_ops.sanitize import (
    BLOCK_RULES,
    REDACTED,
    SECRET_HEADERS,
    SECRET_KEY_SEGMENTS,
    SECRET_KEY_SUFFIXES,
    TOKEN_RULES,
    Sanitizer,
    get_default_sanitizer,
    sanitize_detail,
    sanitize_headers,
    sanitize_label,
    sanitize_message,
    sanitize_url,
    set_default_sanitizer,
)


@pytest.fixture(scope="module", autouse=True, params=["c-extension", "patterns-only"])
def sanitizer_build(request: pytest.FixtureRequest) -> Iterator[str]:
    """The sanitizers of this module's tests, the default one included, built with or without the C
    extension (module-scoped, so that hypothesis's tests share it)."""
    if request.param == "c-extension":
        if None in (
            sanitize_module._KeyModes,
            sanitize_module._token_anchors,
            sanitize_module._c_redact_values,
            sanitize_module._c_has_controls,
        ):
            pytest.skip("upstream_ops._speedups was not built (no C compiler at install)")
        yield request.param
        return
    default = get_default_sanitizer()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sanitize_module, "_KeyModes", None)
        patch.setattr(sanitize_module, "_token_anchors", None)
        patch.setattr(sanitize_module, "_c_redact_values", None)
        patch.setattr(sanitize_module, "_c_has_controls", None)
        set_default_sanitizer(Sanitizer())
        assert get_default_sanitizer()._key_table is None
        try:
            yield request.param
        finally:
            set_default_sanitizer(default)


SK = "sk-proj-Xy7Qw2Er9Ty4Ui1Op6As3Df8Gh5Jk0Lz"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PEM_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"

# (text, secrets that must be gone, context that must stay)
REDACTION_CASES = [
    # Authorization credentials
    (
        "Authorization: Bearer abc.DEF-123_x~y",
        ["abc.DEF-123_x~y"],
        ["Authorization: Bearer [REDACTED]"],
    ),
    ("authorization: bearer tok123456", ["tok123456"], ["authorization: bearer [REDACTED]"]),
    (
        "Authorization: Basic dXNlcjpwYXNz\nHost: api",
        ["dXNlcjpwYXNz"],
        ["Basic [REDACTED]\nHost: api"],
    ),
    ("Authorization: Token t0ps3cr3t", ["t0ps3cr3t"], ["Authorization: Token [REDACTED]"]),
    (
        'Authorization: Digest username="u", response="6629fae4"',
        ["6629fae4", 'username="u"'],
        ["Digest"],
    ),
    ("Proxy-Authorization: Basic cHJveHk6cHc=", ["cHJveHk6cHc="], ["Proxy-Authorization: Basic"]),
    (
        '{"Authorization": "Bearer s3cr3t-t0k3n"}',
        ["s3cr3t-t0k3n"],
        ['"Authorization": "Bearer [REDACTED]"'],
    ),
    (
        "{'authorization': 'Bearer s3cr3t-t0k3n'}",
        ["s3cr3t-t0k3n"],
        ["'authorization': 'Bearer [REDACTED]'"],
    ),
    (
        "upstream said 401 for Bearer Zq8xW2cV9bN4mK7j",
        ["Zq8xW2cV9bN4mK7j"],
        ["for Bearer [REDACTED]"],
    ),
    # a secret key whose value is a scheme word, before another scheme and its credential
    (
        "token=Basic Bearer Zq8xW2cV9bN4mK7j next",
        ["Zq8xW2cV9bN4mK7j"],
        ["token=Basic [REDACTED] next"],
    ),
    (
        "Key=KEY Bearer 000000000000000000000000",
        ["000000000000000000000000"],
        ["Key=KEY [REDACTED]"],
    ),
    (
        "retry with Basic dXNlcjpwYXNzd29yZA== failed",
        ["dXNlcjpwYXNzd29yZA=="],
        ["Basic [REDACTED] failed"],
    ),
    # provider keys and tokens
    (f"invalid key {SK} given", [SK[8:]], ["invalid key sk-proj-[REDACTED] given"]),
    (
        "key sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z",
        ["Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"],
        ["sk-[REDACTED]"],
    ),
    (
        "x-api-key sk-ant-api03-Zx9_Yw8-Vu7Ts6Rq5Po4Nm3Lk2",
        ["Zx9_Yw8-Vu7Ts6Rq5Po4Nm3Lk2"],
        ["sk-ant-api03-"],
    ),
    (
        "stripe sk_live_51HxQ2bC3dE4fG5hI6jK7lM8n",
        ["51HxQ2bC3dE4fG5hI6jK7lM8n"],
        ["sk_live_[REDACTED]"],
    ),
    ("aws AKIAIOSFODNN7EXAMPLE used", ["IOSFODNN7EXAMPLE"], ["aws AKIA[REDACTED] used"]),
    ("sts ASIAY34FZKBOKMUTVV7A,", ["Y34FZKBOKMUTVV7A"], ["ASIA[REDACTED],"]),
    (
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ["wJalrXUtnFEMI"],
        ["aws_secret_access_key = [REDACTED]"],
    ),
    (
        '{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG"}',
        ["wJalrXUtnFEMI"],
        ['"SecretAccessKey": "[REDACTED]"'],
    ),
    (
        "gemini AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI!",
        ["SyDdI0hCZtE6vySjMm"],
        ["gemini AIza[REDACTED]!"],
    ),
    ("vertex ya29.a0AfH6SMBx3y2Qw9_Zt-Lk8Jh7Gf6Dd5Ss4", ["a0AfH6SMBx3y2Qw9"], ["ya29.[REDACTED]"]),
    (
        "gh ghp_16C7e42F292c6912E7710c838347Ae178B4a ok",
        ["16C7e42F292c6912E7710c"],
        ["gh ghp_[REDACTED] ok"],
    ),
    ("gho_16C7e42F292c6912E7710c838347Ae178B4a", ["16C7e42F292c6912E7710c"], ["gho_[REDACTED]"]),
    ("ghs_16C7e42F292c6912E7710c838347Ae178B4a", ["16C7e42F292c6912E7710c"], ["ghs_[REDACTED]"]),
    ("ghu_16C7e42F292c6912E7710c838347Ae178B4a", ["16C7e42F292c6912E7710c"], ["ghu_[REDACTED]"]),
    ("ghr_16C7e42F292c6912E7710c838347Ae178B4a", ["16C7e42F292c6912E7710c"], ["ghr_[REDACTED]"]),
    (
        "github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyz0123",
        ["11ABCDEFG0abcdefghijkl"],
        ["github_pat_[REDACTED]"],
    ),
    (
        "slack xoxb-2631852-1234567890123-AbCdEfGhIjKl",
        ["1234567890123-AbCdEfGhIjKl"],
        ["slack xoxb-[REDACTED]"],
    ),
    ("xoxp-2631852-2631852-AbCdEfGhIjKl", ["AbCdEfGhIjKl"], ["xoxp-[REDACTED]"]),
    ("xapp-1-A0123456789-1234567890-abcdef", ["A0123456789"], ["xapp-[REDACTED]"]),
    (
        "hf hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
        ["AbCdEfGhIjKlMnOpQrStUvWxYz"],
        ["hf hf_[REDACTED]"],
    ),
    (f"jwt={JWT}", [JWT, JWT.split(".")[2]], ["jwt=[REDACTED]"]),
    (f"token {JWT} expired", [JWT.split(".")[1], JWT.split(".")[2]], ["expired"]),
    # PEM private keys, whole block
    (
        f"key:\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----\nafter",
        [PEM_BODY, "END RSA"],
        ["-----BEGIN RSA PRIVATE KEY-----[REDACTED]\nafter"],
    ),
    (
        f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\ncut off here",
        [PEM_BODY, "cut off"],
        ["BEGIN PRIVATE KEY"],
    ),
    (
        f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY}\n-----END OPENSSH PRIVATE KEY----- ok",
        [PEM_BODY],
        ["-----BEGIN OPENSSH PRIVATE KEY-----[REDACTED] ok"],
    ),
    (
        f"-----BEGIN PGP PRIVATE KEY BLOCK-----\n{PEM_BODY}\n-----END PGP PRIVATE KEY BLOCK-----",
        [PEM_BODY],
        ["PGP PRIVATE KEY BLOCK"],
    ),
    (
        json.dumps(
            {
                "type": "service_account",
                "private_key": f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----\n",
            }
        ),
        [PEM_BODY],
        ['"type": "service_account"', '"private_key": "[REDACTED]"'],
    ),
    # URL userinfo
    (
        "GET https://user:hunter2@api.example.com/v1 failed",
        ["hunter2", "user:"],
        ["https://[REDACTED]@api.example.com/v1"],
    ),
    ("postgres://app:p@ss@db:5432/x", ["p@ss", "app:"], ["postgres://[REDACTED]@db:5432/x"]),
    ("clone https://x-access-token:ghs_abc@github.com/o/r", ["ghs_abc"], ["@github.com/o/r"]),
    # key=value in query strings, form bodies, logs
    (
        "url=https://api.example.com/v1?api_key=abc123&max_tokens=5",
        ["abc123"],
        ["?api_key=[REDACTED]&max_tokens=5"],
    ),
    (
        "username=bob&password=hunter2&grant_type=password",
        ["hunter2"],
        ["username=bob", "&grant_type=password"],
    ),
    ("retry token=abc123def after 502", ["abc123def"], ["retry token=[REDACTED] after 502"]),
    ("client_secret: xyz789 (expired)", ["xyz789"], ["client_secret: [REDACTED] (expired)"]),
    ("bk_app_secret=s3cr3t; bk_app_code=app", ["s3cr3t"], ["bk_app_code=app"]),
    (
        "clientSecret=Abc apiKey=Def sessionId=Ghi",
        ["Abc", "Def", "Ghi"],
        ["clientSecret=[REDACTED]"],
    ),
    (
        "X-Amz-Signature=fe5f80f77d5fa3beca038a248ff027d0&X-Amz-Date=20240101",
        ["fe5f80f77d"],
        ["X-Amz-Date=20240101"],
    ),
    ("sv=2022&sig=Zm9vYmFy%2Bbaz%3D&se=2030", ["Zm9vYmFy"], ["sv=2022", "&se=2030"]),
    ("next=/cb%3Fapi_key%3Dabc123 done", ["abc123"], ["done"]),
    ("user[password]=hunter2&user[name]=bob", ["hunter2"], ["user[name]=bob"]),
    ("--password=hunter2 --verbose", ["hunter2"], ["--verbose"]),
    ('"key" => "hunter2"', ["hunter2"], ['"key" => "[REDACTED]"']),
    ("PGPASSWORD=hunter2 psql", ["hunter2"], ["PGPASSWORD=[REDACTED] psql"]),
    # headers as text
    (
        "X-Api-Key: abc123\nContent-Type: application/json",
        ["abc123"],
        ["X-Api-Key: [REDACTED]\nContent-Type"],
    ),
    (
        "Cookie: session=abc123; theme=dark\nAccept: */*",
        ["abc123", "dark"],
        ["Cookie: [REDACTED]\nAccept: */*"],
    ),
    ("Set-Cookie: sid=abc123; Path=/; HttpOnly", ["abc123"], ["Set-Cookie: [REDACTED]"]),
    ("x-goog-api-key: AIza-not-really", ["not-really"], ["x-goog-api-key: [REDACTED]"]),
    # JSON and Python repr
    (
        '{"password": "hu\\"nt\\\\er2", "user": "bob"}',
        ['hu\\"nt', "er2"],
        ['"password": "[REDACTED]"', '"user": "bob"'],
    ),
    ('{"pin_password": 123456, "n": 1}', ["123456"], ['"pin_password": [REDACTED], "n": 1']),
    (
        '{"api_key": null, "token": "", "secret": true}',
        [],
        ['"api_key": null', '"token": ""', '"secret": true'],
    ),
    ('{\n  "access_token":\n    "abc123"\n}', ["abc123"], ['"access_token":\n    "[REDACTED]"']),
    (
        "{'password': 'x y z', 'user': 'bob'}",
        ["x y z"],
        ["'password': '[REDACTED]'", "'user': 'bob'"],
    ),
    ("{'secret': b'raw-bytes'}", ["raw-bytes"], ["'secret': b'[REDACTED]'"]),
    ("{'secret': b\"it's\"}", ["it's"], ["'secret': b\"[REDACTED]\"}"]),
    ("Credentials(token='abc123', expiry=None)", ["abc123"], ["expiry=None"]),
    ('{"api_keys": ["k-111", "k-222"], "ok": 1}', ["k-111", "k-222"], ['"ok": 1']),
    ('{"credentials": {"user": "a", "value": "hunter2"}, "ok": 1}', ["hunter2"], ['"ok": 1']),
    ('{"auth": {"nested": {"password": "hunter2"}}}', ["hunter2"], ['"password": "[REDACTED]"']),
    (
        '"detail": "{\\"api_key\\": \\"abc\\\\\\"123\\", \\"model\\": \\"gpt\\"}"',
        ["abc", "123"],
        ['\\"model\\": \\"gpt\\"'],
    ),
    ('{"password": "unterminated and cut', ["unterminated", "cut"], ['{"password": "[REDACTED]']),
    # URL-encoded pairs: each key ends at the encoded separator before it
    ("body=password%3Dhunter2%26user%3Dbob", ["hunter2"], ["body=password%3D[REDACTED]"]),
    (
        "grant_type%3Dpassword%26username%3Dbob%26password%3Dhunter2",
        ["hunter2"],
        ["grant_type%3Dpassword%26username%3Dbob%26password%3D[REDACTED]"],
    ),
    ('"X-Auth-Token%3dabc123def"%3a%25', ["abc123def"], ['"X-Auth-Token%3d[REDACTED]"']),
]


@pytest.mark.parametrize(("text", "secrets", "kept"), REDACTION_CASES)
def test_secret_is_redacted_and_context_kept(
    text: str, secrets: list[str], kept: list[str]
) -> None:
    out = sanitize_message(text)
    for secret in secrets:
        assert secret not in out, out
    for context in kept:
        assert context in out, out


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens=100",
        '{"max_tokens": 100, "input_tokens": 12, "output_tokens": 34, "total_tokens": 46}',
        '{"usage": {"prompt_tokens": 10, "completion_tokens": 20, "cache_read_input_tokens": 5}}',
        "max_completion_tokens: 512, tokens: 3, token_count=7, num_tokens=9",
        "x-ratelimit-remaining-tokens: 29000\nx-ratelimit-limit-tokens: 30000",
        '{"token_type": "Bearer", "expires_in": 3600}',
        "Rate limit reached on tokens per min (TPM): Limit 30000, Used 29000",
        "Bearer authentication failed: invalid scheme",
        "The Basic Authentication header is missing",
        "passage=3 keyboard=us monkey=1 compass=north bypass=yes",
        "risk-management-framework-approach-document-v2",
        "model=gpt-4o route=/v1/chat/completions status=502",
        "upstream returned 502 at 12:30:01 via https://api.example.com/v1/models",
        "",
    ],
)
def test_text_without_secrets_is_unchanged(text: str) -> None:
    assert sanitize_message(text) == text


SECRET_KEYS = [
    "api_key", "apiKey", "APIKEY", "apikey", "API_KEY", "x-api-key", "X-Api-Key", "api-key", "token",
    "access_token", "accessToken", "refresh_token", "id_token", "csrf_token", "x-xsrf-token",
    "client_secret", "clientSecret", "bk_app_secret", "password", "passwd", "pwd", "PGPASSWORD",
    "db_pass", "aws_secret_access_key", "AWS_SESSION_TOKEN", "X-Amz-Signature", "X-Amz-Security-Token",
    "sig", "signature", "credentials", "session", "sessionId", "session_id", "JSESSIONID",
    "PHPSESSID", "auth", "Authorization", "Proxy-Authorization", "X-Bkapi-Authorization", "cookie",
    "Set-Cookie", "private_key", "privateKey", "jwt", "bearer", "otp", "key", "key_id", "AccessKeyId",
    "user[password]", "X-Goog-Api-Key", "secretKey", "OAuth2Token", "passphrase",
]  # fmt: skip
PLAIN_KEYS = [
    "max_tokens", "input_tokens", "output_tokens", "total_tokens", "prompt_tokens",
    "completion_tokens", "max_completion_tokens", "cache_read_input_tokens", "maxTokens", "tokens",
    "token_count", "max_token", "token_type", "key_type", "password_length", "secret_name",
    "token_url", "passage", "keyboard", "monkey", "compass", "bypass", "model", "messages",
    "x-ratelimit-remaining-tokens", "X-Request-Id", "Content-Type", "session_timeout",
    "auth_status", "authorization_url", "", "   ", "___",
]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys(key: str) -> None:
    assert get_default_sanitizer().is_secret_key(key)
    assert sanitize_message(f"{key}=hunter2") == f"{key}=[REDACTED]"


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_keys_that_are_not_secret(key: str) -> None:
    assert not get_default_sanitizer().is_secret_key(key)


def test_is_secret_key_accepts_bytes_and_ignores_other_types() -> None:
    sanitizer = Sanitizer()
    assert sanitizer.is_secret_key(b"X-Api-Key")  # type: ignore[arg-type]
    assert not sanitizer.is_secret_key(None)  # type: ignore[arg-type]
    assert not sanitizer.is_secret_key(42)  # type: ignore[arg-type]


# --- headers -------------------------------------------------------------------------------------


def test_headers_redact_credentials_and_secret_names() -> None:
    headers = {
        "Authorization": "Bearer abc",
        "proxy-authorization": "Basic xyz",
        "Cookie": "a=1",
        "Set-Cookie": "sid=2",
        "X-Api-Key": "k",
        "Api-Key": "k",
        "X-Goog-Api-Key": "k",
        "X-Bkapi-Authorization": '{"bk_app_secret": "s"}',
        "X-Custom-Token": "t",
        "X-Client-Secret": "s",
        "Content-Type": "application/json",
        "X-Ratelimit-Remaining-Tokens": "2900",
        "Location": "https://h.example/cb?access_token=abc123&state=ok",
    }
    out = sanitize_headers(headers)
    assert list(out) == list(headers)
    for name in list(headers)[:10]:
        assert out[name] == REDACTED, name
    assert out["Content-Type"] == "application/json"
    assert out["X-Ratelimit-Remaining-Tokens"] == "2900"
    assert out["Location"] == "https://h.example/cb?access_token=[REDACTED]&state=ok"


def test_headers_accept_pairs_bytes_and_merge_repeated_names() -> None:
    pairs = [
        (b"accept", b"text/html"),
        ("Accept", "application/json"),
        (b"authorization", b"Bearer x"),
        ("AUTHORIZATION", "Bearer y"),
        ("x-note", "line\nbreak\x00"),
    ]
    out = sanitize_headers(pairs)  # type: ignore[arg-type]
    assert out == {
        "accept": "text/html, application/json",
        "authorization": REDACTED,
        "x-note": "line break",
    }


def test_headers_never_raise() -> None:
    assert sanitize_headers(None) == {}  # type: ignore[arg-type]
    assert sanitize_headers(42) == {}  # type: ignore[arg-type]
    assert sanitize_headers([("a",), 7, ("b", "c", "d"), ("ok", "1")]) == {"ok": "1"}  # type: ignore[list-item]
    assert all(v == REDACTED for k, v in sanitize_headers({h: "v" for h in SECRET_HEADERS}).items())


# --- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pass@host.example/p", "https://[REDACTED]@host.example/p"),
        (
            "https://host/v1?api_key=abc&max_tokens=5",
            "https://host/v1?api_key=[REDACTED]&max_tokens=5",
        ),
        ("https://host/?key=AIzaSy&alt=sse", "https://host/?key=[REDACTED]&alt=sse"),
        ("https://host/?api%5Fkey=a%2Cb;c&x=1", "https://host/?api%5Fkey=[REDACTED]&x=1"),
        (
            "https://host/?X-Amz-Signature=ff&X-Amz-Credential=AKIA%2F",
            "https://host/?X-Amz-Signature=[REDACTED]&X-Amz-Credential=[REDACTED]",
        ),
        (
            "https://host/cb#access_token=abc&token_type=bearer",
            "https://host/cb#access_token=[REDACTED]&token_type=bearer",
        ),
        (
            "https://host/?redirect=https%3A%2F%2Fx%2F%3Ftoken%3Dabc",
            "https://host/?redirect=https%3A%2F%2Fx%2F%3Ftoken%3D[REDACTED]",
        ),
        (
            "https://host/v1/keys/sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z/x",
            "https://host/v1/keys/sk-[REDACTED]/x",
        ),
        ("  https://host/a\tb\nc  ", "https://host/abc"),
        ("http://[::1", "http://[::1"),
        ("not a url at all", "not a url at all"),
        ("", ""),
        (None, ""),
    ],
)
def test_url(url: str | None, expected: str) -> None:
    assert sanitize_url(url) == expected


def test_url_is_bounded() -> None:
    out = sanitize_url("https://host/?q=" + "a" * 10_000 + "&token=abc")
    assert len(out.encode()) <= URL_MAX_BYTES
    assert "truncated" in out
    assert sanitize_url(b"https://u:p@h/") == "https://[REDACTED]@h/"  # type: ignore[arg-type]


# --- control characters, bytes, coercion ---------------------------------------------------------


def test_control_characters() -> None:
    raw = "a\x00b\x07c\td\ne\r\nf\x1bg\x7fh\x85i\x9fj\u202ek\u2066l\ufeffm"
    assert sanitize_message(raw) == "abc\td\ne\nfghijkl\ufeffm"
    assert sanitize_label(raw) == "abc d e fghijkl\ufeffm"
    assert sanitize_label("  model\n") == "model"


def test_lone_surrogates_become_replacement_characters() -> None:
    out = sanitize_message("a\ud800b\udfffc" + "é" * 10)
    assert out == "a\ufffdb\ufffdc" + "é" * 10
    out.encode("utf-8")


def test_bytes_and_invalid_utf8() -> None:
    assert (
        sanitize_message(b"caf\xc3\xa9 \xff\xfe password=hunter2")
        == "café \ufffd\ufffd password=[REDACTED]"
    )
    assert sanitize_message(bytearray(b"token=abc")) == "token=[REDACTED]"  # type: ignore[arg-type]
    assert sanitize_message(memoryview(b"ok")) == "ok"  # type: ignore[arg-type]


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


class _Secretive:
    def __str__(self) -> str:
        return "password=hunter2"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        (42, "42"),
        (_Unprintable(), ""),
        (_Secretive(), "password=[REDACTED]"),
        ("  x  ", "x"),
    ],
)
def test_any_object_is_accepted(value: object, expected: str) -> None:
    assert sanitize_message(value) == expected  # type: ignore[arg-type]
    assert sanitize_label(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("max_bytes", [None, "10", -1, 0])
def test_bad_limits_never_raise(max_bytes: object) -> None:
    assert sanitize_message("hello", max_bytes) in ("", REDACTED)  # type: ignore[arg-type]


# --- truncation ----------------------------------------------------------------------------------


def test_truncation_marker_and_byte_bound() -> None:
    text = "x" * 5000
    out = sanitize_message(text)
    assert len(out.encode()) <= MESSAGE_MAX_BYTES
    head, marker = out.split("…")
    assert marker == f"[truncated {5000 - len(head)} bytes]"
    assert len(sanitize_detail("y" * 20_000).encode()) <= DETAIL_MAX_BYTES
    assert len(sanitize_label("z" * 600).encode()) <= LABEL_MAX_BYTES


def test_text_at_the_limit_is_not_cut() -> None:
    assert sanitize_message("a" * MESSAGE_MAX_BYTES) == "a" * MESSAGE_MAX_BYTES
    assert sanitize_message("é" * (MESSAGE_MAX_BYTES // 2)) == "é" * (MESSAGE_MAX_BYTES // 2)


@pytest.mark.parametrize("char", ["é", "中", "😀", "a"])
@pytest.mark.parametrize("max_bytes", [60, 61, 62, 63, 100, 101, 102, 103])
def test_cut_never_splits_a_code_point(char: str, max_bytes: int) -> None:
    out = sanitize_message(char * 200, max_bytes)
    data = out.encode("utf-8")
    assert len(data) <= max_bytes
    assert out.startswith(char) and "truncated" in out
    assert set(out.split("…")[0]) == {char}


@pytest.mark.parametrize("max_bytes", [0, 1, 2, 3, 5, 10, 20])
def test_tiny_limits_just_cut(max_bytes: int) -> None:
    out = sanitize_message("é" * 100, max_bytes)
    assert len(out.encode()) <= max_bytes
    assert out == "é" * (max_bytes // 2)


def test_redaction_happens_before_truncation() -> None:
    body = "Zq8xW2cV9bN4mK7jZq8xW2cV9bN4mK7j"
    for pad in range(MESSAGE_MAX_BYTES - 60, MESSAGE_MAX_BYTES + 5):
        out = sanitize_message("x" * pad + " sk-" + body + " tail")
        assert body[:6] not in out
        assert len(out.encode()) <= MESSAGE_MAX_BYTES


def test_huge_input_is_cut_before_the_scan_without_leaking_a_half_secret() -> None:
    body = "Zq8xW2cV9bN4mK7j" * 60  # each token redacts to 13 characters from 963
    text = " ".join(f"sk-{body}" for _ in range(2500))  # 2.4 MB
    out = sanitize_message(text, max_bytes=20_000)
    assert len(out.encode()) <= 20_000
    assert "truncated" in out
    assert "Zq8x" not in out
    assert sanitize_message(b"password=" + b"a" * 3_000_000).startswith(
        "password=[REDACTED]…[truncated"
    )
    assert sanitize_message('{"token": "' + "a" * 3_000_000).startswith('{"token": "[REDACTED]…')


# --- the Sanitizer and the default instance ------------------------------------------------------


@pytest.fixture
def restore_default() -> Iterator[None]:
    default = get_default_sanitizer()
    yield
    set_default_sanitizer(default)


def test_sanitizer_extensions(restore_default: None) -> None:
    sanitizer = Sanitizer(
        extra_patterns=[r"internal-[0-9]{4}", re.compile("CORP-[A-Z]+")],
        extra_secret_keys=["tenant", "customer_ref"],
        keep_keys=["idempotency_key"],
    )
    text = (
        "id internal-1234 CORP-XYZ tenant=acme customer_ref=9 customer=1 ref=2 idempotency_key=k1"
    )
    assert sanitizer.message(text) == (
        "id [REDACTED] [REDACTED] tenant=[REDACTED] customer_ref=[REDACTED] customer=1 ref=2"
        " idempotency_key=k1"
    )
    assert sanitizer.headers({"Idempotency-Key": "k1", "X-Tenant": "acme"}) == {
        "Idempotency-Key": "k1",
        "X-Tenant": REDACTED,
    }
    assert sanitize_message("tenant=acme") == "tenant=acme"
    set_default_sanitizer(sanitizer)
    assert get_default_sanitizer() is sanitizer
    assert sanitize_message("tenant=acme") == "tenant=[REDACTED]"
    assert sanitize_url("https://h/?tenant=acme") == "https://h/?tenant=[REDACTED]"


def test_set_default_sanitizer_rejects_other_objects() -> None:
    with pytest.raises(TypeError):
        set_default_sanitizer(object())  # type: ignore[arg-type]


def test_rule_tables_are_data() -> None:
    names = [rule.name for rule in (*BLOCK_RULES, *TOKEN_RULES)]
    assert len(names) == len(set(names))
    for rule in (*BLOCK_RULES, *TOKEN_RULES):
        assert len(rule.gate) == 1 and "keep" in rule.pattern.groupindex
    assert all(name == name.lower() for name in SECRET_HEADERS)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        # the quote that closes the first value opens the second
        ("Key=\" {'password': \"00000000000'\"} ", "00000000000'"),
        ('secret={"password": "a}b c"} tail', "b c"),  # a quoted "}" ends the flat value
    ],
)
def test_a_value_reaching_past_the_redacted_value_it_starts_in_is_redacted(
    text: str, secret: str
) -> None:
    assert secret not in sanitize_message(text)


# --- properties ----------------------------------------------------------------------------------

SECRET_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
secret_values = st.text(SECRET_ALPHABET, min_size=24, max_size=60)
quoted_secret_values = st.text(SECRET_ALPHABET + " !#$%&()*+,-./:;<=>?@[]^_`{|}~\"'\\", min_size=12)
FRAGMENTS = [
    '"', "'", "\\", "=", ":", "{", "}", "[", "]", "(", ")", "&", ";", ",", " ", "\n", "\t", "@",
    "://", "%3D", "=>", "key", "token", "max_tokens", "model", "Bearer", "Basic", "Authorization",
    "-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----", "sk-", "eyJ", "AKIA", "null", "é",
]  # fmt: skip
contexts = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
)

SHAPES = [
    "api_key={}", "password: {}", "token = {}", "?access_token={}&max_tokens=5", "client_secret:{}",
    "Authorization: Bearer {}", "Authorization: Basic {}", "Bearer {}", "Cookie: session={}",
    "X-Api-Key: {}", "https://user:{}@host.example/", "sk-proj-{}", "sk-{}", "AIza{0}{0}", "ghp_{}",
    "github_pat_{}", "xoxb-{}", "ya29.{}", "hf_{}", "eyJ{0}.{0}.{0}", "eyJhbGciOiJIUzI1NiJ9.eyJ{}.x",
    "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----\n{}",
]  # fmt: skip


def _plant(context: str, position: int, shape: str) -> str:
    position = min(position, len(context))
    return f"{context[:position]} {shape} {context[position:]}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    context=contexts,
    plants=st.lists(
        st.tuples(st.integers(0, 300), st.sampled_from(SHAPES), secret_values),
        min_size=1,
        max_size=3,
    ),
)
def test_planted_secrets_never_survive(context: str, plants: list[tuple[int, str, str]]) -> None:
    text, done = "", 0
    for position, shape, secret in sorted(plants):  # into the context, never into another shape
        assume(secret not in context)
        cut = max(done, min(position, len(context)))
        text += f"{context[done:cut]} {shape.format(secret)} "
        done = cut
    text += context[done:]
    out = sanitize_message(text, max_bytes=4096)
    for _, _, secret in plants:
        assert secret not in out
    assert len(out.encode("utf-8")) <= 4096


@settings(max_examples=200, deadline=None)
@given(
    context=contexts,
    position=st.integers(0, 300),
    key=st.sampled_from(["password", "api_key", "clientSecret", "X-Auth-Token", "secret"]),
    quote=st.sampled_from(["json", "python"]),
    secret=quoted_secret_values,
)
def test_planted_quoted_secret_never_survives(
    context: str, position: int, key: str, quote: str, secret: str
) -> None:
    pair = json.dumps({key: secret}) if quote == "json" else repr({key: secret})
    encoded = pair[pair.index(":") + 3 : -2]  # the value as written, escapes included
    assume(len(encoded) >= 12 and encoded not in context)
    out = sanitize_message(_plant(context, position, pair))
    assert encoded not in out
    assert len(out.encode("utf-8")) <= MESSAGE_MAX_BYTES


def test_every_shape_rule_has_a_planted_shape() -> None:
    # The planted-secret properties above cover a rule only if one of SHAPES is a match of it.
    secret = "A1b2C3d4E5f6G7h8J9k0L1m2N3p4"
    for rule in (*BLOCK_RULES, *TOKEN_RULES):
        assert any(rule.pattern.search(shape.format(secret)) for shape in SHAPES), rule.name


#: Every word that makes a key secret, spelled as keys are written, in every pair syntax the pair
#: rules read. Each spelling splits into segments of which one is the word.
SECRET_WORDS = sorted(SECRET_KEY_SEGMENTS | set(SECRET_KEY_SUFFIXES))
KEY_SPELLINGS = [
    str,
    str.upper,
    "x_{}".format,
    lambda w: f"X-{w.capitalize()}",
    lambda w: f"my{w.capitalize()}",
]
PAIR_SYNTAXES = [
    "{k}={v}", "{k}: {v}", "{k} => {v}", '"{k}": "{v}"', "'{k}': '{v}'", '\\"{k}\\": \\"{v}\\"',
    "{k}%3D{v}", "{k}%3a{v}",
]  # fmt: skip
# Characters that case mapping treats specially: "İ" lowers to two characters, the Kelvin sign to an
# ASCII "k"; the long s, capital sharp s and the ffi ligature fold to ASCII-looking letters. Next to
# a key they neither hide nor fake it.
SPECIAL_CASE_CHARACTERS = ["\u0130", "\u212a", "\u017f", "\u1e9e", "\ufb03"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    word=st.sampled_from(SECRET_WORDS),
    spelling=st.sampled_from(KEY_SPELLINGS),
    syntax=st.sampled_from(PAIR_SYNTAXES),
    secret=secret_values,
    context=st.one_of(
        contexts,
        st.lists(st.sampled_from(FRAGMENTS + SPECIAL_CASE_CHARACTERS), max_size=40).map("".join),
    ),
    position=st.integers(0, 300),
)
def test_every_secret_key_value_is_redacted_wherever_it_appears(
    word: str, spelling: Callable[[str], str], syntax: str, secret: str, context: str, position: int
) -> None:
    key = spelling(word)
    assert get_default_sanitizer().is_secret_key(key), key
    pair = syntax.format(k=key, v=secret)
    alone = sanitize_message(pair)
    assert secret not in alone
    assert key in alone  # the key stays: it says which secret was there
    assume(secret not in context)
    assert secret not in sanitize_message(_plant(context, position, pair), 4096)


form_keys = st.sampled_from(["user", "grant_type", "scope", "max_tokens", "model", "redirect_uri"])


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(st.tuples(form_keys, st.text(SECRET_ALPHABET + " :/=&%", max_size=12))),
    after=st.lists(st.tuples(form_keys, st.text(SECRET_ALPHABET + " :/=&%", max_size=12))),
    key=st.sampled_from(["password", "client_secret", "access_token", "api_key"]),
    secret=secret_values,
    encoded=st.booleans(),
)
def test_secret_in_a_url_encoded_form_never_survives(
    before: list[tuple[str, str]],
    after: list[tuple[str, str]],
    key: str,
    secret: str,
    encoded: bool,
) -> None:
    # A form body as logged: raw, or URL-encoded (a value in another form or a query).
    body = urlencode([*before, (key, secret), *after])
    if encoded:
        body = quote(body, safe="")
    assume(body.count(secret) == 1)
    assert secret not in sanitize_message(f"request body: {body}", 8192)


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(st.text(st.characters(exclude_categories=())), contexts),  # lone surrogates too
    max_bytes=st.integers(-2, 3000),
)
def test_any_text_gives_bounded_valid_utf8(text: str, max_bytes: int) -> None:
    for sanitize in (sanitize_message, sanitize_detail, sanitize_label):
        out = sanitize(text, max_bytes)
        assert len(out.encode("utf-8")) <= max(max_bytes, 0)  # encodes: no lone surrogate left
    url = sanitize_url(text)
    assert len(url.encode("utf-8")) <= URL_MAX_BYTES
    assert all(isinstance(v, str) for v in sanitize_headers({text: text}).values())


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), max_bytes=st.integers(0, 3000))
def test_any_bytes_give_bounded_valid_utf8(data: bytes, max_bytes: int) -> None:
    out = sanitize_message(data, max_bytes)
    assert len(out.encode("utf-8")) <= max_bytes
    assert isinstance(sanitize_url(data), str)  # type: ignore[arg-type]
    assert isinstance(sanitize_headers([(data, data)]), dict)  # type: ignore[list-item]


# The quoted values are read with unrolled loops (a run of plain characters, then escape-and-run
# pairs), which the engine runs without a group per character. They must match exactly what the
# plain per-character definitions match.
_PER_CHARACTER_VALUES = re.compile(
    r"""
    (?P<dq>[bBrRuU]?")(?:[^"\\\n]|\\.)*+"?
  | (?P<eq>\\")(?:[^"\\\n]|\\\\(?:\\.|[^"\\\n])|\\[^"\\\n])*+(?:\\")?
  | (?P<sq>[bBrRuU]?')(?:[^'\\\n]|\\.)*+'?
    """,
    re.VERBOSE | re.DOTALL,
)


@settings(max_examples=500, deadline=None)
@given(value=st.text(st.sampled_from("\"'\\\nab \t=:x"), max_size=40))
def test_quoted_values_match_their_per_character_definition(value: str) -> None:
    for opening in ('"', '\\"', "'", "b'", 'u"'):
        text = f"password: {opening}{value}"
        expected = _PER_CHARACTER_VALUES.match(text, len("password: "))
        found = _VALUE.match(text, len("password:"))
        assert expected is not None and found is not None
        assert found.end() == expected.end()


@settings(max_examples=200, deadline=None)
@given(text=contexts)
def test_cached_key_modes_give_what_fresh_ones_give(text: str) -> None:
    warm = Sanitizer()
    first = warm.message(text, 4096)
    assert warm.message(text, 4096) == first  # every key now from the cache
    assert Sanitizer().message(text, 4096) == first


@settings(max_examples=300, deadline=None)
@given(
    context=contexts,
    plants=st.lists(st.tuples(st.sampled_from(SHAPES), secret_values), max_size=3),
)
def test_rules_are_skipped_only_when_they_cannot_match(
    context: str, plants: list[tuple[str, str]]
) -> None:
    # A rule runs only when its gate, the characters of _ALSO_REQUIRED and its _REQUIRED_LITERAL are
    # all in the text: every match, with what its lookbehinds and lookaheads read around it, must
    # contain them (the literal at the match's start).
    names = {rule.name for rule in (*BLOCK_RULES, *TOKEN_RULES)}
    assert set(_ALSO_REQUIRED) <= names and set(_REQUIRED_LITERAL) <= names
    text = context + " ".join(shape.format(secret) for shape, secret in plants)
    for rule in (*BLOCK_RULES, *TOKEN_RULES):
        for match in rule.pattern.finditer(text):
            seen = text[max(0, match.start() - 8) : match.end() + 1]
            assert set(rule.gate + _ALSO_REQUIRED.get(rule.name, "")) <= set(seen), rule.name
            assert match[0].startswith(_REQUIRED_LITERAL.get(rule.name, "")), rule.name


@pytest.mark.parametrize(
    "text",
    [
        "----BEGIN PRIVATE KEY----",  # the rule's characters, not its literal
        "-----BEGIN  RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----",
        "-----begin PRIVATE KEY-----\nabc",
    ],
)
def test_a_rule_whose_literal_is_missing_changes_nothing(text: str) -> None:
    assert Sanitizer().message(text, 4096) == text


# --- linear time on hostile input ----------------------------------------------------------------

MB = 1_000_000
HOSTILE = {
    "a=": "a=" * (MB // 2),
    "sk-": "sk-" * (MB // 3),
    "eyJ": "eyJ" * (MB // 3),
    "eyJ.": "eyJ." * (MB // 4),
    "BEGIN": "-----BEGIN PRIVATE KEY-----" * (MB // 27),
    "BEGIN END": "-----BEGIN PRIVATE KEY-----x-----END " * (MB // 37),
    '"key":"': '"key":"' * (MB // 7),
    "key=": "key=" * (MB // 4),
    "password: quote backslash": 'password: "' + "\\" * MB,
    "escaped quotes": '\\"token\\": \\"' + '\\\\\\"' * (MB // 4),
    "colons": ":" * MB,
    "equals": "=" * MB,
    "a": "a" * MB,
    "https://": "https://" * (MB // 8),
    "://a@": "://a:" * (MB // 5),
    "@": "@" * MB,
    "Bearer ": "Bearer " * (MB // 7),
    "Bearer x": "Bearer " + "x" * MB,
    "key=Bearer Bearer ...": "key=" + "Bearer " * (MB // 7),
    "%3D": "token%3D" * (MB // 8),
    "long encoded key": "a" * MB + "%3Dx",  # an encoded key is read back to a stop, unbounded
    "long encoded key of stop starts": "D6a" * (MB // 3) + "%3Dx",
    "encoded stops": "%26%3A" * (MB // 6),
    "brackets": "token=[" * (MB // 7),
    "braces": '"secret": {' * (MB // 11),
    "AKIA": "AKIA" * (MB // 4),
    "underscores": "ghp_" * (MB // 4),
    "xox": "xoxb-" * (MB // 5),
    "spaces": " " * MB,
    "newlines": "\n" * MB,
    "nul": "\x00" * MB,
    "accents": "é" * (MB // 2),
    "quotes": "'" * MB,
    "mixed": 'api_key: \'x\', "token": "y", Authorization: Bearer z\n' * (MB // 52),
    "keys inside a value": 'token: "' + 'password: "ab ' * (MB // 14),
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_is_linear(text: str) -> None:
    for sanitize in (sanitize_message, sanitize_detail):
        started = time.perf_counter()
        out = sanitize(text)
        assert time.perf_counter() - started < 1.0
        assert len(out.encode()) <= DETAIL_MAX_BYTES
    started = time.perf_counter()
    sanitize_url(text)
    sanitize_label(text)
    sanitize_headers([("X-Text", text)])
    assert time.perf_counter() - started < 1.0


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=600), contexts))
def test_cached_labels_and_urls_are_what_the_rules_give(text: str) -> None:
    sanitizer = Sanitizer()
    first_label, first_url = sanitizer.label(text), sanitizer.url(text)
    assert sanitizer.label(text) == first_label  # now from the cache
    assert sanitizer.url(text) == first_url
    assert first_label == Sanitizer().label(text)
    assert first_url == Sanitizer().url(text)
