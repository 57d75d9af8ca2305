"""monitor in-process on the real broker: anomaly episodes (sealed open and close alerts, received by
a subscriber holding the key ring), what it learnt kept across a restart, and device availability."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from iotpipe import KeyRing, Opened, PlainMessage, Processed, Runtime, Topics, decode
from monitor.service import Monitor, Settings
from servers import TAP, Stack, bus_for, wait_until

WARM_UP = 60


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


def healthy(base: str, first: int, count: int, seed: int) -> list[Opened[Processed]]:
    rng = np.random.default_rng(seed)
    return [
        processed(base, "d1", first + i, float(m), float(s))
        for i, (m, s) in enumerate(zip(rng.normal(21, 0.05, count), rng.uniform(0.1, 0.2, count), strict=True))
    ]


def monitor_for(stack: Stack, keyring: KeyRing, base: str, monkeypatch: pytest.MonkeyPatch) -> Monitor:
    env = stack.env(
        IOTPIPE_BASE_TOPIC=base, IOTPIPE_OFFLINE_AFTER="3600", IOTPIPE_WARM_UP=str(WARM_UP), IOTPIPE_CLOSE_AFTER="5"
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IOTPIPE_STATE_DIR", str(Path(stack.broker.cwd) / f"state-{base}"))
    return Monitor(Runtime(Settings.load(instance="t"), keyring=keyring))


async def test_a_stuck_sensor_is_one_sealed_episode_and_the_device_is_online(
    stack: Stack, keyring: KeyRing, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(base)
    monitor = monitor_for(stack, keyring, base, monkeypatch)
    alerts: list[dict[str, Any]] = []
    status: list[dict[str, object]] = []

    async def on_alert(messages: Sequence[Opened]) -> None:
        alerts.extend(m.data for m in messages)

    async def on_status(messages: Sequence[PlainMessage]) -> None:
        status.extend(orjson.loads(m.payload) for m in messages if m.payload)

    watcher = bus_for(stack, "cloud-forwarder", keyring=keyring)  # the cloud-forwarder's view: sealed
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
        history = healthy(base, 0, 200, seed=1)
        for i in range(0, len(history), 16):  # batches as the bus delivers them (batch=16)
            await monitor.on_processed(history[i : i + 16])
        await monitor.refit()
        assert monitor.detector.fitted == ["temp"]
        # Stuck from window 200 to 229: the same value, no spread.
        await monitor.on_processed([processed(base, "d1", 200 + i, 21.013, 0.0) for i in range(30)])
        await wait_until(lambda: alerts, 10, "the episode's open alert")
        await monitor.on_processed(healthy(base, 230, 20, seed=2))
        await wait_until(lambda: len(alerts) >= 2, 10, "the episode's close alert")
        opened, closed = alerts
        assert opened["kind"] == "anomaly_open" and opened["anomaly"] == "stuck" and opened["sensor"] == "temp"
        assert opened["start"] == 200_000 and opened["episode"] == "temp/200000" == closed["episode"]
        assert opened["evidence"]["std"] == 0.0 and opened["evidence"]["windows"] == 5
        assert closed["kind"] == "anomaly_close" and closed["reason"] == "normal" and closed["end"] == 230_000
        registry = monitor.runtime.metrics.registry
        assert registry.get_sample_value("iotpipe_anomaly_episodes_total", {"anomaly": "stuck"}) == 1
        await wait_until(lambda: status, 10, "device status")
        assert status[0]["state"] == "online" and status[0]["device"] == "d1"
    finally:
        for bus in buses:
            await bus.stop()


async def test_what_the_monitor_learnt_survives_a_restart(
    stack: Stack, keyring: KeyRing, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = monitor_for(stack, keyring, base, monkeypatch)
    await monitor.runtime.bus.start()
    try:
        await monitor.runtime.bus.wait_connected()
        await monitor.on_processed(healthy(base, 0, 200, seed=3))
        await monitor.refit()
    finally:
        await monitor.runtime.bus.stop()
    learnt = monitor.detector.learnt(("d1", "temp"))
    assert learnt >= WARM_UP
    await monitor.close()  # a clean stop saves it
    again = monitor_for(stack, keyring, base, monkeypatch)
    assert again.detector.learnt(("d1", "temp")) == learnt and again.detector.fitted == ["temp"]
    assert again.health()["sensors"] == 1
