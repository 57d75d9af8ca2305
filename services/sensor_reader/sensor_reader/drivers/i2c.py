"""I2C chips on Linux /dev/i2c-N via smbus2: Bosch BME280 and Sensirion SHT3x (SHT31).

`_I2CDriver` owns the bus handle and turns OSError (a NACK, arbitration loss, a missing adapter)
into BusError; a chip class only knows its registers or commands and its conversion formulas.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import Field, field_validator

from .base import (
    BusError,
    ChecksumError,
    DeviceIdentityError,
    Driver,
    DriverParams,
    ImplausibleValueError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class SMBusLike(Protocol):
    """The subset of `smbus2.SMBus` the drivers use (so tests can hand in a fake)."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]: ...

    def i2c_rdwr(self, *i2c_msgs: Any) -> None: ...

    def close(self) -> None: ...


BusFactory = Callable[[int], SMBusLike]


def _default_bus_factory(bus: int) -> SMBusLike:
    from smbus2 import SMBus  # imported on open so that loading the driver table costs nothing

    handle: SMBusLike = SMBus(bus)
    return handle


class I2CParams(DriverParams):
    bus: int = Field(1, ge=0, description="the N of /dev/i2c-N (1 on a Raspberry Pi)")
    address: int  # each chip narrows this to the addresses it can be strapped to


class _I2CDriver(Driver):
    params: I2CParams

    def __init__(self, device_id: str, params: I2CParams, *, bus_factory: BusFactory | None = None) -> None:
        super().__init__(device_id, params)
        self._bus_factory = bus_factory or _default_bus_factory
        self._bus: SMBusLike | None = None

    @property
    def address(self) -> int:
        return self.params.address

    @property
    def bus_key(self) -> str:
        return f"i2c-{self.params.bus}"

    def open(self) -> None:
        try:
            bus = self._bus_factory(self.params.bus)
        except OSError as exc:
            raise BusError(f"open /dev/i2c-{self.params.bus}: {exc}") from exc
        self._bus = bus
        try:
            self.init_chip()
        except BaseException:
            self.close()  # a half-initialised chip is reopened from scratch next time
            raise

    def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        try:
            bus.close()
        except OSError as exc:
            # The adapter may already be gone; the handle is released either way.
            log.debug("%s: closing /dev/i2c-%d failed: %s", self.device_id, self.params.bus, exc)

    def init_chip(self) -> None:
        """Identify and configure the chip right after the bus is opened."""

    def io(self, what: str, fn: Callable[[SMBusLike], T]) -> T:
        """Run one bus transaction; an OSError becomes a BusError naming the transaction."""
        bus = self._bus
        if bus is None:
            raise BusError(f"{what}: the I2C bus is not open")
        try:
            return fn(bus)
        except OSError as exc:
            raise BusError(f"{what} at 0x{self.address:02X} on /dev/i2c-{self.params.bus}: {exc}") from exc


def _check_range(sensor: str, value: float, low: float, high: float, unit: str) -> float:
    if not low <= value <= high:
        raise ImplausibleValueError(f"{sensor} {value:.2f} {unit} outside {low:g}..{high:g} {unit}")
    return value


# --------------------------------------------------------------------------------------------
# Bosch BME280: temperature, pressure, humidity
# --------------------------------------------------------------------------------------------

_OVERSAMPLING = {1: 0b001, 2: 0b010, 4: 0b011, 8: 0b100, 16: 0b101}
_FILTER = {0: 0b000, 2: 0b001, 4: 0b010, 8: 0b011, 16: 0b100}
_HUMIDITY_OVERSHOOT = 2.0  # %RH beyond 0..100 that is still compensation error, not a fault
_STANDBY_MS = {0.5: 0b000, 62.5: 0b001, 125: 0b010, 250: 0b011, 500: 0b100, 1000: 0b101, 10: 0b110, 20: 0b111}


class BME280Params(I2CParams):
    address: Literal[0x76, 0x77] = 0x76
    mode: Literal["forced", "normal"] = Field(
        "forced", description="forced: one conversion per read (the datasheet's choice for slow polling)"
    )
    oversampling_temperature: Literal[1, 2, 4, 8, 16] = 1
    oversampling_pressure: Literal[1, 2, 4, 8, 16] = 1
    oversampling_humidity: Literal[1, 2, 4, 8, 16] = 1
    iir_filter: Literal[0, 2, 4, 8, 16] = 0
    standby_ms: float = Field(1000, description="normal mode only: pause between conversions")

    @field_validator("standby_ms")
    @classmethod
    def _standby(cls, value: float) -> float:
        if value not in _STANDBY_MS:
            raise ValueError(f"must be one of {', '.join(f'{v:g}' for v in sorted(_STANDBY_MS))}")
        return value

    soft_reset: bool = True


