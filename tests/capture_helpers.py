"""What the capture tests share: events in a comparable form, and the secret check."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from upstream_ops import UpstreamErrorEvent

from .upstream_servers import PASSWORD, SECRET


def stable(events: Iterable[UpstreamErrorEvent], *bases: str) -> list[dict[str, Any]]:
    """The events as dicts without their clock fields, each base URL replaced by ``{up}``.

    Attempt events must have taken some time; that is checked here, once.
    """
    out = []
    for event in events:
        data = event.to_dict()
        assert data.pop("at_unix_ms") > 0
        if event.kind in ("http_error", "request_error", "stream_error"):
            assert data.pop("duration_ms") > 0, data
        for base in bases:
            if "upstream_url" in data:
                data["upstream_url"] = data["upstream_url"].replace(base, "{up}")
        out.append(data)
    return out


def assert_no_secrets(events: Iterable[UpstreamErrorEvent]) -> None:
    for event in events:
        text = json.dumps(event.to_dict(), ensure_ascii=False)
        for planted in (SECRET, PASSWORD, SECRET[8:24], PASSWORD[:12]):
            assert planted not in text, text
