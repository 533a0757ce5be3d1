"""The optional C extension (``upstream_ops._speedups``) agrees with the patterns it stands in for.

It replaces three steps of ``Sanitizer._redact``: finding the key of every key/value separator (the
patterns of ``_REVERSED_PAIRS``, run over the reversed text), reading the value after each secret key
(the ``_VALUE`` pattern, in ``_redact_values``) and telling which token rules' literals are in the
text. Each is checked against its pattern on generated text, and the whole sanitizer with the
extension against the sanitizer without it. In CI the extension must have been built.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.micro import PARAGRAPHS, SECRETS, error_text
from tests.speedups import require_extension
from upstream_ops import _sanitize_text, sanitize
from upstream_ops._sanitize_rules import _REVERSED_PAIRS
from upstream_ops.sanitize import REDACTED, TOKEN_RULES, Sanitizer, _patterns_only

try:
    from upstream_ops import _speedups
except ImportError:  # pragma: no cover - depends on the build
    _speedups = None  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def extension() -> None:
    require_extension(_speedups)


def reversed_pair_matches(text: str) -> list[tuple[int, str]]:
    """What the patterns find: (where the value starts, the separator and key reversed)."""
    size, reversed_text = len(text), text[::-1]
    found = [
        (size - match.start() + shift, match[1])
        for _, pattern, shift in _REVERSED_PAIRS
        for match in pattern.finditer(reversed_text)
    ]
    return sorted(found)


def patterns_only() -> Sanitizer:
    """A sanitizer that runs as it does without the extension."""
    return _patterns_only(Sanitizer())


# Text made of what the key patterns look at: separators, quotes, backslashes, the encoded separators
# and their look-alikes, key characters, spaces and line ends, and characters of 1, 2 and 4 bytes.
PIECES = [
    *"=:%3DdAa62 \t\r\n\"'\\[]_.-/&>xyKé€😀",
    "%3D", "%3d", "%3A", "%3a", "%26", "%3F", "://", '\\"', '\\\\"', "=>",
    "password", "api_key", "Authorization", "client_secret", "token", "max_tokens", "user",
]  # fmt: skip
pieced = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)
# Runs around the 128-character key limit and the 8-backslash quote limit.
LONG_PIECES = [
    *("k" * 60, "K" * 68, "x" * 128, "\\" * 5, "%3D"),
    *('"', "'", "=", ":", " ", "D", "3", "%"),
]
long_runs = st.lists(st.sampled_from(LONG_PIECES), max_size=14).map("".join)
texts = st.one_of(pieced, long_runs, st.text(max_size=200))
bench_texts = [
    error_text(size, secrets=secrets, shape=shape)
    for size in (200, 2048)
    for secrets in (True, False)
    for shape in PARAGRAPHS
]
many_examples = settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.parametrize("text", bench_texts)
def test_pair_matches_of_the_bench_texts(text: str) -> None:
    found = _speedups.pair_matches(text)
    assert found == reversed_pair_matches(text)
    if "{" in text or any(secret in text for secret in SECRETS):
        assert found  # the JSON shape, and every planted secret, has keys


@many_examples
@given(text=texts)
def test_pair_matches_agree_with_the_reversed_patterns(text: str) -> None:
    assert _speedups.pair_matches(text) == reversed_pair_matches(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"password": "x"}', [(12, ':"drowssap"')]),
        ("a=1 &b%3D2", [(2, "=a"), (9, "3%b")]),
        ("https://h/x", []),  # the colon of "://" is no separator
        ('\\"token\\":\\"x', [(10, ':"\\nekot"\\')]),
        ("k" * 129 + "=v", []),  # a bare key longer than 128 characters is not read as one
        ("k" * 128 + "=v", [(129, "=" + "k" * 128)]),
        ("é€😀 key=v", [(8, "=yek")]),
    ],
)
def test_pair_matches_examples(text: str, expected: list[tuple[int, str]]) -> None:
    assert _speedups.pair_matches(text) == expected == reversed_pair_matches(text)


@many_examples
@given(text=texts)
def test_secret_separators_agree_with_the_patterns(text: str) -> None:
    sanitizer = Sanitizer(extra_secret_keys=["user"], keep_keys=["client_secret"])
    expected = sanitizer._secret_separators(text)
    table = _speedups.KeyModes()
    assert table.secret_separators(text, sanitizer._reversed_modes) == expected
    assert table.secret_separators(text, sanitizer._reversed_modes) == expected  # from its slots


def test_more_keys_than_the_table_holds() -> None:
    # 5,000 distinct keys: slots are replaced on collisions and the answers stay those of the dict.
    sanitizer = Sanitizer()
    text = " ".join(f"key{i}=v password{i}=v count{i}=1" for i in range(5000))
    expected = sanitizer._secret_separators(text)
    assert len(expected) == 10_000
    table = _speedups.KeyModes()
    for _ in range(2):
        assert table.secret_separators(text, sanitizer._reversed_modes) == expected


class FailingModes(dict[str, int]):
    def __missing__(self, key: str) -> int:
        raise LookupError(key)


def test_a_failing_lookup_raises_and_the_sanitizer_falls_back() -> None:
    with pytest.raises(LookupError):
        _speedups.KeyModes().secret_separators("a=1", FailingModes())

    class Failing(Sanitizer):
        def _key_mode(self, name: object) -> int:
            raise RuntimeError("broken rule")

    assert Failing().message("token=abc") == REDACTED  # as without the extension
    with pytest.raises(TypeError):
        _speedups.pair_matches(b"a=1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.KeyModes().secret_separators("a=1")  # type: ignore[call-arg]


def test_the_anchor_bits_name_the_token_rules_in_order() -> None:
    assert tuple(rule.name for rule in TOKEN_RULES) == _speedups.TOKEN_ANCHOR_RULES
    assert sanitize._token_anchors is _speedups.token_anchors


TOKENS = [
    "Bearer abcdefgh12345678",
    "Basic dXNlcjpwYXNzd29yZA==",
    "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123",
    "sk_live_AbCdEfGhIjKlMnOpQrStUvWx",
    "AKIAABCDEFGHIJKLMNOP",
    "ASIAABCDEFGHIJKLMNOP",
    "AIzaSyA1234567890abcdefghijklmnopqrstu",
    "ya29.AbCdEfGhIjKlMnOpQrStUv",
    "ghp_AbCdEfGhIjKlMnOpQrStUvWx",
    "github_pat_AbCdEfGhIjKlMnOpQrStUvWx",
    "hf_AbCdEfGhIjKlMnOpQrStUvWx",
    "xoxb-1234567890-abcdef",
    "xapp-1-ABCDEFGHIJ",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
]
near_tokens = st.lists(
    st.one_of(
        st.sampled_from(TOKENS),
        st.sampled_from([t[:n] for t in TOKENS for n in (2, 3, 4, 5)]),  # cut short
        st.text(alphabet="BeasrkAKISzy29.ghpousrfxoabJt_-/ =:é€😀", max_size=12),
    ),
    max_size=8,
).map(" ".join)


@many_examples
@given(text=st.one_of(near_tokens, st.text(max_size=100)))
def test_a_rule_without_its_anchor_bit_cannot_match(text: str) -> None:
    present = _speedups.token_anchors(text)
    for bit, rule in enumerate(TOKEN_RULES):
        if rule.pattern.search(text):
            assert present >> bit & 1, rule.name


def test_each_token_sets_its_rules_bit() -> None:
    for token in TOKENS:
        present = _speedups.token_anchors(f"x {token} y")
        matching = [bit for bit, rule in enumerate(TOKEN_RULES) if rule.pattern.search(token)]
        assert matching and all(present >> bit & 1 for bit in matching), token
    assert _speedups.token_anchors("no tokens in this text: key=value") == 0


secret_plants = st.lists(st.sampled_from([*SECRETS, *TOKENS]), max_size=4)


# --- has_controls: whether message text holds anything _strip_controls strips ---------------------

# Each side of every range the control characters cover, in 1-, 2- and 4-byte strings, lone
# surrogates included; runs long enough to cross the 256-character blocks.
CONTROL_PIECES = [
    *"\x00\x08\t\n\x0b\r\x1f \x7e\x7f\x80\x9f\xa0é€😀",
    *"\u2029\u202a\u202e\u202f\u2065\u2066\u2069\u206a\ud7ff\ud800\udfff\ue000",
    "x" * 250, "€" * 130,
]  # fmt: skip
control_texts = st.lists(st.sampled_from(CONTROL_PIECES), max_size=12).map("".join)


@many_examples
@given(text=st.one_of(control_texts, st.text(max_size=300)))
def test_has_controls_tells_whether_strip_controls_changes_message_text(text: str) -> None:
    strip, message_text = _sanitize_text._strip_controls, _sanitize_text._TEXT_CONTROLS
    stripped = strip(text, message_text)
    assert _speedups.has_controls(text) == (stripped != text)
    assert strip(text, message_text, _speedups.has_controls) == stripped


def test_the_sanitizer_tests_message_text_for_controls_in_c() -> None:
    assert Sanitizer()._has_controls is _speedups.has_controls
    assert patterns_only()._has_controls is None


# --- redact_values: the value after each secret key, read as _VALUE reads it ----------------------

# What the value pattern looks at: quotes with their prefixes, escaped and multiply escaped quotes,
# brackets and braces, the literals it keeps and their look-alikes, auth schemes, blanks and line
# ends (up to and past its limits of 16 and 64), '>', Unicode spaces and wide characters.
VALUE_PIECES = [
    *"\"'\\[]{}()<>&;,= \t\n\r:xbBrRuU_-9é€😀\u00a0\u2028\x1c",
    '\\"', '\\\\"', '\\\\\\"', "\\" * 9 + '"', "\\\\", 'b"', "u'", "R\"",
    "null", "nullx", "true", "False", "None", "nil", "nil-", "True_",
    "Bearer ", "bearer\t", "BASIC ", "Token  ", "ApiKey x", "\u212aey ",  # Kelvin sign K
    " " * 16, " " * 17, "\n" + " " * 64 + '"', "\n" + " " * 65 + "{", "secret", "s3cr3t",
]  # fmt: skip
value_texts = st.lists(st.sampled_from(VALUE_PIECES), max_size=40).map("".join)


@st.composite
def texts_with_hits(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]]]:
    text = draw(st.one_of(value_texts, texts))
    positions = draw(st.lists(st.integers(0, len(text)), max_size=24))
    modes = draw(
        st.lists(st.sampled_from([1, 2]), min_size=len(positions), max_size=len(positions))
    )
    return text, sorted(zip(positions, modes, strict=True))


@pytest.fixture(scope="module")
def value_readers() -> tuple[Sanitizer, Sanitizer]:
    return Sanitizer(), patterns_only()


@many_examples
@given(case=texts_with_hits())
def test_values_are_read_and_replaced_as_the_value_pattern_does(
    value_readers: tuple[Sanitizer, Sanitizer], case: tuple[str, list[tuple[int, int]]]
) -> None:
    text, hits = case
    in_c, in_python = value_readers
    assert in_c._redact_values(text, hits) == in_python._redact_values(text, hits)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('password="s3cr3t" x', f'password="{REDACTED}" x'),
        ("password=s3cr3t x", f"password={REDACTED} x"),
        ("password= null,", "password= null,"),
        ('password=""', 'password=""'),
        ("password={a: 1} x", f"password={REDACTED} x"),
        ("password=[1, 2] x", f"password={REDACTED} x"),
        ("password=b'abc'", f"password=b'{REDACTED}'"),
        ('password=\\"abc\\" x', f'password=\\"{REDACTED}\\" x'),
        ('password=\\\\"abc\\\\" x', f'password=\\\\"{REDACTED}\\\\" x'),
        ("authorization: Bearer abc def\nnext", f"authorization: Bearer {REDACTED}\nnext"),
    ],
)
def test_redact_values_examples(text: str, expected: str) -> None:
    assert Sanitizer()._redact(text) == patterns_only()._redact(text) == expected


def test_redact_values_refuses_what_it_cannot_read() -> None:
    match = sanitize._SCHEME.match
    with pytest.raises(TypeError, match="5 arguments"):
        _speedups.redact_values("x", [], match)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _speedups.redact_values(b"x", [(0, 1)], match, 16, REDACTED)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="position, mode"):
        _speedups.redact_values("x=1", [0], match, 16, REDACTED)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="outside the text"):
        _speedups.redact_values("x=1", [(9, 1)], match, 16, REDACTED)
    assert _speedups.redact_values("x=1", [(2, 1)], match, 16, REDACTED) == f"x={REDACTED}"


@pytest.fixture(scope="module")
def sanitizers() -> Iterator[tuple[Sanitizer, Sanitizer]]:
    yield Sanitizer(), patterns_only()


@settings(max_examples=800, deadline=None)
@given(context=texts, plants=secret_plants)
def test_the_sanitizer_gives_the_same_text_with_and_without_the_extension(
    sanitizers: tuple[Sanitizer, Sanitizer], context: str, plants: list[str]
) -> None:
    with_extension, without = sanitizers
    text = context.join(["", *plants, ""]) if plants else context
    assert with_extension._redact(text) == without._redact(text)
    assert with_extension.detail(text) == patterns_only().detail(text)


@pytest.mark.parametrize("text", bench_texts)
def test_bench_texts_are_redacted_alike(text: str) -> None:
    assert Sanitizer()._redact(text) == patterns_only()._redact(text)


def test_the_default_sanitizer_uses_the_extension() -> None:
    assert isinstance(sanitize.get_default_sanitizer()._key_table, _speedups.KeyModes)


def test_the_stub_matches_the_extension() -> None:
    # mypy --strict checks callers against _speedups.pyi; stubtest checks the .pyi against the module.
    completed = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "upstream_ops._speedups"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_without_the_extension_the_patterns_do_the_work() -> None:
    # What an install without a C compiler runs: the import fails, and the sanitizer still redacts.
    program = """
