"""sensor-reader: polls devices and publishes one sealed batch per device per tumbling window.

A window is published whole, in one message, once it has closed (its end plus a grace period has
passed). That makes the preprocessor stateless: any instance of its shared subscription can turn
one message into that window's aggregates, and a window can never be split between instances.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotpipe import (
    SHUTDOWN_DRAIN,
    Component,
    IotpipeError,
    RateLimitedLog,
    RawBatch,
    Runtime,
    Series,
    ServiceSettings,
    WindowSpan,
)
from pydantic import Field

from .config import load_devices
from .poller import DevicePoller, PollPolicy

log = logging.getLogger(__name__)


class Settings(ServiceSettings):
    service_name = "sensor-reader"

    devices_file: Path = Path("services/sensor_reader/examples/simulated.toml")
    window_ms: int = Field(1000, ge=10, le=3_600_000, description="tumbling window length")
    window_grace_ms: int = Field(200, ge=0, description="wait after a window's end for late samples")
    read_timeout: float = Field(2.0, gt=0)
    read_retries: int = Field(2, ge=0)
    reopen_after: int = Field(3, ge=1)
    fault_after: int = Field(5, ge=1)
    max_pending_windows: int = Field(
        10_000,
        ge=1,
        description="windows awaiting the broker's ack (e.g. during an outage) before new ones are dropped",
    )


@dataclass
class _Window:
    start: int
    units: Mapping[str, str]
    t: dict[str, list[int]] = field(default_factory=dict)
    v: dict[str, list[float]] = field(default_factory=dict)

    def add(self, ts: int, sample: Mapping[str, float]) -> None:
        for sensor, value in sample.items():
            self.t.setdefault(sensor, []).append(ts)
            self.v.setdefault(sensor, []).append(value)

    def payload(self, device: str, size: int) -> RawBatch:
        return RawBatch(
            device=device,
            window=WindowSpan(start=self.start, size=size),
            sensors={s: Series(unit=self.units[s], t=self.t[s], v=self.v[s]) for s in self.v},
        )


class SensorReader(Component[Settings]):
    def __init__(self, runtime: Runtime[Settings]) -> None:
        super().__init__(runtime)
        self.devices = load_devices(self.settings.devices_file)
        s = self.settings
        policy = PollPolicy(
            read_timeout=s.read_timeout, retries=s.read_retries, reopen_after=s.reopen_after, fault_after=s.fault_after
        )
        self.pollers: dict[str, DevicePoller] = {}
        self._open: dict[str, _Window] = {}
        self._units: dict[str, Mapping[str, str]] = {}
        self.readings = runtime.metrics.counter("iotpipe_readings", "Readings published", ("device",))
        self.dropped = runtime.metrics.counter(
            "iotpipe_readings_dropped", "Readings dropped because too many windows awaited the broker", ("device",)
        )
        self._drops = RateLimitedLog(log)
        self.late = runtime.metrics.counter("iotpipe_late_samples", "Samples for an already closed window")
        for device, driver in self.devices:
            self._units[device.id] = driver.sensors
            self.pollers[device.id] = DevicePoller(
                driver, device.interval, self._sampler(device.id), self._stater(device.id), policy
            )
        self._status_changed = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()

    def _sampler(self, device: str) -> Callable[[int, Mapping[str, float]], None]:
        size = self.settings.window_ms

        def on_sample(ts: int, sample: Mapping[str, float]) -> None:
            start = ts - ts % size
            window = self._open.get(device)
            if window is None or start > window.start:
                if window is not None:
                    self._flush(device, window)
                window = self._open[device] = _Window(start, self._units[device])
            elif start < window.start:
                self.late.inc()  # the wall clock stepped back: never reopen a published window
                return
            window.add(ts, sample)

        return on_sample

    def _stater(self, device: str) -> Callable[[str, str | None], None]:
        def on_state(state: str, reason: str | None) -> None:
            log.info("device %s is %s%s", device, state, f" ({reason})" if reason else "")
            self._status_changed.set()

        return on_state

    def _flush(self, device: str, window: _Window) -> None:
        if not window.v:
            return
        count = sum(len(v) for v in window.v.values())
        if len(self._publishing) >= self.settings.max_pending_windows:
            # The broker has been unreachable for a long time: bound our memory, and say what is lost.
            self.dropped.labels(device).inc(count)
            self._drops.warning(
                "pending",
                "broker unreachable and %d windows pending: dropping window %s of %s (%d readings)",
                len(self._publishing),
                window.start,
                device,
                count,
            )
            return
        topic = self.runtime.topics.raw(device)
        data = window.payload(device, self.settings.window_ms)
        task = asyncio.get_running_loop().create_task(self._publish(topic, data, device, count))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, topic: str, data: RawBatch, device: str, count: int) -> None:
        try:
            await self.runtime.bus.publish_sealed(topic, data, kind="raw")
        except IotpipeError as exc:
            log.error("publishing window %s of %s failed (%s); %d readings lost", data.window.start, device, exc, count)
            self.runtime.metrics.errors.labels("publish").inc()
            return
        self.readings.labels(device).inc(count)

    async def _close_windows(self) -> None:
        """Close windows on time even when a device has stopped producing samples."""
        size, grace = self.settings.window_ms, self.settings.window_grace_ms
        while True:
            now = time.time_ns() // 1_000_000
            for device, window in list(self._open.items()):
                if now >= window.start + size + grace:
                    del self._open[device]
                    self._flush(device, window)
            next_end = (now - now % size) + size + grace
            await asyncio.sleep(max(0.005, (next_end - time.time_ns() // 1_000_000) / 1000))

    async def _push_status(self) -> None:
        """Publish status as soon as a device changes state (not only on the heartbeat)."""
        while True:
            await self._status_changed.wait()
            self._status_changed.clear()
            if self.runtime.bus.connected.is_set():
                try:
                    await self.runtime.bus.publish_status("online", **self.health())
                except IotpipeError as exc:  # the next heartbeat says it again
                    log.debug("device status change not published: %s", exc)

    async def run(self) -> None:
        await self.runtime.bus.wait_connected(timeout=3600)
        async with asyncio.TaskGroup() as group:
            for device, poller in self.pollers.items():
                group.create_task(poller.run(), name=f"poll {device}")
            group.create_task(self._close_windows(), name="windows")
            group.create_task(self._push_status(), name="status")

    def health(self) -> dict[str, Any]:
        return {
            "devices": {
                device: {"state": p.state, "reason": p.reason, **p.stats.snapshot()}
                for device, p in self.pollers.items()
            }
        }

    async def close(self) -> None:
        for device, window in list(self._open.items()):
            del self._open[device]
            self._flush(device, window)
        if self._publishing:
            # The last windows: drained briefly; whatever the broker has not acknowledged by then is
            # counted as a publish error (the reader is the source, it has no upstream to redeliver).
            await asyncio.wait(self._publishing, timeout=SHUTDOWN_DRAIN)
