"""monitor: availability of devices and services, and anomaly alerts.

- Device availability: last-seen from processed windows; a device silent for `offline_after`
  seconds is published `offline` (retained, plaintext JSON on status/device/<device>) with an
  alert; when data returns it is `online` again. A device the sensor-reader reports as `fault` in
  its sealed health report (health/<source>) is published `fault` with the reader's reason and a
  fault alert, for as long as reports renew it; once one says otherwise, or none has for the
  report's `valid_for`, the device is `online` or `offline` by its data again.
- Service availability: from the retained status topics (birth, heartbeat, Last Will); a service
  whose heartbeat is older than `offline_after` is reported stale in the monitor's own health.
  Status is plaintext: anyone holding a service's MQTT password can write it, so it is shown and
  never decides anything that reaches the cloud (the `devices` in the reader's status are ignored).
- Anomalies, as episodes (detect.py): each batch of windows is checked at once (physical checks,
  robust per-sensor statistics, and the IsolationForest of each sensor kind); an episode's open and
  close are sealed alerts on alerts/<device> (AnomalyOpen, AnomalyClose). The forests are refitted
  every `fit_interval` in a worker thread; what the detector learnt is saved in the state dir every
  `save_interval` and at a clean stop, and restored at start, so a restart does not warm up again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from iotpipe import (
    Alert,
    AnomalyKind,
    AnomalyOpen,
    Component,
    DeviceState,
    DeviceStatus,
    FaultAlert,
    HealthReport,
    OfflineAlert,
    Opened,
    PermanentError,
    PlainMessage,
    Processed,
    Runtime,
    ServiceSettings,
    ServiceStatus,
    encode,
    write_atomically,
)
from pydantic import Field

from .detect import Config, Detector

log = logging.getLogger(__name__)


class Settings(ServiceSettings):
    service_name = "monitor"

    offline_after: float = Field(30.0, gt=0, description="s of silence before a device is offline")
    check_interval: float = Field(2.0, gt=0)
    fit_interval: float = Field(60.0, gt=0, description="s between refits of the per-kind IsolationForests")
    contamination: float = Field(1e-3, gt=0, le=0.5, description="fraction of windows a forest flags")
    warm_up: int = Field(120, ge=60, multiple_of=30, description="normal windows before a sensor's relative checks")
    close_after: int = Field(10, ge=1, description="normal windows in a row that close an episode")
    adapt_after: int = Field(900, ge=10, description="windows after which a relative episode is the new normal")
    save_interval: float = Field(300.0, gt=0, description="s between saves of what the detector learnt")
    sensor_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description='chip ranges by sensor kind beyond the built-in ones, JSON: {"soil": [0, 100]}',
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ExpiredReport(PermanentError):
    """A sealed health report whose validity had ended before it arrived: held back, or captured and
    re-published. It says nothing about now, so it is refused (counted, dead-lettered)."""

    reason = "expired"


@dataclass(frozen=True, slots=True)
class Reported:
    """A device's state from the latest sealed health report that named it."""

    state: str
    reason: str | None
    sender: tuple[str, str, int]  # the report's (src, boot, seq)
    until: int  # unix ms (monitor's clock) after which it no longer holds


