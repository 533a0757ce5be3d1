"""Types of the optional C extension built from ``_wsgi_recording.c``."""

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

_R = TypeVar("_R", bound=Recording)

class Recording:
    middleware: Any
    environ: dict[str, Any]
    _start_response: Callable[..., Callable[[bytes], object]]
    collector: Any
    telemetry: Any
    token: Any
    result: Iterable[bytes]
    status: str
    route_source: object
    error: BaseException | None
    started: float
    ended: float
    iteration_started: bool
    finished: bool
    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]: ...
    def close(self) -> None: ...
    def finish(self) -> None: ...
    def __iter__(self) -> Recording: ...
    def __next__(self) -> bytes: ...

def new_recording(
    cls: type[_R],
    middleware: Any,
    environ: dict[str, Any],
    start_response: Callable[..., Callable[[bytes], object]],
    collector: Any,
    telemetry: Any,
    started: float,
    context_var: Any,
    token: Any,
    route_key: str | None,
    no_echo: bool,
    default_rule: bool,
    /,
) -> _R: ...
def call(
    middleware: Any,
    environ: dict[str, Any],
    start_response: Callable[..., Callable[[bytes], object]],
    /,
) -> Iterable[bytes]: ...
def setup(
    perf_counter: Callable[[], float],
    environ_error_key: str,
    middleware_type: type,
    recording_class: type[Recording],
    collector_type: type,
    context_var: Any,
    get_context: Callable[[], object],
    empty_context: object,
    has_current_span: Callable[[], bool],
    instrumented_flag: str,
    environ_collector_key: str,
    provider_globals: tuple[dict[str, Any], dict[str, Any]] | None,
    /,
) -> None: ...
