"""Provider error envelopes: what the upstream said went wrong, read from its error response.

``parse_error_body`` recognizes the shapes listed in ``ENVELOPE_FORMATS`` (the JSON envelopes of the
big API providers and gateways, HTML error pages, plain text). It decides by content, not by content
type (JSON often arrives as ``text/plain`` or with none), never raises, and reads only the head of
the body, so a 10 MB error page costs what a small one does. Strings come back raw (the sanitizer
runs later) but bounded.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from upstream_ops.defaults import LABEL_MAX_BYTES, MESSAGE_MAX_BYTES
from upstream_ops.events import ORIGIN_GATEWAY

#: JSON is parsed from at most this many leading bytes of the body. It is larger than ``max_bytes``
#: because a JSON envelope cut short does not parse; nothing past it is ever looked at.
JSON_SCAN_MAX_BYTES: Final = 64 * 1024
#: Default ``max_bytes``: how much of a non-JSON body (HTML page, plain text) is looked at.
TEXT_SCAN_MAX_BYTES: Final = 2048

#: ``(name, description, example)`` for every envelope ``parse_error_body`` recognizes, in the order
#: they are tried. ``name`` is the ``ProviderError.format`` it produces.
ENVELOPE_FORMATS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "anthropic",
        "Anthropic: `type` is `error`; the `error` object holds type and message.",
        '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
    ),
    (
        "google",
        "Google APIs (Gemini, Vertex AI): an `error` object with a numeric code and a status name. "
        "type is the status, code the number.",
        '{"error":{"code":429,"message":"Resource has been exhausted",'
        '"status":"RESOURCE_EXHAUSTED"}}',
    ),
    (
        "openai",
        "OpenAI and OpenAI-compatible APIs (Azure OpenAI, LLM proxies): an `error` object with "
        "message, type, param, code. A message that is itself a JSON envelope is unwrapped one "
        "level: its message wins, the outer type and code are kept.",
        '{"error":{"message":"Rate limit reached","type":"requests","param":null,'
        '"code":"rate_limit_exceeded"}}',
    ),
    (
        "aws",
        "AWS: `__type` in a JSON body (the part after `#`), the `x-amzn-ErrorType` header (the "
        "part before `:`), or an XML `<Error><Code>` body (S3, query protocols). The AWS name is "
        "the type.",
        '{"__type":"com.amazon.coral.validate#ValidationException","message":"1 validation error"}',
    ),
    (
        "kimi",
        "KIMI API (and the WeChat-style `errcode`/`errmsg` pair).",
        '{"errcode":-2002,"errmsg":"Token expired"}',
    ),
    (
        "bkapi",
        "BlueKing APIGateway: code, code_name (the type), message, result false. A non-empty "
        "`X-Bkapi-Error-Code` header, or a 16xxxxx code with a code_name, means the gateway "
        "itself answered (origin `gateway`); code and message then also come from the "
        "`X-Bkapi-Error-Code` / `X-Bkapi-Error-Message` headers.",
        '{"code":1640001,"code_name":"INVALID_ARGS","message":"Parameters error","result":false,'
        '"data":null}',
    ),
    (
        "dify",
        "Dify: a string code, a message and the HTTP status.",
        '{"code":"invalid_param","message":"Model is not configured","status":400}',
    ),
    (
        "problem",
        "RFC 9457 problem details (`application/problem+json`): message is detail (else "
        "title), type the problem type URI unless `about:blank`.",
        '{"type":"https://example.com/probs/out-of-credit","title":"Out of credit","status":403,'
        '"detail":"Balance is 30, cost is 50"}',
    ),
    (
        "fastapi",
        "FastAPI / Starlette: `detail` as a string, or a list of validation errors (message "
        "from their `loc: msg`, type from the first).",
        '{"detail":[{"loc":["body","model"],"msg":"Field required","type":"missing"}]}',
    ),
    (
        "generic",
        "Any other JSON object: message from `message`, `error_description`, `msg`, "
        "`error_message`, `errorMessage`, a string `error` or the first of `errors`; code from "
        "`code` or, for OAuth, `error`; type from a string `type`. For an object cut at the "
        "JSON bound: its first `message`-like string.",
        '{"error":"invalid_grant","error_description":"Refresh token expired"}',
    ),
    (
        "html",
        "An HTML error page: its `<title>`, else its first `<h1>`, else its text; entities "
        "unescaped, whitespace collapsed.",
        "<html><head><title>502 Bad Gateway</title></head><body>...</body></html>",
    ),
    (
        "text",
        "Plain text (or a JSON string): the first non-empty line.",
        "upstream connect error or disconnect/reset before headers",
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderError:
    """What the upstream's error response says: its message, its own error type and code.

    ``format`` names the envelope that matched (see ``ENVELOPE_FORMATS``). ``origin`` is
    ``"gateway"`` when an intermediate gateway answered instead of the backend, else ``""``.
    ``code`` is a string even when the provider sends a number.
    """

    message: str = ""
    type: str = ""
    code: str = ""
    format: str
    origin: str = ""


def parse_error_body(
    body: bytes | str | None,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    max_bytes: int = TEXT_SCAN_MAX_BYTES,
) -> ProviderError | None:
    """Read the provider's error out of a response body and its headers; ``None`` if nothing useful.

    JSON is parsed from the first ``JSON_SCAN_MAX_BYTES`` bytes, HTML and text from the first
    ``max_bytes`` (characters for a ``str`` body); no more is read. ``content_type`` only supplies
    the charset: the format is detected from the content. Header names match case-insensitively.
    Never raises: garbage, binary, invalid UTF-8 and absurdly nested JSON give ``None`` or a best
    effort.
    """
    # The contract is "never raises": reading an error must not become the error.
    try:
        found = _parse_body(body, content_type, max_bytes)
    except Exception:
        found = None
    if headers:
        with contextlib.suppress(Exception):  # not a mapping after all: keep what the body said
            found = _apply_headers(found, headers)
    if found is None or not (found.message or found.type or found.code):
        return None
    return found


# --- body -----------------------------------------------------------------------------------------

_INVALID: Final = object()
_TOO_DEEP: Final = object()
#: A JSON object that does not parse (cut at ``JSON_SCAN_MAX_BYTES``): its first message string.
_SALVAGE_RE: Final = re.compile(
    r'"(?:message|errmsg|error_description|msg|detail)"\s*:\s*"((?:[^"\\]|\\.){1,2048})'
)
_CHARSET_RE: Final = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_TITLE_RE: Final = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_H1_RE: Final = re.compile(r"<h1[^>]*>(.*?)</h1", re.IGNORECASE | re.DOTALL)
_XML_CODE_RE: Final = re.compile(r"<Code>\s*([^<]*?)\s*</Code>")
_XML_MESSAGE_RE: Final = re.compile(r"<Message>\s*([^<]*?)\s*</Message>", re.DOTALL)
_INVISIBLE_RE: Final = re.compile(
    r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL
)
_TAG_RE: Final = re.compile(r"<[^>]*>")
_MARKUP_HINTS: Final = ("<!doctype", "<html", "<head", "<body", "<title", "<h1", "</")
#: FastAPI validation errors joined into one message.
_DETAIL_ITEMS: Final = 5
#: A BlueKing APIGateway's own error codes are seven digits starting with 16 (its error reference).
_BK_GATEWAY_CODES: Final = range(1_600_000, 1_700_000)


def _parse_body(
    body: bytes | str | None, content_type: str | None, max_bytes: int
) -> ProviderError | None:
    if not body:
        return None
    text_limit = min(max(max_bytes, 0), JSON_SCAN_MAX_BYTES)
    head = _decode(body, content_type, JSON_SCAN_MAX_BYTES)
    stripped = head.lstrip("\ufeff \t\r\n")
    if not stripped or _looks_binary(stripped):
        return None
    data = _load_json(stripped)
    if data is _TOO_DEEP:
        return None
    if data is not _INVALID:
        return _from_json(data)
    if stripped.startswith("{"):  # an object cut at the bound, or broken: salvage its message
        salvaged = _salvage_message(stripped)
        if salvaged:
            return ProviderError(message=salvaged, format="generic")
    text = _decode(body, content_type, text_limit).lstrip("\ufeff \t\r\n")
    if text.startswith("<"):
        return _from_markup(text)
    if text.startswith(("data:", "event:")):
        return _from_event_stream(stripped) or _from_text(text)
    return _from_text(text)


def _decode(body: bytes | str, content_type: str | None, limit: int) -> str:
    """The first ``limit`` bytes of the body as text (invalid bytes replaced, never an error)."""
    if isinstance(body, str):
        return body[:limit]
    raw = bytes(body[:limit])
    charset = "utf-8"
    if content_type:
        match = _CHARSET_RE.search(content_type)
        if match:
            charset = match.group(1)
    try:
        return raw.decode(charset, "replace")
    except LookupError:  # unknown or non-text codec named by the server
        return raw.decode("utf-8", "replace")


def _looks_binary(text: str) -> bool:
    """NUL, or more than one in ten characters undecodable or control: not an error message."""
    sample = text[:1024]
    if "\x00" in sample:
        return True
    # Counted in C: a Python test per character cost 19 µs on a 1 KiB body, this 0.7 µs (ASCII) or
    # 2.7 µs (other text).
    if sample.isascii():
        raw = sample.encode("ascii")
        bad = len(raw) - len(raw.translate(None, _BINARY_BYTES))
    else:
        bad = len(_BINARY_CHAR_RE.findall(sample))
    return bad * 10 > len(sample)


#: Undecodable (U+FFFD) and control characters other than the whitespace ones (tab, LF, VT, FF, CR).
_BINARY_CHAR_RE: Final = re.compile("[\x00-\x08\x0e-\x1f\ufffd]")
_BINARY_BYTES: Final = bytes([*range(0x00, 0x09), *range(0x0E, 0x20)])


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # nested deeper than the interpreter's stack: hostile, nothing to say
        return _TOO_DEEP
    except ValueError:  # not JSON, or JSON cut short
        return _INVALID


def _salvage_message(text: str) -> str:
    match = _SALVAGE_RE.search(text)
    if match is None:
        return ""
    try:
        value = json.loads(f'"{match.group(1)}"')
    except ValueError:
        return ""
    return value[:MESSAGE_MAX_BYTES] if isinstance(value, str) else ""


def _from_json(data: Any) -> ProviderError | None:
    if isinstance(data, list):  # Google's streaming endpoints answer [{"error": {...}}]
        data = next((item for item in data[:8] if isinstance(item, dict)), None)
    if isinstance(data, dict):
        return _from_mapping(data, depth=0)
    if isinstance(data, str):
        return _from_text(data)
    return None  # a number, true, false, null


def _from_mapping(data: Mapping[str, Any], depth: int) -> ProviderError | None:
    """Match one JSON object against the envelopes, in ``ENVELOPE_FORMATS`` order."""
    error = data.get("error")
    if isinstance(error, Mapping):
        if data.get("type") == "error":
            return _error("anthropic", error.get("message"), error.get("type"), None, depth)
        if isinstance(error.get("status"), str) and _is_int(error.get("code")):
            return _error("google", error.get("message"), error["status"], error["code"], depth)
        return _error("openai", error.get("message"), error.get("type"), error.get("code"), depth)
    if "__type" in data:
        message = data.get("message", data.get("Message"))
        return _error("aws", message, _aws_type(_label(data["__type"])), None, depth)
    if "errcode" in data:
        return _error("kimi", data.get("errmsg"), None, data["errcode"], depth)
    if "code_name" in data or (data.get("result") is False and "code" in data):
        code = data.get("code")
        found = _error("bkapi", data.get("message"), data.get("code_name"), code, depth)
        if data.get("code_name") and _is_int(code) and code in _BK_GATEWAY_CODES:
            return replace(found, origin=ORIGIN_GATEWAY)
        return found
    if isinstance(data.get("code"), str) and "message" in data and _is_int(data.get("status")):
        return _error("dify", data["message"], None, data["code"], depth)
    if isinstance(data.get("title"), str) and ("status" in data or "type" in data):
        kind = data.get("type")
        message = data.get("detail") if isinstance(data.get("detail"), str) else data["title"]
        return _error("problem", message, None if kind == "about:blank" else kind, None, depth)
    if "detail" in data:
        return _from_detail(data["detail"], depth)
    return _from_generic(data, depth)


def _from_detail(detail: Any, depth: int) -> ProviderError | None:
    if isinstance(detail, Mapping):
        return _from_mapping(detail, depth + 1) if depth < 2 else None
    if not isinstance(detail, list):
        return _error("fastapi", detail, None, None, depth)
    parts: list[str] = []
    first_type: Any = None
    for item in detail[:_DETAIL_ITEMS]:
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, Mapping) and isinstance(item.get("msg"), str):
            loc = item.get("loc")
            where = (
                ".".join(str(p) for p in loc if isinstance(p, str | int))
                if isinstance(loc, list)
                else ""
            )
            parts.append(f"{where}: {item['msg']}" if where else item["msg"])
            if first_type is None:
                first_type = item.get("type")
    return _error("fastapi", "; ".join(parts), first_type, None, depth)


_GENERIC_MESSAGE_KEYS: Final = (
    "message",
    "Message",
    "error_description",
    "msg",
    "error_message",
    "errorMessage",
)


def _from_generic(data: Mapping[str, Any], depth: int) -> ProviderError | None:
    message: Any = next((data[k] for k in _GENERIC_MESSAGE_KEYS if data.get(k)), None)
    error = data.get("error")
    code = data.get("code")
    if isinstance(error, str) and error:
        if "error_description" in data and code is None:
            code = error  # OAuth 2.0: `error` is the code, `error_description` the message
        elif message is None:
            message = error
    errors = data.get("errors")
    if message is None and isinstance(errors, list) and errors and isinstance(errors[0], Mapping):
        message = errors[0].get("message")
        code = errors[0].get("code") if code is None else code
    if message is None and code is None:
        return None
    kind = data.get("type") if isinstance(data.get("type"), str) else None
    return _error("generic", message, kind, code, depth)


def _error(fmt: str, message: Any, kind: Any, code: Any, depth: int) -> ProviderError:
    """A bounded ``ProviderError``; a message that is itself a JSON envelope is unwrapped once."""
    text = _message(message)
    type_, code_ = _label(kind), _label(code)
    if depth == 0 and text.lstrip().startswith("{"):
        inner_data = _load_json(text)
        inner = _from_mapping(inner_data, depth=1) if isinstance(inner_data, dict) else None
        if inner is not None and inner.message:
            text = inner.message
            type_, code_ = type_ or inner.type, code_ or inner.code
    return ProviderError(message=text[:MESSAGE_MAX_BYTES], type=type_, code=code_, format=fmt)


def _message(value: Any) -> str:
    """A message value as text: strings as they are (bounded later), lists of strings joined."""
    if isinstance(value, str):
        return value[:JSON_SCAN_MAX_BYTES]
    if isinstance(value, list):  # NestJS: "message": ["name must be a string", ...]
        return "; ".join(v for v in value[:_DETAIL_ITEMS] if isinstance(v, str))
    return _label(value)


def _label(value: Any) -> str:
    """A short field (type, code) as bounded text; numbers become strings, other shapes nothing."""
    if isinstance(value, str):
        return value[:LABEL_MAX_BYTES]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)[:LABEL_MAX_BYTES]
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _aws_type(value: str) -> str:
    """``com.amazon.coral.validate#ValidationException:http://...`` -> ``ValidationException``."""
    return value.rpartition("#")[2].partition(":")[0].strip()


