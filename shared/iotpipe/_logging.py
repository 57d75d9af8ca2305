"""Logging, configured once by each service's `__main__` (the library never configures handlers)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Protocol

import orjson


class LoggingSettings(Protocol):
    """What logging needs to know (every ServiceSettings has it; so does the cloud-sink's)."""

    @property
    def service_name(self) -> str: ...
    @property
    def instance(self) -> str: ...
    @property
    def log_level(self) -> str: ...
    @property
    def log_format(self) -> str: ...
    @property
    def log_file(self) -> Path | None: ...


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


def configure_logging(settings: LoggingSettings) -> None:
    """Configure the root logger once, from a service's settings (stderr, plus its own file)."""
    service, instance, file = settings.service_name, settings.instance, settings.log_file
    formatter: logging.Formatter
    if settings.log_format == "json":
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
    root.setLevel(settings.log_level)
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
