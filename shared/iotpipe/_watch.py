"""What `iotpipe watch` shows, kept apart from the terminal: a plain class that ingests the public
broker's messages (topic, payload) and answers what to show, so it is tested without a screen.

It reads only what the read-only `reader` user of the public broker may read (mosquitto/public-acl):

  <base>/v2/devices/<d>/state | units | availability | alert   the exporter's plaintext projection
  <base>/v2/exporter/state                                     the exporter itself (online | offline)
  <base>/v2/status/device/<d>                                  the monitor's verdict on a device
  <base>/v2/status/service/<name>/<instance>                   every service's retained status
  <base>/v2/alerts/<d>                                         sealed alerts (bridged): opened only
                                                               given a key ring, else left to the
                                                               projection's plain copy

A payload it cannot read is counted and named in `problem`, never raised: one bad message must not
end an operator's view.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

from ._errors import IotpipeError

NONE = "—"
# The alerts kept (and shown at most): an operator's glance, not the cloud's record.
MAX_ALERTS = 50
# Published by every service on each heartbeat, not data: left out of a service's rate out.
STATUS_KIND = "status"
# The exporter's publishes to the public broker: out too, beside what it publishes on the pipeline.
PROJECTED = "projected"
# What is read of a device: the projection's retained topics, and `monitor` (its status/device/<d>).
DEVICE_LEAVES = frozenset({"state", "units", "availability", "monitor"})
# Opens a sealed alert (topic, payload) into its JSON document; None for a duplicate delivery.
SealedOpener = Callable[[str, bytes], dict[str, Any] | None]


class Unreadable(ValueError):
    """A payload that is not what its topic promises."""


def counter_sum(counter: object, *, leave_out: frozenset[str] = frozenset()) -> float | None:
    """A nested counter's total over all its label values (`leave_out`: label values at the first
    level not counted); None if there is no such counter."""
    if isinstance(counter, bool) or counter is None:
        return None
    if isinstance(counter, int | float):
        return float(counter)
    if isinstance(counter, dict):
        total = 0.0
        for label, value in counter.items():
            if label in leave_out:
                continue
            part = counter_sum(value)
            if part is not None:
                total += part
        return total
    return None


def age(seconds: float | None) -> str:
    """`4s`, `3m`, `2h`, `5d`: how long ago, at a glance."""
    if seconds is None or not math.isfinite(seconds):
        return NONE
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def number(value: object) -> str:
    """A sensor value: two decimals, as the exporter's means are shown everywhere else."""
    if not _is_number(value):
        return NONE
    return f"{value:.2f}"


def clock(ts_ms: int | None) -> str:
    if ts_ms is None:
        return NONE
    return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Unreadable(f"not JSON ({exc.msg})") from None


def _object(payload: bytes) -> dict[str, Any]:
    doc = _json(payload)
    if not isinstance(doc, dict):
        raise Unreadable("not a JSON object")
    return doc


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ms(value: object) -> int | None:
    return int(value) if _is_number(value) else None


@dataclass
class DeviceView:
    values: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    state_ts: int | None = None  # the state's `ts`: end of the newest window shown (unix ms)
    availability: str | None = None  # the exporter's online | offline
    monitor: dict[str, Any] | None = None  # the monitor's status of it

    def empty(self) -> bool:
        return not self.values and not self.units and self.availability is None and self.monitor is None


@dataclass
class ServiceView:
    status: dict[str, Any]
    counters: dict[str, Any]
    rate_in: float | None = None
    rate_out: float | None = None
    # (status ts in ms, boot ts, total in, total out) of the previous heartbeat: the rates' base.
    previous: tuple[int, object, float | None, float | None] | None = None


@dataclass(frozen=True)
class DeviceRow:
    device: str
    state: str
    values: str
    last_seen: str


@dataclass(frozen=True)
class ServiceRow:
    service: str
    instance: str
    state: str
    rate_in: str
    rate_out: str
    rejected: str
    lag: str
    status_age: str


@dataclass(frozen=True)
class AlertRow:
    time: str
    device: str
    kind: str
    detail: str