def _from_markup(text: str) -> ProviderError | None:
    code = _XML_CODE_RE.search(text) if "<Error" in text else None
    if code:
        message = _XML_MESSAGE_RE.search(text)
        return ProviderError(
            message=_clean_html(message.group(1)) if message else "",
            type=_clean_html(code.group(1))[:LABEL_MAX_BYTES],
            format="aws",
        )
    lowered = text[:4096].lower()
    if not any(hint in lowered for hint in _MARKUP_HINTS):
        return _from_text(text)  # "<nil>" and friends are text, not markup
    for pattern in (_TITLE_RE, _H1_RE):
        match = pattern.search(text)
        if match:
            title = _clean_html(match.group(1))
            if title:
                return ProviderError(message=title, format="html")
    visible = _clean_html(_INVISIBLE_RE.sub(" ", text))
    return ProviderError(message=visible, format="html") if visible else None


def _clean_html(fragment: str) -> str:
    text = html.unescape(_TAG_RE.sub(" ", fragment))
    return " ".join(text.split())[:MESSAGE_MAX_BYTES]


def _from_event_stream(text: str) -> ProviderError | None:
    """A streamed (SSE) error: the first ``data:`` line holding a JSON envelope."""
    for line in text.splitlines()[:64]:
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload.startswith("{"):
                data = _load_json(payload)
                if isinstance(data, dict):
                    found = _from_mapping(data, depth=0)
                    if found is not None:
                        return found
    return None


