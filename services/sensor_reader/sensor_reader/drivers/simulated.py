"""Simulated device: realistic signals for demos, the local stack, tests and the benchmark.

Each sensor follows a slow daily-like sine around a base value plus Gaussian noise, with occasional
spikes (what the preprocessor's median filter is for) and dropouts (a read that yields nothing for
that sensor, as a real bus sometimes does). Seeded per device, so runs are reproducible. A sensor
name outside the profile table gets a generic profile, so a device may have any number of sensors.

With `sample_rate` set the device runs in block mode, like a chip with a FIFO: each read returns
every sample taken since the previous read at that rate (a Block), so a 250 Hz device polled every
100 ms costs ten reads a second, not 250. Block mode has no per-sensor dropouts (a FIFO frame holds
every channel); its values are drawn for all sensors at once with numpy.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping

import numpy as np
from pydantic import Field

from .base import Block, Driver, DriverParams, Sample

# sensor id -> (unit, base value, amplitude of the slow wave, noise sigma)
_PROFILES: dict[str, tuple[str, float, float, float]] = {
    "temperature": ("degC", 21.0, 3.0, 0.15),
    "humidity": ("%RH", 45.0, 8.0, 0.8),
    "pressure": ("hPa", 1013.0, 4.0, 0.3),
    "soil_moisture": ("%", 35.0, 5.0, 0.5),
    "light": ("lx", 400.0, 300.0, 10.0),
    "pm2_5": ("ug/m3", 12.0, 6.0, 1.0),
}
_GENERIC = ("1", 50.0, 10.0, 1.0)
# After a stall (a paused process), a block holds at most this much time: a real FIFO overflows too.
MAX_BLOCK_SECONDS = 10.0


class SimulatedParams(DriverParams):
    sensors: list[str] = Field(default_factory=lambda: ["temperature", "humidity"], min_length=1)
    spike_probability: float = Field(0.01, ge=0, le=1)
    dropout_probability: float = Field(0.01, ge=0, le=1)
    period_s: float = Field(600.0, gt=0, description="period of the slow wave")
    sample_rate: float | None = Field(
        None, gt=0, le=100_000, description="block mode: samples per second, all returned by each read"
    )
    seed: int | None = None


class SimulatedDriver(Driver):
    name = "simulated"
    Params = SimulatedParams
    params: SimulatedParams
    blocking = False  # computes, never waits: called on the event loop, no thread

    def __init__(self, device_id: str, params: SimulatedParams) -> None:
        super().__init__(device_id, params)
        if len(set(params.sensors)) != len(params.sensors):
            raise ValueError("duplicate sensor names")
        seed = params.seed if params.seed is not None else sum(device_id.encode())
        self._rng = random.Random(seed)
        self._phase = self._rng.uniform(0, 2 * math.pi)
        self._profiles = [_PROFILES.get(s, _GENERIC) for s in params.sensors]
        # Block mode: the profiles as column vectors, and when the last returned sample was taken.
        self._np_rng = np.random.default_rng(seed)
        self._base, self._amplitude, self._sigma = (
            np.array([p[i] for p in self._profiles], dtype=np.float64) for i in (1, 2, 3)
        )
        self._last_sample: float | None = None

    @property
    def sensors(self) -> Mapping[str, str]:
        return {s: p[0] for s, p in zip(self.params.sensors, self._profiles, strict=True)}

    def samples_per_window(self, window_ms: int, interval: float) -> float:
        rate = self.params.sample_rate
        return rate * window_ms / 1000 if rate is not None else super().samples_per_window(window_ms, interval)

    def read(self) -> Sample:
        if self.params.sample_rate is not None:
            return self._read_block(self.params.sample_rate)
        p = self.params
        angle = self._phase + 2 * math.pi * (time.time() % p.period_s) / p.period_s
        sample: dict[str, float] = {}
        for sensor, (_unit, base, amplitude, sigma) in zip(p.sensors, self._profiles, strict=True):
            if self._rng.random() < p.dropout_probability:
                continue
            value = base + amplitude * math.sin(angle) + self._rng.gauss(0, sigma)
            if self._rng.random() < p.spike_probability:
                value += self._rng.choice((-1, 1)) * amplitude * self._rng.uniform(3, 6)
            sample[sensor] = round(value, 3)
        return sample

    def _read_block(self, rate: float) -> Block:
        now = time.time()
        period = 1.0 / rate
        if self._last_sample is None or now - self._last_sample > MAX_BLOCK_SECONDS:
            self._last_sample = now - period
        count = int((now - self._last_sample) * rate)
        if count < 1:
            return Block(period * 1000, {})
        last = self._last_sample + count * period
        self._last_sample = last
        p = self.params
        times = last - period * np.arange(count - 1, -1, -1)
        angle = self._phase + 2 * np.pi * (times % p.period_s) / p.period_s
        rng = self._np_rng
        shape = (len(self._base), count)
        values = self._base[:, None] + self._amplitude[:, None] * np.sin(angle)[None, :]
        values += rng.standard_normal(shape) * self._sigma[:, None]
        if p.spike_probability > 0:
            spikes = rng.random(shape) < p.spike_probability
            if spikes.any():
                size = rng.uniform(3, 6, shape) * rng.choice((-1.0, 1.0), shape) * self._amplitude[:, None]
                values += np.where(spikes, size, 0.0)
        rows = np.round(values, 3).tolist()
        return Block(period * 1000, dict(zip(p.sensors, rows, strict=True)))
