"""Logging, configured once by each service's `__main__` (the library never configures handlers)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from ._settings import ServiceSettings


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self._static = {"service": service, "instance": instance}

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self._static,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def configure_logging(settings: ServiceSettings) -> None:
    """Configure the root logger once, from a service's settings (stderr, plus its own file)."""
    setup_logging(settings.service_name, settings.instance, settings.log_level, settings.log_format, settings.log_file)


def setup_logging(
    service: str, instance: str, level: str = "INFO", fmt: str = "text", file: Path | None = None
) -> None:
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(service, instance)
    else:
        formatter = logging.Formatter(f"%(asctime)s %(levelname)-7s {service}/{instance} %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.WatchedFileHandler(file, encoding="utf-8"))  # survives logrotate
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)


class RateLimitedLog:
    """Logs a recurring problem at most once per `interval` per key, reporting how many were
    suppressed, so a flood of bad messages cannot flood the log (every one is still counted)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e18, 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        if suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, suppressed)
        self._logger.warning(msg, *args)