def _from_text(text: str) -> ProviderError | None:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return ProviderError(message=line[:MESSAGE_MAX_BYTES], format="text")
    return None


# --- headers --------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str] | None, name: str) -> str:
    """The value of header ``name`` (given in lower case), ``""`` when absent.

    Case-insensitive mappings (``httpx.Headers``, requests' ``CaseInsensitiveDict``) and lower-case
    dicts answer the first ``get``; other dicts are scanned once, comparing lower-cased keys.
    """
    if not headers:
        return ""
    if type(headers) is _LowerCaseHeaders:
        return headers.get(name, "")
    value: object = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if str(k).lower() == name), None)
        if value is None:
            return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else str(value)


class _LowerCaseHeaders(dict[str, str]):
    """Headers read once into a dict by lower-cased name, each value as ``_header`` reads it.

    A failed attempt's event reads a dozen headers, most of them absent; ``httpx.Headers`` decodes
    and compares every header for each of those reads, and the fallback scan of ``_header`` reads
    them all again for each absent one. From this dict each read is one lookup.
    """

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> _LowerCaseHeaders:
        """``headers`` read once; ``_header`` answers the same from it as from them."""
        httpx = sys.modules.get("httpx")
        if type(headers) is dict or (httpx is not None and isinstance(headers, httpx.Headers)):
            # Their pairs are what their lookups give (httpx.Headers lower-cases the names and
            # joins a repeated name's values, as its get does): taken in one C call when the
            # names are in lower case and the values text.
            found = cls(headers.items())
            try:
                names = "".join(found)
            except TypeError:  # a name that is not text
                names = "A"
            if names == names.lower() and set(map(type, found.values())) <= _STR_TYPE:
                return found
        # Any other mapping (requests' and urllib3's, whose items() may give a repeated name once
        # a value): each name it holds looked up once, as _header looks it up.
        found = cls()
        for name in dict.fromkeys(str(key).lower() for key in headers):
            value = _header(headers, name)
            if value:
                found[name] = value
        return found


