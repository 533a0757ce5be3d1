from __future__ import annotations

import json

import pytest

from upstream_ops import RequestRecord, UpstreamErrorEvent
from upstream_ops.record import RECORD_FIELDS


def test_to_dict_has_every_key_and_events_under_upstream_errors() -> None:
    record = RequestRecord(
        id="r1",
        request_id="req-1",
        status_code=200,
        upstream_errors=[UpstreamErrorEvent(upstream_status_code=504, kind="http_error")],
        recovered=True,
    )
    data = record.to_dict()
    assert tuple(data) == RECORD_FIELDS
    assert data["upstream_errors"] == [{"upstream_status_code": 504, "kind": "http_error"}]
    assert data["route"] is None
    json.dumps(data)  # JSON-ready
    assert RequestRecord.from_dict(data) == record


def test_from_dict_requires_ids() -> None:
    with pytest.raises(ValueError, match=r"RequestRecord\.request_id"):
        RequestRecord.from_dict({"id": "x"})
