"""Names of everything upstream-ops puts on spans and metrics, and the attributes built from an event.

Every value here comes from an event the collector has already sanitized, or is a bounded, low
cardinality label. The metric attributes are a strict subset: never a request id, a URL or a message.
``docs/opentelemetry.md`` explains each name.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.util.types import AttributeValue

from upstream_ops.events import UpstreamErrorEvent

#: Instrumentation scope of our tracer and meter.
SCOPE_NAME: Final = "upstream_ops"
#: The stable HTTP semantic conventions the spans follow.
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.26.0"

#: HTTP methods named as themselves; any other becomes ``_OTHER`` (span name ``HTTP``), as semconv says.
KNOWN_METHODS: Final = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE")
)

#: The span event added to the request's server span for every appended event.
UPSTREAM_ERROR_EVENT: Final = "upstream.error"

# Span event attributes (one failed upstream attempt).
UPSTREAM_KIND: Final = "upstream.kind"
UPSTREAM_PLATFORM: Final = "upstream.platform"
UPSTREAM_ACCOUNT_ID: Final = "upstream.account_id"
UPSTREAM_ACCOUNT_NAME: Final = "upstream.account_name"
UPSTREAM_MODEL: Final = "upstream.model"
UPSTREAM_REQUEST_ID: Final = "upstream.request_id"
UPSTREAM_ERROR_CLASS: Final = "upstream.error_class"
UPSTREAM_ATTEMPT: Final = "upstream.attempt"
UPSTREAM_MESSAGE: Final = "upstream.message"
UPSTREAM_RETRYABLE: Final = "upstream.retryable"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
HTTP_REQUEST_METHOD: Final = "http.request.method"
URL_FULL: Final = "url.full"
ERROR_TYPE: Final = "error.type"

# Server span attributes added by upstream-ops.
UPSTREAM_ERROR_COUNT: Final = "upstream.error_count"
UPSTREAM_RECOVERED: Final = "upstream.recovered"
UPSTREAM_OPS_REQUEST_ID: Final = "upstream_ops.request_id"

# Metric names and their one non-semconv attribute.
ERRORS_METRIC: Final = "upstream_ops.upstream.errors"
RECORDS_METRIC: Final = "upstream_ops.records"
QUEUE_METRIC: Final = "upstream_ops.dispatcher.queued"
OUTCOME: Final = "outcome"


def event_attributes(event: UpstreamErrorEvent) -> dict[str, AttributeValue]:
    """The attributes of the ``upstream.error`` span event for a stored (sanitized) event.

    Empty fields are left out, like in the event's JSON. ``error.type`` is the event's own
    ``error_type``, else the upstream status code as a string (the semantic conventions' rule for
    HTTP errors).
    """
    attributes: dict[str, AttributeValue] = {}
    for name, value in (
        (UPSTREAM_KIND, event.kind),
        (UPSTREAM_PLATFORM, event.platform),
        (UPSTREAM_ACCOUNT_ID, event.account_id),
        (UPSTREAM_ACCOUNT_NAME, event.account_name),
        (UPSTREAM_MODEL, event.model),
        (HTTP_REQUEST_METHOD, event.method),
        (URL_FULL, event.upstream_url),
        (HTTP_RESPONSE_STATUS_CODE, max(event.upstream_status_code, 0)),
        (UPSTREAM_REQUEST_ID, event.upstream_request_id),
        (ERROR_TYPE, event.error_type or _status_text(event.upstream_status_code)),
        (UPSTREAM_ERROR_CLASS, event.error_class),
        (UPSTREAM_ATTEMPT, event.attempt),
        (UPSTREAM_MESSAGE, event.message),
    ):
        if value:
            attributes[name] = value
    if event.retryable is not None:
        attributes[UPSTREAM_RETRYABLE] = event.retryable
    return attributes


def error_metric_attributes(event: UpstreamErrorEvent) -> dict[str, AttributeValue]:
    """The low-cardinality attributes of ``upstream_ops.upstream.errors`` for one event."""
    attributes: dict[str, AttributeValue] = {}
    if event.platform:
        attributes[UPSTREAM_PLATFORM] = event.platform
    if event.kind:
        attributes[UPSTREAM_KIND] = event.kind
    if event.error_class:
        attributes[UPSTREAM_ERROR_CLASS] = event.error_class
    if event.upstream_status_code > 0:
        attributes[HTTP_RESPONSE_STATUS_CODE] = event.upstream_status_code
    return attributes


def _status_text(status_code: int) -> str:
    return str(status_code) if status_code > 0 else ""
