"""The FastAPI example with its traces in Jaeger: every failed upstream call is on the request's span.

Run it beside Jaeger with ``docker compose up`` (see README.md here), or against any OTLP/HTTP
endpoint:

    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 uvicorn examples.jaeger.app:app --port 8000

``configure`` sets the global tracer and meter providers (batch export over OTLP/HTTP, honouring the
``OTEL_*`` variables); the middleware of the FastAPI example records on them without any change.
"""

from __future__ import annotations

from examples.fastapi_app import app

from upstream_ops.telemetry import configure

configure(service_name="listing-images")

__all__ = ["app"]