_STR_TYPE: Final = frozenset({str})


def _apply_headers(found: ProviderError | None, headers: Mapping[str, str]) -> ProviderError | None:
    """Headers that name the error: AWS ``x-amzn-ErrorType``, BlueKing ``X-Bkapi-Error-*``."""
    aws_type = _aws_type(_header(headers, "x-amzn-errortype"))[:LABEL_MAX_BYTES]
    if aws_type:
        if found is None:
            found = ProviderError(type=aws_type, format="aws")
        elif found.format in ("generic", "text", "html", "aws"):
            # AWS API Gateway and Bedrock: {"message": ...} plus the header naming the type.
            found = replace(found, type=found.type or aws_type, format="aws")
        elif not found.type:
            found = replace(found, type=aws_type)
    bk_code = _header(headers, "x-bkapi-error-code").strip()[:LABEL_MAX_BYTES]
    if bk_code:
        bk_message = _header(headers, "x-bkapi-error-message").strip()[:MESSAGE_MAX_BYTES]
        if found is not None and found.format == "bkapi":
            found = replace(found, code=found.code or bk_code, message=found.message or bk_message)
        else:  # the gateway answered, whatever the body looks like
            found = ProviderError(
                message=bk_message or (found.message if found else ""),
                type=found.type if found else "",
                code=bk_code,
                format="bkapi",
            )
        found = replace(found, origin=ORIGIN_GATEWAY)
    return found