@dataclass(frozen=True)
class BME280Calibration:
    """Factory trimming values (datasheet table 16) and the double-precision compensation
    formulas of datasheet section 8.1."""

    t1: int
    t2: int
    t3: int
    p1: int
    p2: int
    p3: int
    p4: int
    p5: int
    p6: int
    p7: int
    p8: int
    p9: int
    h1: int
    h2: int
    h3: int
    h4: int
    h5: int
    h6: int

    @classmethod
    def from_registers(cls, block_88: Sequence[int], block_e1: Sequence[int]) -> BME280Calibration:
        """`block_88`: registers 0x88..0xA1 (26 bytes); `block_e1`: 0xE1..0xE7 (7 bytes)."""
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1 = struct.unpack("<HhhHhhhhhhhhxB", bytes(block_88))
        h2, h3, e4, e5, e6, h6 = struct.unpack("<hBbBbb", bytes(block_e1))
        # dig_H4 and dig_H5 are 12-bit values sharing the nibbles of 0xE5; their sign is in the
        # outer byte (0xE4 resp. 0xE6), exactly as Bosch's reference driver reads them.
        h4 = (e4 * 16) | (e5 & 0x0F)
        h5 = (e6 * 16) | (e5 >> 4)
        return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, h6)

    def t_fine(self, adc_t: int) -> float:
        var1 = (adc_t / 16384.0 - self.t1 / 1024.0) * self.t2
        var2 = (adc_t / 131072.0 - self.t1 / 8192.0) ** 2 * self.t3
        return var1 + var2

    def temperature(self, t_fine: float) -> float:
        """degC"""
        return t_fine / 5120.0

    def pressure(self, adc_p: int, t_fine: float) -> float:
        """Pa"""
        var1 = t_fine / 2.0 - 64000.0
        var2 = var1 * var1 * self.p6 / 32768.0
        var2 = var2 + var1 * self.p5 * 2.0
        var2 = var2 / 4.0 + self.p4 * 65536.0
        var1 = (self.p3 * var1 * var1 / 524288.0 + self.p2 * var1) / 524288.0
        var1 = (1.0 + var1 / 32768.0) * self.p1
        if var1 == 0:
            raise ImplausibleValueError("pressure compensation divides by zero (dig_P1 is 0?)")
        p = 1048576.0 - adc_p
        p = (p - var2 / 4096.0) * 6250.0 / var1
        var1 = self.p9 * p * p / 2147483648.0
        var2 = p * self.p8 / 32768.0
        return p + (var1 + var2 + self.p7) / 16.0

    def humidity(self, adc_h: int, t_fine: float) -> float:
        """%RH, before the datasheet's clamp to 0..100 (the caller decides what is plausible)."""
        h = t_fine - 76800.0
        h = (adc_h - (self.h4 * 64.0 + self.h5 / 16384.0 * h)) * (
            self.h2 / 65536.0 * (1.0 + self.h6 / 67108864.0 * h * (1.0 + self.h3 / 67108864.0 * h))
        )
        return h * (1.0 - self.h1 * h / 524288.0)