class LiveView:
    """The system as the public broker shows it. `ingest` each message; the `*_rows` methods answer
    what to show at `now` (unix s)."""

    def __init__(self, *, open_sealed: SealedOpener | None = None, max_alerts: int = MAX_ALERTS) -> None:
        self.open_sealed = open_sealed
        self.devices: dict[str, DeviceView] = {}
        self.services: dict[tuple[str, str], ServiceView] = {}
        self.exporter: str | None = None
        self.max_alerts = max_alerts
        self._alerts: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.unreadable = 0
        self.problem: str | None = None  # the latest unreadable message, for the header

    # -- input ----------------------------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes) -> None:
        """One message as the broker delivered it; an empty payload clears a retained topic."""
        parts = topic.split("/")
        try:
            self._route(parts[2:], topic, payload)
        except Unreadable as exc:
            self.unreadable += 1
            self.problem = f"{topic}: {exc}"

    def _route(self, parts: list[str], topic: str, payload: bytes) -> None:
        match parts:
            case ["devices", device, leaf]:
                self._device(device, leaf, payload)
            case ["status", "device", device]:
                self._device(device, "monitor", payload)
            case ["status", "service", name, instance]:
                self._service(name, instance, payload)
            case ["alerts", _device] if self.open_sealed is not None and payload:
                try:
                    doc = self.open_sealed(topic, payload)
                except IotpipeError as exc:  # what the opener refuses (envelope, key, age, model): shown, skipped
                    raise Unreadable(f"sealed alert not opened ({type(exc).__name__}: {exc})") from None
                if doc is not None:
                    self._alert(doc)
            case ["exporter", "state"]:
                self.exporter = payload.decode("utf-8", "replace") if payload else None

    def _device(self, name: str, leaf: str, payload: bytes) -> None:
        if leaf == "alert":
            if payload:
                self._alert(_object(payload))
            return
        if leaf not in DEVICE_LEAVES:
            return
        # Read before anything changes: an unreadable payload leaves the device as it was.
        doc = _object(payload) if payload and leaf != "availability" else {}
        device = self.devices.setdefault(name, DeviceView())
        if leaf == "state":
            device.values = {k: v for k, v in doc.items() if k != "ts" and _is_number(v)}
            device.state_ts = _ms(doc.get("ts"))
        elif leaf == "units":
            device.units = {k: v for k, v in doc.items() if isinstance(v, str)}
        elif leaf == "availability":
            device.availability = payload.decode("utf-8", "replace") if payload else None
        else:
            device.monitor = doc or None
        if device.empty():  # every retained topic of it cleared: the device is gone
            del self.devices[name]

    def _service(self, name: str, instance: str, payload: bytes) -> None:
        key = (name, instance)
        if not payload:
            self.services.pop(key, None)
            return
        status = _object(payload)
        counters = status.get("counters")
        if not isinstance(counters, dict):  # docs/contract.md: nested, by counter name
            counters = {}
        view = self.services.get(key)
        if view is None:
            view = self.services[key] = ServiceView(status, counters)
        view.status, view.counters = status, counters
        ts = _ms(status.get("ts"))
        total_in = counter_sum(counters.get("received"))
        total_out = _total(
            counter_sum(counters.get("published"), leave_out=frozenset({STATUS_KIND})),
            counter_sum(counters.get(PROJECTED)),
        )
        if ts is None:
            return
        if view.previous is not None:
            then, boot, before_in, before_out = view.previous
            seconds = (ts - then) / 1000
            restarted = boot != status.get("boot_ts")
            if seconds > 0 and not restarted:
                view.rate_in = _rate(before_in, total_in, seconds)
                view.rate_out = _rate(before_out, total_out, seconds)
            elif restarted:
                view.rate_in = view.rate_out = None
        if view.previous is None or ts > view.previous[0]:
            view.previous = (ts, status.get("boot_ts"), total_in, total_out)

    def _alert(self, doc: dict[str, Any]) -> None:
        device, kind, ts = doc.get("device"), doc.get("kind"), _ms(doc.get("ts"))
        if not isinstance(device, str) or not isinstance(kind, str) or ts is None:
            raise Unreadable("an alert needs device, kind and ts")
        # The same alert comes twice with a key ring (sealed, and the projection's plain copy): once here.
        self._alerts[(device, kind, ts)] = doc
        while len(self._alerts) > self.max_alerts:
            del self._alerts[min(self._alerts, key=lambda k: k[2])]

    # -- output ---------------------------------------------------------------------------------------
    def device_rows(self, now: float) -> list[DeviceRow]:
        return [self._device_row(name, self.devices[name], now) for name in sorted(self.devices)]

    def _device_row(self, name: str, device: DeviceView, now: float) -> DeviceRow:
        monitor = device.monitor or {}
        state = _state(device)
        shown = state or NONE
        if (
            state is not None and monitor.get("state") == state
        ):  # the monitor's: its reason, and the exporter's if it differs
            if isinstance(monitor.get("reason"), str):
                shown += f" ({monitor['reason']})"
            if device.availability and device.availability != state:
                shown += f", exporter: {device.availability}"
        values = "  ".join(
            f"{sensor} {number(value)}{(' ' + device.units[sensor]) if sensor in device.units else ''}"
            for sensor, value in sorted(device.values.items())
        )
        seen = device.state_ts if device.state_ts is not None else _ms(monitor.get("last_seen"))
        return DeviceRow(name, shown, values or NONE, age(now - seen / 1000) if seen is not None else NONE)

    def service_rows(self, now: float) -> list[ServiceRow]:
        return [self._service_row(key, self.services[key], now) for key in sorted(self.services)]

    def _service_row(self, key: tuple[str, str], view: ServiceView, now: float) -> ServiceRow:
        status = view.status
        state = status.get("state") if isinstance(status.get("state"), str) else NONE
        rejected = counter_sum(view.counters.get("rejected"))
        lag = status.get("lag")
        p50 = lag.get("p50_ms") if isinstance(lag, dict) else None
        ts = _ms(status.get("ts"))
        return ServiceRow(
            service=key[0],
            instance=key[1],
            state=str(state),
            rate_in=_per_second(view.rate_in),
            rate_out=_per_second(view.rate_out),
            rejected=f"{rejected:.0f}" if rejected is not None else "0",
            lag=f"{p50:.0f} ms" if _is_number(p50) else NONE,
            status_age=age(now - ts / 1000) if ts is not None else NONE,
        )

    def alert_rows(self) -> list[AlertRow]:
        """Newest first."""
        ordered = sorted(self._alerts.items(), key=lambda item: (item[0][2], item[0][0]), reverse=True)
        return [AlertRow(clock(ts), device, kind, _detail(doc)) for (device, kind, ts), doc in ordered]

    def counts(self) -> dict[str, int]:
        return {
            "devices": len(self.devices),
            "devices_online": sum(1 for d in self.devices.values() if _state(d) == "online"),
            "services": len(self.services),
            "services_online": sum(1 for s in self.services.values() if s.status.get("state") == "online"),
            "alerts": len(self._alerts),
        }


