"""Per-device fairness (preprocessor.fairness and its use in the preprocessor): what a device may
deliver, what is shed, that legitimate catch-up is not, that the table is bounded and survives a
restart, and the flood alert through the real broker and its ACL."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from iotpipe import FloodAlert, KeyRing, Opened, RawBatchHead, Runtime, Topics, counter, decode
from preprocessor.fairness import DeviceBuckets
from preprocessor.service import Preprocessor, Settings
from servers import Stack, bus_for, service_counters, service_env, spawn, stop_all, wait_online, wait_until

T0 = 1_795_533_424.0  # unix s
TTL = 7 * 24 * 3600


def buckets(rate: float = 200, burst: int = 100, devices: int = 1000) -> DeviceBuckets:
    return DeviceBuckets(rate, burst, devices, max_silence=TTL)


def deliver(b: DeviceBuckets, device: str, count: int, start: float, per_second: float, size_ms: int = 1000) -> int:
    """`count` windows of `device` from `start`, `per_second` of them a second; how many were shed."""
    return sum(not b.admit(device, size_ms, start + i / per_second) for i in range(count))


def test_a_live_device_is_never_shed_and_a_flood_is_shed_beyond_burst_and_rate() -> None:
    b = buckets(rate=200, burst=100)
    assert deliver(b, "live", 3600, T0, per_second=1) == 0  # an hour at one window a second
    # The same device, 10,000 windows in one second: the burst and one second of the rate pass.
    shed = deliver(b, "live", 10_000, T0 + 3600, per_second=10_000)
    assert 10_000 - 100 - 200 - 2 <= shed <= 10_000 - 100 - 200 + 2
    # Held to the rate while it goes on: 10 s of 10,000/s, 200/s pass.
    shed = deliver(b, "live", 100_000, T0 + 3601, per_second=10_000)
    assert 100_000 - 2000 - 2 <= shed <= 100_000 - 2000 + 2
    # And once it is back to one window a second, nothing is shed any more.
    assert deliver(b, "live", 10, T0 + 3700, per_second=1) == 0


def test_a_clock_stepping_back_neither_grants_nor_stops_the_refill() -> None:
    b = buckets(rate=200, burst=100)
    assert deliver(b, "d", 60, T0, per_second=1) == 0
    # The wall clock steps back an hour; the device goes on at one window a second for two hours.
    assert deliver(b, "d", 7200, T0 - 3600, per_second=1) == 0
    assert deliver(b, "d", 1000, T0 + 3600, per_second=1e6) == pytest.approx(1000 - 100, abs=1)  # and it still holds


def test_a_forged_new_device_gets_its_burst_only() -> None:
    b = buckets(rate=200, burst=100)
    assert deliver(b, "forged", 5000, T0, per_second=1e6) == 5000 - 100


@pytest.mark.parametrize("outage_s", [60, 3600, 86_400])
def test_catch_up_after_an_outage_is_never_shed(outage_s: int) -> None:
    """A reader back after an outage replays its spool as fast as the broker takes it (thousands of
    windows a second for a small fleet): the device's silence owes it that many windows."""
    b = buckets(rate=200, burst=100)
    assert deliver(b, "site", 600, T0, per_second=1) == 0
    back = T0 + 600 + outage_s
    # The whole backlog at 5,000 windows/s, then live again: nothing shed.
    assert deliver(b, "site", outage_s, back, per_second=5000) == 0
    assert deliver(b, "site", 60, back + outage_s / 5000, per_second=1) == 0
    # Its catch-up over, the device is held to its allowance again.
    assert deliver(b, "site", 1000, back + 100, per_second=1e6) > 600


def test_windows_of_many_devices_in_one_batch_and_tiny_windows_buy_nothing() -> None:
    b = buckets(rate=200, burst=100)
    for second in range(100):  # 1,000 devices, all their windows at once each second
        assert not any(not b.admit(f"d{i}", 1000, T0 + second) for i in range(1000))
    # Declaring 1 ms windows does not make a device owed 1,000 windows a second of silence.
    assert deliver(b, "tiny", 1, T0, per_second=1, size_ms=1) == 0
    # 10 s later: what is left of its burst and 10 s of the rate, not 10,000 windows.
    assert deliver(b, "tiny", 5000, T0 + 10, per_second=1e6, size_ms=1) == pytest.approx(5000 - 99 - 10 * 200, abs=2)


def test_the_table_is_bounded_whatever_the_number_of_forged_ids() -> None:
    b = buckets(devices=1000)
    for i in range(100):
        b.admit(f"genuine-{i}", 1000, T0 + 10_000)  # seen last: kept
    for i in range(50_000):
        b.admit(f"forged-{i}", 1000, T0 + i / 10)
        assert len(b) <= 1000
    assert b.evicted >= 49_000
    # The most recently seen stay: the genuine devices seen after most forged ids.
    for i in range(100):
        assert b.admit(f"genuine-{i}", 1000, T0 + 10_001)


