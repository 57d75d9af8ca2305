"""MCP3008: 8-channel 10-bit ADC on SPI, for analog sensors (soil moisture probes, LDRs, ...).

Each configured channel is one sensor. Raw counts are turned into the sensor's unit by two-point
calibration: measure the raw count at two known conditions (dry and wet soil, dark and bright) and
give both pairs; values in between are linear. Two points were chosen over scale/offset because
that is what a user can actually measure, and because an inverted sensor (a probe that reads lower
when wetter) needs no sign arithmetic: `raw_min` may be larger than `raw_max`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import Block, BusError, Driver, DriverError, DriverParams, ImplausibleValueError, Sample

log = logging.getLogger(__name__)

_SENSOR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # sensor ids end up in topics and Redis keys
_FULL_SCALE = 1023


class SpiDevLike(Protocol):
    """The subset of `spidev.SpiDev` the driver uses (so tests can hand in a fake)."""

    max_speed_hz: int
    mode: int

    def open(self, bus: int, device: int) -> None: ...

    def xfer2(self, data: list[int]) -> list[int]: ...

    def close(self) -> None: ...


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    channel: int = Field(ge=0, le=7)
    unit: str = Field(min_length=1, max_length=16)
    raw_min: int = Field(0, ge=0, le=_FULL_SCALE, description="raw count that means `min`")
    raw_max: int = Field(_FULL_SCALE, ge=0, le=_FULL_SCALE, description="raw count that means `max`")
    min: float
    max: float
    margin: float = Field(
        0.1, ge=0, description="fraction of the calibrated span a value may exceed before it is implausible"
    )

    @model_validator(mode="after")
    def _distinct_points(self) -> ChannelConfig:
        if self.raw_min == self.raw_max:
            raise ValueError("raw_min and raw_max must differ")
        if self.min == self.max:
            raise ValueError("min and max must differ")
        # Finite min and max can still overflow: (max - min) * count is infinite for a span near
        # 1e308, and an infinite value would pass `plausible` and poison the device's whole window.
        # The conversion is linear, so the two ends of the ADC's range are its extremes.
        ends = (self.convert(0), self.convert(_FULL_SCALE))
        low, high = sorted((self.min, self.max))
        slack = (high - low) * self.margin
        if not all(math.isfinite(v) for v in (*ends, low - slack, high + slack)):
            raise ValueError("min, max and margin extrapolate beyond the float range over raw 0..1023")
        return self

    def convert(self, raw: int) -> float:
        return self.min + (raw - self.raw_min) * (self.max - self.min) / (self.raw_max - self.raw_min)

    def plausible(self, value: float) -> bool:
        low, high = sorted((self.min, self.max))
        slack = (high - low) * self.margin
        return low - slack <= value <= high + slack


class MCP3008Params(DriverParams):
    bus: int = Field(0, ge=0)
    chip_select: int = Field(0, ge=0, description="the `device` of /dev/spidev<bus>.<device>")
    # The chip is specified up to 3.6 MHz at 5 V but only 1.35 MHz at 2.7 V; 1 MHz works at either.
    max_speed_hz: int = Field(1_000_000, gt=0, le=3_600_000)
    channels: dict[str, ChannelConfig] = Field(min_length=1)
    samples_per_read: int = Field(
        1,
        ge=1,
        le=10_000,
        description="burst: conversions of every channel per read, back to back, returned as one Block",
    )

    @field_validator("channels")
    @classmethod
    def _check_channels(cls, channels: dict[str, ChannelConfig]) -> dict[str, ChannelConfig]:
        for sensor in channels:
            if not _SENSOR_ID.fullmatch(sensor):
                raise ValueError(f"sensor id {sensor!r:.80} must match {_SENSOR_ID.pattern}")
        used = [c.channel for c in channels.values()]
        duplicates = sorted({c for c in used if used.count(c) > 1})
        if duplicates:
            raise ValueError(f"channel(s) {duplicates} are assigned to more than one sensor")
        return channels


def _default_spi_factory() -> SpiDevLike:
    try:
        # Imported here: spidev only builds on Linux, and the rest of the reader runs anywhere.
        import spidev
    except ImportError as exc:
        raise DriverError(f"spidev is not available ({exc}); the MCP3008 driver needs Linux") from exc
    device: SpiDevLike = spidev.SpiDev()
    return device


class MCP3008Driver(Driver):
    name = "mcp3008"
    Params = MCP3008Params
    params: MCP3008Params

    def __init__(
        self,
        device_id: str,
        params: MCP3008Params,
        *,
        spi_factory: Callable[[], SpiDevLike] | None = None,
    ) -> None:
        super().__init__(device_id, params)
        self._spi_factory = spi_factory or _default_spi_factory
        self._spi: SpiDevLike | None = None

    @property
    def sensors(self) -> Mapping[str, str]:
        return {sensor: cfg.unit for sensor, cfg in self.params.channels.items()}

    @property
    def bus_key(self) -> str:
        return f"spi-{self.params.bus}"  # chip selects share the clock and data lines

    def open(self) -> None:
        p = self.params
        spi = self._spi_factory()
        try:
            spi.open(p.bus, p.chip_select)
            spi.max_speed_hz = p.max_speed_hz
            spi.mode = 0  # CPOL=0, CPHA=0: the chip samples on rising and shifts out on falling edges
        except OSError as exc:
            _close_quietly(spi)
            raise BusError(f"open /dev/spidev{p.bus}.{p.chip_select}: {exc}") from exc
        self._spi = spi

    def samples_per_window(self, window_ms: int, interval: float) -> float:
        return super().samples_per_window(window_ms, interval) * self.params.samples_per_read

    def read(self) -> Sample:
        """One conversion per channel, or with `samples_per_read` > 1 a burst: that many rounds of
        conversions back to back in one read (at 1 MHz one conversion takes about 30 µs, so a poll
        every 100 ms can carry hundreds of samples), returned as a Block spaced by the measured
        time per round. An implausible value drops the whole read, as for a single sample."""
        rounds = self.params.samples_per_read
        if rounds == 1:
            return self._sample()
        began = time.monotonic()
        samples = [self._sample() for _ in range(rounds)]
        period_ms = (time.monotonic() - began) * 1000 / rounds
        return Block(period_ms, {sensor: [s[sensor] for s in samples] for sensor in self.params.channels})

    def _sample(self) -> dict[str, float]:
        sample: dict[str, float] = {}
        for sensor, cfg in self.params.channels.items():
            raw = self.read_raw(cfg.channel)
            value = cfg.convert(raw)
            if not cfg.plausible(value):
                raise ImplausibleValueError(
                    f"{sensor}: raw {raw} on channel {cfg.channel} -> {value:.4g} {cfg.unit}, "
                    f"outside the calibrated {cfg.min:g}..{cfg.max:g} {cfg.unit} by more than "
                    f"{cfg.margin:.0%} (probe disconnected or miswired?)"
                )
            sample[sensor] = value
        return sample

    def read_raw(self, channel: int) -> int:
        """One single-ended conversion. The start bit is the last bit of the first byte so that
        the 10 result bits end byte-aligned: the reply's second byte carries B9..B8 in its two
        low bits (above them: the sample period and the null bit) and the third byte B7..B0."""
        spi = self._require_open()
        request = [0x01, (0x08 | channel) << 4, 0x00]
        try:
            reply = spi.xfer2(request)
        except OSError as exc:
            raise BusError(f"SPI transfer for channel {channel}: {exc}") from exc
        if len(reply) != 3:
            raise BusError(f"SPI transfer for channel {channel} returned {len(reply)} bytes, not 3")
        return ((reply[1] & 0x03) << 8) | reply[2]

    def close(self) -> None:
        spi, self._spi = self._spi, None
        if spi is not None:
            _close_quietly(spi)

    def _require_open(self) -> SpiDevLike:
        if self._spi is None:
            raise BusError("SPI device is not open")
        return self._spi


def _close_quietly(spi: SpiDevLike) -> None:
    try:
        spi.close()
    except OSError as exc:
        # Closing a handle on a bus that already failed can fail too; the handle is gone either way.
        log.debug("closing the SPI handle failed: %s", exc)
