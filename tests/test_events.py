from __future__ import annotations

import json

import pytest

from upstream_ops import UpstreamErrorEvent, marshal_upstream_errors
from upstream_ops.events import EVENT_FIELDS, KINDS, unmarshal_upstream_errors


def test_json_keys_follow_the_go_design_and_omit_empty_fields() -> None:
    event = UpstreamErrorEvent(
        at_unix_ms=1_700_000_000_000,
        platform="rix",
        account_id=7,
        upstream_status_code=504,
        kind="http_error",
        message="gateway timeout",
    )
    assert event.to_dict() == {
        "at_unix_ms": 1_700_000_000_000,
        "platform": "rix",
        "account_id": 7,
        "upstream_status_code": 504,
        "kind": "http_error",
        "message": "gateway timeout",
    }
    assert EVENT_FIELDS[:8] == (
        "at_unix_ms",
        "platform",
        "account_id",
        "upstream_status_code",
        "upstream_request_id",
        "kind",
        "message",
        "detail",
    )


def test_retryable_false_is_information_and_kept() -> None:
    assert UpstreamErrorEvent(retryable=False).to_dict() == {"retryable": False}
    assert UpstreamErrorEvent(retryable=None).to_dict() == {}


def test_obvious_spellings_are_coerced() -> None:
    event = UpstreamErrorEvent(account_id="42", upstream_status_code=504.0, platform=b"rix")  # type: ignore[arg-type]
    assert (event.account_id, event.upstream_status_code, event.platform) == (42, 504, "rix")
    assert UpstreamErrorEvent(platform=None).platform == ""  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("account_id", "abc"), ("upstream_status_code", True), ("message", 12), ("retryable", "yes")],
)
def test_bad_values_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"UpstreamErrorEvent.{field} must be"):
        UpstreamErrorEvent(**{field: value})  # type: ignore[arg-type]


def test_marshal_is_none_for_no_events_and_compact_json_otherwise() -> None:
    assert marshal_upstream_errors([]) is None
    text = marshal_upstream_errors(
        [UpstreamErrorEvent(upstream_status_code=429, message="slow down ✋")]
    )
    assert text == '[{"upstream_status_code":429,"message":"slow down ✋"}]'
    assert json.loads(text or "") == [{"upstream_status_code": 429, "message": "slow down ✋"}]


def test_unmarshal_round_trips_and_ignores_unknown_keys() -> None:
    events = [UpstreamErrorEvent(kind=k, message=k, attempt=i + 1) for i, k in enumerate(KINDS)]
    assert unmarshal_upstream_errors(marshal_upstream_errors(events)) == events
    assert unmarshal_upstream_errors('[{"kind":"retry","future_field":1}]') == [
        UpstreamErrorEvent(kind="retry")
    ]
    assert unmarshal_upstream_errors(None) == []
    with pytest.raises(ValueError, match="JSON array"):
        unmarshal_upstream_errors('{"kind":"retry"}')


def test_a_copy_is_equal_and_independent() -> None:
    import copy

    event = UpstreamErrorEvent(upstream_status_code=502, message="m", retryable=False)
    clone = copy.copy(event)
    assert clone == event and clone is not event and type(clone) is UpstreamErrorEvent
    clone.message = "other"
    assert event.message == "m"
