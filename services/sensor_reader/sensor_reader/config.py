"""The devices file (TOML): which devices to poll, with which driver and parameters.

[[devices]]
id = "greenhouse-1"      # ^[A-Za-z0-9_-]{1,64}$
driver = "bme280"        # a name from DRIVERS
interval = 1.0           # seconds between polls
[devices.params]         # the driver's own parameters, validated by its Params model
bus = 1
address = 0x76
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from iotpipe import ID_PATTERN, ConfigError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .drivers import DRIVERS, Driver


class DeviceConfig(BaseModel):
    # TOML has inf and nan literals; no setting of a device means either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str
    driver: str
    interval: float = Field(1.0, gt=0, le=3600)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(f"must match {ID_PATTERN.pattern}")
        return value

    @field_validator("driver")
    @classmethod
    def _driver(cls, value: str) -> str:
        if value not in DRIVERS:
            raise ValueError(f"unknown driver {value!r}; known: {', '.join(sorted(DRIVERS))}")
        return value


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_devices(path: Path) -> list[tuple[DeviceConfig, Driver]]:
    """Parse and validate the devices file and build a driver per device. Every error names the
    file, the device and the field."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read devices file {str(path)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text; a ValueError, not an OSError
        raise ConfigError(f"devices file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"devices file {str(path)!r} is not valid TOML: {exc}") from exc
    unknown = set(doc) - {"devices"}
    if unknown:
        raise ConfigError(f"devices file {str(path)!r}: unknown top-level key(s) {sorted(unknown)}")
    entries = doc.get("devices")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"devices file {str(path)!r}: needs at least one [[devices]] table")
    built: list[tuple[DeviceConfig, Driver]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        label = f"devices[{index}]"
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            label += f" (id {entry['id']!r:.70})"
        try:
            device = DeviceConfig.model_validate(entry)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"devices file {str(path)!r}: {label}.{_where(err['loc'])}: {err['msg']}") from None
        if device.id in seen:
            raise ConfigError(f"devices file {str(path)!r}: {label}.id: duplicate device id")
        seen.add(device.id)
        driver_cls = DRIVERS[device.driver]
        try:
            params = driver_cls.Params.model_validate(device.params)
            driver = driver_cls(device.id, params)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(
                f"devices file {str(path)!r}: {label}.params.{_where(err['loc'])}: {err['msg']}"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"devices file {str(path)!r}: {label}.params: {exc}") from None
        for sensor in driver.sensors:
            if not ID_PATTERN.fullmatch(sensor):
                raise ConfigError(f"devices file {str(path)!r}: {label}: sensor id {sensor!r:.70} is invalid")
        built.append((device, driver))
    return built
