"""Record what the caller's own resilience code decided: a retry, giving up, a failover.

The capture integrations record each failed attempt; these events record the decisions around them,
so a record reads "429, retry in 2 s, 429, gave up after 2 attempts, failover to account 2".

``attempt`` on these events is the number of the latest attempt made through a capture integration
in the request (the one the decision follows), ``0`` when none was; the caller's own counts go in
the message. Labels come from the enclosing ``upstream(...)`` block unless given. Like
``append_upstream_error`` these never raise, and do nothing outside a request.
"""

from __future__ import annotations

import logging

from upstream_ops.classify import (
    RETRYABLE_ERROR_CLASSES,
    error_class_for_exception,
    error_class_for_status,
    error_type_for,
    is_retryable,
)
from upstream_ops.collector import append_upstream_error, current_collector
from upstream_ops.events import FAILOVER, RETRY, RETRY_EXHAUSTED, UpstreamErrorEvent
from upstream_ops.labels import make_labels

__all__ = ["record_failover", "record_retry", "record_retry_exhausted"]

logger = logging.getLogger("upstream_ops")


def record_retry(
    reason: str = "",
    *,
    error: BaseException | None = None,
    status_code: int = 0,
    wait_ms: int = 0,
    platform: str = "",
    account_id: int | str = 0,
    account_name: str = "",
    model: str = "",
) -> UpstreamErrorEvent | None:
    """Record that the caller will retry: ``kind="retry"``.

    ``error`` (an exception) or ``status_code`` (a response's) says what failed; the status is also
    read from ``error.response.status_code`` (``httpx.HTTPStatusError``, ``requests.HTTPError``).
    ``wait_ms``, the delay before the next attempt, is stored as ``retry_after_ms``.
    """
    return _record(
        RETRY,
        reason or "retrying",
        error,
        status_code,
        wait_ms=wait_ms,
        labels=(platform, account_id, account_name, model),
    )


def record_retry_exhausted(
    *,
    attempts: int,
    reason: str = "",
    error: BaseException | None = None,
    status_code: int = 0,
    platform: str = "",
    account_id: int | str = 0,
    account_name: str = "",
    model: str = "",
) -> UpstreamErrorEvent | None:
    """Record that the caller gave up after ``attempts`` attempts: ``kind="retry_exhausted"``."""
    text = f"gave up after {attempts} attempt{'' if attempts == 1 else 's'}"
    return _record(
        RETRY_EXHAUSTED,
        f"{text}: {reason}" if reason else text,
        error,
        status_code,
        labels=(platform, account_id, account_name, model),
    )


def record_failover(
    *,
    from_account: int | str,
    to_account: int | str,
    reason: str = "",
    error: BaseException | None = None,
    status_code: int = 0,
    platform: str = "",
    model: str = "",
) -> UpstreamErrorEvent | None:
    """Record a switch from one upstream account to another: ``kind="failover"``.

    An account is an id (``int``, or a string of digits) or a name; the event's account fields
    name ``from_account``, the one that failed, and the message names both.
    """
    from_id, from_name = _account(from_account)
    text = f"failover from account {from_account} to account {to_account}"
    return _record(
        FAILOVER,
        f"{text}: {reason}" if reason else text,
        error,
        status_code,
        labels=(platform, from_id, from_name, model),
    )


def _account(account: int | str) -> tuple[int | str, str]:
    if isinstance(account, int) and not isinstance(account, bool):
        return account, ""
    text = str(account).strip()
    return (text, "") if text.isdigit() else (0, text)


def _record(
    kind: str,
    message: str,
    error: BaseException | None,
    status_code: int,
    *,
    labels: tuple[object, object, object, object],
    wait_ms: int = 0,
) -> UpstreamErrorEvent | None:
    collector = current_collector()
    if collector is None:
        return None
    try:
        given = make_labels(*labels)
        status = status_code or _status_of(error)
        event = UpstreamErrorEvent(
            kind=kind,
            message=message,
            platform=given.platform,
            account_id=given.account_id,
            account_name=given.account_name,
            model=given.model,
            upstream_status_code=status,
            attempt=collector.attempts,
            retry_after_ms=max(int(wait_ms), 0),
        )
        if status >= 400:
            event.error_class = error_class_for_status(status)
            event.error_type = error_type_for(status, None)
            event.retryable = is_retryable(status)
        elif error is not None:
            event.error_class = error_class_for_exception(error)
            event.error_type = error_type_for(None, error)
            event.retryable = event.error_class in RETRYABLE_ERROR_CLASSES
        if error is not None:
            event.detail = _describe(error)
        return append_upstream_error(event)
    except Exception:
        logger.exception("upstream_ops: could not record a %s event", kind)
        return None


def _status_of(error: BaseException | None) -> int:
    """The HTTP status an exception carries (``exc.response.status_code``), else 0."""
    status = getattr(getattr(error, "response", None), "status_code", 0)
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def _describe(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:
        text = ""
    name = error_type_for(None, error)
    return f"{name}: {text}" if text else name
