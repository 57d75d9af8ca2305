"""sensor-reader: polls devices and publishes their tumbling windows, many devices per sealed message.

A device's window is published whole once it has closed (its end plus a grace period has passed).
That makes the preprocessor stateless: any instance of its shared subscription can turn a message
into aggregates, and a window can never be split between instances. Windows are aligned on the wall
clock, so every device's window closes at the same moment: the closed windows are then packed into
as few messages as fit (`RawBatch`, bounded by an estimate of their encoded size against the
payload limit): a fleet of 5,000 slow devices costs a handful of messages per window, not 5,000.

Device health (how polling each device goes: online, fault with the reason) travels sealed on
`health/<instance>` (`HealthReport`) at each change and each heartbeat, valid for a few heartbeats:
the monitor decides a device's `fault` from it alone. The same states are in the plaintext service
status, for display.

Each message is sealed at once and handed to the outbox (sensor_reader.spool), which publishes
messages in the order they were packed and keeps each one the broker has not acknowledged within
one commit tick in the local spool until it has. Polling never waits for the broker: during an outage
windows pile up in the spool (bounded by its byte budget, oldest dropped first) and are published
when the broker is back, also after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from iotpipe import (
    MAX_HEALTH_VALID_MS,
    MAX_SAMPLES_PER_SENSOR,
    MAX_WINDOW_MS,
    SHUTDOWN_DRAIN,
    Component,
    ConfigError,
    IotpipeError,
    RateLimitedLog,
    Runtime,
    ServiceSettings,
)
from pydantic import Field

from .config import load_devices
from .drivers import Block, Sample
from .poller import BusThreads, DevicePoller, PollPolicy
from .spool import Outbox, SpoolFile, Window

# Upper bounds of the JSON a raw window encodes to, to pack messages without encoding twice: per
# reading a 13-digit timestamp and the longest float repr with their commas; per sensor its id,
# unit and keys; per window its device id and span.
READING_BYTES = 40
SENSOR_BYTES = 140
WINDOW_BYTES = 140
# Sealing grows a payload by a third (base64 of the Fernet token) plus the envelope: a plaintext
# within this share of the payload limit always fits once sealed.
SEALED_PAYLOAD_RATIO = 0.7
# A health report holds for this many heartbeats (IOTPIPE_STATUS_INTERVAL): one report lost or late
# does not end a fault, and a fault the reader stops renewing (it died) ends within three.
HEALTH_VALID_HEARTBEATS = 3
# Upper bound of the JSON of one device's health entry besides its id and reason (keys, state,
# punctuation); a reason may grow six-fold when its control characters are escaped.
HEALTH_ENTRY_BYTES = 48
# A device over its cap of samples per window is said at most once per this many seconds.
SHED_LOG_INTERVAL = 60.0

log = logging.getLogger(__name__)


class Settings(ServiceSettings):
    service_name = "sensor-reader"

    devices_file: Path = Path("services/sensor_reader/examples/simulated.toml")
    # At most what receivers allow a window to reach into the future (iotpipe.WindowBounds).
    window_ms: int = Field(1000, ge=10, le=MAX_WINDOW_MS, description="tumbling window length")
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
    sample_cap_factor: float = Field(
        4.0,
        ge=1,
        description="a device's window keeps at most this many times the samples per sensor its polling "
        "yields (the rest shed and counted)",
    )

    @property
    def spool_path(self) -> Path:
        return self.spool_file or self.state_dir / f"{self.service_name}-{self.instance}.spool.sqlite3"


@dataclass
class _Window:
    """One device's open window: each sensor's timestamps and values, appended as they are read."""

    device: str
    start: int
    units: Mapping[str, str]
    t: dict[str, list[int]] = field(init=False)
    v: dict[str, list[float]] = field(init=False)
    samples: int = 0  # samples taken into the window (each one reading per sensor at most)

    def __post_init__(self) -> None:
        self.t = {sensor: [] for sensor in self.units}
        self.v = {sensor: [] for sensor in self.units}

    def add(self, ts: int, sample: Mapping[str, float]) -> None:
        t, v = self.t, self.v
        for sensor, value in sample.items():
            t[sensor].append(ts)
            v[sensor].append(value)
        self.samples += 1

    def add_block(self, t: list[int], values: Mapping[str, list[float]], lo: int, hi: int) -> None:
        """Samples lo..hi-1 of a block whose timestamps are `t`."""
        stamps = t[lo:hi]
        for sensor, column in values.items():
            self.t[sensor].extend(stamps)
            self.v[sensor].extend(column[lo:hi])
        self.samples += hi - lo

    @property
    def readings(self) -> int:
        return sum(len(v) for v in self.v.values())

    @property
    def sensors(self) -> list[str]:
        """The sensors with readings in this window (a dropout may leave one empty)."""
        return [sensor for sensor, values in self.v.items() if values]

    def raw(self, size: int, sensors: list[str]) -> dict[str, Any]:
        """The window as the contract's RawWindow, built as plain JSON values: the reader made every
        field itself, so validating them again (as RawWindow would) only cost time (about 4 µs per
        sensor: a quarter of the reader's CPU with 5,000 devices)."""
        return {
            "device": self.device,
            "window": {"start": self.start, "size": size},
            "sensors": {s: {"unit": self.units[s], "t": self.t[s], "v": self.v[s]} for s in sensors},
        }

    def bound(self, sensors: list[str]) -> int:
        """Most bytes these of the window's sensors can encode to."""
        return WINDOW_BYTES + sum(SENSOR_BYTES + READING_BYTES * len(self.v[s]) for s in sensors)


def sample_cap(expected: float, settings: Settings) -> int:
    """Samples per sensor a device's window keeps: `sample_cap_factor` times what its polling yields
    (`expected`, from its driver), never more than the contract allows (a window over that would
    have the preprocessor refuse the whole message, every other device's windows in it too)."""
    return max(1, min(MAX_SAMPLES_PER_SENSOR, math.ceil(expected * settings.sample_cap_factor)))


def pack(windows: list[_Window], size: int, budget: int) -> Iterator[list[dict[str, Any]]]:
    """Closed windows in messages whose encoded size stays within `budget` bytes, in order. A
    window too big for one message by itself is split by sensor (the preprocessor works per
    sensor, so nothing depends on a device's sensors travelling together)."""
    batch: list[dict[str, Any]] = []
    used = 0
    for window in windows:
        sensors = window.sensors
        if not sensors:
            continue
        parts = [sensors]
        if window.bound(sensors) > budget:
            parts = []
            part: list[str] = []
            for sensor in sensors:
                if part and window.bound([*part, sensor]) > budget:
                    parts.append(part)
                    part = []
                part.append(sensor)
            parts.append(part)
        for part in parts:
            bound = window.bound(part)
            if batch and used + bound > budget:
                yield batch
                batch, used = [], 0
            batch.append(window.raw(size, part))
            used += bound
    if batch:
        yield batch


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
        self._closed: list[_Window] = []  # closed by a newer sample, published at the next close tick
        self._units: dict[str, Mapping[str, str]] = {}
        self.readings = runtime.metrics.counter("iotpipe_readings", "Readings published")
        self.dropped = runtime.metrics.counter(
            "iotpipe_readings_dropped",
            "Readings in windows never published (spool full, expired, refused by the broker...)",
        )
        self.windows_dropped = runtime.metrics.counter(
            "iotpipe_windows_dropped", "Device windows never published, by reason (docs/contract.md)", ("reason",)
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
        # Windows awaiting the broker: in memory (next in line or in flight, at most max_pending_windows)
        # and in the spool on disk (within spool_max_bytes; the memory ones are there too once committed).
        queues = runtime.metrics.queues
        queues.add("spool_memory", self.outbox.in_memory)
        queues.add("spool_disk", lambda: self.outbox.disk_windows, lambda: self.outbox.disk_bytes)
        self.late = runtime.metrics.counter("iotpipe_late_samples", "Samples for an already closed window")
        self.shed = runtime.metrics.counter(
            "iotpipe_readings_shed", "Readings beyond a device's cap of samples per window, by device", ("device",)
        )
        self._shed_log = RateLimitedLog(log, SHED_LOG_INTERVAL)
        self._shed_by_device: dict[str, int] = {}
        self._caps: dict[str, int] = {}
        self._bus_threads = BusThreads()
        for device, driver in self.devices:
            self._units[device.id] = driver.sensors
            self._caps[device.id] = sample_cap(driver.samples_per_window(s.window_ms, device.interval), s)
            thread = self._bus_threads.for_driver(driver) if driver.blocking else None
            self.pollers[device.id] = DevicePoller(
                driver, device.interval, self._sampler(device.id), self._stater(device.id), policy, thread=thread
            )
        self._status_changed = asyncio.Event()
        self._seen_online: set[str] = set()

    def _sampler(self, device: str) -> Callable[[int, Sample], None]:
        size = self.settings.window_ms
        cap = self._caps[device]

        def window_for(start: int) -> _Window | None:
            window = self._open.get(device)
            if window is None or start > window.start:
                if window is not None:
                    self._closed.append(window)
                window = self._open[device] = _Window(device, start, self._units[device])
            elif start < window.start:
                return None  # the wall clock stepped back: never reopen a published window
            return window

        def on_sample(ts: int, sample: Sample) -> None:
            if not isinstance(sample, Block):
                window = window_for(ts - ts % size)
                if window is None:
                    self.late.inc()
                elif window.samples >= cap:
                    self._shed_samples(device, cap, len(sample))
                else:
                    window.add(ts, sample)
                return
            count = len(sample)
            # The last sample was taken at `ts`, the others `period_ms` apart before it.
            period = sample.period_ms
            t = [ts - round((count - 1 - i) * period) for i in range(count)]
            values = {s: list(v) if not isinstance(v, list) else v for s, v in sample.values.items()}
            lo = 0
            while lo < count:  # a block may straddle a window boundary: each part to its window
                start = t[lo] - t[lo] % size
                hi = lo + 1
                while hi < count and t[hi] < start + size:
                    hi += 1
                window = window_for(start)
                if window is None:
                    self.late.inc(hi - lo)
                else:
                    keep = min(hi, lo + max(0, cap - window.samples))
                    if keep > lo:
                        window.add_block(t, values, lo, keep)
                    if keep < hi:
                        self._shed_samples(device, cap, (hi - keep) * len(values))
                lo = hi

        return on_sample

    def _shed_samples(self, device: str, cap: int, readings: int) -> None:
        """Readings of a device over its cap of samples per window: counted, said once a minute."""
        self.shed.labels(device).inc(readings)
        total = self._shed_by_device[device] = self._shed_by_device.get(device, 0) + readings
        self._shed_log.warning(
            device,
            "device %s returned more samples than its window may hold (%d per sensor per %d ms window): "
            "%d reading(s) shed so far (a driver gone wrong?)",
            device,
            cap,
            self.settings.window_ms,
            total,
        )

    def _stater(self, device: str) -> Callable[[str, str | None], None]:
        def on_state(state: str, reason: str | None) -> None:
            # The first `online` of each device is routine (and 5,000 of them at start-up are noise).
            level = logging.DEBUG if state == "online" and self._first_online(device) else logging.INFO
            log.log(level, "device %s is %s%s", device, state, f" ({reason})" if reason else "")
            self._status_changed.set()

        return on_state

    def _first_online(self, device: str) -> bool:
        first = device not in self._seen_online
        self._seen_online.add(device)
        if first and len(self._seen_online) == len(self.pollers):
            log.info("all %d devices are online", len(self.pollers))
        return first

    def _flush(self, windows: list[_Window]) -> None:
        """Windows closed: packed into messages, each sealed now (so it is never at rest in
        plaintext) and handed to the outbox."""
        if not windows:
            return
        topic = self.runtime.topics.raw(self.settings.instance)
        budget = int(self.settings.max_payload_bytes * SEALED_PAYLOAD_RATIO)
        sealed_at = time.time_ns() // 1_000_000
        for batch in pack(windows, self.settings.window_ms, budget):
            count = sum(len(series["v"]) for w in batch for series in w["sensors"].values())
            first = batch[0]["device"]
            label = first if len(batch) == 1 else f"{first} and {len(batch) - 1} more"
            payload = self._sealer.seal(topic, {"windows": batch})  # RawBatch
            start = batch[0]["window"]["start"]
            self.outbox.put(Window(label, start, count, topic, payload, sealed_at, windows=len(batch)))

    async def _publish(self, topic: str, payload: bytes) -> None:
        await self.runtime.bus.publish(topic, payload, kind="raw")

    def _published(self, window: Window) -> None:
        self.readings.inc(window.readings)

    def _dropped(self, window: Window, reason: str) -> None:
        self.dropped.inc(window.readings)
        self.windows_dropped.labels(reason).inc(window.windows)
        if reason == "publish_failed":
            self.runtime.metrics.errors.labels("publish").inc()

    async def _close_windows(self) -> None:
        """Close windows on time even when a device has stopped producing samples."""
        size, grace = self.settings.window_ms, self.settings.window_grace_ms
        while True:
            now = time.time_ns() // 1_000_000
            closed, self._closed = self._closed, []
            for device, window in list(self._open.items()):
                if now >= window.start + size + grace:
                    del self._open[device]
                    closed.append(window)
            self._flush(closed)
            next_end = (now - now % size) + size + grace
            await asyncio.sleep(max(0.005, (next_end - time.time_ns() // 1_000_000) / 1000))

    def health_reports(self) -> Iterator[dict[str, Any]]:
        """Every device's state as HealthReport payloads, as few as fit the payload limit once sealed."""
        valid_for = max(
            1, min(round(HEALTH_VALID_HEARTBEATS * self.settings.status_interval * 1000), MAX_HEALTH_VALID_MS)
        )
        budget = int(self.settings.max_payload_bytes * SEALED_PAYLOAD_RATIO)
        devices: dict[str, dict[str, str]] = {}
        used = 0
        for device, poller in self.pollers.items():
            entry = {"state": poller.state}
            if poller.reason:
                entry["reason"] = poller.reason[:200]  # the contract's Reason
            size = HEALTH_ENTRY_BYTES + len(device) + 6 * len(entry.get("reason", ""))
            if devices and used + size > budget:
                yield {"valid_for": valid_for, "devices": devices}
                devices, used = {}, 0
            devices[device] = entry
            used += size
        if devices:
            yield {"valid_for": valid_for, "devices": devices}

    async def _report_health(self) -> None:
        """Sealed health at once when a device changes state (with the plaintext status, for
        display) and at every heartbeat in between. Never spooled: only the current state matters,
        so a report the broker did not take is simply superseded by the next one, and the broker
        drops one that waited too long for the monitor (MQTT message expiry)."""
        bus, interval = self.runtime.bus, self.settings.status_interval
        topic = self.runtime.topics.health(self.settings.instance)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._status_changed.wait()
            changed = self._status_changed.is_set()
            self._status_changed.clear()
            if not bus.connected.is_set():
                continue
            try:
                for report in self.health_reports():
                    # The broker drops a report once half its validity is gone: what reaches the
                    # monitor has time left to be handled (one that had none would be refused).
                    expiry = max(1, report["valid_for"] // 2000)
                    await bus.publish_sealed(topic, report, kind="health", expiry=expiry)
                if changed:
                    await bus.publish_status("online", **self.health())
            except IotpipeError as exc:  # the next change or heartbeat says it again
                log.debug("device health not published: %s", exc)

    async def run(self) -> None:
        # No waiting for the broker: readings are taken and spooled from the start.
        await self.outbox.start()
        async with asyncio.TaskGroup() as group:
            for device, poller in self.pollers.items():
                group.create_task(poller.run(), name=f"poll {device}")
            group.create_task(self._close_windows(), name="windows")
            group.create_task(self._report_health(), name="health")
            group.create_task(self.outbox.watch(), name="outbox")

    def health(self) -> dict[str, Any]:
        return {
            "devices": {
                device: {
                    "state": p.state,
                    "reason": p.reason,
                    **p.stats.snapshot(),
                    "readings_shed": self._shed_by_device.get(device, 0),
                }
                for device, p in self.pollers.items()
            },
            "spool": self.outbox.stats(),
        }

    async def close(self) -> None:
        # The open windows close now; the broker gets SHUTDOWN_DRAIN seconds to acknowledge what is
        # in flight, and whatever it has not acknowledged by then stays in the spool for the next start.
        closed, self._closed = [*self._closed, *self._open.values()], []
        self._open.clear()
        self._flush(closed)
        await self.outbox.close(SHUTDOWN_DRAIN)
        self._bus_threads.shutdown()
