"""The driver interface every sensor chip plugs into.

A driver owns one device (one chip on one bus). The reader calls it from a worker thread, so a
driver may block on bus I/O; the reader enforces the per-read timeout and the retry/reopen policy
around it, so drivers stay small: open the bus, turn raw bytes into SI values, close the bus.

Error tree (what the reader does with each):

    DriverError                 base; never escapes the reader
    ├── BusError                transient I/O failure (OSError on a transfer or on open, e.g. nothing
    │                           answering at the address; a timeout): retry with backoff, reopen the
    │                           bus after N consecutive failures
    ├── ChecksumError           a frame/word failed its CRC or checksum: counted and dropped
    ├── ImplausibleValueError   a value outside the chip's physical range: counted and dropped
    └── DeviceIdentityError     something answers, but it is not this chip (wrong chip id): reopen,
                                then fault
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class DriverError(Exception):
    """Base of every error a driver raises."""

    kind: ClassVar[str] = "driver"


class BusError(DriverError):
    kind = "bus"


class ChecksumError(DriverError):
    kind = "checksum"


class ImplausibleValueError(DriverError):
    kind = "implausible"


class DeviceIdentityError(DriverError):
    kind = "identity"


class DriverParams(BaseModel):
    """Per-driver parameters from the devices file; unknown keys are a config error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Driver(abc.ABC):
    """One device. Subclasses declare `name`, `Params` and `sensors` (sensor id -> SI unit)."""

    name: ClassVar[str]
    Params: ClassVar[type[DriverParams]] = DriverParams

    def __init__(self, device_id: str, params: DriverParams) -> None:
        self.device_id = device_id
        self.params = params

    @property
    @abc.abstractmethod
    def sensors(self) -> Mapping[str, str]:
        """Sensor id -> unit of the values `read()` returns."""

    def open(self) -> None:  # noqa: B027 - optional hook: simulated devices have no bus
        """Open the bus handle (and check the chip's identity). Called again after `close()`."""

    @abc.abstractmethod
    def read(self) -> Mapping[str, float]:
        """One sample: sensor id -> value in the unit of `sensors`. Raises DriverError subclasses."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the bus handle; must not raise."""