class BME280Driver(_I2CDriver):
    name = "bme280"
    Params = BME280Params
    params: BME280Params

    CHIP_ID = 0x60
    REG_CALIB_00 = 0x88
    REG_CHIP_ID = 0xD0
    REG_RESET = 0xE0
    REG_CALIB_26 = 0xE1
    REG_CTRL_HUM = 0xF2
    REG_STATUS = 0xF3
    REG_CTRL_MEAS = 0xF4
    REG_CONFIG = 0xF5
    REG_DATA = 0xF7
    RESET_WORD = 0xB6
    STATUS_MEASURING = 0x08
    STATUS_IM_UPDATE = 0x01
    _MODE_BITS: ClassVar[dict[str, int]] = {"sleep": 0b00, "forced": 0b01, "normal": 0b11}
    _KNOWN_IDS: ClassVar[dict[int, str]] = {0x58: "a BMP280 (no humidity sensor)", 0x61: "a BME680"}

    def __init__(self, device_id: str, params: BME280Params, *, bus_factory: BusFactory | None = None) -> None:
        super().__init__(device_id, params, bus_factory=bus_factory)
        self._calibration: BME280Calibration | None = None

    @property
    def sensors(self) -> Mapping[str, str]:
        return {"temperature": "degC", "pressure": "hPa", "humidity": "%RH"}

    def init_chip(self) -> None:
        chip_id = self._read_byte(self.REG_CHIP_ID, "read chip id")
        if chip_id != self.CHIP_ID:
            what = self._KNOWN_IDS.get(chip_id, "not a BME280")
            raise DeviceIdentityError(
                f"chip id 0x{chip_id:02X} at 0x{self.address:02X} on /dev/i2c-{self.params.bus}: {what} "
                f"(a BME280 reads 0x{self.CHIP_ID:02X})"
            )
        if self.params.soft_reset:
            # Start from power-on defaults, whatever a previous process left configured.
            self._write_byte(self.REG_RESET, self.RESET_WORD, "soft reset")
            self._wait_status_clear(self.STATUS_IM_UPDATE, 0.002, "copy the trimming values after reset")
        block_88 = self._read_block(self.REG_CALIB_00, 26, "read calibration 0x88..0xA1")
        block_e1 = self._read_block(self.REG_CALIB_26, 7, "read calibration 0xE1..0xE7")
        self._calibration = BME280Calibration.from_registers(block_88, block_e1)
        p = self.params
        # Order matters: ctrl_hum only takes effect with the next ctrl_meas write, and config
        # writes may be ignored outside sleep mode, so the mode bits go last.
        config = _STANDBY_MS[p.standby_ms] << 5 | _FILTER[p.iir_filter] << 2
        self._write_byte(self.REG_CTRL_HUM, _OVERSAMPLING[p.oversampling_humidity], "write ctrl_hum")
        self._write_byte(self.REG_CONFIG, config, "write config")
        mode = "normal" if p.mode == "normal" else "sleep"  # forced conversions are started by read()
        self._write_byte(self.REG_CTRL_MEAS, self._ctrl_meas(mode), "write ctrl_meas")

    def read(self) -> Mapping[str, float]:
        if self.params.mode == "forced":
            self._write_byte(self.REG_CTRL_MEAS, self._ctrl_meas("forced"), "start forced conversion")
            time.sleep(self.max_measurement_s())
            self._wait_status_clear(self.STATUS_MEASURING, 0.001, "finish the conversion")
        # One burst read, so that all three values come from the same conversion (the chip
        # shadows the data registers only for the duration of a burst).
        return self.compensate(self._read_block(self.REG_DATA, 8, "burst read 0xF7..0xFE"))

    def compensate(self, data: Sequence[int]) -> dict[str, float]:
        """Turn the 8 data registers 0xF7..0xFE into degC, hPa and %RH."""
        cal = self._calibration
        if cal is None:
            raise BusError("BME280 is not open")
        adc_p = (data[0] << 12) | (data[1] << 4) | (data[2] >> 4)
        adc_t = (data[3] << 12) | (data[4] << 4) | (data[5] >> 4)
        adc_h = (data[6] << 8) | data[7]
        if adc_t == 0x80000 or adc_p == 0x80000 or adc_h == 0x8000:
            # The reset values of the data registers: the chip skipped the conversion, which means
            # it lost its configuration (a brown-out resets it). A BusError gets the bus reopened,
            # and open() configures it again.
            raise BusError("BME280 returned skipped-measurement values; chip was reset?")
        t_fine = cal.t_fine(adc_t)
        temperature = _check_range("temperature", cal.temperature(t_fine), -40.0, 85.0, "degC")
        pressure = _check_range("pressure", cal.pressure(adc_p, t_fine) / 100.0, 300.0, 1100.0, "hPa")
        humidity = cal.humidity(adc_h, t_fine)
        if -_HUMIDITY_OVERSHOOT <= humidity <= 100.0 + _HUMIDITY_OVERSHOOT:
            # The compensation overshoots slightly at saturation; Bosch's reference code clamps.
            humidity = min(max(humidity, 0.0), 100.0)
        humidity = _check_range("humidity", humidity, 0.0, 100.0, "%RH")
        return {"temperature": temperature, "pressure": pressure, "humidity": humidity}

    def max_measurement_s(self) -> float:
        """Datasheet section 9.1: the longest a forced conversion takes at these oversamplings."""
        p = self.params
        ms = 1.25 + 2.3 * p.oversampling_temperature
        ms += 2.3 * p.oversampling_pressure + 0.575
        ms += 2.3 * p.oversampling_humidity + 0.575
        return ms / 1000.0

    def _ctrl_meas(self, mode: str) -> int:
        p = self.params
        return (
            _OVERSAMPLING[p.oversampling_temperature] << 5
            | _OVERSAMPLING[p.oversampling_pressure] << 2
            | self._MODE_BITS[mode]
        )

    def _wait_status_clear(self, bit: int, poll_s: float, what: str, attempts: int = 10) -> None:
        for _ in range(attempts):
            if not self._read_byte(self.REG_STATUS, "read status") & bit:
                return
            time.sleep(poll_s)
        raise BusError(f"BME280 did not {what} (status bit 0x{bit:02X} stuck)")

    def _read_block(self, register: int, length: int, what: str) -> list[int]:
        return self.io(what, lambda b: b.read_i2c_block_data(self.address, register, length))

    def _read_byte(self, register: int, what: str) -> int:
        return self.io(what, lambda b: b.read_byte_data(self.address, register))

    def _write_byte(self, register: int, value: int, what: str) -> None:
        self.io(what, lambda b: b.write_byte_data(self.address, register, value))


