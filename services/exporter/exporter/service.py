"""exporter: the plaintext projection of processed windows and alerts, for third parties.

It logs in to the pipeline broker as `exporter` (read: processed windows and alerts, sealed; its own
status) and to the PUBLIC broker as `exporter` (write: the projection topics only, mosquitto/public-acl),
and publishes there, per device (docs/contract.md, "Projection"):

  <base>/v2/devices/<device>/state           retained  {"<sensor>": <mean>, ..., "ts": <window end, unix ms>}
  <base>/v2/devices/<device>/units           retained  {"<sensor>": "<unit>", ...}
  <base>/v2/devices/<device>/sensor/<sensor> retained  the mean, a bare number
  <base>/v2/devices/<device>/availability    retained  online | offline
  <base>/v2/devices/<device>/alert                     an alert, as plain JSON
  <base>/v2/exporter/state                   retained  online | offline (our Last Will)
  <prefix>/sensor/<device>/<sensor>/config   retained  Home Assistant discovery (opt-in, exporter.ha)

So plaintext readings exist only on the public broker, and only what is projected: never on the
pipeline broker, where everything stays sealed.

Handlers only update a table in memory (they never wait for the public broker, so its outage never
holds the pipeline's messages), and one loop publishes from it: each device's state at most once per
`state_interval` (the latest values win: a fast sensor cannot flood consumers), `offline` for a
device silent for `offline_after`, and, for one silent for `forget_after`, an empty retained payload
on every topic of it (Home Assistant removes its entities). The table (which devices, when last
seen, which sensors) is saved in the state directory, so a restart still forgets what went away.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from iotpipe import (
    ID_PATTERN,
    Alert,
    Component,
    IotpipeError,
    MqttConnection,
    MqttSettings,
    Opened,
    Processed,
    RateLimitedLog,
    Runtime,
    ServiceSettings,
    encode,
    mqtt_password_file,
    read_secret,
    write_atomically,
)
from pydantic import Field, field_validator

from . import ha

log = logging.getLogger(__name__)

# The state JSON's own key: a sensor of this name would be overwritten by it, so it is not projected.
TS = "ts"
# How long one device's publishes may wait for the public broker before the loop moves on (the
# device stays due and is tried again: nothing is lost but superseded values).
PUBLISH_TIMEOUT = 10.0
# Alerts waiting for the public broker: beyond this the oldest go (the cloud keeps every alert; the
# projection is for display).
MAX_PENDING_ALERTS = 1000
SAVE_INTERVAL = 30.0
# What a stopping exporter gives the public broker to take its `offline` (process managers SIGKILL soon).
STOP_TIMEOUT = 2.0
OFFLINE = b"offline"
ONLINE = b"online"


class PublicMqttSettings(MqttSettings):
    """The public broker, where the projection goes. No durable session: we subscribe to nothing
    there, and a retained message is the whole state."""

    session_expiry: int = Field(0, ge=0, description="s the public broker keeps our (empty) session")


class Settings(ServiceSettings):
    service_name = "exporter"

    public: PublicMqttSettings = PublicMqttSettings()
    state_interval: float = Field(1.0, ge=0, description="s between two state publishes of one device")
    offline_after: float = Field(30.0, gt=0, description="s without a window before a device is offline")
    forget_after: float = Field(7 * 24 * 3600.0, gt=0, description="s without a window before a device is removed")
    check_interval: float = Field(1.0, gt=0, description="s between checks for silent devices")
    max_devices: int = Field(10_000, ge=1, description="devices projected at most (more are counted, not projected)")
    # A restart of the public broker takes seconds; a wrong host, password or certificate never ends,
    # and `docker compose ps` (the healthcheck) should say so.
    public_unhealthy_after: float = Field(
        30.0, gt=0, description="s without the public broker before the exporter reports itself unhealthy"
    )
    ha_discovery: bool = Field(False, description="publish Home Assistant MQTT discovery configs")
    ha_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix")

    @field_validator("ha_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not ID_PATTERN.fullmatch(value):
            raise ValueError(f"must match {ID_PATTERN.pattern}")
        return value

    @property
    def table_file(self) -> Path:
        """The device table kept across restarts."""
        return self.state_dir / f"{self.service_name}-{self.instance}.devices.json"


@dataclass
class Device:
    """What we know of one device, and what of it we have published."""

    seen: float  # unix s (our clock) of its latest window; restored from the table after a restart
    values: dict[str, float] = field(default_factory=dict)
    ends: dict[str, int] = field(default_factory=dict)  # sensor -> end (unix ms) of the window its value is of
    units: dict[str, str] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # sensors with a value not yet published
    fresh: set[str] = field(default_factory=set)  # of those, with a new window (not a republish): their lag
    next_state: float = 0.0  # monotonic: the earliest its next state may go out
    published_units: dict[str, str] | None = None
    discovered: dict[str, bytes] = field(default_factory=dict)  # sensor -> config published by this process
    sensors_out: set[str] = field(default_factory=set)  # every sensor with retained topics (across restarts)
    online: bool | None = None  # availability last published (None: not by this process)

    def forget_published(self) -> None:
        """Publish all of it again (the public broker may have lost it)."""
        self.changed |= set(self.values)
        self.next_state = 0.0
        self.published_units = None
        self.discovered.clear()
        self.online = None


class Exporter(Component[Settings]):
    def __init__(self, runtime: Runtime[Settings]) -> None:
        super().__init__(runtime)
        s = self.settings
        self.topics = runtime.topics
        self.devices: dict[str, Device] = {}
        self.alerts: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=MAX_PENDING_ALERTS)
        self.wake = asyncio.Event()
        self._table_changed = False
        self._problems = RateLimitedLog(log)
        m = runtime.metrics
        self.published = m.counter("iotpipe_projected", "Projection messages published, by kind", ("kind",))
        self.superseded = m.counter(
            "iotpipe_projection_superseded", "Window values replaced before they were published (rate limit)"
        )
        self.ignored = m.counter("iotpipe_projection_ignored", "Windows not projected, by reason", ("reason",))
        self.failures = m.counter("iotpipe_projection_failures", "Device publishes the public broker did not take")
        self.forgotten = m.counter("iotpipe_projection_forgotten", "Devices removed after forget_after")
        # Devices with a value not yet published (rate limit, public broker away), alerts not yet sent.
        m.queues.add("projection_pending", lambda: sum(1 for d in list(self.devices.values()) if d.changed))
        m.queues.add("alerts_pending", lambda: len(self.alerts))
        password_file = s.public.password_file or mqtt_password_file(s.secrets_dir, s.public.username or "exporter")
        bridge_state = self.topics.exporter_state
        # The public broker has no client-id rule (third parties choose their own ids): a fixed id
        # would let any third party connect under it and end our connection. A random suffix per
        # process cannot be guessed, and nothing is lost with the old id: we keep no session there.
        self.public = MqttConnection(
            s.public,
            f"exporter-{s.instance}-{secrets.token_hex(8)}",
            username=s.public.username or "exporter",
            password=read_secret(password_file, "public broker MQTT password"),
            will=lambda: (bridge_state, OFFLINE),
            birth=self._on_public_connect,
        )
        self._republish = False  # set at each connect to the public broker
        self._public_down_since: float | None = time.monotonic()
        self._started = False
        self._load_table()
        runtime.bus.subscribe(self.topics.all("processed"), self.on_processed, model=Processed, batch=64)
        runtime.bus.subscribe(self.topics.all("alerts"), self.on_alerts, model=Alert)

    # -- inputs: the table only, never the public broker ----------------------------------------
    async def on_processed(self, messages: Sequence[Opened[Processed]]) -> None:
        now = time.time()
        for message in messages:
            for w in message.data.windows:
                if w.sensor == TS:
                    self.ignored.labels("reserved_name").inc()
                    self._problems.warning(
                        "ts", "device %s: a sensor named %r is not projected (reserved)", w.device, TS
                    )
                    continue
                device = self.devices.get(w.device)
                if device is None:
                    if len(self.devices) >= self.settings.max_devices:
                        self.ignored.labels("too_many_devices").inc()
                        self._problems.warning(
                            "max", "device %s not projected: %d devices already", w.device, len(self.devices)
                        )
                        continue
                    device = self.devices[w.device] = Device(seen=now)
                    self._table_changed = True
                if w.end < device.ends.get(w.sensor, -1):
                    self.ignored.labels("older").inc()  # a late window: the value shown is newer
                    continue
                if w.sensor in device.changed:
                    self.superseded.inc()
                device.values[w.sensor] = w.mean
                device.ends[w.sensor] = w.end
                device.units[w.sensor] = w.unit
                device.changed.add(w.sensor)
                device.fresh.add(w.sensor)
                device.seen = now
        self.wake.set()

    async def on_alerts(self, messages: Sequence[Opened[Alert]]) -> None:
        for message in messages:
            self.alerts.append((message.data.device, encode(message.data)))
        self.wake.set()

    def _on_public_connect(self) -> tuple[str, bytes]:
        """At every connect to the public broker: our birth message, and everything again at the next
        flush (a public broker restarted without its store has lost every retained topic)."""
        self._republish = True
        self.wake.set()
        return self.topics.exporter_state, ONLINE

    # -- the one loop that publishes ----------------------------------------------------------------
    async def run(self) -> None:
        await self.public.start()
        self._started = True
        last_save = time.monotonic()
        while True:
            self.wake.clear()
            await self.public.connected.wait()  # while the public broker is away, values just get newer
            delay = await self._flush()
            if time.monotonic() - last_save > SAVE_INTERVAL:
                self._save_table()
                last_save = time.monotonic()
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def _flush(self) -> float:
        """Publish what is due; the seconds until something next will be."""
        s = self.settings
        delay = s.check_interval
        if self._republish:
            self._republish = False
            for device in self.devices.values():
                device.forget_published()
        for name, device in list(self.devices.items()):
            silent = time.time() - device.seen
            if silent > s.forget_after:
                await self._forget(name, device)
                continue
            if device.changed:
                wait = device.next_state - time.monotonic()
                if wait <= 0:
                    await self._publish_device(name, device)
                    device.next_state = time.monotonic() + s.state_interval
                else:
                    delay = min(delay, wait)
            silent_too_long = silent > s.offline_after and device.online is not False
            if silent_too_long and await self._send(self.topics.device(name, "availability"), OFFLINE, "availability"):
                device.online = False
                log.info("device %s offline: no window for %.0f s", name, silent)
        while self.alerts:
            name, payload = self.alerts[0]
            if not await self._send(self.topics.device(name, "alert"), payload, "alert", retain=False):
                break
            self.alerts.popleft()
        return max(delay, 0.0)

    async def _publish_device(self, name: str, device: Device) -> None:
        changed, device.changed = device.changed, set()
        # Values of new windows (not published again after a reconnect): their lag is observed once out.
        fresh, device.fresh = device.fresh & changed, device.fresh - changed
        publishes: list[tuple[str, bytes, str]] = []
        if self.settings.ha_discovery:
            for sensor in sorted(changed):
                config = self._config(name, sensor, device.units[sensor])
                if device.discovered.get(sensor) != config:
                    publishes.append((ha.config_topic(self.settings.ha_prefix, name, sensor), config, "discovery"))
        if device.units != device.published_units:
            publishes.append((self.topics.device(name, "units"), orjson.dumps(device.units), "units"))
        state = {**device.values, TS: max(device.ends.values())}
        publishes.append((self.topics.device(name, "state"), orjson.dumps(state), "state"))
        publishes += [
            (self.topics.device_sensor(name, sensor), orjson.dumps(device.values[sensor]), "sensor")
            for sensor in sorted(changed)
        ]
        if device.online is not True:
            publishes.append((self.topics.device(name, "availability"), ONLINE, "availability"))
        # Discovery first (Home Assistant subscribes to the state topic it names), then the rest at once.
        first = [p for p in publishes if p[2] == "discovery"]
        rest = [p for p in publishes if p[2] != "discovery"]
        ok = all([await self._send(t, b, k) for t, b, k in first])
        ok = ok and all(await asyncio.gather(*(self._send(t, b, k) for t, b, k in rest)))
        if not ok:
            device.changed |= changed  # tried again (with whatever is newer by then)
            device.fresh |= fresh
            self.failures.inc()
            return
        # End to end: from the end of the window each new value is of to the public broker's ack.
        self.runtime.metrics.lag.observe("delivered", time.time_ns() // 1_000_000, (device.ends[s] for s in fresh))
        for topic, payload, _kind in first:
            device.discovered[topic.split("/")[-2]] = payload
        device.published_units = dict(device.units)
        if not device.sensors_out >= changed:
            device.sensors_out |= changed
            self._table_changed = True
        device.online = True

    def _config(self, name: str, sensor: str, unit: str) -> bytes:
        return ha.config_payload(
            base=self.topics.base,
            device=name,
            sensor=sensor,
            unit=unit,
            state_topic=self.topics.device(name, "state"),
            device_availability=self.topics.device(name, "availability"),
            bridge_state=self.topics.exporter_state,
        )

    async def _forget(self, name: str, device: Device) -> None:
        """Clear every retained topic of a device gone for good: discovery first, so Home Assistant
        removes its entities rather than showing them unavailable."""
        sensors = sorted(device.sensors_out | set(device.values))
        clear = (
            [ha.config_topic(self.settings.ha_prefix, name, s) for s in sensors] if self.settings.ha_discovery else []
        )
        clear += [self.topics.device_sensor(name, s) for s in sensors]
        clear += [self.topics.device(name, leaf) for leaf in ("state", "units", "availability")]
        for topic in clear:
            if not await self._send(topic, b"", "cleared"):
                return  # tried again at the next check
        if time.time() - device.seen <= self.settings.forget_after:
            device.forget_published()  # a window came while we cleared: it is back
            return
        del self.devices[name]
        self._table_changed = True
        self.forgotten.inc()
        log.info("device %s forgotten: no window for %.0f s, its projection cleared", name, time.time() - device.seen)

    async def _send(
        self, topic: str, payload: bytes, kind: str, *, retain: bool = True, timeout: float = PUBLISH_TIMEOUT
    ) -> bool:
        """Publish to the public broker; False if it is away or did not take it (logged, rate-limited)."""
        if not self.public.connected.is_set():
            return False
        try:
            async with asyncio.timeout(timeout):
                await self.public.publish(topic, payload, retain=retain)
        except (TimeoutError, IotpipeError) as exc:
            # BrokerRefused: the public ACL does not let us (a deployment to fix); else the broker is away.
            self._problems.warning(f"send {kind}", "public broker did not take %s on %s: %s", kind, topic, exc)
            return False
        self.published.labels(kind).inc()
        return True

    # -- the table, across restarts ---------------------------------------------------------------
    def _load_table(self) -> None:
        path = self.settings.table_file
        try:
            table = orjson.loads(path.read_bytes())
            for name, entry in table.items():
                if ID_PATTERN.fullmatch(name):
                    sensors = {s for s in entry.get("sensors", []) if isinstance(s, str) and ID_PATTERN.fullmatch(s)}
                    self.devices[name] = Device(seen=float(entry["seen"]), sensors_out=sensors)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("device table %s unreadable (%s); starting without it", path, type(exc).__name__)
            return
        log.info("device table restored from %s: %d device(s)", path, len(self.devices))

    def _save_table(self) -> None:
        if not self._table_changed:
            return
        table = {name: {"seen": d.seen, "sensors": sorted(d.sensors_out)} for name, d in self.devices.items()}
        try:
            write_atomically(self.settings.table_file, orjson.dumps(table))
            self._table_changed = False
        except OSError as exc:
            log.error("cannot save the device table to %s: %s", self.settings.table_file, exc)

    # -- lifecycle ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        details: dict[str, Any] = {}
        if self.public.connected.is_set():
            self._public_down_since = None
        elif self._public_down_since is None:
            self._public_down_since = time.monotonic()
        elif (down := time.monotonic() - self._public_down_since) > self.settings.public_unhealthy_after:
            details["unhealthy"] = f"public broker unreachable for {down:.0f} s"
        return {
            **details,
            "projection": {
                "devices": len(self.devices),
                "online": sum(1 for d in self.devices.values() if d.online),
                "public": "up" if self.public.connected.is_set() else "down",
                "ha_discovery": self.settings.ha_discovery,
            },
        }

    async def close(self) -> None:
        self._table_changed = True
        self._save_table()
        if not self._started:
            return
        said_offline = await self._send(self.topics.exporter_state, OFFLINE, "bridge_state", timeout=STOP_TIMEOUT)
        # Our own `offline` taken: a normal DISCONNECT. Else ask the broker for the Will (the same).
        await self.public.stop(will=not said_offline, timeout=STOP_TIMEOUT)
