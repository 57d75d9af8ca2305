"""Simulated device: realistic signals for demos, the local stack and tests.

Each sensor follows a slow daily-like sine around a base value plus Gaussian noise, with occasional
spikes (what the preprocessor's median filter is for) and dropouts (a read that yields nothing for
that sensor, as a real bus sometimes does). Seeded per device, so runs are reproducible.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping

from pydantic import Field

from .base import Driver, DriverParams

# sensor id -> (unit, base value, amplitude of the slow wave, noise sigma)
_PROFILES: dict[str, tuple[str, float, float, float]] = {
    "temperature": ("degC", 21.0, 3.0, 0.15),
    "humidity": ("%RH", 45.0, 8.0, 0.8),
    "pressure": ("hPa", 1013.0, 4.0, 0.3),
    "soil_moisture": ("%", 35.0, 5.0, 0.5),
    "light": ("lx", 400.0, 300.0, 10.0),
    "pm2_5": ("ug/m3", 12.0, 6.0, 1.0),
}


class SimulatedParams(DriverParams):
    sensors: list[str] = Field(default_factory=lambda: ["temperature", "humidity"], min_length=1)
    spike_probability: float = Field(0.01, ge=0, le=1)
    dropout_probability: float = Field(0.01, ge=0, le=1)
    period_s: float = Field(600.0, gt=0, description="period of the slow wave")
    seed: int | None = None


class SimulatedDriver(Driver):
    name = "simulated"
    Params = SimulatedParams
    params: SimulatedParams

    def __init__(self, device_id: str, params: SimulatedParams) -> None:
        super().__init__(device_id, params)
        unknown = sorted(set(params.sensors) - set(_PROFILES))
        if unknown:
            raise ValueError(f"unknown simulated sensor(s) {unknown}; choose from {sorted(_PROFILES)}")
        seed = params.seed if params.seed is not None else sum(device_id.encode())
        self._rng = random.Random(seed)
        self._phase = self._rng.uniform(0, 2 * math.pi)

    @property
    def sensors(self) -> Mapping[str, str]:
        return {s: _PROFILES[s][0] for s in self.params.sensors}

    def read(self) -> Mapping[str, float]:
        p = self.params
        angle = self._phase + 2 * math.pi * (time.time() % p.period_s) / p.period_s
        sample: dict[str, float] = {}
        for sensor in p.sensors:
            if self._rng.random() < p.dropout_probability:
                continue
            _unit, base, amplitude, sigma = _PROFILES[sensor]
            value = base + amplitude * math.sin(angle) + self._rng.gauss(0, sigma)
            if self._rng.random() < p.spike_probability:
                value += self._rng.choice((-1, 1)) * amplitude * self._rng.uniform(3, 6)
            sample[sensor] = round(value, 3)
        return sample
