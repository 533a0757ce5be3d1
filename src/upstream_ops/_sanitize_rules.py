"""The redaction rules of ``upstream_ops.sanitize``: which keys are secret, the token shapes, and
the patterns that find ``key=value`` pairs and read their values.

Data and compiled patterns, plus the small functions that read their matches; ``Sanitizer`` applies
them. Everything public here is re-exported by ``upstream_ops.sanitize``, which is where to import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, NamedTuple

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
# What a key says of its value: kept, secret, or secret with the rest of its line.
_NOT_SECRET, _SECRET, _SECRET_TO_LINE_END = 0, 1, 2


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
        elif scheme:
            # The credential follows the last of the scheme words: in "Key Bearer abc" the value is
            # "Key" and the credential "abc", which the Bearer rule cannot find once "Bearer" went.
            after = scheme.end()
            while (inner := _SCHEME.match(text, after)) is not None:
                after = inner.end()
            if credential := _BARE.match(text, after):
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