def test_a_flood_is_reported_even_when_forged_ids_fill_the_table_after_it() -> None:
    """A flood, then more new ids than the table holds before the next alert round: evicting the
    flooding device would drop its unreported shed windows, and its flood alert with them."""
    b = buckets(rate=1, burst=10, devices=100)
    assert deliver(b, "flood", 1000, T0, per_second=1e6) == 990
    for i in range(500):
        b.admit(f"forged-{i}", 1000, T0 + 0.5 + i / 1000)
        assert len(b) <= 100
    assert b.evicted >= 400
    assert [(s.device, s.windows) for s in b.due(T0 + 1, interval=60, limit=10)] == [("flood", 990)]


def test_shed_windows_are_reported_once_per_device_per_interval() -> None:
    b = buckets(rate=1, burst=1)
    assert deliver(b, "x", 11, T0, per_second=1e6) == 10
    assert deliver(b, "y", 3, T0, per_second=1e6) == 2
    due = b.due(T0 + 1, interval=60, limit=1)  # one at a time: the oldest first
    assert [(s.device, s.windows, s.since) for s in due] == [("x", 10, pytest.approx(T0, abs=1e-3))]
    assert [s.device for s in b.due(T0 + 1, interval=60, limit=10)] == ["y"]
    assert deliver(b, "x", 5, T0 + 2, per_second=1e6) == 3  # 2 s at 1 window/s pass
    assert b.due(T0 + 30, interval=60, limit=10) == []  # reported within the interval: it waits
    (again,) = b.due(T0 + 62, interval=60, limit=10)
    assert again.windows == 3
    b.restore(again)  # not sent: counted with the next report, an interval later
    assert deliver(b, "x", 100, T0 + 62, per_second=1e6) == 40
    assert b.due(T0 + 63, interval=60, limit=10) == []
    (merged,) = b.due(T0 + 122, interval=60, limit=10)
    assert merged.windows == 43


def test_the_table_survives_a_restart_so_the_backlog_queued_meanwhile_passes(tmp_path: Path) -> None:
    b = buckets(rate=200, burst=100)
    deliver(b, "d1", 100, T0, per_second=1)
    saved = b.dump()
    restarted = buckets(rate=200, burst=100)
    restarted.load(saved)
    # Down for an hour: the broker queued 3,600 windows of d1 for it, delivered at once.
    assert deliver(restarted, "d1", 3600, T0 + 100 + 3600, per_second=10_000) == 0
    with pytest.raises(ValueError):
        restarted.load(b"not a table")


# -- the preprocessor -----------------------------------------------------------------------------
def raw_window(device: str, start: int) -> dict[str, Any]:
    return {
        "device": device,
        "window": {"start": start, "size": 1000},
        "sensors": {"t": {"unit": "degC", "t": [start], "v": [1.0]}},
    }


def opened(base: str, seq: int, windows: list[dict[str, Any]]) -> Opened[RawBatchHead]:
    topic = f"{base}/v2/raw/r1"
    return Opened(
        topic, "sensor-reader/r1", "boot", seq, 0, decode(orjson.dumps({"windows": windows}), RawBatchHead, topic)
    )


def preprocessor(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str
) -> Preprocessor:
    for key, value in stack.env(
        IOTPIPE_BASE_TOPIC=base, IOTPIPE_STATE_DIR=str(tmp_path / "state"), IOTPIPE_FLOOD_BURST="5", **env
    ).items():
        monkeypatch.setenv(key, value)
    return Preprocessor(Runtime(Settings.load(instance="fair"), keyring=keyring))


