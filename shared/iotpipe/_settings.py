"""Settings shared by every service: environment variables prefixed `IOTPIPE_`, secrets from files.

Nested groups use `__`: `IOTPIPE_MQTT__HOST`, `IOTPIPE_REDIS__PORT`. Secrets (passwords, keys,
tokens) are only ever *paths* in the environment; the values are read from those files.
"""

from __future__ import annotations

import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._errors import ConfigError
from ._models import WindowBounds
from ._topics import ID_PATTERN

# What the default IOTPIPE_WINDOW_MAX_AGE allows beyond two message TTLs: a window waits at most one
# TTL as raw (reader spool, broker queue) and one as processed, but starts up to a window length
# (an hour at most) plus the reader's grace before it is sealed, and hosts' clocks differ.
WINDOW_AGE_MARGIN = 24 * 3600
# Where a service serves Prometheus /metrics unless told otherwise (IOTPIPE_METRICS_PORT).
METRICS_PORT = 9100


def read_secret(path: Path | str, what: str) -> str:
    """The secret in `path`, without its trailing newline. Errors name the file, never the value."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} from {str(path)!r}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{what} file {str(path)!r} is empty")
    return value


# Secret file names, the one place they are spelled: compose mounts each as /run/secrets/<name>, and
# `iotpipe secrets` (devstack) writes the same names for the local stack and tests.
def secret_name(name: str) -> str:
    return name.replace("-", "_")


def mqtt_password_file(secrets_dir: Path, user: str) -> Path:
    return secrets_dir / f"mqtt_{secret_name(user)}_password"


def mqtt_client_cert_file(secrets_dir: Path, user: str) -> Path:
    """The client certificate of `user` (common name = the user) for the broker's mTLS listener."""
    return secrets_dir / f"mqtt_{secret_name(user)}_crt"


def mqtt_client_key_file(secrets_dir: Path, user: str) -> Path:
    return secrets_dir / f"mqtt_{secret_name(user)}_key"


def redis_password_file(secrets_dir: Path, user: str) -> Path:
    return secrets_dir / f"redis_{secret_name(user)}_password"


def health_file_for(health_dir: Path, service: str, instance: str) -> Path:
    return health_dir / f"{service}-{instance}.json"


def _default_instance() -> str:
    # Container hostnames are unique per replica (what `--scale` needs); keep them id-safe.
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    return name or "0"


class MqttSettings(BaseModel):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = Field(None, description="defaults to the service name")
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = Field(None, description="CA bundle for the TLS listener")
    # The mTLS option (docs/security.md): a client certificate whose common name is the user, as a
    # second factor beside the password, for the broker's listener that requires one.
    cert_file: Path | None = Field(None, description="client certificate (PEM) for the mTLS listener")
    key_file: Path | None = Field(None, description="its private key (PEM); required with cert_file")
    keepalive: int = Field(30, ge=5)
    session_expiry: int = Field(7 * 24 * 3600, ge=0, description="s the broker keeps our session")
    receive_maximum: int = Field(200, ge=1, le=65535, description="unacked deliveries at once")
    max_inflight: int = Field(200, ge=1, description="our publishes awaiting PUBACK at once")
    connect_timeout: float = Field(30.0, gt=0)


class RedisSettings(BaseModel):
    host: str = "localhost"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0)
    username: str | None = None
    password_file: Path | None = None