def _state(device: DeviceView) -> str | None:
    """The monitor's verdict on a device (it alone sees faults), else the exporter's availability."""
    state = (device.monitor or {}).get("state")
    return state if isinstance(state, str) else device.availability


def _total(*parts: float | None) -> float | None:
    known = [p for p in parts if p is not None]
    return sum(known) if known else None


def _rate(before: float | None, after: float | None, seconds: float) -> float | None:
    if before is None or after is None or after < before:
        return None
    return (after - before) / seconds


def _per_second(rate: float | None) -> str:
    return NONE if rate is None else f"{rate:.1f}/s"


def _detail(doc: dict[str, Any]) -> str:
    """What an alert says beyond its kind (docs/contract.md, the alert models)."""
    kind = doc.get("kind")
    if kind == "anomaly_open":
        evidence = doc.get("evidence")
        if not isinstance(evidence, dict):
            evidence = {}
        return (
            f"{doc.get('sensor')} {doc.get('anomaly')}: mean {number(evidence.get('mean'))} "
            f"score {number(doc.get('score'))}"
        )
    if kind == "anomaly_close":
        return f"{doc.get('sensor')} {doc.get('anomaly')} over ({doc.get('reason')}) after {doc.get('windows')} windows"
    if kind == "flood":
        return f"{doc.get('shed')} windows shed ({doc.get('reason')})"
    parts = []
    if isinstance(doc.get("reason"), str):
        parts.append(doc["reason"])
    if _ms(doc.get("last_seen")) is not None:
        parts.append(f"last seen {clock(_ms(doc.get('last_seen')))}")
    return ", ".join(parts) or NONE
