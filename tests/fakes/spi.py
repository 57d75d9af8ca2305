"""An MCP3008 on a fake spidev, emulated bit by bit.

The chip ignores MOSI until the first 1 (the start bit), clocks in SGL/DIFF and D2..D0, spends one
clock sampling, shifts out a null bit and then B9..B0 (and, if clocked further, B1..B9 LSB first,
then zeros). MISO is high-impedance before that; the fake drives it high there, so a driver that
forgets to mask the reply reads garbage, as it would on a board with a pull-up.
"""

from __future__ import annotations

import errno
import os

from .faults import FaultInjector, ProtocolViolationError

MAX_SPEED_HZ = 3_600_000  # datasheet maximum (at 5 V)


class FakeMCP3008:
    """The chip as wired to /dev/spidev<bus>.<device>, with a 10-bit value per channel."""

    def __init__(self, values: dict[int, int] | None = None, *, bus: int = 0, device: int = 0) -> None:
        self.bus = bus
        self.device = device
        self.values = [0] * 8
        for channel, raw in (values or {}).items():
            self.set(channel, raw)
        self.faults = FaultInjector()
        self.conversions: list[int] = []  # channel of every conversion, in order

    def set(self, channel: int, raw: int) -> None:
        if not 0 <= raw <= 1023:
            raise ValueError(f"a 10-bit ADC cannot read {raw}")
        self.values[channel] = raw

    def spidev(self) -> FakeSpiDev:
        """Use as `spi_factory`: like `spidev.SpiDev()`, returns an unopened handle."""
        return FakeSpiDev(self)

    def transfer(self, mosi: list[int]) -> list[int]:
        bits = [(byte >> (7 - i)) & 1 for byte in mosi for i in range(8)]
        if 1 not in bits:
            raise ProtocolViolationError(f"no start bit in {bytes(mosi).hex()}")
        start = bits.index(1)
        config = bits[start + 1 : start + 5]
        if len(config) < 4:
            raise ProtocolViolationError(f"transfer {bytes(mosi).hex()} ends before the 4 config bits")
        single_ended, d2, d1, d0 = config
        if not single_ended:
            raise ProtocolViolationError("differential mode requested; the driver must read single-ended")
        channel = d2 << 2 | d1 << 1 | d0
        value = self.values[channel]
        self.conversions.append(channel)
        result = [0] + [(value >> (9 - i)) & 1 for i in range(10)] + [(value >> i) & 1 for i in range(1, 10)]
        first = start + 6  # after the start bit, 4 config bits and the sample clock
        miso = [1 if i < first else (result[i - first] if i - first < len(result) else 0) for i in range(len(bits))]
        return [int("".join(map(str, miso[i : i + 8])), 2) for i in range(0, len(miso), 8)]


class FakeSpiDev:
    """The subset of `spidev.SpiDev` the driver uses."""

    def __init__(self, chip: FakeMCP3008) -> None:
        self._chip = chip
        self._open = False
        self.mode = 0
        self.max_speed_hz = 125_000_000  # spidev reports the controller's limit until it is set

    def open(self, bus: int, device: int) -> None:
        if (bus, device) != (self._chip.bus, self._chip.device):
            path = f"/dev/spidev{bus}.{device}"
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        self._open = True

    def xfer2(self, data: list[int]) -> list[int]:
        if not self._open:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if self.mode not in (0, 3):
            raise ProtocolViolationError(f"the MCP3008 supports SPI modes 0 and 3, not {self.mode}")
        if self.max_speed_hz > MAX_SPEED_HZ:
            raise ProtocolViolationError(f"{self.max_speed_hz} Hz is above the chip's {MAX_SPEED_HZ} Hz")
        self._chip.faults.check()
        return self._chip.transfer(list(data))

    def close(self) -> None:
        self._open = False