class ServiceSettings(BaseSettings):
    """What every service needs. Each service subclasses this and sets `service_name`."""

    model_config = SettingsConfigDict(env_prefix="IOTPIPE_", env_nested_delimiter="__", extra="ignore")
    service_name: ClassVar[str] = "iotpipe"

    base_topic: str = "iotpipe"
    instance: str = Field(default_factory=_default_instance)
    mqtt: MqttSettings = MqttSettings()
    secrets_dir: Path = Field(Path("/run/secrets"), description="where default secret files live")
    keyring_file: Path | None = Field(None, description="default <secrets_dir>/keyring")
    message_ttl: int = Field(7 * 24 * 3600, ge=1, description="s a sealed message stays valid")
    window_max_skew: float = Field(
        60.0, ge=0, description="s a window may start after this host's clock (clock difference between hosts)"
    )
    window_max_age: float | None = Field(
        None, gt=0, description="s a window may start before this host's clock; default 2 x message_ttl + 1 day"
    )
    max_payload_bytes: int = Field(1 << 20, ge=1024)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_dir: Path | None = Field(None, description="also log to <log_dir>/<service>.log")
    health_dir: Path = Field(Path(tempfile.gettempdir()) / "iotpipe", description="health files go here")
    status_interval: float = Field(10.0, gt=0, description="s between status/health updates")
    # On by default (docs/operations.md, "Metrics"): 9100, the port every container uses and the one
    # Prometheus's own docs give exporters; the local stack gives each service its own. Loopback by
    # default: /metrics is unauthenticated, so only a deployment that means to (compose, inside its
    # network) opens it wider.
    metrics_port: int = Field(METRICS_PORT, ge=0, le=65535, description="Prometheus /metrics port (0: no metrics)")
    metrics_host: str = Field("127.0.0.1", description="address /metrics listens on (0.0.0.0: every interface)")
    state_dir: Path = Field(Path("var/state"), description="what must survive a restart (the replay window)")
    dead_letter_file: Path | None = Field(
        None,
        description="messages given up on, as JSON lines; default "
        "<state_dir>/../dead-letter/<service>-<instance>.jsonl (var/dead-letter/...)",
    )

    @field_validator("base_topic", "instance")
    @classmethod
    def _id_safe(cls, value: str) -> str:
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(f"must match {ID_PATTERN.pattern}")
        return value

    @field_validator("window_max_age")
    @classmethod
    def _covers_outages(cls, value: float | None, info: ValidationInfo) -> float | None:
        # Smaller would refuse windows the durability promise delivers late (after an outage up to
        # the message TTL), and they exist nowhere else: lower IOTPIPE_MESSAGE_TTL instead.
        ttl = info.data.get("message_ttl")
        if value is not None and ttl is not None and value < 2 * ttl:
            raise ValueError(
                f"must be at least twice IOTPIPE_MESSAGE_TTL ({2 * ttl} s): windows after an outage are that old"
            )
        return value

    @property
    def window_bounds(self) -> WindowBounds:
        """How far from this host's clock a consumed window may lie (iotpipe._models.WindowBounds)."""
        age = self.window_max_age if self.window_max_age is not None else 2 * self.message_ttl + WINDOW_AGE_MARGIN
        return WindowBounds(max_skew_ms=round(self.window_max_skew * 1000), max_age_ms=round(age * 1000))

    @property
    def src(self) -> str:
        return f"{self.service_name}/{self.instance}"

    @property
    def keyring_path(self) -> Path:
        return self.keyring_file or self.secrets_dir / "keyring"

    @property
    def mqtt_password_path(self) -> Path:
        return self.mqtt.password_file or mqtt_password_file(self.secrets_dir, self.mqtt.username or self.service_name)

    @property
    def log_file(self) -> Path | None:
        return self.log_dir / f"{self.service_name}.log" if self.log_dir else None

    @property
    def dead_letter_path(self) -> Path:
        # Beside the state directory: wherever a deployment puts what must outlive the process
        # (compose: a volume), the dead letters go too.
        return (
            self.dead_letter_file
            or self.state_dir.parent / "dead-letter" / f"{self.service_name}-{self.instance}.jsonl"
        )

    @property
    def replay_state_file(self) -> Path:
        return self.state_dir / f"{self.service_name}-{self.instance}.replay.json"

    @property
    def health_file(self) -> Path:
        return health_file_for(self.health_dir, self.service_name, self.instance)

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build from the environment, turning validation errors into one ConfigError that names
        each bad field as its environment variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                f"IOTPIPE_{'__'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid {cls.service_name} settings: {problems}") from None


S = TypeVar("S", bound=ServiceSettings)


def load_settings_or_exit(cls: type[S]) -> S:
    """Settings from the environment; a bad value ends the process with one clear line, exit 2."""
    try:
        return cls.load()
    except ConfigError as exc:
        sys.stderr.write(f"{cls.service_name}: configuration error: {exc}\n")
        raise SystemExit(2) from None
