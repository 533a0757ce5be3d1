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

Where a C compiler built ``upstream_ops._speedups``, it finds the keys of the ``key=value`` pairs, reads
the value after each secret key, and tells which token rules' literals are in the text; it gives what
the patterns give, and without it they do all the work.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from itertools import compress
from typing import Any, Final
from urllib.parse import unquote_plus

# The rule tables and patterns live in _sanitize_rules, the steps that make any value bounded,
# printable text in _sanitize_text; every public name among them is imported from here.
from upstream_ops._sanitize_rules import (
    _BLOCK_SUBSTITUTIONS,
    _KEY_MAX_CHARS,
    _NOT_SECRET,
    _REVERSED_KEY_TEXT,
    _REVERSED_PAIRS,
    _SCHEME,
    _SECRET,
    _SECRET_TO_LINE_END,
    _TOKEN_SUBSTITUTIONS,
    AUTH_SCHEMES,
    BLOCK_RULES,
    NON_SECRET_KEY_QUALIFIERS,
    REDACTED,
    SECRET_HEADERS,
    SECRET_KEY_SEGMENTS,
    SECRET_KEY_SUFFIXES,
    TOKEN_RULES,
    WHOLE_VALUE_KEY_SEGMENTS,
    TokenRule,
    _keep_prefix,
    _segments,
    _substitute_if_all_in,
    _value_span,
)
from upstream_ops._sanitize_text import (
    _LABEL_CONTROLS,
    _SCAN_MIN_CHARS,
    _TEXT_CONTROLS,
    _URL_CONTROLS,
    _coerce,
    _fit,
    _scan_limit,
    _strip_controls,
)
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

#: The kinds of text of ``Sanitizer.clean``: what ``label``, ``message``, ``detail`` and ``url`` clean.
LABEL_TEXT: Final = 0
MESSAGE_TEXT: Final = 1
DETAIL_TEXT: Final = 2
URL_TEXT: Final = 3
# The key/value pass and the token rules' literals in C where a compiler built upstream_ops._speedups
# (an optional extension, see setup.py); without it the patterns do all the work, with the same result.
_KeyModes: type[KeyModes] | None
_token_anchors: Callable[[str], int] | None
_c_redact_values: Callable[[str, list[tuple[int, int]], Any, int, str], str] | None
_c_has_controls: Callable[[str], bool] | None
try:
    from upstream_ops._speedups import (
        TOKEN_ANCHOR_RULES,
        KeyModes,
        has_controls,
        redact_values,
        token_anchors,
    )
except ImportError:  # pragma: no cover - depends on the build
    _KeyModes = _token_anchors = _c_redact_values = _c_has_controls = None
else:
    _KeyModes = KeyModes
    _c_redact_values = redact_values
    _c_has_controls = has_controls
    # Its bits must name the rules in TOKEN_RULES' order; an extension built from other rules is
    # not asked.
    _token_anchors = (
        token_anchors if tuple(rule.name for rule in TOKEN_RULES) == TOKEN_ANCHOR_RULES else None
    )
#: The token rules' substitutions with the bit ``token_anchors`` gives each.
_TOKEN_BITS: Final = tuple(
    (1 << i, substitute) for i, (_, _, substitute) in enumerate(_TOKEN_SUBSTITUTIONS)
)

_INNER_VALUE_CHECKS = 16  # values of keys inside a redacted value, read per text
_KEY_CACHE_SIZE = 4096
_CACHED_CHARS = 512  # texts up to this long are cached


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
        # The C extension's steps, where it was built (see ``_patterns_only``).
        self._key_table = None if _KeyModes is None else _KeyModes()
        self._token_anchors = _token_anchors
        self._c_redact_values = _c_redact_values
        self._has_controls = _c_has_controls
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
            text = _strip_controls(text, controls, self._has_controls)
            return _fit(self._redact(text).strip(), max_bytes, dropped)
        except Exception:  # a sanitizer error must not break the request it records
            return _fallback(max_bytes)

    def _redact(self, text: str) -> str:
        for gate, also_required, substitute in _BLOCK_SUBSTITUTIONS:
            if gate in text:
                text = _substitute_if_all_in(text, also_required, substitute)
        if "=" in text or ":" in text or "%" in text:
            text = self._redact_pairs(text)
        token_anchors = self._token_anchors
        if token_anchors is not None:
            present = token_anchors(text)
            if present:
                for bit, substitute in _TOKEN_BITS:
                    if present & bit:
                        text = substitute(_keep_prefix, text)
        else:
            for gate, also_required, substitute in _TOKEN_SUBSTITUTIONS:
                if gate in text:
                    text = _substitute_if_all_in(text, also_required, substitute)
        for pattern in self._extra_patterns:
            text = pattern.sub(REDACTED, text)
        return text

    def _redact_pairs(self, text: str) -> str:
        """Replace the values of secret keys; keys, and the values of other keys, stay."""
        table = self._key_table
        if table is not None:
            return self._redact_values(text, table.secret_separators(text, self._reversed_modes))
        return self._redact_values(text, self._secret_separators(text))

    def _secret_separators(self, text: str) -> list[tuple[int, int]]:
        """(where the value starts, key mode) of each separator whose key is secret, in text order."""
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
        hits.sort()
        return hits

    def _redact_values(self, text: str, hits: list[tuple[int, int]]) -> str:
        """``text`` with the value after each of ``hits`` (``_secret_separators``) redacted."""
        if not hits:
            return text
        if self._c_redact_values is not None:  # this loop, each value read in C
            return self._c_redact_values(text, hits, _SCHEME.match, _INNER_VALUE_CHECKS, REDACTED)
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


def _patterns_only(sanitizer: Sanitizer) -> Sanitizer:
    """``sanitizer``, from now on without the C extension's steps: what an install without a C
    compiler runs, for the tests and the bench to compare with."""
    sanitizer._key_table = None
    sanitizer._token_anchors = None
    sanitizer._c_redact_values = None
    sanitizer._has_controls = None
    return sanitizer


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