class Monitor(Component[Settings]):
    def __init__(self, runtime: Runtime[Settings]) -> None:
        super().__init__(runtime)
        s = self.settings
        config = Config(
            warm_up=s.warm_up, close_after=s.close_after, adapt_after=s.adapt_after, contamination=s.contamination
        )
        self.detector = Detector(config, s.sensor_ranges)
        self._state_file = s.state_dir / f"{s.service_name}-{s.instance}.detector"
        self._load_detector()
        self.last_seen: dict[str, int] = {}  # device -> unix ms of its latest processed message
        self.device_state: dict[str, tuple[DeviceState, str | None]] = {}  # what we last published
        self.reported: dict[str, Reported] = {}  # device -> its state from sealed health reports
        self.services: dict[str, dict[str, Any]] = {}  # "service/instance" -> last status
        self.alerts = runtime.metrics.counter("iotpipe_alerts", "Alerts published", ("kind",))
        self.episodes = runtime.metrics.counter("iotpipe_anomaly_episodes", "Anomaly episodes opened", ("anomaly",))
        for anomaly in get_args(AnomalyKind):  # every kind at 0 from the start: rate() sees the first one
            self.episodes.labels(anomaly)
        topics = runtime.topics
        runtime.bus.subscribe(topics.all("processed"), self.on_processed, model=Processed, batch=16)
        runtime.bus.subscribe(topics.all("health"), self.on_health, model=HealthReport)
        runtime.bus.subscribe(
            f"{topics.root}/status/service/+/+", self.on_service_status, model=ServiceStatus, sealed=False
        )

    # -- inputs ---------------------------------------------------------------------------------
    async def on_processed(self, messages: Sequence[Opened[Processed]]) -> None:
        now = _now_ms()
        windows = [window for message in messages for window in message.data.windows]
        devices = dict.fromkeys(window.device for window in windows)  # distinct, in arrival order
        for device in devices:
            self.last_seen[device] = now
        # The whole batch is checked in one call (vectorised inside); it returns episode opens and closes.
        alerts = self.detector.observe(windows, now)
        for device in devices:
            await self._set_device_state(device)
        for alert in alerts:
            if isinstance(alert, AnomalyOpen):
                self.episodes.labels(alert.anomaly).inc()
            await self._alert(alert)

    async def on_service_status(self, messages: Sequence[PlainMessage[ServiceStatus]]) -> None:
        for message in messages:
            parts = message.topic.split("/")
            name = "/".join(parts[-2:])
            status = message.data
            if status is None:
                self.services.pop(name, None)  # retained status cleared
                continue
            previous = self.services.get(name, {}).get("state")
            self.services[name] = {"state": status.state, "ts": status.ts, "seen": _now_ms()}
            if previous is not None and previous != status.state:
                log.info("service %s is %s", name, status.state)

    async def on_health(self, messages: Sequence[Opened[HealthReport]]) -> None:
        """Device states from the sensor-readers' sealed reports. Each entry holds from when it was
        sealed for the report's `valid_for` (a report dated ahead of our clock counts from now, so
        it cannot hold longer); a report whose validity has ended is refused."""
        now = _now_ms()
        changed: dict[str, None] = {}
        expired: Opened[HealthReport] | None = None
        for message in messages:
            report = message.data
            if message.ts + report.valid_for < now:
                expired = message
                continue
            until = min(message.ts, now) + report.valid_for
            sender = (message.src, message.boot, message.seq)
            for device, entry in report.devices.items():
                held = self.reported.get(device)
                if held is not None and held.sender[:2] == sender[:2] and held.sender[2] > sender[2]:
                    continue  # an earlier report of the same reader, arriving late: the later one holds
                self.reported[device] = Reported(entry.state, entry.reason, sender, until)
                changed[device] = None
        for device in changed:
            await self._set_device_state(device)
        if expired is not None:
            # Raised last, so this batch's valid reports took effect; the bus then settles each
            # message alone (applying a report again changes nothing) and dead-letters this one.
            age = (now - expired.ts) / 1000
            raise ExpiredReport(f"health report sealed {age:.0f}s ago, valid for {expired.data.valid_for / 1000:g}s")

    # -- outputs --------------------------------------------------------------------------------
    def _fault(self, device: str, now: int) -> str | None:
        """The reason, while a sealed health report that still holds says the device is failing."""
        reported = self.reported.get(device)
        if reported is None or reported.state != "fault":
            return None
        if now > reported.until:
            del self.reported[device]  # not renewed: the reader stopped reporting it failing
            return None
        return reported.reason or "reported failing by its sensor-reader"

    async def _set_device_state(self, device: str) -> None:
        now = _now_ms()
        seen = self.last_seen.get(device)
        state: DeviceState
        reason: str | None
        fault = self._fault(device, now)
        if fault is not None:
            state, reason = "fault", fault
        elif seen is not None and now - seen <= self.settings.offline_after * 1000:
            state, reason = "online", None
        elif seen is not None or device in self.device_state:
            # Silent (or, after a fault, never heard from at all): no data, so offline.
            state, reason = "offline", f"no data for {self.settings.offline_after:.0f}s"
        else:
            return  # never seen, never reported: nothing to say yet
        if self.device_state.get(device) == (state, reason):
            return
        first = device not in self.device_state
        self.device_state[device] = (state, reason)
        status = DeviceStatus(state=state, device=device, last_seen=seen, ts=now, reason=reason)
        await self.runtime.bus.publish(
            self.runtime.topics.device_status(device), encode(status), retain=True, kind="status"
        )
        if not first or state != "online":
            log.info("device %s is %s%s", device, state, f" ({reason})" if reason else "")
        if state == "offline":
            await self._alert(OfflineAlert(device=device, reason=reason, last_seen=seen, ts=now))
        elif state == "fault":
            await self._alert(FaultAlert(device=device, reason=reason, last_seen=seen, ts=now))

    async def _alert(self, alert: Alert) -> None:
        await self.runtime.bus.publish_sealed(self.runtime.topics.alerts(alert.device), alert, kind="alert")
        self.alerts.labels(alert.kind).inc()

    # -- loops ----------------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval)
            for device in list({**self.last_seen, **self.reported}):  # faults end unless renewed
                await self._set_device_state(device)

    async def _refit(self) -> None:
        while True:
            await asyncio.sleep(self.settings.fit_interval)
            await self.refit()

    async def refit(self) -> None:
        """Fit the forests of the kinds with new rows in a worker thread, then swap them in."""
        data = self.detector.snapshot()
        if data:
            started = time.monotonic()
            models = await asyncio.to_thread(self.detector.fit, data)
            self.detector.install(models)  # swapped in one assignment between two batches
            log.debug("refitted %d sensor kinds in %.2fs", len(models), time.monotonic() - started)

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.save_interval)
            data = self.detector.dump()  # a copy, taken between two batches
            await asyncio.to_thread(self._write_state, data)

    def _write_state(self, data: bytes) -> None:
        try:
            write_atomically(self._state_file, data)
        except OSError as exc:
            log.error("cannot save the detector state to %s: %s", self._state_file, exc)

    def _load_detector(self) -> None:
        if not self._state_file.exists():
            return
        try:
            restored = self.detector.load(self._state_file.read_bytes())
        except Exception as exc:
            log.warning("detector state in %s unreadable (%s): sensors warm up again", self._state_file, exc)
            return
        if restored:
            log.info("detector state restored from %s: %d sensor(s)", self._state_file, self.detector.sensors)
        else:
            log.warning("detector state in %s is from other settings: sensors warm up again", self._state_file)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(), name="watch")
            group.create_task(self._refit(), name="refit")
            group.create_task(self._save_loop(), name="save")

    async def close(self) -> None:
        self._write_state(self.detector.dump())

    def health(self) -> dict[str, Any]:
        now = _now_ms()
        stale_after = self.settings.offline_after * 1000
        return {
            "device_states": {d: s for d, (s, _r) in self.device_state.items()},
            "services": {
                n: ("stale" if s["state"] == "online" and now - s["seen"] > stale_after else s["state"])
                for n, s in self.services.items()
            },
            "models": len(self.detector.fitted),
            "sensors": self.detector.sensors,
            "episodes_open": self.detector.open_episodes,
        }
