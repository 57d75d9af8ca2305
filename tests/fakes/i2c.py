"""An I2C adapter with fake chips on it: a BME280 (register map) and an SHT31 (command protocol).

`FakeI2CBus` is the wire: chips by address plus a FaultInjector that every transaction passes.
`FakeSMBus` is one open handle on it, with the smbus2 methods the drivers use. Chips only see raw
writes and reads, so SMBus register access and i2c_rdwr messages are emulated the way the
kernel puts them on the wire (a register read is a write of the register address, then a read).

Conversions take as long as the datasheets allow at most, on a clock the test may replace
(`clock=`, monotonic seconds): a driver that reads before the chip is done gets what the chip
gives then -- a NACK from the SHT31, the measuring bit and the previous data from the BME280.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import ClassVar, Protocol

from .faults import FaultInjector, ProtocolViolationError

I2C_M_RD = 0x0001


class FakeChip(Protocol):
    def write(self, data: bytes) -> None: ...

    def read(self, length: int) -> bytes: ...


def _nack(what: str) -> OSError:
    # What Linux i2c adapters report when a chip does not acknowledge.
    return OSError(errno.EREMOTEIO, f"{os.strerror(errno.EREMOTEIO)} ({what})")


class FakeI2CBus:
    def __init__(self, chips: dict[int, FakeChip], *, number: int = 1) -> None:
        self.number = number
        self.chips = chips
        self.faults = FaultInjector()
        self.opened = 0
        self.closed = 0

    def smbus(self, bus: int) -> FakeSMBus:
        """Use as `bus_factory`: like `smbus2.SMBus(bus)`."""
        if bus != self.number:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), f"/dev/i2c-{bus}")
        self.opened += 1
        return FakeSMBus(self)

    def chip(self, address: int) -> FakeChip:
        if address not in self.chips:
            raise _nack(f"nothing at 0x{address:02X}")
        return self.chips[address]


class FakeSMBus:
    def __init__(self, wire: FakeI2CBus) -> None:
        self._wire = wire
        self._open = True

    def _transaction(self, address: int) -> FakeChip:
        if not self._open:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        self._wire.faults.check()
        return self._wire.chip(address)

    def read_byte_data(self, i2c_addr: int, register: int) -> int:
        chip = self._transaction(i2c_addr)
        chip.write(bytes([register]))
        return chip.read(1)[0]

    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None:
        self._transaction(i2c_addr).write(bytes([register, value]))

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]:
        if length > 32:
            raise ValueError("Desired block length over 32 bytes")  # what smbus2 raises
        chip = self._transaction(i2c_addr)
        chip.write(bytes([register]))
        return list(chip.read(length))

    def i2c_rdwr(self, *i2c_msgs: ctypes.Structure) -> None:
        for msg in i2c_msgs:
            chip = self._transaction(msg.addr)
            if msg.flags & I2C_M_RD:
                data = chip.read(msg.len)
                ctypes.memmove(msg.buf, data, len(data))
            else:
                chip.write(bytes(msg))

    def close(self) -> None:
        if self._open:
            self._open = False
            self._wire.closed += 1


# --------------------------------------------------------------------------------------------


def _bme280_max_conversion_s(osrs_t: int, osrs_p: int, osrs_h: int) -> float:
    """BME280 datasheet section 9.1, t_measure,max; a skipped measurement (osrs 0) takes no time."""
    factor = {0: 0, 1: 1, 2: 2, 3: 4, 4: 8}
    t, p, h = (factor.get(osrs, 16) for osrs in (osrs_t, osrs_p, osrs_h))
    ms = 1.25 + 2.3 * t + (2.3 * p + 0.575 if p else 0.0) + (2.3 * h + 0.575 if h else 0.0)
    return ms / 1000.0


class FakeBME280:
    """Register map of a BME280. Forced mode starts a conversion on the ctrl_meas write; it runs for
    the datasheet's maximum conversion time, during which status bit 3 (measuring) is set and the
    data registers keep the previous conversion (after a reset: 0x80000, 0x80000, 0x8000). Normal
    mode converts on every burst read. The ADC values are whatever the test sets."""

    # Bosch's worked example (BMP280 datasheet section 3.12, same formulas in the BME280) plus
    # humidity trimming values read from a real BME280.
    EXAMPLE_TRIMMING: ClassVar[dict[str, int]] = {
        "t1": 27504, "t2": 26435, "t3": -1000,
        "p1": 36477, "p2": -10685, "p3": 3024, "p4": 2855, "p5": 140, "p6": -7,
        "p7": 15500, "p8": -14600, "p9": 6000,
        "h1": 75, "h2": 362, "h3": 0, "h4": 313, "h5": 50, "h6": 30,
    }  # fmt: skip
    EXAMPLE_ADC_T = 519888  # -> 25.08 degC
    EXAMPLE_ADC_P = 415148  # -> 100653.27 Pa
    EXAMPLE_ADC_H = 28000

    STATUS_MEASURING = 0x08

    def __init__(
        self,
        *,
        chip_id: int = 0x60,
        trimming: dict[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._conversion: tuple[float, bytes] | None = None  # (done at, data registers it yields)
        self.regs = bytearray(256)
        self.regs[0xD0] = chip_id
        self.trimming = dict(trimming or self.EXAMPLE_TRIMMING)
        self._load_trimming()
        self._power_on()
        self.adc_t = self.EXAMPLE_ADC_T
        self.adc_p = self.EXAMPLE_ADC_P
        self.adc_h = self.EXAMPLE_ADC_H
        self.pointer = 0
        self.conversions = 0
        self.resets = 0
        self.conversion_overrun_s = 0.0  # a chip slower than its datasheet: converts this much longer
        self.early_data_reads = 0  # reads of the data registers while a conversion was running

    def _load_trimming(self) -> None:
        t = self.trimming
        self.regs[0x88:0xA0] = struct.pack(
            "<HhhHhhhhhhhh", t["t1"], t["t2"], t["t3"], t["p1"], t["p2"], t["p3"],
            t["p4"], t["p5"], t["p6"], t["p7"], t["p8"], t["p9"],
        )  # fmt: skip
        self.regs[0xA1] = t["h1"]
        h4, h5 = t["h4"], t["h5"]
        self.regs[0xE1:0xE8] = struct.pack(
            "<hBbBbb", t["h2"], t["h3"], h4 >> 4, (h4 & 0x0F) | (h5 & 0x0F) << 4, h5 >> 4, t["h6"]
        )

    def _power_on(self) -> None:
        self._conversion = None
        for reg in (0xF2, 0xF3, 0xF4, 0xF5):
            self.regs[reg] = 0
        self.regs[0xF7:0xFF] = bytes([0x80, 0x00, 0x00, 0x80, 0x00, 0x00, 0x80, 0x00])
        self._osrs_h = 0  # ctrl_hum as latched by the last ctrl_meas write

    @property
    def mode(self) -> int:
        return self.regs[0xF4] & 0b11

    def write(self, data: bytes) -> None:
        self._finish_conversion()
        if not data:
            return
        self.pointer = data[0]
        # Multi-byte writes are register/value pairs (datasheet 6.2.1), not auto-increment.
        for reg, value in zip(data[0::2], data[1::2], strict=False):
            self._write_register(reg, value)

    def _write_register(self, reg: int, value: int) -> None:
        if reg == 0xE0:
            if value == 0xB6:
                self.resets += 1
                self._power_on()
        elif reg == 0xF2:
            self.regs[reg] = value & 0x07
        elif reg == 0xF4:
            self.regs[reg] = value
            self._osrs_h = self.regs[0xF2]
            if self.mode in (0b01, 0b10):  # forced: one conversion, then back to sleep
                self._start_conversion()
        elif reg == 0xF5:
            self.regs[reg] = value
        # everything else is read-only and the chip ignores the write

    def _osrs(self) -> tuple[int, int, int]:
        return self.regs[0xF4] >> 5, (self.regs[0xF4] >> 2) & 0b111, self._osrs_h & 0b111

    def _conversion_result(self) -> bytes:
        """Data registers 0xF7..0xFE as a conversion at the current settings fills them."""
        osrs_t, osrs_p, osrs_h = self._osrs()
        adc_t = self.adc_t if osrs_t else 0x80000
        adc_p = self.adc_p if osrs_p else 0x80000
        adc_h = self.adc_h if osrs_h else 0x8000
        return (adc_p << 4).to_bytes(3, "big") + (adc_t << 4).to_bytes(3, "big") + adc_h.to_bytes(2, "big")

    def _start_conversion(self) -> None:
        self.conversions += 1
        # The ADC samples now; the results reach the data registers when the conversion ends.
        done_at = self._clock() + _bme280_max_conversion_s(*self._osrs()) + self.conversion_overrun_s
        self._conversion = (done_at, self._conversion_result())

    def _finish_conversion(self) -> None:
        if self._conversion is None:
            return
        done_at, result = self._conversion
        if self._clock() < done_at:
            return
        self._conversion = None
        self.regs[0xF7:0xFF] = result
        self.regs[0xF4] &= ~0b11 & 0xFF  # a forced conversion ends in sleep mode

    def read(self, length: int) -> bytes:
        self._finish_conversion()
        if self.pointer == 0xF7 and self.mode == 0b11:
            self.conversions += 1
            self.regs[0xF7:0xFF] = self._conversion_result()  # normal mode: the newest is always there
        registers = [(self.pointer + i) & 0xFF for i in range(length)]
        out = bytearray(self.regs[reg] for reg in registers)
        if self._conversion is not None:
            if 0xF3 in registers:
                out[registers.index(0xF3)] |= self.STATUS_MEASURING
            if any(0xF7 <= reg <= 0xFE for reg in registers):
                self.early_data_reads += 1
        self.pointer = (self.pointer + length) & 0xFF
        return bytes(out)


def crc8(data: bytes) -> int:
    """Independent of the driver's: table-free bitwise CRC-8, poly 0x31, init 0xFF."""
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc << 1) ^ 0x31 if crc & 0x80 else crc << 1
            crc &= 0xFF
    return crc