async def test_flood_windows_are_shed_before_processing_alerted_once_and_genuine_ones_processed(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(base)
    # A rate slow enough that the test's own pace refills nothing: only the burst of 5 passes.
    component = preprocessor(stack, keyring, base, tmp_path, monkeypatch, IOTPIPE_FLOOD_RATE="0.01")
    alerts: list[Opened[Any]] = []
    processed: list[dict[str, Any]] = []

    async def on_alert(messages: Sequence[Opened[Any]]) -> None:
        alerts.extend(messages)

    async def on_processed(messages: Sequence[Opened[Any]]) -> None:
        processed.extend(w for m in messages for w in m.data["windows"])

    # The cloud-forwarder's view: it uploads what arrives on alerts/+.
    forwarder = bus_for(stack, "cloud-forwarder", keyring=keyring)
    forwarder.subscribe(topics.all("alerts"), on_alert)
    forwarder.subscribe(topics.all("processed"), on_processed)
    buses = (component.runtime.bus, forwarder)
    for bus in buses:
        await bus.start()
        await bus.wait_connected()
    runner = asyncio.create_task(component.run())
    try:
        await asyncio.wait_for(forwarder.subscribed.wait(), 10)
        # One message: 50 windows of `flood` and one of each genuine device, as a reader would pack them.
        start = 1_795_533_424_000
        flood = [raw_window("flood", start - i * 1000) for i in range(50)]
        first = opened(base, 1, [*flood, raw_window("g1", start), raw_window("g2", start)])
        # Charged once, even when the same batch is handed over again (the bus retrying it after
        # the broker did not acknowledge its processed message).
        assert len(component._admitted(first)) == 7
        await component.handle([first])
        counters = component.runtime.metrics.counters()
        assert counter(counters, "windows_shed", "flood") == 45
        assert counter(counters, "windows") == 5 + 2
        await component.handle([opened(base, 2, [raw_window("g1", start + 1000), raw_window("flood", start + 1000)])])
        await wait_until(lambda: len(processed) == 8, 10, "the admitted windows processed")
        assert sorted((w["device"], w["start"]) for w in processed if w["device"] != "flood") == [
            ("g1", start),
            ("g1", start + 1000),
            ("g2", start),
        ]
        # One sealed flood alert for the device, from the preprocessor, that the forwarder accepts.
        await wait_until(lambda: alerts, 10, "the flood alert")
        (message,) = alerts
        assert message.topic == topics.alerts("flood") and message.src == "preprocessor/fair"
        alert = decode(orjson.dumps(message.data), FloodAlert)
        assert alert.device == "flood" and alert.shed == 46 and "0.01 windows/s" in alert.reason
        # More shed within the interval: counted, not alerted again.
        await component.handle([opened(base, 3, [raw_window("flood", start + 2000)])])
        assert counter(component.runtime.metrics.counters(), "windows_shed", "flood") == 47
        await component._alert_floods()
        assert len(alerts) == 1 and counter(component.runtime.metrics.counters(), "alerts", "flood") == 1
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await component.close()
        for bus in buses:
            await bus.stop()
    # The table was saved: a preprocessor started again knows the devices (and how long they were away).
    again = preprocessor(stack, keyring, base, tmp_path, monkeypatch)
    assert again.buckets is not None and len(again.buckets) == 3


def test_no_limit_when_the_rate_is_zero(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    component = preprocessor(stack, keyring, base, tmp_path, monkeypatch, IOTPIPE_FLOOD_RATE="0")
    message = opened(base, 1, [raw_window("flood", 1_795_533_424_000 - i * 1000) for i in range(50)])
    assert component.buckets is None and len(component._admitted(message)) == 50


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_a_window_breaking_the_contract_still_rejects_its_whole_message(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """The preprocessor decodes a window's readings only once admitted; one that breaks the contract
    makes its message a counted, dead-lettered schema rejection as before, its batch-mates handled."""
    topics = Topics(base)
    proc = spawn("preprocessor", service_env(stack, base, tmp_path, "strict", IOTPIPE_STATUS_INTERVAL="1"), tmp_path)
    processed: list[dict[str, Any]] = []

    async def on_processed(messages: Sequence[Opened[Any]]) -> None:
        processed.extend(w for m in messages for w in m.data["windows"])

    watcher = bus_for(stack, "cloud-forwarder", keyring=keyring)
    watcher.subscribe(topics.all("processed"), on_processed)
    producer = bus_for(stack, "sensor-reader", keyring=keyring)
    start = 1_795_533_424_000
    bad = raw_window("g9", start) | {"sensors": {"t": {"unit": "degC", "t": [start + 5000], "v": [1.0]}}}
    try:
        for bus in (watcher, producer):
            await bus.start()
            await bus.wait_connected()
        await asyncio.wait_for(watcher.subscribed.wait(), 10)
        await wait_online(stack, topics.service_status("preprocessor", "strict"))
        for windows in ([raw_window("g1", start)], [raw_window("g2", start), bad], [raw_window("g3", start)]):
            await producer.publish_sealed(topics.raw("r1"), {"windows": windows})
        await wait_until(lambda: len(processed) == 2, 30, "the two valid messages processed")
        assert sorted(w["device"] for w in processed) == ["g1", "g3"]
        await wait_until(lambda: (tmp_path / "dead.jsonl").exists(), 10, "the dead letter")
        (dead,) = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
        assert dead["reason"] == "schema" and "outside the window" in dead["error"] and dead["seq"] == 2
        await wait_until(
            lambda: counter(service_counters(tmp_path, "preprocessor", "strict"), "rejected", "schema") == 1,
            10,
            "the rejection counted",
        )
    finally:
        for bus in (watcher, producer):
            await bus.stop()
        stop_all([proc])
