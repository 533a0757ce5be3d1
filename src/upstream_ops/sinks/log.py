"""A sink that writes each record as one JSON line to a standard ``logging`` logger."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from upstream_ops.record import RequestRecord

DEFAULT_LOGGER: str = "upstream_ops.records"


class LoggingSink:
    """Logs one compact JSON object per record, so any log pipeline can collect them.

    ``logger`` is a ``logging.Logger`` or a logger name; ``level`` an int or a level name
    (``"INFO"``). Nothing is serialized when the logger would drop the level anyway.
    """

    def __init__(
        self,
        logger: logging.Logger | str = DEFAULT_LOGGER,
        level: int | str = logging.WARNING,
    ) -> None:
        if isinstance(logger, str):
            if not logger:
                raise ValueError("logger must be a Logger or a non-empty logger name")
            logger = logging.getLogger(logger)
        elif not isinstance(logger, logging.Logger):
            raise ValueError(
                f"logger must be a Logger or a logger name, got {type(logger).__name__}"
            )
        self.logger = logger
        self.level = _level(level)

    def write(self, records: Sequence[RequestRecord], /) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        for record in records:
            line = json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))
            self.logger.log(self.level, "%s", line)

    def __repr__(self) -> str:
        return f"LoggingSink({self.logger.name!r}, {logging.getLevelName(self.level)})"


def _level(level: object) -> int:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        name = level.strip().upper()
        by_name = logging.getLevelNamesMapping()
        if name in by_name:
            return by_name[name]
        if name.isdigit():
            return int(name)
    raise ValueError(
        f"level must be a logging level (an int or a name like 'INFO'), got {level!r:.60}"
    )
