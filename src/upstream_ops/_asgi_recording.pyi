"""Types of the optional C extension built from ``_asgi_recording.c``."""

from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

_C = TypeVar("_C", bound=Call)

class Call:
    middleware: Any
    scope: dict[str, Any]
    collector: Any
    telemetry: Any
    otel_token: object
    _header: tuple[bytes, bytes] | None
    root_path: str
    status_code: int
    started: float
    response_ended_at: float
    response_complete: bool
    disconnected: bool
    def send(self, value: Any, /) -> Any: ...
    def throw(self, value: BaseException, /) -> Any: ...
    def close(self) -> None: ...
    def __await__(self) -> Generator[Any]: ...
    def __next__(self) -> Any: ...

def new_call(
    cls: type[_C],
    middleware: Any,
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
    /,
) -> _C: ...
def setup(
    perf_counter: Callable[[], float],
    collector_class: type[Any],
    current_var: Any,
    get_context: Callable[[], object],
    empty_context: object,
    has_current_span: Callable[[], bool],
    with_header: Callable[[Any, tuple[bytes, bytes]], Any],
    provider_globals: tuple[dict[str, Any], dict[str, Any]] | None,
    /,
) -> None: ...
