"""Known records for the read-side tests (store, ops API, dashboard, CLI).

Six records over five minutes from ``base_ms``; the expected answers in the tests are worked out by
hand from this table, so change both together.

===  ======  ==========  ======  =========  =================================================
id   minute  route       client  recovered  events (platform account status kind message)
===  ======  ==========  ======  =========  =================================================
r1   0       /v1/chat    200     yes        openai 1 429 http_error "Rate limit reached"
                                            anthropic 2 529 failover "Overloaded"
r2   1       /v1/chat    502     no         openai 1 - request_error "ConnectError: ..."
                                            (summary upstream status 504)
r3   2       /v1/images  200     yes        gemini 3 500 http_error "Internal error"
                                            gemini 3 - retry "retrying after 500"
r4   2       /v1/images  500     no         none (summary message "100%_done ...")
r5   3       /v1/chat    200     yes        openai 1 503 retry "Overloaded"
                                            openai 1 401 http_error "Unauthorized"
                                            openai 1 - request_error "timed out"
                                            (all three at the same millisecond)
r6   4       /v1/chat    200     yes        anthropic 2 529 http_error XSS (a <script>)
===  ======  ==========  ======  =========  =================================================
"""

from __future__ import annotations

from typing import Any, Final

from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord

MINUTE: Final = 60_000
#: A minute boundary, so one-minute stats buckets start at ``BASE_MS``.
BASE_MS: Final = 1_700_000_040_000
XSS: Final = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
TRACE_ID: Final = "0af7651916cd43dd8448eb211c80319c"


def _event(
    at: int, platform: str, account: int, status: int, kind: str, message: str, **more: Any
) -> UpstreamErrorEvent:
    return UpstreamErrorEvent(
        at_unix_ms=at,
        platform=platform,
        account_id=account,
        account_name={1: "primary", 2: "backup", 3: "vertex"}[account],
        upstream_status_code=status,
        kind=kind,
        message=message,
        **more,
    )


def ops_dataset(base_ms: int = BASE_MS) -> list[RequestRecord]:
    """The records of the module docstring, ``base_ms`` being minute 0."""

    def at(minute: int, ms: int = 0) -> int:
        return base_ms + minute * MINUTE + ms

    def record(
        id: str, minute: int, route: str, status: int, recovered: bool, **more: Any
    ) -> RequestRecord:
        values: dict[str, Any] = {
            "id": id,
            "request_id": f"req-{id}",
            "service": "gateway",
            "method": "POST",
            "path": route,
            "route": route,
            "status_code": status,
            "duration_ms": 812.5,
            "started_at_ms": at(minute),
            "recovered": recovered,
        }
        values.update(more)
        return RequestRecord(**values)

    return [
        record(
            "r1",
            0,
            "/v1/chat",
            200,
            True,
            trace_id=TRACE_ID,
            span_id="b7ad6b7169203331",
            upstream_errors=[
                _event(
                    at(0, 100),
                    "openai",
                    1,
                    429,
                    "http_error",
                    "Rate limit reached",
                    upstream_request_id="req_up_1",
                    attempt=1,
                    detail='{"error":{"type":"rate_limit_error"}}',
                ),
                _event(at(0, 200), "anthropic", 2, 529, "failover", "Overloaded", attempt=2),
            ],
        ),
        record(
            "r2",
            1,
            "/v1/chat",
            502,
            False,
            upstream_status_code=504,
            upstream_error_message="all upstream accounts failed",
            upstream_errors=[
                _event(
                    at(1, 100), "openai", 1, 0, "request_error", "ConnectError: connection refused"
                ),
            ],
        ),
        record(
            "r3",
            2,
            "/v1/images",
            200,
            True,
            upstream_errors=[
                _event(at(2, 100), "gemini", 3, 500, "http_error", "Internal error"),
                _event(at(2, 200), "gemini", 3, 0, "retry", "retrying after 500"),
            ],
        ),
        record(
            "r4",
            2,
            "/v1/images",
            500,
            False,
            upstream_error_message="100%_done of nothing",
            error="boom",
        ),
        record(
            "r5",
            3,
            "/v1/chat",
            200,
            True,
            upstream_errors=[
                _event(at(3, 100), "openai", 1, 503, "retry", "Overloaded"),
                _event(at(3, 100), "openai", 1, 401, "http_error", "Unauthorized"),
                _event(
                    at(3, 100),
                    "openai",
                    1,
                    0,
                    "request_error",
                    "timed out",
                    error_class="connection_timeout",
                ),
            ],
        ),
        record(
            "r6",
            4,
            "/v1/chat",
            200,
            True,
            upstream_errors=[
                _event(at(4, 100), "anthropic", 2, 529, "http_error", XSS, detail=XSS)
            ],
        ),
    ]
