"""The C extension's event helpers agree with the Python code they stand in for.

``event_from_fields`` is ``collector._event_from_fields`` in C (each field's type checked, each
text's cleaned result taken from the sanitizer's kept results, the event made); ``Appender`` is
``append_upstream_error`` in C for its common case, and hands every other call to the Python
function; ``event_key`` tells
what the SQLite sink's writer works out for each event's row (plain types, which fields are set).
Each is checked against the Python path on generated input; ``tests/test_collector.py`` and
``tests/test_sinks_sqlite_rows.py`` run with and without them. In CI the extension must be built.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from operator import truth
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sink_records import full_event
from tests.speedups import require_extension
from upstream_ops import collector as collector_module
from upstream_ops import events as events_module
from upstream_ops import wrap_context
from upstream_ops.collector import Collector
from upstream_ops.events import EVENT_FIELDS, FIELD_TYPES, UpstreamErrorEvent, field_values
from upstream_ops.sanitize import MESSAGE_TEXT, Sanitizer, get_default_sanitizer
from upstream_ops.sinks import _sqlite_rows

try:
    from upstream_ops import _speedups
except ImportError:  # pragma: no cover - depends on the build
    _speedups = None  # type: ignore[assignment]

SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture(autouse=True)
def extension() -> None:
    require_extension(_speedups)


# --- event_from_fields ------------------------------------------------------------------------------


def event_from_fields(fields: dict[str, Any], *, with_c: bool) -> UpstreamErrorEvent | str:
    """``_event_from_fields`` on a copy of ``fields``, with or without the C pass; an error as text."""
    with pytest.MonkeyPatch.context() as patch:
        if not with_c:
            patch.setattr(collector_module, "_event_pass", None)
        try:
            return collector_module._event_from_fields(dict(fields))
        except (TypeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"


# Texts the sanitizer has kept results for (cleaned as every kind of text first) and texts it has not.
SEEN = ["openai", "POST", f"Bearer {SECRET}", "upstream returned 429", "https://u:p@h/x?key=v"]


@pytest.fixture(autouse=True)
def seen_texts_kept() -> None:
    sanitizer = get_default_sanitizer()
    for kind in range(len(sanitizer.cached_results())):
        for text in SEEN:
            sanitizer.clean(kind, text)


text_values = st.one_of(
    st.sampled_from(["", *SEEN]),
    st.text(max_size=30),
    st.text(max_size=10).map(lambda t: f"password={t}"),
)
# Values of each declared type and of the others, including what coerce_field accepts or refuses.
any_values = st.one_of(
    text_values,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.sampled_from([None, True, False, b"bytes", "42", 3.0, [1]]),
)


def field_values_for(name: str) -> st.SearchStrategy[Any]:
    expected = FIELD_TYPES[name]
    typed: st.SearchStrategy[Any]
    if expected is str:
        typed = text_values
    elif expected is int:
        typed = st.integers(min_value=-(2**62), max_value=2**62)
    elif expected is float:
        typed = st.floats(allow_nan=False)
    else:
        typed = st.sampled_from([None, True, False])
    return st.one_of(typed, typed, any_values)


field_dicts = st.lists(
    st.sampled_from(EVENT_FIELDS), unique=True, max_size=len(EVENT_FIELDS)
).flatmap(lambda names: st.fixed_dictionaries({name: field_values_for(name) for name in names}))


@settings(max_examples=400, deadline=None)
@given(field_dicts, st.sampled_from([None, "bogus", "Platform"]))
def test_an_event_from_fields_is_the_same_with_and_without_the_c_pass(
    fields: dict[str, Any], unknown: str | None
) -> None:
    if unknown is not None:
        fields[unknown] = "x"
    with_c = event_from_fields(fields, with_c=True)
    without = event_from_fields(fields, with_c=False)
    if isinstance(with_c, UpstreamErrorEvent) and isinstance(without, UpstreamErrorEvent):
        given_at = fields.get("at_unix_ms")
        if not (isinstance(given_at, int) and given_at > 0):
            without.at_unix_ms = with_c.at_unix_ms  # filled in from the clock, a ms apart
        assert _same(field_values(with_c), field_values(without))
    else:
        assert with_c == without


def _same(left: tuple[Any, ...], right: tuple[Any, ...]) -> bool:
    """Equal, a NaN being equal to a NaN."""
    return all(
        a == b
        or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        for a, b in zip(left, right, strict=True)
    )


def c_pass(
    fields: dict[Any, Any], cached: tuple[Mapping[str, str], ...] | None = None
) -> UpstreamErrorEvent | int:
    """``event_from_fields`` as ``_event_from_fields`` calls it."""
    made: UpstreamErrorEvent | int = _speedups.event_from_fields(
        fields,
        collector_module._FIELD_RULES,
        get_default_sanitizer().cached_results() if cached is None else cached,
        UpstreamErrorEvent,
        events_module._EVENT_SLOTS,
    )
    return made


def test_it_finishes_the_fields_it_can_and_stops_at_the_first_it_cannot() -> None:
    cached = get_default_sanitizer().cached_results()
    secret = f"Bearer {SECRET}"
    fields: dict[str, Any] = {
        "platform": "openai",
        "message": secret,
        "attempt": 2,
        "detail": "",
        "upstream_status_code": "429",  # to coerce: Python's
        "model": secret,
    }
    done = c_pass(fields)
    assert done == 4
    assert fields["message"] == cached[MESSAGE_TEXT][secret] != secret
    assert SECRET not in fields["message"]
    assert fields["upstream_status_code"] == "429"
    assert fields["model"] == secret  # after the stop: untouched


def test_a_text_not_cleaned_before_an_unknown_name_or_an_odd_type_is_left_to_python() -> None:
    never_seen = f"never seen {os.urandom(8).hex()} {SECRET}"

    class Text(str):
        pass

    for fields in (
        {"message": never_seen},
        {"no_such_field": "x"},
        {"platform": Text("openai")},
        {"attempt": True},
        {"retryable": 1},
    ):
        before = dict(fields)
        assert c_pass(fields) == 0
        assert fields == before
    # A sanitizer subclass keeps no results for callers: every text is its own methods' to clean.
    subclass_results = type("Custom", (Sanitizer,), {})().cached_results()
    assert c_pass({"platform": "openai"}, subclass_results) == 0
    made = c_pass({"attempt": 1, "platform": ""}, subclass_results)
    assert isinstance(made, UpstreamErrorEvent) and made.attempt == 1 and made.platform == ""


def test_the_event_made_in_c_has_every_field_given_the_defaults_and_a_time() -> None:
    sanitizer = get_default_sanitizer()
    for kind in range(len(sanitizer.cached_results())):
        sanitizer.clean(kind, "post")  # kept: the pass finishes the method and upper-cases it
    before = time.time_ns() // 1_000_000
    made = c_pass({"method": "post", "platform": "openai", "retryable": True, "duration_ms": 1.5})
    assert isinstance(made, UpstreamErrorEvent)
    expected = UpstreamErrorEvent(
        method="POST",
        platform="openai",
        retryable=True,
        duration_ms=1.5,
        at_unix_ms=made.at_unix_ms,
    )
    assert made == expected
    assert before <= made.at_unix_ms <= time.time_ns() // 1_000_000
    given = c_pass({"at_unix_ms": 1_700_000_000_000, "message": ""})
    assert isinstance(given, UpstreamErrorEvent) and given.at_unix_ms == 1_700_000_000_000
    assert c_pass({"at_unix_ms": -5}).at_unix_ms >= before  # type: ignore[union-attr]
    assert c_pass({"at_unix_ms": 2**80}).at_unix_ms == 2**80  # type: ignore[union-attr]


def test_event_from_fields_refuses_arguments_of_other_types() -> None:
    rules, cached = collector_module._FIELD_RULES, get_default_sanitizer().cached_results()
    slots = events_module._EVENT_SLOTS
    with pytest.raises(TypeError, match="5 arguments"):
        _speedups.event_from_fields({}, rules, cached)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="a dict, a dict, a tuple, a type and slots"):
        _speedups.event_from_fields([], rules, cached, UpstreamErrorEvent, slots)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a dict, a dict, a tuple, a type and slots"):
        _speedups.event_from_fields({}, rules, list(cached), UpstreamErrorEvent, slots)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="slots must be"):
        _speedups.event_from_fields({}, rules, cached, UpstreamErrorEvent, (("platform",),))  # type: ignore[arg-type]


def test_a_name_whose_comparison_changes_the_dict_does_not_break_the_pass() -> None:
    """Python code run by a lookup (a str subclass's ``__eq__``) may change the dict being walked."""
    fields: dict[str, Any] = {}

    class Name(str):
        def __hash__(self) -> int:
            return hash(str(self))

        def __eq__(self, other: object) -> bool:
            fields.clear()
            return str(self) == other

    fields.update({"platform": "openai", Name("attempt"): 1, "model": "m"})
    made = c_pass(fields)
    assert isinstance(made, int) and 0 <= made <= 3  # left to Python: a name is no exact str


def test_append_upstream_error_uses_the_c_pass() -> None:
    assert collector_module._event_pass is _speedups.event_from_fields


# --- Appender: append_upstream_error(**fields) in one C call -----------------------------------------


def test_append_upstream_error_is_the_c_appender_wrapping_the_python_function() -> None:
    appender = collector_module.append_upstream_error
    assert isinstance(appender, _speedups.Appender)
    python = appender.__wrapped__  # type: ignore[attr-defined]
    assert inspect.isfunction(python) and python.__module__ == "upstream_ops.collector"
    assert getattr(appender, "__name__", None) == "append_upstream_error"
    assert appender.__doc__ == python.__doc__
    assert inspect.signature(appender) == inspect.signature(python)
    # Pickled and copied by name, as a function is.
    assert pickle.loads(pickle.dumps(appender)) is appender
    assert copy.copy(appender) is appender and copy.deepcopy(appender) is appender


class Spy:
    """The Python ``append_upstream_error``, counting the calls an ``Appender`` hands it."""

    def __init__(self) -> None:
        self.calls = 0
        self.python = collector_module.append_upstream_error.__wrapped__  # type: ignore[attr-defined]

    def __call__(self, *args: Any, **fields: Any) -> UpstreamErrorEvent | None:
        self.calls += 1
        stored: UpstreamErrorEvent | None = self.python(*args, **fields)
        return stored


def appender_args(fallback: Callable[..., Any]) -> list[Any]:
    """The arguments the collector module makes its own ``Appender`` with, around ``fallback``."""
    from upstream_ops import labels, sanitize

    return [
        fallback,
        collector_module._current,
        labels._current,
        labels.NO_LABELS,
        Collector,
        vars(collector_module),
        vars(sanitize),
        Sanitizer,
        collector_module._FIELD_RULES,
        UpstreamErrorEvent,
        events_module._EVENT_SLOTS,
        deque,
        sanitize.sanitize_label,
    ]


def appender(fallback: Callable[..., Any]) -> Callable[..., Any]:
    made: Callable[..., Any] = _speedups.Appender(*appender_args(fallback))
    return made


@contextmanager
def current(collector: Collector) -> Iterator[Collector]:
    token = collector_module._activate(collector)
    try:
        yield collector
    finally:
        collector_module._deactivate(token)


#: Fields whose texts the sanitizer has kept results for (``seen_texts_kept``).
KEPT = {
    "platform": "openai",
    "method": "POST",
    "upstream_status_code": 429,
    "message": f"Bearer {SECRET}",
    "upstream_url": "https://u:p@h/x?key=v",
    "attempt": 2,
    "duration_ms": 12.5,
    "retryable": True,
}


def test_the_common_case_is_stored_in_c_as_python_stores_it() -> None:
    spy = Spy()
    append = appender(spy)
    with current(Collector("r", max_events=4)) as in_c:
        stored = append(**KEPT)
    with current(Collector("r", max_events=4)) as in_python:
        expected = spy.python(**KEPT)
    assert spy.calls == 0
    assert stored is not None and expected is not None
    assert in_c.events == [stored] and in_c.events[0] is stored
    expected.at_unix_ms = stored.at_unix_ms
    assert stored == expected
    assert SECRET not in stored.message and "h/x" in stored.upstream_url
    assert in_python.events == [expected]


@settings(max_examples=300, deadline=None)
@given(field_dicts)
def test_the_appender_stores_what_the_python_function_stores(fields: dict[str, Any]) -> None:
    spy = Spy()
    append = appender(spy)
    with current(Collector("r")) as in_c:
        stored = append(**fields)
    with pytest.MonkeyPatch.context() as patch, current(Collector("r")) as in_python:
        patch.setattr(collector_module, "_event_pass", None)
        expected = spy.python(**fields)
    if isinstance(stored, UpstreamErrorEvent) and isinstance(expected, UpstreamErrorEvent):
        given_at = fields.get("at_unix_ms")
        if not (isinstance(given_at, int) and given_at > 0):
            expected.at_unix_ms = stored.at_unix_ms  # filled in from the clock, a ms apart
        assert _same(field_values(stored), field_values(expected))
        assert in_c.events == [stored] and len(in_python.events) == 1
    else:
        assert stored is expected is None
        assert in_c.events == in_python.events == []


def test_a_full_collector_drops_the_oldest_and_counts_it_in_c() -> None:
    spy = Spy()
    append = appender(spy)
    with current(Collector("r", max_events=4)) as collector:
        stored = [append(**{**KEPT, "attempt": i}) for i in range(10)]
    assert spy.calls == 0
    assert collector.events == stored[6:]
    assert collector.dropped_events == 6


def test_appends_from_threads_are_all_kept_or_counted() -> None:
    spy = Spy()
    append = appender(spy)
    threads, per_thread, most = 8, 300, 100
    with current(Collector("r", max_events=most)) as collector:

        def work(n: int) -> None:
            for i in range(per_thread):
                append(**{**KEPT, "attempt": n * per_thread + i})
                if i % 50 == 0:
                    time.sleep(0)
                    collector.next_attempt()  # the Python side takes the same lock

        pool = [threading.Thread(target=wrap_context(work), args=(n,)) for n in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    assert spy.calls == 0
    assert len(collector.events) == most
    assert collector.dropped_events == threads * per_thread - most
    assert len({e.attempt for e in collector.events}) == most


def test_nothing_is_kept_without_a_request_a_status_a_message_or_a_detail() -> None:
    spy = Spy()
    append = appender(spy)
    assert append(**KEPT) is None  # outside a request
    with current(Collector("r")) as collector:
        assert append(platform="openai", attempt=1, upstream_status_code=0, message="") is None
        collector.finish()
        assert append(**KEPT) is None
    assert spy.calls == 0
    assert collector.events == []


def test_labels_fill_what_the_fields_leave_empty_in_c() -> None:
    from upstream_ops import upstream

    spy = Spy()
    append = appender(spy)
    with current(Collector("r")), upstream(account_id=7, model=f"key={SECRET}"):
        stored = append(**KEPT)
    assert spy.calls == 0
    assert stored is not None and stored.account_id == 7 and stored.platform == "openai"
    assert stored.model.startswith("key=") and SECRET not in stored.model


def test_listeners_get_the_event_through_collector_store() -> None:
    spy = Spy()
    append = appender(spy)
    seen: list[UpstreamErrorEvent] = []
    with current(Collector("r")) as collector:
        collector.listeners.append(seen.append)
        stored = append(**KEPT)
    assert spy.calls == 0
    assert seen == [stored] and collector.events == [stored]


class OwnCollector(Collector):
    pass


@pytest.mark.parametrize(
    "case",
    [
        "an event given",
        "a collector subclass",
        "a text not cleaned before",
        "a value to coerce",
        "an unknown field",
        "the c pass switched off",
        "a sanitizer subclass",
    ],
)
def test_every_other_call_goes_to_python_with_its_arguments(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    spy = Spy()
    append = appender(spy)
    fields: dict[str, Any] = dict(KEPT)
    args: tuple[Any, ...] = ()
    collector = OwnCollector("r") if case == "a collector subclass" else Collector("r")
    if case == "an event given":
        args = (UpstreamErrorEvent(detail="d"),)
    elif case == "a text not cleaned before":
        fields["detail"] = f"never seen {os.urandom(8).hex()} {SECRET}"
    elif case == "a value to coerce":
        fields["account_id"] = "42"
    elif case == "an unknown field":
        fields["no_such_field"] = 1
    with pytest.MonkeyPatch.context() as patch, current(collector):
        if case == "the c pass switched off":
            patch.setattr(collector_module, "_event_pass", None)
        if case == "a sanitizer subclass":
            from upstream_ops import sanitize

            patch.setattr(sanitize, "_default_sanitizer", type("Own", (Sanitizer,), {})())
        given = dict(fields)
        with caplog.at_level(logging.WARNING, logger="upstream_ops"):
            stored = append(*args, **fields)
    assert spy.calls == 1
    assert fields == given  # handed over as they came
    if case == "an unknown field":
        assert stored is None and "no_such_field" in caplog.text
        return
    assert stored is not None and collector.events == [stored]
    assert SECRET not in stored.message + stored.detail
    if case == "a value to coerce":
        assert stored.account_id == 42


def test_the_appender_refuses_what_it_cannot_work_with() -> None:
    with pytest.raises(TypeError):
        _speedups.Appender()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="callables"):
        _speedups.Appender(*appender_args(None))  # type: ignore[arg-type]
    args = appender_args(Spy())
    args[10] = tuple(slot for slot in events_module._EVENT_SLOTS if slot[0] != "detail")
    with pytest.raises(ValueError, match="upstream_status_code, message and detail"):
        _speedups.Appender(*args)


# --- event_key --------------------------------------------------------------------------------------


def python_key(values: tuple[Any, ...]) -> tuple[tuple[bool, ...], object] | None:
    """What the writer's Python passes tell: ``None`` for types that are not plain."""
    if tuple(map(type, values)) not in _sqlite_rows._PLAIN_TYPES:
        return None
    return tuple(map(truth, values)), values[_sqlite_rows._RETRYABLE]


def decoded(key: int) -> tuple[tuple[bool, ...], object] | None:
    """``event_key``'s int as the Python key."""
    if key < 0:
        return None
    count, optional = len(EVENT_FIELDS), _sqlite_rows._RETRYABLE
    retryable = {0: None, 1: True, 2: False}[key >> count]
    is_set = tuple(bool(retryable) if i == optional else bool(key >> i & 1) for i in range(count))
    return is_set, retryable


def event_key(values: tuple[Any, ...]) -> int:
    return _speedups.event_key(values, _sqlite_rows._TYPES, _sqlite_rows._RETRYABLE)


class Int(int):
    pass


odd_values = st.sampled_from([None, True, False, Int(3), "", "x", 0, 1, 0.0, -0.0, math.nan, b"b"])


@settings(max_examples=400, deadline=None)
@given(
    st.builds(
        full_event,
        platform=st.sampled_from(["", "openai"]),
        account_id=st.sampled_from([0, 7, -(2**80)]),
        message=st.text(max_size=5),
        duration_ms=st.sampled_from([0.0, -0.0, 12.5, math.inf, math.nan]),
        retryable=st.sampled_from([None, False, True]),
        retry_after_ms=st.sampled_from([0, 1200]),
        origin=st.sampled_from(["", "upstream"]),
    ),
    st.dictionaries(st.integers(0, len(EVENT_FIELDS) - 1), odd_values, max_size=3),
)
def test_event_key_tells_what_the_python_passes_tell(
    event: UpstreamErrorEvent, replaced: dict[int, Any]
) -> None:
    values = list(field_values(event))
    for index, value in replaced.items():
        values[index] = value
    key = event_key(tuple(values))
    assert decoded(key) == python_key(tuple(values))


def test_events_of_one_shape_get_one_key_and_events_of_two_shapes_two() -> None:
    keys = {
        event_key(field_values(event))
        for event in (
            full_event(),
            full_event(message="other", attempt=9, duration_ms=1.0),
            full_event(retryable=True),
            full_event(retryable=None),
            full_event(detail=""),
            UpstreamErrorEvent(),
        )
    }
    assert len(keys) == 5


def test_event_key_refuses_arguments_it_cannot_key() -> None:
    types, optional = _sqlite_rows._TYPES, _sqlite_rows._RETRYABLE
    with pytest.raises(TypeError, match="3 arguments"):
        _speedups.event_key((), types)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="a tuple, a tuple and an int"):
        _speedups.event_key([], types, optional)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one type each"):
        _speedups.event_key((1,), types, optional)
    with pytest.raises(ValueError, match="up to 60"):
        _speedups.event_key((0,) * 61, (int,) * 61, -1)
    assert _speedups.event_key(([],), (list,), -1) == -1  # only str, int and float are keyed


def test_the_writer_uses_event_key() -> None:
    assert _sqlite_rows._event_key is _speedups.event_key
