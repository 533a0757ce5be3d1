"""The OpenAPI 3.1 description of the ops API, built from the parameter table and the data models so
it cannot drift from what the app accepts and returns."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Final

from upstream_ops._ops_params import EVENTS, RECORDS, STATS, Param, params_for
from upstream_ops._version import __version__
from upstream_ops.events import UpstreamErrorEvent
from upstream_ops.record import RequestRecord
from upstream_ops.store import GROUP_BY

_TYPES: Final[dict[str, dict[str, Any]]] = {
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "bool | None": {"type": ["boolean", "null"]},
    "str | None": {"type": ["string", "null"]},
    "int | None": {"type": ["integer", "null"]},
}


def _model(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        properties[f.name] = dict(_TYPES.get(str(f.type), {}))
    return {"type": "object", "properties": properties}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _parameter(param: Param) -> dict[str, Any]:
    schema: dict[str, Any] = (
        {"type": "array", "items": param.schema} if param.repeatable else dict(param.schema)
    )
    return {
        "name": param.name,
        "in": "query",
        "required": False,
        "description": param.description,
        "schema": schema,
        **({"style": "form", "explode": True} if param.repeatable else {}),
    }


def _responses(ok: str, schema: dict[str, Any]) -> dict[str, Any]:
    error = {"application/json": {"schema": _ref("Error")}}
    return {
        "200": {"description": ok, "content": {"application/json": {"schema": schema}}},
        "400": {"description": "A bad parameter; `field` names it.", "content": error},
        "401": {"description": "No bearer token, or a wrong one.", "content": error},
        "503": {"description": "The store failed (database unreachable ...).", "content": error},
    }


def _page(items_key: str, item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [items_key, "next_cursor", "window"],
        "properties": {
            items_key: {"type": "array", "items": _ref(item)},
            "next_cursor": {"type": ["string", "null"], "description": "null on the last page"},
            "window": _ref("Window"),
        },
    }


def _counts() -> dict[str, Any]:
    return {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "group": {"type": ["string", "integer", "null"]},
                "count": {"type": "integer"},
            },
        },
    }


def openapi_document(server_url: str) -> dict[str, Any]:
    """The description, with ``server_url`` (where the app is mounted) as its server."""
    event = _model(UpstreamErrorEvent)
    listed_event = _model(UpstreamErrorEvent, skip=("detail",))
    stored_event = _model(UpstreamErrorEvent, skip=("detail",))
    stored_event["properties"] = {
        "record_id": {"type": "string"},
        "seq": {"type": "integer", "description": "position of the event in its record"},
        "request_id": {"type": "string"},
        **stored_event["properties"],
    }
    record = _model(RequestRecord)
    record["properties"]["upstream_errors"] = {"type": "array", "items": _ref("Event")}
    listed = _model(RequestRecord, skip=("upstream_error_detail",))
    listed["properties"]["upstream_errors"] = {"type": "array", "items": _ref("ListedEvent")}
    window = {
        "type": "object",
        "properties": {"start_ms": {"type": "integer"}, "end_ms": {"type": "integer"}},
    }
    stats = {
        "type": "object",
        "properties": {
            "window": _ref("Window"),
            "bucket_ms": {"type": "integer"},
            "group_by": {"type": "string", "enum": list(GROUP_BY)},
            "buckets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"start_ms": {"type": "integer"}, "counts": _counts()},
                },
            },
            "groups": _counts(),
            "totals": {
                "type": "object",
                "properties": {
                    "events": {"type": "integer"},
                    "records": {"type": "integer"},
                    "recovered_records": {"type": "integer"},
                    "recovered_ratio": {"type": ["number", "null"]},
                },
            },
            "top_messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "count": {"type": "integer"},
                        "last_at_ms": {"type": "integer"},
                    },
                },
            },
        },
    }

    def get(summary: str, endpoint: str | None, ok: str, schema: dict[str, Any]) -> dict[str, Any]:
        operation: dict[str, Any] = {"summary": summary, "responses": _responses(ok, schema)}
        if endpoint is not None:
            operation["parameters"] = [_parameter(p) for p in params_for(endpoint)]
        return {"get": operation}

    by_id = get(
        "The full record of one request, every attempt in order",
        None,
        "The record, and a Jaeger link when the app knows Jaeger",
        {
            "type": "object",
            "properties": {"record": _ref("Record"), "trace_url": {"type": ["string", "null"]}},
        },
    )
    by_id["get"]["parameters"] = [
        {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    by_id["get"]["responses"]["404"] = {
        "description": "No record with this request id.",
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "upstream-ops",
            "version": __version__,
            "description": "Failed upstream calls, recorded per request: query, page, count.",
        },
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/records": get(
                "Records (one per request), newest first",
                RECORDS,
                "A page",
                _page("records", "ListedRecord"),
            ),
            "/api/records/{request_id}": by_id,
            "/api/events": get(
                "Upstream error events, newest first",
                EVENTS,
                "A page",
                _page("events", "StoredEvent"),
            ),
            "/api/stats": get(
                "Event counts per time bucket and group, record totals, top messages",
                STATS,
                "The aggregates",
                _ref("Stats"),
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Record": record,
                "ListedRecord": listed,
                "Event": event,
                "ListedEvent": listed_event,
                "StoredEvent": stored_event,
                "Stats": stats,
                "Window": window,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "field": {"type": "string"}},
                },
            },
        },
    }
