"""preprocessor: raw windows in, filtered window aggregates out.

No window state by design: a raw message holds whole windows (the reader publishes each device's
window whole, in one message), so instances in the `$share/preprocessor` group never need each
other's state. The windows of a whole handler batch (several raw messages, many devices) are filtered and
aggregated together and go out in as few processed messages as fit the payload limit. A raw
message is acknowledged only after the processed messages holding its windows were acknowledged by
the broker.

Before any of that work, each window is charged to its device's allowance (preprocessor.fairness,
the one state an instance keeps, saved across restarts): a device delivering more than it could (a
flood, by an insider holding the key ring) has the excess shed, counted, logged and reported in a
sealed `flood` alert, so it cannot delay the others.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from iotpipe import (
    Component,
    FloodAlert,
    IotpipeError,
    Opened,
    Processed,
    RawBatchHead,
    RawWindow,
    RawWindowHead,
    Runtime,
    ServiceSettings,
    Window,
    raw_windows,
    write_atomically,
)
from pydantic import Field, field_validator

from .fairness import DeviceBuckets
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
# Devices named in the shed counter's `device` label: the first ones shed, the rest as `other`, so
# forged device ids cannot grow the metrics without bound (the alerts and the log name every one).
SHED_LABELLED_DEVICES = 20
# How often flood alerts are sent (each device at most once per IOTPIPE_FLOOD_ALERT_INTERVAL), and
# at most how many per round: a flood spread over many forged ids gets its alerts over time, never
# a flood of alerts.
ALERT_ROUND = 1.0
ALERTS_PER_ROUND = 10
# How often the device table is saved (and at shutdown): a crash forgets the last interval's
# sightings, which only credits those devices a few windows more after the restart.
TABLE_SAVE_INTERVAL = 30.0
# Messages whose admitted windows are remembered, so that a batch handed to the handler again (the
# broker down, a retry) is not charged twice: more than a handler batch holds.
DECISIONS_KEPT = 1024


class Settings(ServiceSettings):
    service_name = "preprocessor"

    median_kernel: int = Field(5, ge=1, le=101, description="median filter width (odd)")
    share_group: str = "preprocessor"
    share_adopt_after: float = Field(
        30.0, gt=0, description="s another member's session may say offline before a live member drains it"
    )
    flood_rate: float = Field(
        200.0, ge=0, description="windows/s a device may deliver sustained (0: no per-device limit, nothing shed)"
    )
    flood_burst: int = Field(3600, ge=1, description="windows a device may deliver at once on top of flood_rate")
    flood_devices: int = Field(50_000, ge=1, description="devices whose allowance is tracked (least recent evicted)")
    flood_alert_interval: float = Field(60.0, gt=0, description="s between flood alerts for one device")

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
        s = self.settings
        self.windows = runtime.metrics.counter("iotpipe_windows", "Windows computed")
        self.shed = runtime.metrics.counter(
            "iotpipe_windows_shed", "Raw windows shed as over their device's allowance, by device", ("device",)
        )
        self.alerts = runtime.metrics.counter("iotpipe_alerts", "Alerts published", ("kind",))
        self.buckets = (
            DeviceBuckets(s.flood_rate, s.flood_burst, s.flood_devices, max_silence=s.message_ttl)
            if s.flood_rate > 0
            else None
        )
        self._labelled: set[str] = set()
        self._decided: collections.OrderedDict[tuple[str, str, int], list[RawWindowHead]] = collections.OrderedDict()
        self._table_file = s.state_dir / f"{s.service_name}-{s.instance}.devices.json"
        self._load_table()
        runtime.bus.subscribe(
            runtime.topics.all("raw"),
            self.handle,
            # Each window's readings are decoded only once it is admitted: shedding a flood then costs
            # its decryption and about a microsecond a window, not the several a full decode takes.
            model=RawBatchHead,
            share_group=self.settings.share_group,
            adopt_after=self.settings.share_adopt_after,
        )

    async def handle(self, messages: Sequence[Opened[RawBatchHead]]) -> None:
        # A window whose readings break the contract makes its message a schema rejection (as it
        # would have been had the bus decoded it whole): the bus dead-letters that one alone.
        raw = [window for m in messages for window in raw_windows(self._admitted(m))]
        windows = process(raw, self.settings.median_kernel) if raw else []
        bus, topic = self.runtime.bus, self.runtime.topics.processed(self.settings.instance)
        # Returning acknowledges the raw batches: only after every processed message is at the broker.
        await asyncio.gather(
            *(bus.publish_sealed(topic, p, kind="processed") for p in fitting(windows, self.settings.max_payload_bytes))
        )
        self.windows.inc(len(windows))
        for m in messages:
            self._decided.pop((m.src, m.boot, m.seq), None)

    def _admitted(self, message: Opened[RawBatchHead]) -> list[RawWindowHead]:
        """The message's windows within their devices' allowances, charged once per message: a
        batch handed to the handler again (a retry while the broker is away) is not charged again."""
        if self.buckets is None:
            return message.data.windows
        key = (message.src, message.boot, message.seq)
        admitted = self._decided.get(key)
        if admitted is None:
            now = time.time()
            admit = self.buckets.admit
            windows = message.data.windows
            verdicts = [admit(w.device, w.window.size, now) for w in windows]
            admitted = list(itertools.compress(windows, verdicts))
            if len(admitted) < len(windows):
                shed = collections.Counter(w.device for w, ok in zip(windows, verdicts, strict=True) if not ok)
                for device, count in shed.items():
                    self._count_shed(device, count)
            self._decided[key] = admitted
            if len(self._decided) > DECISIONS_KEPT:
                self._decided.popitem(last=False)
        return admitted

    def _count_shed(self, device: str, count: int) -> None:
        if device not in self._labelled and len(self._labelled) < SHED_LABELLED_DEVICES:
            self._labelled.add(device)
        self.shed.labels(device if device in self._labelled else "other").inc(count)

    # -- flood alerts and the device table --------------------------------------------------------
    async def run(self) -> None:
        if self.buckets is None:
            await super().run()
            return
        saved = time.monotonic()
        while True:
            await asyncio.sleep(ALERT_ROUND)
            await self._alert_floods()
            if time.monotonic() - saved >= TABLE_SAVE_INTERVAL:
                saved = time.monotonic()
                self._save_table()

    async def _alert_floods(self) -> None:
        assert self.buckets is not None
        s = self.settings
        for shed in self.buckets.due(time.time(), s.flood_alert_interval, ALERTS_PER_ROUND):
            reason = (
                f"over its allowance of {s.flood_rate:g} windows/s (burst {s.flood_burst}, "
                f"plus what its silences owe): {shed.windows} window(s) shed"
            )
            alert = FloodAlert(
                device=shed.device,
                shed=shed.windows,
                since=int(shed.since * 1000),
                reason=reason,
                ts=time.time_ns() // 1_000_000,
            )
            log.warning("device %s flooding: %s since %s", shed.device, reason, _iso(shed.since))
            try:
                await self.runtime.bus.publish_sealed(self.runtime.topics.alerts(shed.device), alert, kind="alert")
            except IotpipeError as exc:
                log.warning("flood alert for %s not published (%s): it goes with the next one", shed.device, exc)
                self.buckets.restore(shed)
                continue
            self.alerts.labels("flood").inc()

    def _load_table(self) -> None:
        if self.buckets is None or not self._table_file.exists():
            return
        try:
            self.buckets.load(self._table_file.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("device table in %s unreadable (%s): every device starts with its burst", self._table_file, exc)
            return
        log.info("device table restored from %s: %d device(s)", self._table_file, len(self.buckets))

    def _save_table(self) -> None:
        if self.buckets is None:
            return
        try:
            write_atomically(self._table_file, self.buckets.dump())
        except OSError as exc:
            log.error("cannot save the device table to %s: %s", self._table_file, exc)

    def health(self) -> dict[str, Any]:
        if self.buckets is None:
            return {}
        # Not "devices": in a service status that key is the sensor-reader's (ServiceStatus.devices).
        return {"fairness": {"devices": len(self.buckets), "evicted": self.buckets.evicted}}

    async def close(self) -> None:
        self._save_table()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