# --------------------------------------------------------------------------------------------
# Sensirion SHT3x (SHT31): temperature, humidity
# --------------------------------------------------------------------------------------------


def crc8_sensirion(data: bytes) -> int:
    """CRC-8 of the SHT3x datasheet (section 4.12): poly 0x31, init 0xFF, no reflection."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SHT31Params(I2CParams):
    address: Literal[0x44, 0x45] = 0x44
    repeatability: Literal["high", "medium", "low"] = "high"


class SHT31Driver(_I2CDriver):
    name = "sht31"
    Params = SHT31Params
    params: SHT31Params

    # Single shot without clock stretching -> (command, longest measurement time in s). Without
    # clock stretching the chip NACKs reads until it is done, so the driver waits the datasheet's
    # maximum instead of holding the bus (clock stretching is unreliable on a Raspberry Pi).
    _MEASURE: ClassVar[dict[str, tuple[int, float]]] = {
        "high": (0x2400, 0.0155),
        "medium": (0x240B, 0.0065),
        "low": (0x2416, 0.0045),
    }
    CMD_SOFT_RESET = 0x30A2
    CMD_READ_STATUS = 0xF32D
    SOFT_RESET_S = 0.0015

    @property
    def sensors(self) -> Mapping[str, str]:
        return {"temperature": "degC", "humidity": "%RH"}

    def init_chip(self) -> None:
        self._command(self.CMD_SOFT_RESET, "soft reset")
        time.sleep(self.SOFT_RESET_S)
        # The SHT3x has no id register; a status word with a valid CRC is the closest thing:
        # another chip at this address (or a floating bus) will not produce one.
        self._command(self.CMD_READ_STATUS, "read status")
        status = self._read(3, "read status")
        if crc8_sensirion(status[:2]) != status[2]:
            raise DeviceIdentityError(
                f"status word {status.hex()} at 0x{self.address:02X} on /dev/i2c-{self.params.bus} "
                "fails its CRC: not an SHT3x?"
            )

    def read(self) -> Mapping[str, float]:
        command, duration = self._MEASURE[self.params.repeatability]
        self._command(command, "start measurement")
        time.sleep(duration)
        return self.convert(self._read(6, "read measurement"))

    @staticmethod
    def convert(frame: bytes) -> dict[str, float]:
        """6 bytes: T msb, T lsb, CRC, RH msb, RH lsb, CRC -> degC and %RH."""
        for name, word in (("temperature", frame[0:3]), ("humidity", frame[3:6])):
            if crc8_sensirion(word[:2]) != word[2]:
                raise ChecksumError(
                    f"{name} word {word[:2].hex()} has CRC 0x{word[2]:02X}, expected 0x{crc8_sensirion(word[:2]):02X}"
                )
        raw_t = int.from_bytes(frame[0:2], "big")
        raw_rh = int.from_bytes(frame[3:5], "big")
        temperature = _check_range("temperature", -45.0 + 175.0 * raw_t / 65535.0, -40.0, 125.0, "degC")
        return {"temperature": temperature, "humidity": 100.0 * raw_rh / 65535.0}

    def _command(self, command: int, what: str) -> None:
        # Commands go out as plain I2C writes: an SMBus "write byte data" would do for 16 bits,
        # but an SMBus block read would send a register byte, which the SHT3x takes as half a
        # command; i2c_rdwr keeps reads and writes symmetrical and exact.
        from smbus2 import i2c_msg  # imported where used, like the bus itself

        msg = i2c_msg.write(self.address, [command >> 8, command & 0xFF])
        self.io(what, lambda b: b.i2c_rdwr(msg))

    def _read(self, length: int, what: str) -> bytes:
        from smbus2 import i2c_msg

        msg = i2c_msg.read(self.address, length)
        self.io(what, lambda b: b.i2c_rdwr(msg))
        return bytes(msg)
