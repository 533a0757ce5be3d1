"""One failed upstream attempt: the event model and its JSON shape.

The JSON keys and the rule "empty fields are omitted" follow the Go reference design
(``OpsUpstreamErrorEvent``), so records are interchangeable with gateways that already store that shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, Final

# Canonical kinds. Other strings are accepted: gateways invent their own.
HTTP_ERROR: Final = "http_error"
REQUEST_ERROR: Final = "request_error"
RETRY: Final = "retry"
RETRY_EXHAUSTED: Final = "retry_exhausted"
FAILOVER: Final = "failover"
STREAM_ERROR: Final = "stream_error"
CIRCUIT_OPEN: Final = "circuit_open"
KINDS: Final = (
    HTTP_ERROR,
    REQUEST_ERROR,
    RETRY,
    RETRY_EXHAUSTED,
    FAILOVER,
    STREAM_ERROR,
    CIRCUIT_OPEN,
)

# Who produced the error: an intermediate gateway, or the upstream service itself.
ORIGIN_GATEWAY: Final = "gateway"
ORIGIN_UPSTREAM: Final = "upstream"


@dataclass(slots=True)
class _EventFields:
    """The fields of an event, unchecked; ``UpstreamErrorEvent`` adds the checks.

    Apart so that code which has checked every value already (a copy, the collector) can build an
    event without paying for the checks again: they cost more than the rest of the construction.
    """

    at_unix_ms: int = 0
    platform: str = ""
    account_id: int = 0
    upstream_status_code: int = 0
    upstream_request_id: str = ""
    kind: str = ""
    message: str = ""
    detail: str = ""
    account_name: str = ""
    model: str = ""
    method: str = ""
    upstream_url: str = ""
    attempt: int = 0
    duration_ms: float = 0.0
    error_class: str = ""
    error_type: str = ""
    phase: str = ""
    retryable: bool | None = None
    retry_after_ms: int = 0
    provider_error_type: str = ""
    provider_error_code: str = ""
    origin: str = ""


@dataclass(slots=True)
class UpstreamErrorEvent(_EventFields):
    """One failed upstream attempt (an HTTP error, a transport error, a retry, a failover ...).

    Field order is the JSON order: the Go reference fields first, then the optional extensions.
    Construction validates types and raises ``ValueError`` naming the field; it does not sanitize
    (``append_upstream_error`` does that before anything is stored).
    """

    def __post_init__(self) -> None:
        for name, expected in _FIELD_TYPES:
            value = getattr(self, name)
            if type(value) is expected:
                continue
            setattr(self, name, coerce_field(name, expected, value))

    def __copy__(self) -> UpstreamErrorEvent:
        # copy.copy's generic path (__reduce_ex__ and a state dict) costs 2.5x this, on every event.
        clone = object.__new__(UpstreamErrorEvent)
        _EventFields.__init__(clone, *field_values(self))
        return clone

    @classmethod
    def _from_checked(cls, values: Mapping[str, Any]) -> UpstreamErrorEvent:
        """An event of ``values`` that are known to have their fields' types (no checks)."""
        event = object.__new__(cls)
        _EventFields.__init__(event, **values)
        return event

    @classmethod
    def _from_field_values(cls, values: tuple[Any, ...]) -> UpstreamErrorEvent:
        """The event whose ``field_values`` were ``values`` (no checks: they came from an event)."""
        event = object.__new__(cls)
        _EventFields.__init__(event, *values)
        return event

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict: empty strings, zeros and ``None`` are omitted (``retryable=False`` is kept)."""
        out: dict[str, Any] = {}
        for name, value in zip(_FIELD_NAMES, field_values(self), strict=True):
            if value is None or value == "" or (value == 0 and value is not False):
                continue
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpstreamErrorEvent:
        """Rebuild an event from its dict; unknown keys (from newer writers) are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _FIELD_SET})


_FIELD_NAMES: Final = tuple(f.name for f in fields(UpstreamErrorEvent))
_FIELD_SET: Final = frozenset(_FIELD_NAMES)
_FIELD_TYPES: Final = tuple(
    (f.name, {"int": int, "str": str, "float": float}.get(str(f.type), bool))
    for f in fields(UpstreamErrorEvent)
)
#: Each field's type (``bool`` for ``retryable``, which may also be ``None``), for code that checks
#: the few fields it was given instead of constructing an event to check all of them.
FIELD_TYPES: Final = dict(_FIELD_TYPES)
#: The values of an event's fields, in field order, at once (one C call instead of a getattr each).
field_values: Final = attrgetter(*_FIELD_NAMES)

# The event's slots as the C extension's event_from_fields sets them, in field order: (name,
# descriptor, default, step), the step being 1 for the method (upper-cased) and 2 for at_unix_ms
# (from the clock when missing or not positive), as collector._event_from_fields does in Python.
_EVENT_SLOTS: Final = tuple(
    (
        f.name,
        _EventFields.__dict__[f.name],
        f.default,
        {"method": 1, "at_unix_ms": 2}.get(f.name, 0),
    )
    for f in fields(UpstreamErrorEvent)
)

#: Public: the event field names, in JSON order.
EVENT_FIELDS: Final = _FIELD_NAMES


def coerce_field(name: str, expected: type, value: object) -> object:
    """``value`` as field ``name`` (of type ``expected``) holds it: the obvious spellings are accepted
    (``"42"`` for an int, ``None`` for empty); anything else raises ``ValueError`` naming the field."""
    if value is None:
        return None if expected is bool else expected()
    if expected is str:
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, str):
            return str(value)
    elif expected is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, bool):
        pass  # True is not an account id
    elif expected is int:
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())
    elif expected is float and isinstance(value, int | float):
        return float(value)
    raise ValueError(
        f"UpstreamErrorEvent.{name} must be {_TYPE_WORDS[expected]}, got {type(value).__name__} "
        f"{value!r:.60}"
    )


_TYPE_WORDS: Final = {int: "an integer", str: "a string", float: "a number", bool: "a bool or None"}


def marshal_upstream_errors(events: Iterable[UpstreamErrorEvent]) -> str | None:
    """The events as one compact JSON array, or ``None`` when there are none (like the Go helper)."""
    items = [event.to_dict() for event in events]
    if not items:
        return None
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))


def unmarshal_upstream_errors(text: str | None) -> list[UpstreamErrorEvent]:
    """Parse what ``marshal_upstream_errors`` wrote; ``None`` or an empty string gives ``[]``."""
    if not text:
        return []
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("upstream_errors must be a JSON array")
    return [UpstreamErrorEvent.from_dict(item) for item in data]
