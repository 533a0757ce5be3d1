"""Redaction and bounding of every string that is stored, exported or logged.

Upstream errors echo what the service sent: ``Authorization`` headers, ``?api_key=`` query strings,
JSON bodies with passwords. Every string that reaches a sink, a span or a log goes through a
``Sanitizer`` first, which

* replaces secrets with ``[REDACTED]``, keeping the key or prefix so an operator still sees which kind
  of secret was there: PEM private keys and URL userinfo (``BLOCK_RULES``), then the value of every
  ``key=value`` / ``key: value`` / JSON / Python-repr pair whose key is secret by
  ``Sanitizer.is_secret_key``, then the token shapes of ``TOKEN_RULES``;
* drops control characters (C0 except tab and newline, so CRLF becomes LF; DEL; C1; bidi embeddings,
  overrides and isolates), turns tab and newline into spaces in labels and drops them from URLs, and
  turns lone surrogates into U+FFFD, so that the result always encodes as UTF-8;
* trims, and cuts to a byte limit on a code-point boundary, ending with ``…[truncated N bytes]``.

Redaction runs before truncation, so a cut can never leave the start of a secret behind. Nothing here
raises, and the work is linear in the input: every pattern starts with a literal the engine can jump to
and never backtracks over a run (possessive or bounded repetition, lookbehinds for the context), and
input beyond 64 times the limit (at most 1 MiB) is cut before the pattern pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from itertools import compress
from typing import Final, NamedTuple
from urllib.parse import unquote_plus

from upstream_ops.defaults import (
    DETAIL_MAX_BYTES,
    LABEL_MAX_BYTES,
    MESSAGE_MAX_BYTES,
    URL_MAX_BYTES,
)

__all__ = [
    "AUTH_SCHEMES",
    "BLOCK_RULES",
    "DETAIL_TEXT",
    "LABEL_TEXT",
    "MESSAGE_TEXT",
    "NON_SECRET_KEY_QUALIFIERS",
    "REDACTED",
    "SECRET_HEADERS",
    "SECRET_KEY_SEGMENTS",
    "SECRET_KEY_SUFFIXES",
    "TOKEN_RULES",
    "URL_TEXT",
    "WHOLE_VALUE_KEY_SEGMENTS",
    "Sanitizer",
    "TokenRule",
    "get_default_sanitizer",
    "sanitize_detail",
    "sanitize_headers",
    "sanitize_label",
    "sanitize_message",
    "sanitize_url",
    "set_default_sanitizer",
]

REDACTED: Final = "[REDACTED]"

# --- Which keys are secret -------------------------------------------------------------------------
# A key is split into segments on non-alphanumerics and camelCase boundaries ("X-Amz-Signature" ->
# x, amz, signature; "clientSecret" -> client, secret; "APIKey" -> api, key), then lowercased.

#: A key is secret when one of its segments is one of these words ...
SECRET_KEY_SEGMENTS: Final = frozenset(
    {
        "key", "keys", "apikeys", "authkey", "appkey", "signingkey", "masterkey", "accesskeyid",
        "pass", "pwd", "secrets", "passwords", "signatures", "sig", "sid", "session",
        "auth", "oauth", "cookies", "private", "jwt", "bearer", "otp", "totp", "cred", "creds",
    }
)  # fmt: skip
#: ... or ends with one of these (so "pgpassword", "apitoken", "jsessionid", "setcookie" count). The
#: plural "tokens" is not here: max_tokens, input_tokens, total_tokens ... are counts, not secrets.
SECRET_KEY_SUFFIXES: Final = (
    "password", "passwd", "passphrase", "secret", "token", "apikey", "accesskey", "privatekey",
    "secretkey", "sessionid", "sessid", "sessionkey", "credential", "credentials", "signature",
    "authorization", "cookie",
)  # fmt: skip
#: A key with one of these segments describes a secret instead of holding one, and is kept:
#: token_count, max_token, key_type, password_length, secret_name, token_url, key_file. Identifiers are
#: not in this list on purpose: session_id is a credential, and key_id / AccessKeyId are half of one.
NON_SECRET_KEY_QUALIFIERS: Final = frozenset(
    {
        "count", "counts", "limit", "limits", "max", "min", "total", "length", "len", "size",
        "type", "kind", "scheme", "method", "format", "usage", "used", "remaining", "expires",
        "expiry", "expiration", "ttl", "timeout", "duration", "status", "error", "url", "uri",
        "endpoint", "name", "file", "path", "version", "algorithm", "alg",
    }
)  # fmt: skip
#: When the last segment is one of these, the whole value to the end of the line is the secret
#: (``Authorization: Digest a="1", b="2"``, ``Cookie: a=1; b=2``), not just its first word.
WHOLE_VALUE_KEY_SEGMENTS: Final = frozenset({"authorization", "cookie", "cookies"})
#: Header values always replaced by ``[REDACTED]`` (names compared case-insensitively), on top of
#: every header whose name is secret by the key rules.
SECRET_HEADERS: Final = frozenset(
    {
        "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
        "x-goog-api-key", "x-bkapi-authorization",
    }
)  # fmt: skip
#: Scheme words kept in front of a redacted credential: ``Authorization: Bearer [REDACTED]``.
AUTH_SCHEMES: Final = (
    "Bearer", "Basic", "Token", "Digest", "Negotiate", "NTLM", "AWS4-HMAC-SHA256", "ApiKey",
    "Key", "OAuth", "DPoP", "SharedAccessSignature",
)  # fmt: skip


# --- Secrets recognised by their shape -------------------------------------------------------------


class TokenRule(NamedTuple):
    """A secret recognised by its shape.

    ``pattern`` starts with a literal the engine can jump to, and runs only when the character
    ``gate`` is in the text (a memchr, not a scan). Its group ``keep``, the prefix that says which kind
    of secret it was, is kept; the rest of the match becomes ``[REDACTED]``.
    """

    name: str
    gate: str
    pattern: re.Pattern[str]


# The character before a token is checked with lookbehinds placed after the leading literal (so the
# engine can still jump to that literal): "risk-..." or "high_..." are not tokens.
_CREDENTIAL = r"[A-Za-z0-9._~+/=-]"  # RFC 7235 token68
# A credential after a bare "Bearer"/"Basic" must not look like a word ("Bearer authentication").
_NOT_A_WORD = r"(?=[A-Za-z0-9._~+/=-](?:[a-z]{0,22}+[A-Z0-9._~+/=-]|[a-z]{23}))"
_AUTHORITY = r"[^\s/?#@\"'<>\\]"

#: Shapes redacted first, before the key/value pairs: a PEM block has "Proc-Type: ..." lines of its own,
#: and a URL's user:password would otherwise be read as a pair.
BLOCK_RULES: Final = (
    TokenRule(  # PEM private key blocks, whole; an unterminated block is redacted to the end
        "private_key",
        "G",
        re.compile(
            r"(?P<keep>-----BEGIN (?:[A-Z0-9]{1,24} ){0,4}PRIVATE KEY(?: BLOCK)?-----)"
            r"(?:.*?-----END [A-Z0-9 ]{0,100}?PRIVATE KEY(?: BLOCK)?-----|.*)",
            re.DOTALL,
        ),
    ),
    TokenRule(  # scheme://user:password@host -> scheme://[REDACTED]@host (up to the last "@")
        "url_userinfo",
        "@",
        re.compile(rf"(?P<keep>://)(?:{_AUTHORITY}*+@(?={_AUTHORITY}*+@))*+{_AUTHORITY}*+(?=@)"),
    ),
)
#: Token shapes, applied in this order after the key/value pairs (a token pattern must not swallow the
#: key of a pair, as in "Bearer client_secret:...").
TOKEN_RULES: Final = (
    TokenRule(  # a bare "Bearer <token>" / "Basic <base64>" outside an Authorization pair
        "bearer_or_basic_credential",
        "B",
        re.compile(
            r"(?P<keep>B(?<![A-Za-z0-9]B)(?:earer|asic)[ \t]++)"
            + _NOT_A_WORD
            + _CREDENTIAL
            + "{8,}+"
        ),
    ),
    TokenRule(  # sk-..., sk-proj-..., sk-ant-api03-..., sk_live_...
        "openai_anthropic_stripe_key",
        "k",
        re.compile(
            r"(?P<keep>sk(?<![A-Za-z0-9]sk)"
            r"(?:-(?:proj-|svcacct-|admin-|ant-(?:[a-z]{2,8}[0-9]{2}-)?)?|_(?:live|test)_))"
            r"[A-Za-z0-9_-]{20,}+"
        ),
    ),
    TokenRule(  # AKIA / ASIA + 16 (AWS access key ids), AIza + 35 (Google API keys)
        "aws_access_key_id_or_google_api_key",
        "A",
        re.compile(
            r"(?P<keep>A(?<![A-Za-z0-9]A)(?:[KS]IA|Iza))"
            r"(?:(?<=IA)[A-Z0-9]{16}(?![A-Za-z0-9])|(?<=za)[A-Za-z0-9_-]{30,}+)"
        ),
    ),
    TokenRule(  # ya29....
        "google_oauth_token",
        "9",
        re.compile(r"(?P<keep>ya29\.(?<![A-Za-z0-9]ya29\.))[A-Za-z0-9_-]{20,}+"),
    ),
    TokenRule(  # ghp_, gho_, ghu_, ghs_, ghr_, github_pat_ (GitHub), hf_ (Hugging Face)
        "github_or_huggingface_token",
        "_",
        re.compile(
            r"(?P<keep>_(?<=[pousrfb]_)"  # one cheap look back rejects most underscores
            r"(?:(?<=gh[pousr]_)(?<![A-Za-z0-9]gh[pousr]_)|(?<=hf_)(?<![A-Za-z0-9]hf_)"
            r"|(?<=github_)(?<![A-Za-z0-9]github_)pat_))[A-Za-z0-9_]{20,}+"
        ),
    ),
    TokenRule(  # xoxb-, xoxp-, xoxa-, ..., xapp-
        "slack_token",
        "x",
        re.compile(r"(?P<keep>x(?<![A-Za-z0-9]x)(?:ox[abeoprs]|app)-)[A-Za-z0-9-]{10,}+"),
    ),
    TokenRule(  # header.payload.signature, header starting with eyJ ('{"')
        "jwt",
        "J",
        re.compile(
            r"(?P<keep>)eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]*+\.[A-Za-z0-9_-]++\.[A-Za-z0-9_-]*+"
        ),
    ),
)


# --- Key/value pairs -------------------------------------------------------------------------------
# A pair is found from its separator: in the reversed text the engine jumps from one "=" (or ":") to
# the next and reads the key backwards from there, instead of trying a key at every word. re.split
# hands all of them over at once (no match objects), so that Python code only touches secret keys.
# A key never contains a separator, so that one match cannot swallow the next separator. A key in
# URL-encoded text also ends at an encoded separator or "&" ("%3D", "%3A", "%26"; read backwards
# "D3%", "A3%", "62%"): otherwise `password%3Dhunter2%26user%3Dbob` is one key with the value "bob",
# and hunter2 is kept.
_KEY_CHARS = r"A-Za-z0-9_.%\[\]-"
_KEY_MAX_CHARS = 128


def _reversed_key(quoted: str = r"[^\"'\\\r\n:=]", bare: str = "") -> str:
    """A key read backwards from its separator.

    ``quoted`` matches one character of a quoted key; ``bare`` a whole bare key, by default a run of
    up to ``_KEY_MAX_CHARS`` key characters.
    """
    bare = bare or f"[{_KEY_CHARS}]{{1,{_KEY_MAX_CHARS}}}+(?![{_KEY_CHARS}])"
    return (
        r"[ \t]*+(?:"
        rf"\"\\{{0,8}}+{quoted}{{1,{_KEY_MAX_CHARS}}}+\"\\{{0,8}}+"  # "key" or \"key\"
        rf"|'{quoted}{{1,{_KEY_MAX_CHARS}}}+'"  # 'key'
        rf"|{bare}"  # key, X-Api-Key, user[password]
        r"))"
    )


# URL-encoded keys stop before "D3%", "A3%" and "62%" (read backwards). Only D, d, A, a and 6 are
# looked ahead from, so that most characters take the engine's fast path. The bare key is the whole
# run back to a stop: a run never reaches past the separator before it (itself a stop), so each
# character is read once; _ReversedKeyModes ignores one longer than _KEY_MAX_CHARS, as the bounded
# bare key of the other separators would.
_ENCODED_STOP = r"(?:[DdAa]3|62)%"
_NOT_A_STOP_START = r"[B-CE-Zb-ce-z0-57-9_.%\[\]-]"  # _KEY_CHARS without D, d, A, a, 6
_ENCODED_QUOTED_KEY_CHAR = rf"(?:[^\"'\\\r\n:=DdAa6]|(?!{_ENCODED_STOP})[DdAa6])"
_ENCODED_BARE_KEY = (
    rf"(?!{_ENCODED_STOP})(?=[{_KEY_CHARS}])"
    rf"{_NOT_A_STOP_START}*+(?:(?!{_ENCODED_STOP})[DdAa6]{_NOT_A_STOP_START}*+)*+"
)
_REVERSED_PAIRS: Final = (  # (gate, pattern, separator characters the match leaves out)
    ("=", re.compile("(=" + _reversed_key()), 0),  # also "=>"
    (":", re.compile("(:(?<!//:)" + _reversed_key()), 0),  # not the colon of "https://"
    (  # %3D, %3A in URL-encoded text
        "%",
        re.compile("(3%(?<=[DdAa]3%)" + _reversed_key(_ENCODED_QUOTED_KEY_CHAR, _ENCODED_BARE_KEY)),
        1,
    ),
)
_REVERSED_KEY_TEXT = re.compile(r"(?:[=:]|3%)[ \t]*[\"'\\]*(.*?)[\"'\\]*", re.DOTALL)
# The value after a separator. A quoted value may be unterminated (cut off): it is redacted to the end
# of the line. Each quoted kind has an opening group followed directly by its closing group.
_VALUE = re.compile(
    r"""
    >?[ \t]{0,16}+(?:\n[ \t]{0,64}+(?=["'\\\[{]))?
    (?:
        (?P<dqo>[bBrRuU]?")[^"\\\n]*+(?:\\.[^"\\\n]*+)*+(?P<dqc>"?)
      | (?P<eqo>\\")[^"\\\n]*+(?:(?:\\\\(?:\\.|[^"\\\n])|\\[^"\\\n])[^"\\\n]*+)*+(?P<eqc>(?:\\")?)
      | (?P<flat>\[[^\[\]{}]*+\]|\{[^{}]*+\})
      | (?P<literal>(?:null|true|false|None|True|False|nil)(?![A-Za-z0-9_-]))
      | (?P<sqo>[bBrRuU]?')[^'\\\n]*+(?:\\.[^'\\\n]*+)*+(?P<sqc>'?)
      | (?P<bqo>\\{2,8}+")(?:(?!(?P=bqo))[^\n])*+(?P<bqc>(?P=bqo)?)
      | (?P<bare>[^\s&;,"'<>(){}]++)
    )
    """,
    re.VERBOSE | re.DOTALL,
)
_Substitute = Callable[[Callable[[re.Match[str]], str], str], str]
# Besides its gate, characters every match of a rule contains. Each is a memchr; a pass over the text
# costs as much as twenty of them, so a rule whose match cannot be there is skipped.
_ALSO_REQUIRED: Final = {
    "private_key": "VKY",  # "PRIVATE KEY"
    "url_userinfo": ":/",
    "aws_access_key_id_or_google_api_key": "I",  # AKIA, ASIA, AIza
    "google_oauth_token": "y2.",  # ya29.
    "github_or_huggingface_token": "h",  # gh?_, hf_, github_pat_
    "slack_token": "-",
    "jwt": "e.",  # eyJ, and the dots between its parts
}
# Then, once those characters are all there, the literal a rule's match starts with, for a rule whose
# characters are common but whose literal is rare and long enough for str's search to skip ahead
# (0.5 µs against the pass's 0.75 µs on 2 KiB; for a short literal such as "ya29." it is slower).
_REQUIRED_LITERAL: Final = {"private_key": "-----BEGIN "}


def _requirements(rule: TokenRule) -> tuple[str, ...]:
    """What a text must contain for ``rule`` to match in it: characters first, then its literal."""
    literal = _REQUIRED_LITERAL.get(rule.name)
    return (*_ALSO_REQUIRED.get(rule.name, ""), *((literal,) if literal else ()))


_BLOCK_SUBSTITUTIONS: Final = tuple(
    (rule.gate, _requirements(rule), rule.pattern.sub) for rule in BLOCK_RULES
)
_TOKEN_SUBSTITUTIONS: Final = tuple(
    (rule.gate, _requirements(rule), rule.pattern.sub) for rule in TOKEN_RULES
)
_QUOTE_CLOSE: Final = frozenset(_VALUE.groupindex[g] for g in ("dqc", "eqc", "bqc", "sqc"))
_FLAT: Final = _VALUE.groupindex["flat"]
_BARE_VALUE: Final = _VALUE.groupindex["bare"]
_BARE = re.compile(r"[^\s&;,\"'<>(){}]++")
_SCHEME = re.compile("(?i:" + "|".join(map(re.escape, AUTH_SCHEMES)) + r")[ \t]++(?=\S)")
_SEGMENT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_NOT_SECRET, _SECRET, _SECRET_TO_LINE_END = 0, 1, 2
#: The kinds of text of ``Sanitizer.clean``: what ``label``, ``message``, ``detail`` and ``url`` clean.
LABEL_TEXT: Final = 0
MESSAGE_TEXT: Final = 1
DETAIL_TEXT: Final = 2
URL_TEXT: Final = 3
_INNER_VALUE_CHECKS = 16  # values of keys inside a redacted value, read per text
_KEY_CACHE_SIZE = 4096
_CACHED_CHARS = 512  # texts up to this long are cached

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


class Sanitizer:
    """The redaction rules; the module functions use a default instance.

    ``extra_patterns`` (strings or compiled patterns) are replaced by ``[REDACTED]`` after the built-in
    rules; keeping them linear is up to you. ``extra_secret_keys`` adds secret segments (one-word
    entries) or whole key names; ``keep_keys`` names keys that are never secret (the headers of
    ``SECRET_HEADERS`` stay redacted). Names are compared by their lowercased segments, so
    ``x-request-token``, ``X_Request_Token`` and ``xRequestToken`` are the same name.
    """

    def __init__(
        self,
        *,
        extra_patterns: Iterable[str | re.Pattern[str]] = (),
        extra_secret_keys: Iterable[str] = (),
        keep_keys: Iterable[str] = (),
    ) -> None:
        self._extra_patterns = tuple(
            p if isinstance(p, re.Pattern) else re.compile(p) for p in extra_patterns
        )
        segments, names = set(SECRET_KEY_SEGMENTS), set[str]()
        for key in extra_secret_keys:
            parts = _segments(key)
            if parts:
                (segments if len(parts) == 1 else names).add("".join(parts))
        self._secret_segments = frozenset(segments)
        self._secret_names = frozenset(names)
        self._keep_names = frozenset("".join(_segments(key)) for key in keep_keys)
        self._modes: dict[str, int] = {}
        self._reversed_modes = _ReversedKeyModes(self._key_mode)
        # Texts repeat: the same platform, model, kind and endpoint on every event, and the same
        # "429 Too Many Requests" message and provider error body on every rate-limited call. The
        # results for texts up to _CACHED_CHARS long are kept, one bounded cache per kind of text
        # (indexed by LABEL_TEXT ... URL_TEXT). The output depends only on the input and on this
        # sanitizer's rules, which never change after __init__.
        self._caches: tuple[dict[str, str], ...] = ({}, {}, {}, {})

    def message(self, text: str | bytes | None, max_bytes: int = MESSAGE_MAX_BYTES) -> str:
        """An error message, redacted, without control characters, cut to ``max_bytes`` bytes."""
        if type(text) is not str or len(text) > _CACHED_CHARS or max_bytes != MESSAGE_MAX_BYTES:
            return self._clean(text, max_bytes, _TEXT_CONTROLS)
        cache = self._caches[MESSAGE_TEXT]
        return cache.get(text) or _remember(
            cache, text, self._clean(text, max_bytes, _TEXT_CONTROLS)
        )

    def detail(self, text: str | bytes | None, max_bytes: int = DETAIL_MAX_BYTES) -> str:
        """Like ``message``, with the larger limit meant for response bodies and tracebacks."""
        if type(text) is not str or len(text) > _CACHED_CHARS or max_bytes != DETAIL_MAX_BYTES:
            return self._clean(text, max_bytes, _TEXT_CONTROLS)
        cache = self._caches[DETAIL_TEXT]
        return cache.get(text) or _remember(
            cache, text, self._clean(text, max_bytes, _TEXT_CONTROLS)
        )

    def label(self, text: str | bytes | None, max_bytes: int = LABEL_MAX_BYTES) -> str:
        """A short field (platform, model, request id ...): like a message, on one line."""
        if type(text) is not str or len(text) > _CACHED_CHARS or max_bytes != LABEL_MAX_BYTES:
            return self._clean(text, max_bytes, _LABEL_CONTROLS)
        cache = self._caches[LABEL_TEXT]
        return cache.get(text) or _remember(
            cache, text, self._clean(text, max_bytes, _LABEL_CONTROLS)
        )

    def url(self, url: str | None, max_bytes: int = URL_MAX_BYTES) -> str:
        """A URL without userinfo, with the values of secret query and fragment parameters redacted."""
        if type(url) is not str or len(url) > _CACHED_CHARS or max_bytes != URL_MAX_BYTES:
            return self._url(url, max_bytes)
        cache = self._caches[URL_TEXT]
        return cache.get(url) or _remember(cache, url, self._url(url, max_bytes))

    def clean(self, kind: int, text: str) -> str:
        """``text`` cleaned as the kind of text ``kind`` (``LABEL_TEXT``, ``MESSAGE_TEXT``,
        ``DETAIL_TEXT``, ``URL_TEXT``) with its default limit: ``label``, ``message``, ``detail``
        or ``url``."""
        cleaned: str = getattr(self, _CLEANER_NAMES[kind])(text)
        return cleaned

    def cached_results(self) -> tuple[Mapping[str, str], ...]:
        """The results kept for short texts, by kind of text (index ``LABEL_TEXT`` ... ``URL_TEXT``).

        For a caller that cleans many fields at once (an event's dozen): a text found here needs
        no call. Empty for a subclass, whose own methods must see every text.
        """
        return self._caches if type(self) is Sanitizer else _NO_CACHED_RESULTS

    def _url(self, url: str | None, max_bytes: int) -> str:
        try:
            text, dropped = _coerce(url, _scan_limit(max_bytes))
            text = _strip_controls(text, _URL_CONTROLS).strip()  # as browsers drop tab and newline
            if "=" in text:
                text = self._redact_url_parameters(text)
            return _fit(self._redact(text).strip(), max_bytes, dropped)
        except Exception:  # a sanitizer error must not break the request it records
            return _fallback(max_bytes)

    def headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
        """Sanitized headers; credentials and secret-named headers become ``[REDACTED]``.

        Names are sanitized as labels; repeated names (compared case-insensitively) are joined with
        ``", "`` under their first spelling. Bytes pairs (ASGI) are accepted.
        """
        out: dict[str, str] = {}
        spelling: dict[str, str] = {}
        try:
            items = headers.items() if isinstance(headers, Mapping) else headers
            for item in items:
                try:
                    raw_name, raw_value = item
                except (TypeError, ValueError):
                    continue
                name = self.label(raw_name)
                if not name:
                    continue
                lower = name.lower()
                secret = lower in SECRET_HEADERS or self.is_secret_key(name)
                value = REDACTED if secret else self.label(raw_value)
                key = spelling.setdefault(lower, name)
                if key in out and not secret:
                    value = _fit(f"{out[key]}, {value}", LABEL_MAX_BYTES, 0)
                out[key] = value
        except Exception:  # keep the headers sanitized so far
            return out
        return out

    def is_secret_key(self, name: str) -> bool:
        """Whether a value stored under the key ``name`` is a secret, by its segments."""
        mode = self._modes.get(name) if isinstance(name, str) else None
        if mode is None:
            mode = self._key_mode(name)
        return mode != _NOT_SECRET

    def _key_mode(self, name: object) -> int:
        if isinstance(name, bytes | bytearray):
            name = bytes(name).decode("latin-1")
        if not isinstance(name, str):
            return _NOT_SECRET
        parts = _segments(unquote_plus(name) if "%" in name else name)
        joined = "".join(parts)
        if not parts or joined in self._keep_names:
            mode = _NOT_SECRET
        elif joined in self._secret_names:
            mode = _SECRET
        elif not NON_SECRET_KEY_QUALIFIERS.isdisjoint(parts):
            mode = _NOT_SECRET
        elif any(p in self._secret_segments or p.endswith(SECRET_KEY_SUFFIXES) for p in parts):
            mode = _SECRET_TO_LINE_END if parts[-1] in WHOLE_VALUE_KEY_SEGMENTS else _SECRET
        else:
            mode = _NOT_SECRET
        if len(self._modes) >= _KEY_CACHE_SIZE:
            self._modes.clear()
        self._modes[name] = mode
        return mode

    def _clean(self, value: object, max_bytes: int, controls: tuple[bytes | None, bytes]) -> str:
        try:
            if type(value) is str and len(value) <= _SCAN_MIN_CHARS:
                text, dropped = value, 0
            else:
                text, dropped = _coerce(value, _scan_limit(max_bytes))
            text = _strip_controls(text, controls)
            return _fit(self._redact(text).strip(), max_bytes, dropped)
        except Exception:  # a sanitizer error must not break the request it records
            return _fallback(max_bytes)

    def _redact(self, text: str) -> str:
        for gate, also_required, substitute in _BLOCK_SUBSTITUTIONS:
            if gate in text:
                text = _substitute_if_all_in(text, also_required, substitute)
        if "=" in text or ":" in text or "%" in text:
            text = self._redact_pairs(text)
        for gate, also_required, substitute in _TOKEN_SUBSTITUTIONS:
            if gate in text:
                text = _substitute_if_all_in(text, also_required, substitute)
        for pattern in self._extra_patterns:
            text = pattern.sub(REDACTED, text)
        return text

    def _redact_pairs(self, text: str) -> str:
        """Replace the values of secret keys; keys, and the values of other keys, stay."""
        size = len(text)
        reversed_text = text[::-1]
        mode_of = self._reversed_modes.__getitem__
        hits: list[tuple[int, int]] = []  # (index just after the separator, key mode)
        for gate, pattern, shift in _REVERSED_PAIRS:
            if gate not in text:
                continue
            parts = pattern.split(reversed_text)  # text, separator+key, text, separator+key, ...
            modes = list(map(mode_of, parts[1::2]))
            if any(modes):
                start, summed = 0, 0  # the offset in the reversed text of parts[summed]
                for i in compress(range(1, len(parts), 2), modes):
                    start += len("".join(parts[summed:i]))  # a memcpy: cheaper than len() each
                    summed = i
                    hits.append((size - start + shift, modes[i // 2]))
        if not hits:
            return text
        hits.sort()
        out: list[str] = []
        done = 0
        inner_checks = _INNER_VALUE_CHECKS
        for position, mode in hits:
            if position >= done:
                span = _value_span(text, position, mode)
                if span is not None:
                    out += (text[done : span[0]], span[2])
                    done = span[1]
                continue
            # This key was inside a value already redacted, but its own value may reach past
            # that value: `Key=" {'password': "s3cret'"}` (the quote that closes the first value
            # opens the second), `secret={"password": "a}b"}`. A few are checked (each check reads
            # the value, so a bounded number keeps the pass linear); past those, the rest of the
            # line is redacted.
            if inner_checks:
                inner_checks -= 1
                span = _value_span(text, position, mode)
                end = span[1] if span is not None else done
            else:
                line_end = text.find("\n", done)
                end = len(text) if line_end < 0 else line_end
            if end > done:
                out.append(REDACTED)
                done = end
        out.append(text[done:])
        return "".join(out)

    def _redact_url_parameters(self, url: str) -> str:
        rest, hash_mark, fragment = url.partition("#")
        base, question_mark, query = rest.partition("?")
        return (
            base
            + question_mark
            + self._redact_query(query)
            + hash_mark
            + self._redact_query(fragment)  # the OAuth implicit flow puts tokens there
        )

    def _redact_query(self, query: str) -> str:
        if "=" not in query:
            return query
        parameters = query.split("&")
        for i, parameter in enumerate(parameters):
            name, equals, value = parameter.partition("=")
            if value and self.is_secret_key(unquote_plus(name)):
                parameters[i] = name + equals + REDACTED
        return "&".join(parameters)


#: The method ``Sanitizer.clean`` calls for each kind of text.
_CLEANER_NAMES: Final = ("label", "message", "detail", "url")
_NO_CACHED_RESULTS: Final[tuple[Mapping[str, str], ...]] = ({}, {}, {}, {})


def _remember(cache: dict[str, str], text: str, cleaned: str) -> str:
    """Keep ``cleaned`` as the result of ``text`` (a full cache is emptied first); return it."""
    if len(cache) >= _KEY_CACHE_SIZE:
        cache.clear()
    cache[text] = cleaned
    return cleaned


class _ReversedKeyModes(dict[str, int]):
    """The key mode of each reversed "separator and key" that the pair patterns split off.

    A dict, so that the modes of all the keys of a text are looked up in one ``map`` without a
    Python call per key; a key not seen before is read and classified by ``__missing__``.
    """

    def __init__(self, key_mode: Callable[[object], int]) -> None:
        super().__init__()
        self._key_mode = key_mode

    def __missing__(self, separator_and_key: str) -> int:
        match = _REVERSED_KEY_TEXT.fullmatch(separator_and_key)
        if not match or len(match[1]) > _KEY_MAX_CHARS:
            return _NOT_SECRET  # not kept: a key this long is not read as one
        mode = self._key_mode(match[1][::-1])
        if len(self) >= _KEY_CACHE_SIZE:
            self.clear()
        self[separator_and_key] = mode
        return mode


def _substitute_if_all_in(text: str, required: tuple[str, ...], substitute: _Substitute) -> str:
    for part in required:
        if part not in text:
            return text
    return substitute(_keep_prefix, text)


def _keep_prefix(match: re.Match[str]) -> str:
    return match["keep"] + REDACTED


def _value_span(text: str, position: int, mode: int) -> tuple[int, int, str] | None:
    """Where the value after a secret key's separator is, and its replacement (None: keep it).

    null/true/false and "" are kept: whether a secret was missing or empty is worth seeing.
    """
    match = _VALUE.match(text, position)
    last = match.lastindex if match else None
    if match is None or last is None:
        return None
    if last == _BARE_VALUE:
        start, end = match.span(last)
        if mode == _SECRET and text[end : end + 1] not in (" ", "\t"):
            return start, end, REDACTED  # the common case: key=value, "key": 123
        scheme = _SCHEME.match(text, start)  # "Bearer abc": keep the scheme, redact the credential
        if mode == _SECRET_TO_LINE_END:
            line_end = text.find("\n", start)
            end = len(text) if line_end < 0 else line_end
        elif scheme and (credential := _BARE.match(text, scheme.end())):
            end = credential.end()
        if scheme and scheme.end() < end:
            return start, end, scheme[0] + REDACTED
        return start, end, REDACTED
    if last in _QUOTE_CLOSE:
        body, close = match.end(last - 1), match.start(last)
        if body == close:
            return None
        scheme = _SCHEME.match(text, body, close) if mode == _SECRET_TO_LINE_END else None
        keep = match[last - 1] + scheme[0] if scheme else match[last - 1]
        return match.start(last - 1), match.end(), keep + REDACTED + match[last]
    if last == _FLAT:
        return match.start(last), match.end(), REDACTED
    return None  # null, true, false ...


def _segments(name: str) -> list[str]:
    return [part.lower() for part in _SEGMENT.findall(name[:256])]


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


def _strip_controls(text: str, controls: tuple[bytes | None, bytes]) -> str:
    if len(text) < 64 and text.isprintable():  # isprintable costs more per character than translate
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


def _fallback(max_bytes: object) -> str:
    return REDACTED if isinstance(max_bytes, int) and max_bytes >= len(REDACTED) else ""


_default_sanitizer = Sanitizer()


def get_default_sanitizer() -> Sanitizer:
    """The sanitizer that the module functions, and so the whole library, use."""
    return _default_sanitizer


def set_default_sanitizer(sanitizer: Sanitizer) -> None:
    """Make ``sanitizer`` (with your extra patterns and keys) the one every module function uses."""
    global _default_sanitizer
    if not isinstance(sanitizer, Sanitizer):
        raise TypeError(f"expected a Sanitizer, got {type(sanitizer).__name__}")
    _default_sanitizer = sanitizer


def sanitize_message(text: str | bytes | None, max_bytes: int = MESSAGE_MAX_BYTES) -> str:
    """Redact secrets, drop control characters, trim and cut an error message. Never raises."""
    return _default_sanitizer.message(text, max_bytes)


def sanitize_detail(text: str | bytes | None, max_bytes: int = DETAIL_MAX_BYTES) -> str:
    """``sanitize_message`` with the larger limit for response bodies and tracebacks."""
    return _default_sanitizer.detail(text, max_bytes)


def sanitize_label(text: str | bytes | None, max_bytes: int = LABEL_MAX_BYTES) -> str:
    """``sanitize_message`` for short fields; tabs and newlines become spaces."""
    return _default_sanitizer.label(text, max_bytes)


def sanitize_url(url: str | None, max_bytes: int = URL_MAX_BYTES) -> str:
    """A URL without userinfo, with secret query and fragment parameter values redacted."""
    return _default_sanitizer.url(url, max_bytes)


def sanitize_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers with credential and secret-named values replaced by ``[REDACTED]``."""
    return _default_sanitizer.headers(headers)
