"""The driver interface every sensor chip plugs into.

A driver owns one device (one chip on one bus). The reader calls a blocking driver from the worker
thread of its bus (`bus_key`: the devices on one physical bus share one thread, since the bus serves
one transfer at a time anyway), so a driver may block on bus I/O; the reader enforces the per-read
timeout and the retry/reopen policy around it, so drivers stay small: open the bus, turn raw bytes
into SI values, close the bus. A driver that never blocks (`blocking = False`: the simulator) is
called on the event loop, with no thread at all: thousands of them cost no threads.

`read()` returns one sample (sensor -> value) or, for chips read in bursts and the simulator in
block mode, a `Block` of evenly spaced samples: at high rates one read per poll then carries many
samples instead of one poll per sample.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    """Per-driver parameters from the devices file; unknown keys are a config error, and so are
    TOML's inf and nan (no driver parameter means either)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Block:
    """Several samples from one read, oldest first, `period_ms` apart; the last one was taken when
    the read returned. Every sensor's sequence has the same length (at least one)."""

    period_ms: float
    values: Mapping[str, Sequence[float]]

    def __len__(self) -> int:
        return len(next(iter(self.values.values()), ()))


Sample = Mapping[str, float] | Block


class Driver(abc.ABC):
    """One device. Subclasses declare `name`, `Params` and `sensors` (sensor id -> SI unit)."""

    name: ClassVar[str]
    Params: ClassVar[type[DriverParams]] = DriverParams
    # False only for drivers that never wait on I/O: they are called on the event loop.
    blocking: ClassVar[bool] = True

    def __init__(self, device_id: str, params: DriverParams) -> None:
        self.device_id = device_id
        self.params = params

    @property
    @abc.abstractmethod
    def sensors(self) -> Mapping[str, str]:
        """Sensor id -> unit of the values `read()` returns."""

    def open(self) -> None:  # noqa: B027 - optional hook: simulated devices have no bus
        """Open the bus handle (and check the chip's identity). Called again after `close()`."""

    @property
    def bus_key(self) -> str:
        """The physical bus this device sits on: devices with the same key share one worker thread."""
        return f"{self.name}:{self.device_id}"

    def samples_per_window(self, window_ms: int, interval: float) -> float:
        """How many samples of each sensor a window of `window_ms` holds when this device is polled
        every `interval` s: one per read by default. The reader caps each window at a multiple of
        it (a driver gone wrong must not flood the pipeline); a driver returning Blocks says how
        many it returns."""
        return window_ms / 1000 / interval

    @abc.abstractmethod
    def read(self) -> Sample:
        """One sample (sensor id -> value in the unit of `sensors`) or a Block of them. Raises
        DriverError subclasses."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the bus handle; must not raise."""
