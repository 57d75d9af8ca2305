"""preprocessor: raw window batches in, filtered window aggregates out.

Stateless by design: each raw message holds one whole window per sensor (the reader publishes
windows whole), so instances in the `$share/preprocessor` group never need each other's state.
A raw batch is acknowledged only after its processed message was acknowledged by the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
from iotpipe import Component, Opened, Processed, RawBatch, Runtime, ServiceSettings, Window, encode
from pydantic import Field, field_validator

from .windows import aggregate

log = logging.getLogger(__name__)
# Aggregates go out rounded: 53.477 rather than 53.477000000000004 in Redis and at the cloud, and
# far finer than any sensor this pipeline reads resolves.
AGGREGATE_DECIMALS = 6
# Sealing grows a payload by a third (base64 of the Fernet token) plus the envelope: a plaintext
# within this share of the receivers' limit always fits once sealed.
SEALED_PAYLOAD_RATIO = 0.7
# A window encodes to about 180 bytes; ids and units at their longest stay under this.
WINDOW_BYTES_BOUND = 400


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


def fitting(processed: Processed, max_bytes: int) -> list[Processed]:
    """`processed` split into messages whose sealed form fits `max_bytes` (what every receiver
    accepts): one raw batch of thousands of sensors must not become one message no one can take."""
    if len(processed.windows) * WINDOW_BYTES_BOUND <= max_bytes * SEALED_PAYLOAD_RATIO:
        return [processed]  # the common case, decided without encoding
    if len(processed.windows) == 1 or len(encode(processed)) <= max_bytes * SEALED_PAYLOAD_RATIO:
        return [processed]
    half = len(processed.windows) // 2
    return [
        *fitting(Processed(device=processed.device, windows=processed.windows[:half]), max_bytes),
        *fitting(Processed(device=processed.device, windows=processed.windows[half:]), max_bytes),
    ]


def process(batches: Sequence[RawBatch], kernel: int) -> list[Processed]:
    """The processed message of each raw batch: every series filtered and aggregated, all series
    of the same length in one vectorised pass."""
    flat = [np.asarray(series.v, dtype=np.float64) for batch in batches for series in batch.sensors.values()]
    stats = iter(aggregate(flat, kernel))
    out = []
    for batch in batches:
        start, end = batch.window.start, batch.window.start + batch.window.size
        windows = []
        for sensor, series in batch.sensors.items():
            values = next(stats)
            windows.append(
                Window(
                    sensor=sensor,
                    unit=series.unit,
                    start=start,
                    end=end,
                    n=int(values["n"]),
                    **{k: round(float(values[k]), AGGREGATE_DECIMALS) for k in ("mean", "median", "min", "max", "std")},
                )
            )
        out.append(Processed(device=batch.device, windows=windows))
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
        limit = self.settings.max_payload_bytes
        processed = [
            part for p in process([m.data for m in messages], self.settings.median_kernel) for part in fitting(p, limit)
        ]
        bus, topics = self.runtime.bus, self.runtime.topics
        # Returning acknowledges the raw batches: only after every processed message is at the broker.
        await asyncio.gather(*(bus.publish_sealed(topics.processed(p.device), p, kind="processed") for p in processed))
        self.windows.inc(sum(len(p.windows) for p in processed))
