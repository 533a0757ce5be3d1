"""tenacity callbacks that record ``retry`` and ``retry_exhausted`` events (extra ``[tenacity]``).

    from tenacity import retry, stop_after_attempt, wait_exponential
    from upstream_ops.tenacity import record_before_sleep, record_retry_error

    @retry(stop=stop_after_attempt(3), wait=wait_exponential(),
           before_sleep=record_before_sleep, retry_error_callback=record_retry_error)
    async def generate(): ...

``record_retry_error`` raises exactly what tenacity raises without a callback (``RetryError``, or the
last exception with ``reraise=True``), so adding it changes nothing for the caller. Both work with
``Retrying`` and ``AsyncRetrying``, and never raise errors of their own.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from tenacity import RetryCallState

from upstream_ops.retries import record_retry, record_retry_exhausted

__all__ = ["record_before_sleep", "record_retry_error"]

logger = logging.getLogger("upstream_ops")


def record_before_sleep(retry_state: RetryCallState) -> None:
    """``before_sleep=``: record a ``retry`` event for the attempt that just failed."""
    try:
        error, status = _outcome(retry_state)
        action = retry_state.next_action
        wait_s = action.sleep if action is not None else retry_state.upcoming_sleep
        record_retry(
            f"attempt {retry_state.attempt_number} of {_name(retry_state)} {_what(error, status)}, "
            f"retrying in {wait_s:.2f} s",
            error=error,
            status_code=status,
            wait_ms=round(wait_s * 1000),
        )
    except Exception:
        logger.exception("upstream_ops: could not record a tenacity retry")


def record_retry_error(retry_state: RetryCallState) -> NoReturn:
    """``retry_error_callback=``: record ``retry_exhausted``, then raise what tenacity would."""
    try:
        error, status = _outcome(retry_state)
        record_retry_exhausted(
            attempts=retry_state.attempt_number,
            reason=f"{_name(retry_state)} {_what(error, status)}",
            error=error,
            status_code=status,
        )
    except Exception:
        logger.exception("upstream_ops: could not record a tenacity retry_exhausted")
    retrying = retry_state.retry_object
    outcome = retry_state.outcome
    if outcome is None:  # tenacity always sets it before giving up; keep its type contract anyway
        raise RuntimeError("tenacity gave up without an outcome")
    retry_error = retrying.retry_error_cls(outcome)
    if retrying.reraise:
        retry_error.reraise()
    raise retry_error from outcome.exception()


def _outcome(retry_state: RetryCallState) -> tuple[BaseException | None, int]:
    outcome = retry_state.outcome
    if outcome is None:
        return None, 0
    if outcome.failed:
        return outcome.exception(), 0
    result: Any = outcome.result()
    status = getattr(result, "status_code", 0)  # retry_if_result on an httpx / requests response
    return None, status if isinstance(status, int) and not isinstance(status, bool) else 0


def _name(retry_state: RetryCallState) -> str:
    name = getattr(retry_state.fn, "__qualname__", None)
    return f"{name}()" if isinstance(name, str) else "the call"


def _what(error: BaseException | None, status: int) -> str:
    if error is not None:
        return f"raised {type(error).__name__}"
    if status:
        return f"returned HTTP {status}"
    return "returned a result to retry"
