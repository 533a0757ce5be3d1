"""The request-scoped collector: the Python analogue of the Gin context keys of the Go design.

The middleware puts one fresh ``Collector`` per request into a ``ContextVar``. Code anywhere below it
(endpoints, the threadpool, background tasks, capture transports) appends events through the module
functions, which find the collector through that variable. The collector is a mutable object, so it is
shared by every context copied from the request's (tasks, threads); the variable itself is set once and
never relied on to propagate upwards. Outside a request every function is a silent no-op.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from operator import attrgetter
from typing import Any, Final, ParamSpec, TypeVar

from upstream_ops import sanitize as _sanitize_module
from upstream_ops._ids import uuid7_hex
from upstream_ops.defaults import MAX_EVENTS_PER_REQUEST
from upstream_ops.events import (
    _EVENT_SLOTS,
    EVENT_FIELDS,
    FIELD_TYPES,
    UpstreamErrorEvent,
    coerce_field,
    field_values,
)
from upstream_ops.labels import NO_LABELS
from upstream_ops.labels import _current as _labels_var
from upstream_ops.sanitize import (
    DETAIL_TEXT,
    LABEL_TEXT,
    MESSAGE_TEXT,
    URL_TEXT,
    Sanitizer,
    get_default_sanitizer,
    sanitize_detail,
    sanitize_label,
    sanitize_message,
)

__all__ = [
    "Collector",
    "append_upstream_error",
    "current_collector",
    "get_upstream_errors",
    "new_request_id",
    "set_upstream_error",
    "wrap_context",
]

logger = logging.getLogger("upstream_ops")

P = ParamSpec("P")
R = TypeVar("R")

EventListener = Callable[[UpstreamErrorEvent], None]

_current: contextvars.ContextVar[Collector | None] = contextvars.ContextVar(
    "upstream_ops_collector", default=None
)
# One lock for every collector: it is held for a few bytecodes when an event is stored or an attempt
# counted, which is rare next to the requests that make a collector and never take it. A forked child
# gets a fresh one: a thread of the parent may have held it at the fork.
_lock = threading.Lock()
# labels.current_labels() without its Python call, for every event. Bound here: a method called on
# an imported name compiles to an attribute load that makes a bound method at every call.
_current_labels: Final = _labels_var.get


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

#: A request's id when none came: a UUIDv7 in hex (``_ids.uuid7_hex``), 32 lower-case hex digits
#: like a uuid4 hex, time-ordered so that the stores' request-id indexes grow at their end.
new_request_id: Final = uuid7_hex


# How each text field of an event is cleaned: short fields are bounded and redacted like labels;
# ``message``, ``detail`` and ``upstream_url`` have their own rules.
_TEXT_KINDS: Final[dict[str, int]] = {
    "platform": LABEL_TEXT,
    "upstream_request_id": LABEL_TEXT,
    "kind": LABEL_TEXT,
    "message": MESSAGE_TEXT,
    "detail": DETAIL_TEXT,
    "account_name": LABEL_TEXT,
    "model": LABEL_TEXT,
    "method": LABEL_TEXT,
    "upstream_url": URL_TEXT,
    "error_class": LABEL_TEXT,
    "error_type": LABEL_TEXT,
    "phase": LABEL_TEXT,
    "provider_error_type": LABEL_TEXT,
    "provider_error_code": LABEL_TEXT,
    "origin": LABEL_TEXT,
}
# Each field's type, for text its kind of text, and its place among the event's slots
# (events._EVENT_SLOTS): one lookup per field given as a keyword.
_FIELD_RULES: Final[dict[str, tuple[type, int | None, int]]] = {
    name: (expected, _TEXT_KINDS.get(name), index)
    for index, (name, expected) in enumerate(FIELD_TYPES.items())
}
# An event object's text fields with their kinds, and their values read in one call.
_TEXT_FIELD_KINDS: Final = tuple(_TEXT_KINDS.items())
_text_values: Final = attrgetter(*_TEXT_KINDS)

# _event_from_fields in C where a compiler built upstream_ops._speedups: it checks each field's type
# and takes each text's cleaned result from the sanitizer's kept results, and makes the event when
# it finishes every field; else it stops at the first field it cannot finish, which the Python loop
# takes from there.
_event_pass: Callable[..., UpstreamErrorEvent | int] | None
try:
    from upstream_ops._speedups import event_from_fields as _event_pass
except ImportError:  # pragma: no cover - depends on the build
    _event_pass = None


class Collector:
    """Everything one request learns about its upstreams, until the middleware builds the record.

    Thread-safe: endpoints in the threadpool and concurrent tasks may append at once. Keeps the last
    ``max_events`` events and counts the ones it dropped, so a retry storm cannot grow memory.
    """

    # Most requests never see an upstream failure: what stays at its default is read from the
    # class, so a healthy request's collector costs three attribute stores. (No ``__slots__``:
    # slots cannot have class defaults.)
    _events: deque[UpstreamErrorEvent] | tuple[()] = ()  # a deque from the first append
    _request_id: str | None = None  # made at the first read
    _finished = False
    _attempts = 0
    _sends: dict[tuple[str, str], int] | None = None
    dropped_events = 0
    upstream_status_code: int | None = None
    upstream_error_message: str | None = None
    upstream_error_detail: str | None = None

    def __init__(
        self, request_id: str | None = "", max_events: int = MAX_EVENTS_PER_REQUEST
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events!r}")
        if request_id is not None:
            self._request_id = request_id
        self._max_events = max_events
        #: Called with each stored event (telemetry hooks in here); a failing listener is logged.
        self.listeners: list[EventListener] = []

    @property
    def request_id(self) -> str:
        """The request's id; with ``None`` given, a new one (``new_request_id``) made at the first
        read, so that a request nobody asks about (most of them) costs no id."""
        request_id = self._request_id
        if request_id is None:
            # setdefault is atomic: two threads reading it first both get the id stored first.
            request_id = self.__dict__.setdefault("_request_id", new_request_id())
        return request_id

    @request_id.setter
    def request_id(self, value: str | None) -> None:
        if value is None:
            self.__dict__.pop("_request_id", None)  # a new one at the next read
        else:
            self._request_id = value

    @property
    def events(self) -> list[UpstreamErrorEvent]:
        """A copy of the events kept so far, oldest first."""
        # No lock: list() copies the deque in one C call, which no other thread can interleave with
        # under the interpreter lock. The lock guards _store's read-then-write, not a read.
        return list(self._events)

    def has_events(self) -> bool:
        """Whether an event is kept; cheaper than ``events`` (no copy), for the end of every request."""
        return bool(self._events)

    @property
    def finished(self) -> bool:
        """True once the record was built; later appends are ignored."""
        return self._finished

    def append(self, event: UpstreamErrorEvent) -> UpstreamErrorEvent | None:
        """Sanitize and store ``event``; returns the stored copy, or ``None`` when it was empty."""
        if self._finished:
            return None
        return self._store(_clean_event(copy.copy(event)))

    def _append_own(self, event: UpstreamErrorEvent) -> UpstreamErrorEvent | None:
        """:meth:`append` for an event made for this call (the capture integrations' own), which
        is cleaned and kept without a copy."""
        if self._finished:
            return None
        return self._store(_clean_event(event))

    def _store(self, stored: UpstreamErrorEvent) -> UpstreamErrorEvent | None:
        """Keep ``stored``, an event made and cleaned for this call, unless it is empty."""
        if self._finished:
            return None
        if not stored.upstream_status_code and not stored.message and not stored.detail:
            return None
        # Not ``with _lock``: its __enter__ and __exit__ calls cost twice acquire() and release().
        _lock.acquire()
        try:
            events = self._events
            if isinstance(events, deque):
                if len(events) == self._max_events:  # its maxlen, read from self: cheaper
                    self.dropped_events += 1
                events.append(stored)
            else:  # the first event; positional: deque(maxlen=n) parses a keyword, at 1,800 more
                self._events = deque((stored,), self._max_events)
        finally:
            _lock.release()
        for listener in self.listeners:
            try:
                listener(stored)
            except Exception:
                logger.exception("upstream_ops: an event listener failed")
        return stored

    def set_summary(self, status_code: int, message: str = "", detail: str = "") -> None:
        """The request's summary of its upstream failure; non-positive status and blank text ignored."""
        if self._finished:
            return
        if isinstance(status_code, int) and not isinstance(status_code, bool) and status_code > 0:
            self.upstream_status_code = status_code
        if message := sanitize_message(message):
            self.upstream_error_message = message
        if detail := sanitize_detail(detail):
            self.upstream_error_detail = detail

    @property
    def attempts(self) -> int:
        """How many upstream attempts the capture integrations made in this request so far."""
        return self._attempts

    def next_attempt(self) -> int:
        """The 1-based number of the next upstream attempt in this request (capture integrations)."""
        # acquire/release rather than ``with``: half the instructions in CPython 3.11, and this
        # runs for every captured attempt.
        _lock.acquire()
        try:
            self._attempts = number = self._attempts + 1
        finally:
            _lock.release()
        return number

    def finish(self) -> None:
        """Close the collector: the record is being built from it."""
        self._finished = True

    def close(self) -> bool:
        """:meth:`finish`, and say whether the request left nothing to record: no event kept or
        dropped and no summary. One call at the end of every request."""
        self._finished = True
        return not (
            self._events
            or self.upstream_status_code
            or self.dropped_events
            or self.upstream_error_message is not None
            or self.upstream_error_detail is not None
        )

    def count_send(self, method: str, url: str) -> int:
        """Count one upstream attempt to ``method url``; returns how many earlier attempts in this
        request had the same method and URL (OpenTelemetry's ``http.request.resend_count``)."""
        key = (method, url)
        with _lock:
            sends = self._sends
            if sends is None:
                sends = self._sends = {}
            earlier = sends.get(key, 0)
            sends[key] = earlier + 1
        return earlier


def _clean_event(clean: UpstreamErrorEvent) -> UpstreamErrorEvent:
    """``clean`` sanitized and trimmed in place, with its timestamp filled in."""
    if clean.at_unix_ms <= 0:
        clean.at_unix_ms = time.time_ns() // 1_000_000
    sanitizer = get_default_sanitizer()
    cached = sanitizer.cached_results()  # a text cleaned before needs no call
    for (name, kind), value in zip(_TEXT_FIELD_KINDS, _text_values(clean), strict=True):
        if value:
            cleaned = cached[kind].get(value) if type(value) is str else None
            if cleaned is None:
                cleaned = sanitizer.clean(kind, value)
            if cleaned is not value:
                setattr(clean, name, cleaned)
    if clean.method:
        clean.method = clean.method.upper()
    return clean


def _event_from_fields(fields: dict[str, Any]) -> UpstreamErrorEvent:
    """``_clean_event(UpstreamErrorEvent(**fields))`` at a third of the cost: each given field is
    checked and cleaned in one pass (a text cleaned before comes from the sanitizer's results), the
    others keep their empty defaults. May change ``fields`` in place. With the C extension, its
    ``event_from_fields`` runs the pass and makes the event; when it stops at a field it cannot
    finish, the loop here goes on from there."""
    sanitizer = get_default_sanitizer()
    cached = sanitizer.cached_results()
    items: Iterable[tuple[str, Any]] = fields.items()
    if _event_pass is not None:
        made = _event_pass(fields, _FIELD_RULES, cached, UpstreamErrorEvent, _EVENT_SLOTS)
        if not isinstance(made, int):
            return made
        items = islice(items, made, None)
    value: Any
    try:
        for name, value in items:
            expected, kind, _ = _FIELD_RULES[name]
            if type(value) is not expected:
                value = fields[name] = coerce_field(name, expected, value)
            if kind is not None and value:
                cleaned = cached[kind].get(value)
                fields[name] = cleaned if cleaned is not None else sanitizer.clean(kind, value)
    except KeyError:
        raise TypeError(f"UpstreamErrorEvent has no field {name!r}") from None
    if method := fields.get("method"):
        fields["method"] = method.upper()
    if fields.get("at_unix_ms", 0) <= 0:
        fields["at_unix_ms"] = time.time_ns() // 1_000_000
    return UpstreamErrorEvent._from_checked(fields)


def current_collector() -> Collector | None:
    """The collector of the request being served here, or ``None`` outside a request."""
    return _current.get()


def append_upstream_error(
    event: UpstreamErrorEvent | None = None, /, **fields: Any
) -> UpstreamErrorEvent | None:
    """Record one failed upstream attempt on the current request.

    Pass an ``UpstreamErrorEvent`` or its fields as keywords (or both: keywords override). Label
    fields left empty are taken from the enclosing ``upstream(...)`` block. Fills ``at_unix_ms``, trims
    and sanitizes every string, and drops an event with no status, no message and no detail. Never
    raises into the app: an invalid field is logged as a warning naming it and the event is skipped.
    Returns the stored (sanitized) event, or ``None``.
    """
    collector = _current.get()
    if collector is None:
        return None
    try:
        if collector._finished:
            return None  # before the sanitizer's work, which would be thrown away
        if event is None:
            stored = _event_from_fields(fields)
        elif fields:  # keywords override the event's fields; the caller's object is not changed
            given = dict(zip(EVENT_FIELDS, field_values(event), strict=True))
            given.update(fields)
            stored = _event_from_fields(given)
        else:
            stored = _clean_event(copy.copy(event))
        labels = _current_labels()
        if labels is not NO_LABELS:
            labels.fill(stored, sanitize_label)
        return collector._store(stored)
    except (TypeError, ValueError) as exc:
        logger.warning("upstream_ops: event not recorded: %s", exc)
        return None


def _bind_c_appender() -> None:
    """``append_upstream_error(**fields)`` in one C call, where a compiler built
    ``upstream_ops._speedups``.

    The keywords' dict is taken as it comes (a Python function unpacks and gathers it again), the
    pass runs, and the event is stored as ``Collector._store`` stores it. The C object does the
    common case only (fields as keywords, a ``Collector``, the default ``Sanitizer``, every field
    finished by the pass, no listeners) and calls the Python function above, with the arguments as
    they came, for anything else. Setting ``_event_pass`` to None switches both off (the tests run
    both ways). Bound through ``globals()`` so that the documentation and type checkers, which read
    the source, see the function whose signature and docstring the object carries.
    """
    try:
        from upstream_ops._speedups import Appender
    except ImportError:  # pragma: no cover - depends on the build
        return
    python = append_upstream_error
    appender = Appender(
        python,
        _current,
        _labels_var,
        NO_LABELS,
        Collector,
        globals(),
        vars(_sanitize_module),
        Sanitizer,
        _FIELD_RULES,
        UpstreamErrorEvent,
        _EVENT_SLOTS,
        deque,
        sanitize_label,
    )
    globals()["append_upstream_error"] = functools.update_wrapper(appender, python)


_bind_c_appender()


def set_upstream_error(status_code: int, message: str = "", detail: str = "") -> None:
    """Set the current request's upstream failure summary (``upstream_status_code`` etc. on the record)."""
    collector = _current.get()
    if collector is not None:
        collector.set_summary(status_code, message, detail)


def get_upstream_errors() -> list[UpstreamErrorEvent]:
    """The events recorded so far in the current request (a copy); ``[]`` outside a request."""
    collector = _current.get()
    return [] if collector is None else collector.events


def wrap_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Bind ``fn`` to the current request so it can record from a ``ThreadPoolExecutor`` or a thread.

    The context is captured when ``wrap_context`` is called; every call runs in its own copy of it, so
    the wrapped function may run in several threads at once.
    """
    context = contextvars.copy_context()

    @functools.wraps(fn)
    def run_in_request_context(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(fn, *args, **kwargs)

    return run_in_request_context


def _activate(collector: Collector | None) -> contextvars.Token[Collector | None]:
    """Make ``collector`` current (integrations only)."""
    return _current.set(collector)


def _deactivate(token: contextvars.Token[Collector | None]) -> None:
    """Undo ``_activate``; tolerate being called from another context (WSGI iteration in a thread)."""
    try:
        _current.reset(token)
    except ValueError:
        _current.set(None)