import sys
import threading
sys.modules["upstream_ops._speedups"] = None  # import now raises ImportError
from upstream_ops import sanitize
assert sanitize._KeyModes is None and sanitize._token_anchors is None
assert sanitize.get_default_sanitizer()._key_table is None
print(sanitize.sanitize_message('{"password": "hunter2"} key sk-proj-AbCdEfGhIjKlMnOpQrStUvWx'))
"""
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == '{"password": "[REDACTED]"} key sk-proj-[REDACTED]'


def test_one_table_shared_by_threads() -> None:
    # The default sanitizer is shared by a server's threads; a lookup of a new key runs Python code
    # (the dict's __missing__), during which another thread may fill or replace the same slot.
    sanitizer = Sanitizer()
    texts = [
        " ".join(f"key{t}_{i}=v secret{i}=v token{t}x{i}: v n{i}=1" for i in range(300))
        for t in range(8)
    ]
    expected = [patterns_only()._secret_separators(text) for text in texts]
    table, modes = sanitizer._key_table, sanitizer._reversed_modes
    assert table is not None
    failures: list[int] = []

    def work(index: int) -> None:
        for _ in range(20):
            if table.secret_separators(texts[index], modes) != expected[index]:
                failures.append(index)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


@pytest.mark.parametrize(
    "duplicate", [copy.copy, copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))]
)
def test_a_sanitizer_can_still_be_copied_and_pickled(duplicate: Any) -> None:
    # As without the extension: its table of key modes is a cache, and a copy's starts empty.
    sanitizer = Sanitizer(extra_secret_keys=["tenant"])
    assert sanitizer.message("tenant=1 n=2") == "tenant=[REDACTED] n=2"
    twin = duplicate(sanitizer)
    assert isinstance(twin._key_table, _speedups.KeyModes)
    assert twin.message("tenant=1 n=2 password=3") == "tenant=[REDACTED] n=2 password=[REDACTED]"
