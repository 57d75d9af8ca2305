"""monitor in-process on the real broker: anomaly alerts (fitted off the message path, with a cooldown)
and device availability."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import orjson
import pytest
from iotpipe import KeyRing, Opened, PlainMessage, Processed, Runtime, Topics, counter, decode
from monitor.service import Monitor, Settings
from servers import TAP, Stack, bus_for, wait_until


def processed(base: str, device: str, seq: int, mean: float, spread: float) -> Opened[Processed]:
    window = {
        "device": device,
        "sensor": "temp",
        "unit": "degC",
        "start": seq * 1000,
        "end": seq * 1000 + 1000,
        "n": 10,
        "mean": mean,
        "median": mean,
        "min": mean - spread,
        "max": mean + spread,
        "std": spread / 2,
    }
    topic = f"{base}/v2/processed/{device}"
    data = decode(orjson.dumps({"windows": [window]}), Processed, topic)
    return Opened(topic, "preprocessor/x", "b", seq, 0, data)


async def test_anomaly_alerts_with_cooldown_and_device_status(
    stack: Stack, keyring: KeyRing, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in stack.env(
        IOTPIPE_BASE_TOPIC=base, IOTPIPE_ALERT_COOLDOWN="3600", IOTPIPE_OFFLINE_AFTER="3600"
    ).items():
        monkeypatch.setenv(key, value)
    topics = Topics(base)
    monitor = Monitor(Runtime(Settings.load(instance="t"), keyring=keyring))
    alerts: list[dict[str, object]] = []
    status: list[dict[str, object]] = []

    async def on_alert(messages: Sequence[Opened]) -> None:
        alerts.extend(m.data for m in messages)

    async def on_status(messages: Sequence[PlainMessage]) -> None:
        status.extend(orjson.loads(m.payload) for m in messages if m.payload)

    watcher = bus_for(stack, "cloud-forwarder", keyring=keyring)
    watcher.subscribe(topics.all("alerts"), on_alert)
    status_watcher = bus_for(stack, TAP)
    status_watcher.subscribe(f"{topics.root}/status/device/+", on_status, sealed=False)
    buses = (monitor.runtime.bus, watcher, status_watcher)
    for bus in buses:
        await bus.start()
        await bus.wait_connected()
    try:
        await asyncio.wait_for(watcher.subscribed.wait(), 10)
        await asyncio.wait_for(status_watcher.subscribed.wait(), 10)
        rng = np.random.default_rng(1)
        await monitor.on_processed(
            [processed(base, "d1", i, float(m), 0.3) for i, m in enumerate(rng.normal(21, 0.1, 200))]
        )
        assert alerts == []  # no model yet: nothing is scored, and observing never fits
        monitor.detector.install(await asyncio.to_thread(monitor.detector.fit, monitor.detector.snapshot()))
        await monitor.on_processed([processed(base, "d1", 300, 21.0, 0.3)])
        await monitor.on_processed([processed(base, "d1", 301, 80.0, 30.0), processed(base, "d1", 302, 90.0, 40.0)])
        await wait_until(lambda: alerts, 10, "an anomaly alert")
        (alert,) = alerts
        assert alert["kind"] == "anomaly" and alert["sensor"] == "temp" and alert["start"] == 301000
        assert counter(monitor.runtime.metrics.counters(), "anomalies_suppressed") == 1
        await wait_until(lambda: status, 10, "device status")
        assert status[0]["state"] == "online" and status[0]["device"] == "d1"
    finally:
        for bus in buses:
            await bus.stop()