class FakeSHT31:
    """SHT3x command set: 16-bit commands in, 2-byte words each followed by its CRC out.

    Reads with nothing to send, or sent before a measurement is done, are NACKed, like the chip in
    single-shot mode without clock stretching."""

    MEASURE: ClassVar[dict[int, str]] = {0x2400: "high", 0x240B: "medium", 0x2416: "low"}
    # The longest a single-shot measurement takes: datasheet table 4 maxima, which Sensirion's
    # reference driver and Linux's sht3x hwmon driver also wait.
    MEASUREMENT_S: ClassVar[dict[str, float]] = {"high": 0.015, "medium": 0.006, "low": 0.004}
    SOFT_RESET = 0x30A2
    READ_STATUS = 0xF32D

    def __init__(
        self, temperature: float = 21.5, humidity: float = 40.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self.temperature = temperature
        self.humidity = humidity
        self.status = 0x8010  # after power-up: alert pending, reset detected
        self.commands: list[int] = []
        self.measurements = 0
        self._corrupt: deque[str] = deque()  # word to corrupt in each of the next measurements
        self._pending: bytes | None = None
        self._ready_at = 0.0  # when the pending data can be read
        self.early_reads = 0  # reads NACKed because the measurement was still running

    def corrupt_next(self, times: int = 1, word: str = "temperature") -> None:
        """Flip a data bit of `word` in the next `times` measurements, leaving the CRC as sent."""
        self._corrupt.extend([word] * times)

    @staticmethod
    def raw_temperature(celsius: float) -> int:
        return max(0, min(0xFFFF, round((celsius + 45.0) * 65535.0 / 175.0)))

    @staticmethod
    def raw_humidity(percent: float) -> int:
        return max(0, min(0xFFFF, round(percent * 65535.0 / 100.0)))

    @staticmethod
    def word(value: int) -> bytes:
        data = value.to_bytes(2, "big")
        return data + bytes([crc8(data)])

    def write(self, data: bytes) -> None:
        if len(data) != 2:
            raise ProtocolViolationError(f"SHT3x commands are 16 bits, got {data.hex()}")
        command = int.from_bytes(data, "big")
        self.commands.append(command)
        self._ready_at = self._clock()
        if command in self.MEASURE:
            self.measurements += 1
            t = self.word(self.raw_temperature(self.temperature))
            h = self.word(self.raw_humidity(self.humidity))
            if self._corrupt:
                target = self._corrupt.popleft()
                if target == "temperature":
                    t = bytes([t[0] ^ 0x01, t[1], t[2]])
                else:
                    h = bytes([h[0] ^ 0x01, h[1], h[2]])
            self._pending = t + h
            self._ready_at += self.MEASUREMENT_S[self.MEASURE[command]]
        elif command == self.SOFT_RESET:
            self._pending = None
            self.status = 0x8010
        elif command == self.READ_STATUS:
            self._pending = self.word(self.status)
        else:
            raise ProtocolViolationError(f"unknown SHT3x command 0x{command:04X}")

    def read(self, length: int) -> bytes:
        if self._pending is None:
            raise _nack("SHT3x has no data ready")
        if self._clock() < self._ready_at:
            self.early_reads += 1  # the data stays pending: a later read gets it
            raise _nack("SHT3x is still measuring")
        data, self._pending = self._pending[:length], None
        return data
