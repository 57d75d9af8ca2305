"""preprocessor: raw window batches in, filtered window aggregates out.

Stateless by design: each raw message holds one whole window per sensor (the reader publishes
windows whole), so instances in the `$share/preprocessor` group never need each other's state.
A raw batch is acknowledged only after its processed message was acknowledged by the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from iotpipe import (
    ID_PATTERN,
    MalformedEnvelope,
    Opened,
    RateLimitedLog,
    Runtime,
    ServiceSettings,
    Topics,
    run_service,
)
from pydantic import Field, field_validator

from .windows import aggregate

log = logging.getLogger(__name__)
MAX_SAMPLES_PER_SENSOR = 1_000_000  # a window larger than this is a bug or an attack
# Aggregates go out rounded: 53.477 rather than 53.477000000000004 in Redis and at the cloud, and
# far finer than any sensor this pipeline reads resolves.
AGGREGATE_DECIMALS = 6


class Settings(ServiceSettings):
    service_name = "preprocessor"

    median_kernel: int = Field(5, ge=1, le=101, description="median filter width (odd)")
    share_group: str = "preprocessor"

    @field_validator("median_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd")
        return value


def parse_raw(message: Opened) -> tuple[str, int, int, list[tuple[str, str, np.ndarray]]]:
    """Validate one raw batch: (device, start, size, [(sensor, unit, values)]). Raises
    MalformedEnvelope naming what is wrong."""
    data = message.data
    if not isinstance(data, dict) or set(data) != {"device", "window", "sensors"}:
        raise MalformedEnvelope("raw batch must have exactly device, window, sensors")
    device, window, sensors = data["device"], data["window"], data["sensors"]
    if not isinstance(device, str) or not ID_PATTERN.fullmatch(device) or Topics.device_of(message.topic) != device:
        raise MalformedEnvelope("device does not match the topic")
    if not isinstance(window, dict) or set(window) != {"start", "size"}:
        raise MalformedEnvelope("window must have exactly start, size")
    start, size = window["start"], window["size"]
    if type(start) is not int or type(size) is not int or size <= 0 or start < 0:
        raise MalformedEnvelope("window start/size must be non-negative integers")
    if not isinstance(sensors, dict) or not sensors:
        raise MalformedEnvelope("sensors must be a non-empty object")
    series = []
    for sensor, body in sensors.items():
        if not ID_PATTERN.fullmatch(sensor):
            raise MalformedEnvelope(f"invalid sensor id {sensor!r:.70}")
        if not isinstance(body, dict) or set(body) != {"unit", "t", "v"} or not isinstance(body["unit"], str):
            raise MalformedEnvelope(f"sensor {sensor}: needs exactly unit, t, v")
        values, stamps = body["v"], body["t"]
        if not isinstance(values, list) or not isinstance(stamps, list) or len(values) != len(stamps):
            raise MalformedEnvelope(f"sensor {sensor}: t and v must be lists of equal length")
        if not 0 < len(values) <= MAX_SAMPLES_PER_SENSOR:
            raise MalformedEnvelope(f"sensor {sensor}: {len(values)} samples")
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise MalformedEnvelope(f"sensor {sensor}: values must be numbers") from exc
        if array.ndim != 1 or not np.isfinite(array).all():
            raise MalformedEnvelope(f"sensor {sensor}: values must be finite numbers")
        try:
            times = np.asarray(stamps)
        except (TypeError, ValueError) as exc:  # ragged or nested input
            raise MalformedEnvelope(f"sensor {sensor}: timestamps must be integers") from exc
        # Vectorised: this runs for every reading. A non-integer dtype (floats, strings, bools mixed
        # with ints become object/float) is refused rather than truncated.
        if times.ndim != 1 or times.dtype.kind not in "iu":
            raise MalformedEnvelope(f"sensor {sensor}: timestamps must be integers")
        if times.min() < start or times.max() >= start + size:
            raise MalformedEnvelope(f"sensor {sensor}: timestamps outside the window")
        series.append((sensor, body["unit"][:32], array))
    return device, start, size, series


class Preprocessor:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings  # type: ignore[assignment]
        self.windows = runtime.metrics.counter("iotpipe_windows", "Windows computed")
        self._rejects = RateLimitedLog(log)
        runtime.bus.subscribe(runtime.topics.all("raw"), self.handle, share_group=self.settings.share_group)

    async def handle(self, messages: Sequence[Opened]) -> None:
        parsed = []
        for message in messages:
            try:
                parsed.append(parse_raw(message))
            except MalformedEnvelope as exc:
                self.runtime.metrics.rejected.labels("schema").inc()
                self._rejects.warning("schema", "rejected raw batch on %s: %s", message.topic, exc)
        if not parsed:
            return
        flat = [values for *_head, series in parsed for _s, _u, values in series]
        stats = iter(aggregate(flat, self.settings.median_kernel))
        publishes = []
        for device, start, size, series in parsed:
            windows: list[dict[str, Any]] = []
            for sensor, unit, _values in series:
                aggregates = {k: round(v, AGGREGATE_DECIMALS) for k, v in next(stats).items()}
                windows.append({"sensor": sensor, "unit": unit, "start": start, "end": start + size, **aggregates})
            topic = self.runtime.topics.processed(device)
            publishes.append(
                self.runtime.bus.publish_sealed(topic, {"device": device, "windows": windows}, kind="processed")
            )
            self.windows.inc(len(windows))
        # Returning acknowledges the raw batches: only after every processed message is at the broker.
        await asyncio.gather(*publishes)

    async def run(self) -> None:
        await asyncio.Event().wait()

    def health(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None


def run(settings: Settings) -> None:
    run_service(settings, Preprocessor)
