"""The numbers users tune, in one place.

Every limit, queue size and header name that a user may want to change is defined here and documented
in ``docs/configuration.md``. Modules import these names instead of repeating literals.
"""

from __future__ import annotations

from typing import Final

#: Events kept per request; older ones are dropped (and counted) so memory stays bounded.
MAX_EVENTS_PER_REQUEST: Final = 16

#: Byte limits applied by the sanitizer to stored strings.
MESSAGE_MAX_BYTES: Final = 2048
DETAIL_MAX_BYTES: Final = 8192
#: Short labels (platform, model, account name, kind, request ids, URLs ...).
LABEL_MAX_BYTES: Final = 512

#: Dispatcher: bounded memory queue, batch size and the longest a record waits for its batch.
QUEUE_SIZE: Final = 10_000
BATCH_SIZE: Final = 256
BATCH_INTERVAL_S: Final = 0.2
#: A failing ``sink.write`` is tried this many times in all, backing off exponentially with jitter.
WRITE_ATTEMPTS: Final = 4
RETRY_BACKOFF_S: Final = 0.1
RETRY_BACKOFF_MAX_S: Final = 2.0
#: How long ``flush()`` waits by default, and how long the interpreter-exit drain may take.
FLUSH_TIMEOUT_S: Final = 5.0
#: A full queue warns at most this often (seconds).
DROP_WARNING_INTERVAL_S: Final = 60.0

#: Durable delivery (``spool_dir``): the on-disk spool's bound (oldest records are evicted past it,
#: and counted) and the size of one segment file.
SPOOL_MAX_BYTES: Final = 1024 * 1024 * 1024
SPOOL_SEGMENT_BYTES: Final = 16 * 1024 * 1024
#: While the sink is failing (the circuit is open) the dispatcher spools everything and tries the
#: sink with the oldest spooled records at most this often, backing off from the first to the second.
CIRCUIT_PROBE_MIN_S: Final = 0.5
CIRCUIT_PROBE_MAX_S: Final = 5.0
#: With a spool, a batch waits for a busy sink only while the memory queue is less than this full;
#: past it the dispatcher spools instead of letting the queue fill up and drop records.
SPILL_AT_QUEUE_FRACTION: Final = 0.5
#: How often a running dispatcher looks for spools left by dead processes (it always does at start).
SPOOL_ADOPT_INTERVAL_S: Final = 60.0

#: Retention: how often the dispatcher purges (when ``retention`` is set and the sink can purge)
#: and how many records one purge transaction deletes.
RETENTION_INTERVAL_S: Final = 3600.0
PURGE_BATCH_SIZE: Final = 5000

#: PostgresSink: pool sizes, how long a write or query waits for a connection, and libpq's
#: connect timeout (whole seconds; libpq treats 1 as 2).
PG_POOL_MIN_SIZE: Final = 1
PG_POOL_MAX_SIZE: Final = 4
PG_POOL_TIMEOUT_S: Final = 5.0
PG_CONNECT_TIMEOUT_S: Final = 5

#: Request id: the incoming header is trusted when it matches this rule, else a new one is made.
REQUEST_ID_HEADER: Final = "X-Request-ID"
REQUEST_ID_MAX_LENGTH: Final = 128

#: Where records go when no sink is given.
SINK_ENV_VAR: Final = "UPSTREAM_OPS_SINK"
DEFAULT_SINK_URL: Final = "sqlite:///upstream_ops.db"

#: JsonlSink rotation: the file is rotated past this size, keeping this many old files.
JSONL_MAX_BYTES: Final = 64 * 1024 * 1024
JSONL_BACKUPS: Final = 5

#: Query API default and ceiling for the number of rows returned.
QUERY_LIMIT: Final = 100
QUERY_LIMIT_MAX: Final = 500

#: Sanitized URLs are cut to this many bytes (query strings run longer than other labels).
URL_MAX_BYTES: Final = 2048

#: Ops read side (HTTP API, dashboard, CLI). The longest time window one query may cover, the window
#: used when a caller names none, and the longest text a ``q`` search may be.
QUERY_WINDOW_MAX_MS: Final = 30 * 24 * 3600 * 1000
QUERY_WINDOW_DEFAULT_MS: Final = 24 * 3600 * 1000
QUERY_TEXT_MAX: Final = 200
#: Stats: at most this many time buckets per answer (one day of minutes, two days at most), and the
#: number of top upstream messages reported.
STATS_MAX_BUCKETS: Final = 2880
STATS_TOP_MESSAGES: Final = 10

#: ``upstream-ops serve``: where the ops API and dashboard listen, and the environment variable
#: that holds the bearer token when ``--token`` is not given.
OPS_HOST: Final = "127.0.0.1"
OPS_PORT: Final = 8700
OPS_TOKEN_ENV_VAR: Final = "UPSTREAM_OPS_TOKEN"  # noqa: S105 (a variable name, not a secret)
#: ``upstream-ops tail``: records shown at start, the poll interval of ``--follow`` and how far back
#: (by request start) each poll looks, so a long request written late is still shown.
TAIL_RECORDS: Final = 20
TAIL_INTERVAL_S: Final = 1.0
TAIL_LOOKBACK_MS: Final = 10 * 60 * 1000

#: Capture integrations (httpx transports, requests adapter): the statuses recorded as failed
#: attempts, and how much of an error body is kept. Only what the caller itself reads is captured.
CAPTURE_STATUSES: Final = range(400, 600)
CAPTURE_BODY_MAX_BYTES: Final = 2048
#: Lines of a ``text/event-stream`` longer than this are skipped while looking for error events.
SSE_LINE_MAX_BYTES: Final = 16 * 1024
