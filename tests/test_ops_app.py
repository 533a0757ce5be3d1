"""The ops HTTP API (``ops_app.py``, ``_ops_params.py``, ``_ops_openapi.py``) over every store in
``conftest.STORES``, in process through httpx's ASGI transport, plus a real uvicorn server."""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.conftest import serve_asgi
from tests.ops_records import BASE_MS, MINUTE, TRACE_ID, XSS, ops_dataset
from upstream_ops import ops_app
from upstream_ops._ops_params import PARAMS, params_for
from upstream_ops.ops_app import create_ops_app
from upstream_ops.record import RequestRecord
from upstream_ops.sinks import MemorySink, SQLiteSink
from upstream_ops.store import GROUP_BY, Store

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DATASET = ops_dataset()


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


#: The dataset's five minutes, as the API is asked for them.
WINDOW = f"start_time={BASE_MS}&end_time={BASE_MS + 5 * MINUTE}"


def call(app: Any, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """One request to ``app`` in process (the store still runs in Starlette's threadpool)."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ops") as client:
            return await client.get(url, headers=AUTH if headers is None else headers)

    return anyio.run(send)


@pytest.fixture
def loaded(store: Store) -> Store:
    store.write(DATASET)  # type: ignore[attr-defined]
    return store


@pytest.fixture
def app(loaded: Store) -> Any:
    return create_ops_app(loaded, token=TOKEN, jaeger_url="http://jaeger.example:16686/")


def ids(response: httpx.Response, key: str = "records") -> list[str]:
    assert response.status_code == 200, response.text
    items = response.json()[key]
    if key == "records":
        return [item["id"] for item in items]
    return [f"{item['record_id']}:{item['seq']}" for item in items]


# --- filters ----------------------------------------------------------------------------------

RECORD_CASES = [
    ("", ["r6", "r5", "r4", "r3", "r2", "r1"]),
    ("platform=openai", ["r5", "r2", "r1"]),
    ("platform=", ["r6", "r5", "r4", "r3", "r2", "r1"]),  # empty means not given
    ("status_code=529", ["r6", "r1"]),
    ("status_code=504&status_code=429", ["r2", "r1"]),
    ("kind=retry", ["r5", "r3"]),
    ("account_id=3", ["r3"]),
    ("route=/v1/images", ["r4", "r3"]),
    ("recovered=false", ["r4", "r2"]),
    ("recovered=true", ["r6", "r5", "r3", "r1"]),
    ("q=rate%20LIMIT", ["r1"]),
    ("q=req-r2", ["r2"]),
    ("q=%25", ["r4"]),
    ("platform=openai&status_code=401", ["r5"]),
    ("route=/v1/chat&recovered=false", ["r2"]),
]


@pytest.mark.parametrize(("query", "expected"), RECORD_CASES)
def test_records_filters(app: Any, query: str, expected: list[str]) -> None:
    assert ids(call(app, f"/api/records?{WINDOW}&{query}")) == expected


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # RFC 3339 in any zone, or Unix ms; half-open
        (
            f"start_time={rfc3339(BASE_MS + MINUTE)}&end_time={rfc3339(BASE_MS + 3 * MINUTE)}",
            ["r4", "r3", "r2"],
        ),
        (
            "start_time=2023-11-14T23:14:00%2B01:00&end_time=2023-11-14T23:16:00%2B01:00",
            ["r2", "r1"],
        ),
        (f"start_time={BASE_MS + 1}&end_time={BASE_MS + 2 * MINUTE}", ["r2"]),
        (f"end_time={BASE_MS + 2 * MINUTE}&time_range=1m", ["r2"]),
        (f"end_time={BASE_MS + 3 * MINUTE}&time_range=2m", ["r4", "r3", "r2"]),
    ],
)
def test_records_windows(app: Any, window: str, expected: list[str]) -> None:
    assert rfc3339(BASE_MS) == "2023-11-14T22:14:00Z"
    assert ids(call(app, f"/api/records?{window}")) == expected


def test_time_range_ends_now_and_the_default_is_a_day(store: Store) -> None:
    now = int(time.time() * 1000)
    store.write(  # type: ignore[attr-defined]
        [
            RequestRecord(id="recent", request_id="recent", started_at_ms=now - 5 * MINUTE),
            RequestRecord(id="old", request_id="old", started_at_ms=now - 25 * 3600 * 1000),
        ]
    )
    app = create_ops_app(store, token=TOKEN)
    assert ids(call(app, "/api/records?time_range=1h")) == ["recent"]
    assert ids(call(app, "/api/records?time_range=1m")) == []
    assert ids(call(app, "/api/records")) == ["recent"]
    assert ids(call(app, "/api/records?time_range=2d")) == ["recent", "old"]
    window = call(app, "/api/records?time_range=1h").json()["window"]
    assert window["end_ms"] - window["start_ms"] == 3_600_000
    assert abs(window["end_ms"] - time.time() * 1000) < 60_000


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["r6:0", "r5:2", "r5:1", "r5:0", "r3:1", "r3:0", "r2:0", "r1:1", "r1:0"]),
        ("platform=gemini", ["r3:1", "r3:0"]),
        ("status_code=529&status_code=401", ["r6:0", "r5:1", "r1:1"]),
        ("kind=request_error", ["r5:2", "r2:0"]),
        ("account_id=2", ["r6:0", "r1:1"]),
        ("route=/v1/images", ["r3:1", "r3:0"]),
        ("recovered=0", ["r2:0"]),
        ("q=unauthorized", ["r5:1"]),
        ("q=req-r3", ["r3:1", "r3:0"]),
    ],
)
def test_events_filters(app: Any, query: str, expected: list[str]) -> None:
    assert ids(call(app, f"/api/events?{WINDOW}&{query}"), "events") == expected


def test_event_json_is_flat_and_names_its_record(app: Any) -> None:
    [event] = call(app, f"/api/events?{WINDOW}&platform=gemini&kind=http_error").json()["events"]
    assert event == {
        "record_id": "r3",
        "seq": 0,
        "request_id": "req-r3",
        **DATASET[2].upstream_errors[0].to_dict(),
    }


# --- pagination -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "key"), [("/api/records", "records"), ("/api/events", "events")])
@pytest.mark.parametrize("limit", [1, 2, 4])
def test_cursor_pages_cover_everything_once(app: Any, path: str, key: str, limit: int) -> None:
    everything = ids(call(app, f"{path}?{WINDOW}"), key)
    seen: list[str] = []
    cursor = ""
    for _ in range(20):
        response = call(app, f"{path}?{WINDOW}&limit={limit}{cursor}")
        page = ids(response, key)
        assert len(page) <= limit
        seen += page
        next_cursor = response.json()["next_cursor"]
        if next_cursor is None:
            break
        cursor = f"&cursor={next_cursor}"
    assert seen == everything


def test_cursor_keeps_the_filters_of_its_request(app: Any) -> None:
    first = call(app, f"/api/records?{WINDOW}&route=/v1/chat&limit=2").json()
    assert [r["id"] for r in first["records"]] == ["r6", "r5"]
    rest = call(app, f"/api/records?{WINDOW}&route=/v1/chat&cursor={first['next_cursor']}")
    assert ids(rest) == ["r2", "r1"]
    assert rest.json()["next_cursor"] is None


# --- one record -------------------------------------------------------------------------------


def test_record_detail_has_every_attempt_in_order_and_a_trace_link(app: Any) -> None:
    response = call(app, "/api/records/req-r1")
    assert response.status_code == 200
    body = response.json()
    assert body["record"] == DATASET[0].to_dict()
    assert [e["platform"] for e in body["record"]["upstream_errors"]] == ["openai", "anthropic"]
    assert body["trace_url"] == f"http://jaeger.example:16686/trace/{TRACE_ID}"
    assert call(app, "/api/records/req-r2").json()["trace_url"] is None  # no trace id


def test_lists_leave_out_details_the_record_endpoint_has(app: Any) -> None:
    [listed] = call(app, f"/api/records?{WINDOW}&q=req-r1").json()["records"]
    assert "upstream_error_detail" not in listed
    assert all("detail" not in e for e in listed["upstream_errors"])
    full = call(app, "/api/records/req-r1").json()["record"]
    assert full["upstream_errors"][0]["detail"] == '{"error":{"type":"rate_limit_error"}}'
    assert {k: v for k, v in full.items() if k != "upstream_errors"} == {
        **{k: v for k, v in listed.items() if k != "upstream_errors"},
        "upstream_error_detail": None,
    }


def test_unknown_record_is_a_json_404(app: Any) -> None:
    response = call(app, "/api/records/nope")
    assert response.status_code == 404
    assert response.json()["field"] == "request_id"


def test_without_jaeger_there_is_no_trace_link(loaded: Store) -> None:
    app = create_ops_app(loaded, token=TOKEN)
    assert call(app, "/api/records/req-r1").json()["trace_url"] is None


# --- stats ------------------------------------------------------------------------------------


def test_stats(app: Any) -> None:
    response = call(app, f"/api/stats?{WINDOW}&bucket=1m&group_by=category&top=2")
    assert response.status_code == 200
    body = response.json()
    assert body["window"] == {"start_ms": BASE_MS, "end_ms": BASE_MS + 5 * MINUTE}
    assert (body["bucket_ms"], body["group_by"]) == (MINUTE, "category")
    assert [b["start_ms"] for b in body["buckets"]] == [BASE_MS + i * MINUTE for i in range(5)]
    assert body["buckets"][3]["counts"] == [  # largest first, then by name
        {"group": "client_error", "count": 1},
        {"group": "overloaded", "count": 1},
        {"group": "transport", "count": 1},
    ]
    assert body["groups"][0] == {"group": "overloaded", "count": 3}
    assert body["totals"] == {
        "events": 9,
        "records": 6,
        "recovered_records": 4,
        "recovered_ratio": pytest.approx(4 / 6),
    }
    assert body["top_messages"] == [
        {"message": "Overloaded", "count": 2, "last_at_ms": BASE_MS + 3 * MINUTE + 100},
        {"message": XSS, "count": 1, "last_at_ms": BASE_MS + 4 * MINUTE + 100},
    ]


@pytest.mark.parametrize("group_by", GROUP_BY)
def test_stats_group_by(app: Any, group_by: str) -> None:
    body = call(app, f"/api/stats?{WINDOW}&group_by={group_by}&platform=openai").json()
    assert body["group_by"] == group_by
    assert body["totals"]["events"] == 5
    assert sum(g["count"] for g in body["groups"]) == 5


def test_stats_default_to_categories_and_a_round_bucket(app: Any) -> None:
    body = call(app, f"/api/stats?{WINDOW}").json()
    assert body["group_by"] == "category"
    assert body["bucket_ms"] == 10_000  # 5 minutes: 30 buckets of 10 s
    midnight = 1_699_920_000_000  # 2023-11-14T00:00:00Z
    day = call(app, f"/api/stats?end_time={midnight}&time_range=24h").json()
    assert day["bucket_ms"] == 15 * MINUTE and len(day["buckets"]) == 96
    unaligned = call(app, f"/api/stats?end_time={midnight + 1}&time_range=24h").json()
    assert unaligned["bucket_ms"] == 15 * MINUTE and len(unaligned["buckets"]) == 97
    month = call(app, f"/api/stats?end_time={midnight}&time_range=30d").json()
    assert month["bucket_ms"] == 6 * 3_600_000 and len(month["buckets"]) == 120


# --- bad input --------------------------------------------------------------------------------

BAD = [
    ("/api/records?nope=1", "nope"),
    ("/api/records?bucket=1m", "bucket"),  # a stats parameter
    ("/api/stats?cursor=x", "cursor"),
    ("/api/records?start_time=yesterday", "start_time"),
    ("/api/records?start_time=2026-02-12T08:30:00", "start_time"),  # no zone
    ("/api/records?end_time=2026-13-01T00:00:00Z", "end_time"),
    ("/api/records?start_time=99999999999999999999", "start_time"),
    (f"/api/records?start_time={BASE_MS}&end_time={BASE_MS}", "start_time"),
    (f"/api/records?start_time={BASE_MS}&end_time={BASE_MS - 1}", "start_time"),
    (f"/api/records?start_time={BASE_MS}&end_time={BASE_MS + 31 * 86_400_000}", "start_time"),
    ("/api/records?time_range=31d", "time_range"),
    ("/api/records?time_range=5x", "time_range"),
    ("/api/records?time_range=0m", "time_range"),
    ("/api/records?time_range=-5m", "time_range"),
    (f"/api/records?time_range=1h&start_time={BASE_MS}", "time_range"),
    ("/api/records?limit=0", "limit"),
    ("/api/records?limit=501", "limit"),
    ("/api/events?limit=ten", "limit"),
    ("/api/records?limit=1&limit=2", "limit"),
    ("/api/records?platform=a&platform=b", "platform"),
    ("/api/records?status_code=abc", "status_code"),
    ("/api/records?status_code=99", "status_code"),
    ("/api/events?status_code=600", "status_code"),
    ("/api/records?account_id=0", "account_id"),
    ("/api/records?account_id=1.5", "account_id"),
    ("/api/records?recovered=maybe", "recovered"),
    (f"/api/records?q={'x' * 201}", "q"),
    ("/api/records?cursor=not-a-cursor", "cursor"),
    ("/api/records?cursor=WzEsMl0", "cursor"),  # [1,2]: a record cursor holds an id string
    ("/api/events?cursor=WzEsImEiXQ", "cursor"),  # [1,"a"]: an events cursor has three parts
    ("/api/records?cursor=Wzk5OTk5OTk5OTk5OTk5OTk5OTk5OSwiYSJd", "cursor"),  # int beyond 64 bits
    ("/api/stats?group_by=nope", "group_by"),
    ("/api/stats?bucket=1s&time_range=30d", "bucket"),
    ("/api/stats?bucket=soon", "bucket"),
    ("/api/stats?top=101", "top"),
    ("/api/records/req-r1?verbose=1", "verbose"),
]


@pytest.mark.parametrize(("url", "field"), BAD)
def test_bad_input_is_a_400_naming_the_field(app: Any, url: str, field: str) -> None:
    response = call(app, url)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["field"] == field
    assert isinstance(body["error"], str) and body["error"]


def test_unknown_paths_and_methods_answer_json(app: Any) -> None:
    response = call(app, "/api/nothing")
    assert response.status_code == 404 and "error" in response.json()

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ops"
        ) as client:
            return await client.post("/api/records", headers=AUTH)

    response = anyio.run(post)
    assert response.status_code == 405 and "error" in response.json()


def test_a_failing_store_is_a_503_not_a_500(tmp_path: Path) -> None:
    db = tmp_path / "broken.db"
    db.write_bytes(b"this is not a SQLite database" * 100)
    app = create_ops_app(SQLiteSink(db), token=TOKEN)
    response = call(app, f"/api/records?{WINDOW}")
    assert response.status_code == 503
    assert "DatabaseError" in response.json()["error"]


# --- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
    ],
)
@pytest.mark.parametrize(
    "path", ["/api/records", "/api/events", "/api/stats", "/api/records/req-r1"]
)
def test_every_data_endpoint_needs_the_token(app: Any, path: str, headers: dict[str, str]) -> None:
    response = call(app, path, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "records" not in response.json()


def test_the_right_token_in_any_case_of_scheme(app: Any) -> None:
    assert (
        call(app, f"/api/records?{WINDOW}", {"Authorization": f"bearer {TOKEN}"}).status_code == 200
    )


def test_token_is_compared_in_constant_time(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(ops_app.hmac, "compare_digest", spy)
    assert call(app, "/api/records", {"Authorization": "Bearer guess"}).status_code == 401
    assert compared == [(b"guess", TOKEN.encode())]


def test_page_and_description_load_without_the_token(app: Any) -> None:
    page = call(app, "/", {})
    assert page.status_code == 200 and "<title>upstream-ops</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css"):
        assert call(app, f"/static/{name}", {}).status_code == 200
    assert call(app, "/static/../ops_app.py", {}).status_code == 404
    assert call(app, "/api/openapi.json", {}).status_code == 200


def test_building_the_app_needs_a_token_or_an_explicit_anonymous(loaded: Store) -> None:
    with pytest.raises(ValueError, match="token"):
        create_ops_app(loaded)
    with pytest.raises(ValueError, match="token"):
        create_ops_app(loaded, token="  ")
    anonymous = create_ops_app(loaded, allow_anonymous=True)
    assert call(anonymous, f"/api/records?{WINDOW}", {}).status_code == 200
    both = create_ops_app(loaded, token=TOKEN, allow_anonymous=True)  # a given token is enforced
    assert call(both, "/api/records", {}).status_code == 401


def test_building_the_app_checks_its_arguments(loaded: Store) -> None:
    with pytest.raises(TypeError, match="queryable store"):
        create_ops_app(MemorySink(), token=TOKEN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jaeger_url"):
        create_ops_app(loaded, token=TOKEN, jaeger_url="javascript:alert(1)")


# --- how the app runs -------------------------------------------------------------------------


class ThreadRecordingStore(SQLiteSink):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: set[str] = set()

    def search_records(self, *args: Any, **kwargs: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        return super().search_records(*args, **kwargs)


def test_store_calls_run_in_a_worker_thread(tmp_path: Path) -> None:
    store = ThreadRecordingStore(tmp_path / "t.db")
    app = create_ops_app(store, token=TOKEN)
    assert call(app, "/api/records").status_code == 200
    assert store.threads and threading.main_thread().name not in store.threads


def test_openapi_describes_every_endpoint_and_parameter(app: Any) -> None:
    doc = call(app, "/api/openapi.json", {}).json()
    assert doc["openapi"].startswith("3.1")
    for path, endpoint in (
        ("/api/records", "records"),
        ("/api/events", "events"),
        ("/api/stats", "stats"),
    ):
        described = [p["name"] for p in doc["paths"][path]["get"]["parameters"]]
        assert described == [p.name for p in params_for(endpoint)]
    assert "/api/records/{request_id}" in doc["paths"]
    assert {p.name for p in PARAMS} >= {"start_time", "end_time", "time_range", "status_code", "q"}
    record = doc["components"]["schemas"]["Record"]["properties"]
    assert record["started_at_ms"] == {"type": "integer"}
    assert record["recovered"] == {"type": "boolean"}
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    json.dumps(doc)


@pytest.fixture
def mounted(loaded: Store) -> Iterator[str]:
    parent = Starlette(routes=[Mount("/ops", create_ops_app(loaded, token=TOKEN))])
    with serve_asgi(parent) as url:
        yield url


def test_under_a_real_server_and_mounted(mounted: str) -> None:
    with httpx.Client(base_url=mounted, timeout=10) as client:
        page = client.get("/ops/")
        assert page.status_code == 200
        assert '<base href="/ops/">' in page.text
        assert client.get("/ops/static/dashboard.js").status_code == 200
        assert client.get("/ops/api/records").status_code == 401
        servers = client.get("/ops/api/openapi.json").json()["servers"]
        assert servers == [{"url": f"{mounted}/ops/"}]
        response = client.get(f"/ops/api/records?{WINDOW}&limit=2", headers=AUTH)
        assert response.status_code == 200
        assert [r["id"] for r in response.json()["records"]] == ["r6", "r5"]
        assert client.get("/ops/api/records/req-r6", headers=AUTH).json()["record"]["id"] == "r6"


def test_exported_lazily_so_import_upstream_ops_stays_light() -> None:
    import subprocess
    import sys

    import upstream_ops

    assert upstream_ops.create_ops_app is create_ops_app
    assert "create_ops_app" in upstream_ops.__all__ and "QueryFilter" in upstream_ops.__all__
    code = "import sys, upstream_ops; print('starlette' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_operators_doc_names_every_parameter() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operators.md").read_text()
    for param in PARAMS:
        assert f"| `{param.name}` |" in doc, param.name
