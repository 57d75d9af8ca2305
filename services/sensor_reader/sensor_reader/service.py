"""sensor-reader: polls devices and publishes one sealed batch per device per tumbling window.

A window is published whole, in one message, once it has closed (its end plus a grace period has
passed). That makes the preprocessor stateless: any instance of its shared subscription can turn
one message into that window's aggregates, and a window can never be split between instances.

A closed window is sealed at once and handed to the outbox (sensor_reader.spool), which publishes
windows in the order they closed and keeps each one the broker has not acknowledged within one
commit tick in the local spool until it has. Polling never waits for the broker: during an outage
windows pile up in the spool (bounded by its byte budget, oldest dropped first) and are published
when the broker is back, also after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from iotpipe import (
    SHUTDOWN_DRAIN,
    Component,
    ConfigError,
    IotpipeError,
    RawBatch,
    Runtime,
    Series,
    ServiceSettings,
    WindowSpan,
)
from pydantic import Field

from .config import load_devices
from .poller import DevicePoller, PollPolicy
from .spool import Outbox, SpoolFile, Window

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
        1000,
        ge=1,
        description="windows awaiting the broker kept in memory; with a spool the older ones wait on disk, "
        "without one the oldest are dropped",
    )
    spool_file: Path | None = Field(
        None, description="default <state_dir>/sensor-reader-<instance>.spool.sqlite3 (state that must survive)"
    )
    spool_max_bytes: int = Field(
        1 << 30, ge=0, description="disk budget of the spool (oldest windows dropped beyond it); 0: no spool"
    )
    spool_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL", description="FULL also survives a power loss: one fsync per commit tick that wrote windows"
    )

    @property
    def spool_path(self) -> Path:
        return self.spool_file or self.state_dir / f"{self.service_name}-{self.instance}.spool.sqlite3"


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
            "iotpipe_readings_dropped",
            "Readings in windows never published (spool full, expired, refused by the broker...)",
            ("device",),
        )
        self.windows_dropped = runtime.metrics.counter(
            "iotpipe_windows_dropped", "Windows never published, by reason (docs/contract.md)", ("reason",)
        )
        if runtime.bus.sealer is None:
            raise ConfigError("the sensor-reader needs a key ring to seal its windows")
        self._sealer = runtime.bus.sealer
        s = self.settings
        self.outbox = Outbox(
            SpoolFile(s.spool_path, s.spool_synchronous) if s.spool_max_bytes > 0 else None,
            max_bytes=s.spool_max_bytes,
            publish=self._publish,
            connected=runtime.bus.connected,
            max_in_memory=s.max_pending_windows,
            max_in_flight=s.mqtt.max_inflight,
            ttl_ms=s.message_ttl * 1000,
            on_published=self._published,
            on_dropped=self._dropped,
            on_spool_error=runtime.metrics.errors.labels("spool").inc,
        )
        self.late = runtime.metrics.counter("iotpipe_late_samples", "Samples for an already closed window")
        for device, driver in self.devices:
            self._units[device.id] = driver.sensors
            self.pollers[device.id] = DevicePoller(
                driver, device.interval, self._sampler(device.id), self._stater(device.id), policy
            )
        self._status_changed = asyncio.Event()

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
        """A window closed: sealed now (so it is never at rest in plaintext) and handed to the outbox."""
        if not window.v:
            return
        count = sum(len(v) for v in window.v.values())
        topic = self.runtime.topics.raw(device)
        payload = self._sealer.seal(topic, window.payload(device, self.settings.window_ms))
        self.outbox.put(Window(device, window.start, count, topic, payload, time.time_ns() // 1_000_000))

    async def _publish(self, topic: str, payload: bytes) -> None:
        await self.runtime.bus.publish(topic, payload, kind="raw")

    def _published(self, window: Window) -> None:
        self.readings.labels(window.device).inc(window.readings)

    def _dropped(self, window: Window, reason: str) -> None:
        self.dropped.labels(window.device).inc(window.readings)
        self.windows_dropped.labels(reason).inc()
        if reason == "publish_failed":
            self.runtime.metrics.errors.labels("publish").inc()

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
        # No waiting for the broker: readings are taken and spooled from the start.
        await self.outbox.start()
        async with asyncio.TaskGroup() as group:
            for device, poller in self.pollers.items():
                group.create_task(poller.run(), name=f"poll {device}")
            group.create_task(self._close_windows(), name="windows")
            group.create_task(self._push_status(), name="status")
            group.create_task(self.outbox.watch(), name="outbox")

    def health(self) -> dict[str, Any]:
        return {
            "devices": {
                device: {"state": p.state, "reason": p.reason, **p.stats.snapshot()}
                for device, p in self.pollers.items()
            },
            "spool": self.outbox.stats(),
        }

    async def close(self) -> None:
        # The open windows close now; the broker gets SHUTDOWN_DRAIN seconds to acknowledge what is
        # in flight, and whatever it has not acknowledged by then stays in the spool for the next start.
        for device, window in list(self._open.items()):
            del self._open[device]
            self._flush(device, window)
        await self.outbox.close(SHUTDOWN_DRAIN)
