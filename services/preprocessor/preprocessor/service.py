"""preprocessor: raw windows in, filtered window aggregates out.

Stateless by design: a raw message holds whole windows (the reader publishes each device's window
whole, in one message), so instances in the `$share/preprocessor` group never need each other's
state. The windows of a whole handler batch (several raw messages, many devices) are filtered and
aggregated together and go out in as few processed messages as fit the payload limit. A raw
message is acknowledged only after the processed messages holding its windows were acknowledged by
the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
from iotpipe import Component, Opened, Processed, RawBatch, RawWindow, Runtime, ServiceSettings, Window
from pydantic import Field, field_validator

from .windows import aggregate_array, round_aggregates

log = logging.getLogger(__name__)
# Aggregates go out rounded: 53.477 rather than 53.477000000000004 in Redis and at the cloud, and
# far finer than any sensor this pipeline reads resolves.
AGGREGATE_DECIMALS = 6
# Sealing grows a payload by a third (base64 of the Fernet token) plus the envelope: a plaintext
# within this share of the receivers' limit always fits once sealed.
SEALED_PAYLOAD_RATIO = 0.7
# A window encodes to about 200 bytes; with ids and units at their longest it stays under this.
WINDOW_BYTES_BOUND = 480
# Windows per processed message at most, whatever the byte limit allows: about 100 KB, so that
# consumers decode, hold and acknowledge the stream in steps of a few milliseconds of work rather
# than in megabyte messages (at 20,000 windows/s: 40 messages a second).
WINDOWS_PER_MESSAGE = 500


class Settings(ServiceSettings):
    service_name = "preprocessor"

    median_kernel: int = Field(5, ge=1, le=101, description="median filter width (odd)")
    share_group: str = "preprocessor"
    share_adopt_after: float = Field(
        30.0, gt=0, description="s another member's session may say offline before a live member drains it"
    )

    @field_validator("median_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd")
        return value


def fitting(windows: list[Window], max_bytes: int) -> list[Processed]:
    """`windows` in messages whose sealed form fits `max_bytes` (what every receiver accepts)."""
    per_message = max(1, min(WINDOWS_PER_MESSAGE, int(max_bytes * SEALED_PAYLOAD_RATIO) // WINDOW_BYTES_BOUND))
    return [Processed(windows=windows[i : i + per_message]) for i in range(0, len(windows), per_message)]


def process(raw: Sequence[RawWindow], kernel: int) -> list[Window]:
    """The aggregates of every sensor of every raw window, in order; series of equal length are
    filtered and aggregated in one vectorised pass, and rounded in one."""
    flat = [np.asarray(series.v, dtype=np.float64) for window in raw for series in window.sensors.values()]
    counts, stats = aggregate_array(flat, kernel)
    # numpy's round (to the nearest of the value scaled by 10^6) rather than Python's exact decimal
    # round: they differ only for a value within an ulp of a tie, far below any sensor's resolution.
    rows = iter(zip(counts.tolist(), round_aggregates(stats, AGGREGATE_DECIMALS).tolist(), strict=True))
    out = []
    for window in raw:
        device, start, end = window.device, window.window.start, window.window.start + window.window.size
        for sensor, series in window.sensors.items():
            n, (mean, median, low, high, std) = next(rows)
            out.append(Window(device, sensor, series.unit, start, end, n, mean, median, low, high, std))
    return out


class Preprocessor(Component[Settings]):
    def __init__(self, runtime: Runtime[Settings]) -> None:
        super().__init__(runtime)
        self.windows = runtime.metrics.counter("iotpipe_windows", "Windows computed")
        runtime.bus.subscribe(
            runtime.topics.all("raw"),
            self.handle,
            model=RawBatch,
            share_group=self.settings.share_group,
            adopt_after=self.settings.share_adopt_after,
        )

    async def handle(self, messages: Sequence[Opened[RawBatch]]) -> None:
        windows = process([w for m in messages for w in m.data.windows], self.settings.median_kernel)
        bus, topic = self.runtime.bus, self.runtime.topics.processed(self.settings.instance)
        # Returning acknowledges the raw batches: only after every processed message is at the broker.
        await asyncio.gather(
            *(bus.publish_sealed(topic, p, kind="processed") for p in fitting(windows, self.settings.max_payload_bytes))
        )
        self.windows.inc(len(windows))
