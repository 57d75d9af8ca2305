"""iotpipe core library: sealed envelope, key ring, MQTT bus client, settings, logging, health."""

from __future__ import annotations

import sys
from typing import TypeVar

from ._bus import SHUTDOWN_DRAIN, Bus, PlainMessage
from ._envelope import KeyRing, Opened, Opener, ReplayGuard, Sealer, loads_strict
from ._errors import (
    ConfigError,
    DuplicateMessage,
    EnvelopeError,
    IotpipeError,
    MalformedEnvelope,
    PermanentError,
    RetryableError,
    StaleMessage,
    TopicMismatch,
    UndecryptableToken,
)
from ._health import Metrics, check_health, write_health
from ._logging import RateLimitedLog, configure_logging, setup_logging
from ._service import Component, Runtime, run_service, serve
from ._settings import MqttSettings, RedisSettings, ServiceSettings, read_secret, redis_password_file
from ._topics import ID_PATTERN, Topics, validate_id

S = TypeVar("S", bound=ServiceSettings)


def load_settings_or_exit(cls: type[S]) -> S:
    """Settings from the environment; a bad value ends the process with one clear line, exit 2."""
    try:
        return cls.load()
    except ConfigError as exc:
        sys.stderr.write(f"{cls.service_name}: configuration error: {exc}\n")
        raise SystemExit(2) from None


__all__ = [
    "ID_PATTERN",
    "SHUTDOWN_DRAIN",
    "Bus",
    "Component",
    "ConfigError",
    "DuplicateMessage",
    "EnvelopeError",
    "IotpipeError",
    "KeyRing",
    "MalformedEnvelope",
    "Metrics",
    "MqttSettings",
    "Opened",
    "Opener",
    "PermanentError",
    "PlainMessage",
    "RateLimitedLog",
    "RedisSettings",
    "ReplayGuard",
    "RetryableError",
    "Runtime",
    "Sealer",
    "ServiceSettings",
    "StaleMessage",
    "TopicMismatch",
    "Topics",
    "UndecryptableToken",
    "check_health",
    "configure_logging",
    "load_settings_or_exit",
    "loads_strict",
    "read_secret",
    "redis_password_file",
    "run_service",
    "serve",
    "setup_logging",
    "validate_id",
    "write_health",
]
