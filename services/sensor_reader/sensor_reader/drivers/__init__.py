"""Sensor drivers, by the name a devices file uses in `driver = "..."`."""

from __future__ import annotations

from .base import (
    Block,
    BusError,
    ChecksumError,
    DeviceIdentityError,
    Driver,
    DriverError,
    DriverParams,
    ImplausibleValueError,
    Sample,
)
from .i2c import BME280Driver, SHT31Driver
from .simulated import SimulatedDriver
from .spi import MCP3008Driver
from .uart import PMS5003Driver

DRIVERS: dict[str, type[Driver]] = {
    d.name: d for d in (SimulatedDriver, MCP3008Driver, BME280Driver, SHT31Driver, PMS5003Driver)
}

__all__ = [
    "DRIVERS",
    "BME280Driver",
    "Block",
    "BusError",
    "ChecksumError",
    "DeviceIdentityError",
    "Driver",
    "DriverError",
    "DriverParams",
    "ImplausibleValueError",
    "MCP3008Driver",
    "PMS5003Driver",
    "SHT31Driver",
    "Sample",
    "SimulatedDriver",
]
