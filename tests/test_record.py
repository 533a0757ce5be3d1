from __future__ import annotations

import gc
import json
from dataclasses import dataclass

import pytest

from upstream_ops import RequestRecord, UpstreamErrorEvent
from upstream_ops.record import RECORD_FIELDS, pack_record, unpack_record


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


def _full_record() -> RequestRecord:
    return RequestRecord(
        id="r1",
        request_id="req-1",
        service="svc",
        method="POST",
        path="/v1/chat",
        route="/v1/{name}",
        status_code=200,
        duration_ms=12.5,
        started_at_ms=1_700_000_000_000,
        upstream_status_code=504,
        upstream_error_message="timeout",
        upstream_errors=[
            UpstreamErrorEvent(upstream_status_code=504, kind="http_error", attempt=1),
            UpstreamErrorEvent(kind="request_error", message="reset", retryable=True, attempt=2),
        ],
        dropped_events=1,
        recovered=True,
        trace_id="ab" * 16,
    )


@pytest.mark.parametrize("record", [_full_record(), RequestRecord(id="r", request_id="q")])
def test_packed_record_unpacks_equal(record: RequestRecord) -> None:
    packed = pack_record(record)
    assert packed is not None
    assert unpack_record(packed) == record


def test_packed_records_leave_the_garbage_collector_at_its_first_collection() -> None:
    gc.disable()
    try:
        packed = [pack_record(_full_record()) for _ in range(100)]
        assert all(gc.is_tracked(p) for p in packed)  # a new tuple starts tracked
        gc.collect(0)
        assert not any(gc.is_tracked(p) for p in packed)
    finally:
        gc.enable()


def test_records_of_other_classes_are_not_packed() -> None:
    @dataclass(slots=True)
    class Subclass(RequestRecord):
        tenant: str = ""

    class Event(UpstreamErrorEvent):
        pass

    assert pack_record(Subclass(id="r", request_id="q", tenant="t")) is None
    assert pack_record(RequestRecord(id="r", request_id="q", upstream_errors=[Event()])) is None
