"""The process around the dispatchers: drain at interpreter exit and on SIGTERM, restart after fork.

Every dispatcher registers here. At interpreter exit each one is closed within ``FLUSH_TIMEOUT_S``
(written to the sink, or spooled when the deadline nears). SIGTERM's default action kills the
process without running ``atexit``, so when SIGTERM still has that default action and a dispatcher
is created in the main thread, a handler is installed that drains the same way and then dies of
SIGTERM as before; a handler someone else installed (uvicorn, gunicorn ...) is left alone, and
their graceful shutdown drains through the ASGI lifespan or ``atexit``. A forked child (gunicorn
workers with ``preload_app``) gets fresh dispatchers: the parent keeps what it had queued.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
import weakref
from typing import Protocol

from upstream_ops import defaults

__all__ = ["live", "register"]


class _Managed(Protocol):
    def running(self) -> bool: ...
    def close(self, timeout: float) -> bool: ...
    def _after_fork(self) -> None: ...


_live: weakref.WeakSet[_Managed] = weakref.WeakSet()
_sigterm_installed = False


def register(dispatcher: _Managed, *, handle_sigterm: bool) -> None:
    _live.add(dispatcher)
    if handle_sigterm:
        _install_sigterm_handler()


def live() -> list[_Managed]:
    return list(_live)


def close_all(timeout: float) -> None:
    """Close every running dispatcher within one shared ``timeout``."""
    deadline = time.monotonic() + timeout
    for dispatcher in live():
        if dispatcher.running():
            dispatcher.close(max(0.0, deadline - time.monotonic()))


def _drain_at_exit() -> None:
    close_all(defaults.FLUSH_TIMEOUT_S)


def _install_sigterm_handler() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - embedded interpreters
        return
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: object) -> None:
    """Close every dispatcher within ``FLUSH_TIMEOUT_S``, then die of SIGTERM as before.

    The draining runs on a helper thread: the interrupted main thread may hold a lock it needs.
    """
    global _sigterm_installed
    timeout = defaults.FLUSH_TIMEOUT_S
    drainer = threading.Thread(
        target=close_all, args=(timeout,), name="upstream-ops-sigterm", daemon=True
    )
    drainer.start()
    drainer.join(timeout + 1.0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm_installed = False
    os.kill(os.getpid(), signal.SIGTERM)


def _after_fork_in_child() -> None:
    for dispatcher in live():
        dispatcher._after_fork()


atexit.register(_drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
