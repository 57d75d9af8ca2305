"""The whole pipeline as real subprocesses against the real broker and Redis.

Every reading the reader published is accounted for, window by window, in Redis and at the
cloud-sink, with the aggregates the contract defines for those readings (computed independently in
tests/window_reference.py); the wire carries only sealed envelopes and status JSON; statuses flip offline on a clean
stop and on kill -9 (Last Will); the monitor reports devices offline once they fall silent.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from iotpipe import KeyRing, Opener, PlainMessage
from servers import TAP, Stack, bus_for, free_port, pipeline_env, spawn, stop_all, unseal, wait_until
from test_broker import raw_connect
from window_reference import mismatches

SERVICES = ("cloud_sink", "sensor_reader", "preprocessor", "cache_writer", "cloud_forwarder", "monitor")
STATUS_NAMES = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor")

DEVICES = """
[[devices]]
id = "dev-a"
driver = "simulated"
interval = 0.02
[devices.params]
sensors = ["temperature", "humidity"]
spike_probability = 0.05
dropout_probability = 0.05

# No SPI bus 99 exists: opening it fails every time, as an unplugged ADC would.
[[devices]]
id = "dead-adc"
driver = "mcp3008"
interval = 0.05
[devices.params]
bus = 99
[devices.params.channels.soil]
channel = 0
unit = "%"
min = 0.0
max = 100.0

[[devices]]
id = "dev-b"
driver = "simulated"
interval = 0.05
[devices.params]
sensors = ["pressure"]
"""


class Wire:
    """A third-party view of the broker: the read-only user subscribed to <base>/v2/#."""

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring
        self.opener = Opener(keyring)
        self.messages: list[PlainMessage] = []
        self.readings: dict[tuple[str, str, int], int] = {}  # (device, sensor, window start) -> n
        # (device, sensor, window start) -> (unit, end, the values the reader published)
        self.raw_values: dict[tuple[str, str, int], tuple[str, int, list[float]]] = {}
        self.status: dict[str, dict[str, object]] = {}
        self.processed: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.processed_by: set[str] = set()
        self.changed = asyncio.Event()

    async def handle(self, messages: Sequence[PlainMessage]) -> None:
        for m in messages:
            self.messages.append(m)
            kind = m.topic.split("/")[2]
            if kind == "raw":
                opened = self.opener.open(m.topic, m.payload)
                self.opener.commit(opened)
                for window in opened.data["windows"]:
                    start = window["window"]["start"]
                    for sensor, body in window["sensors"].items():
                        self.readings[(window["device"], sensor, start)] = len(body["v"])
                # The readings, as sealed by the reader.
                for raw in unseal(self.keyring, m.payload)["data"]["windows"]:
                    start, end = raw["window"]["start"], raw["window"]["start"] + raw["window"]["size"]
                    for sensor, body in raw["sensors"].items():
                        self.raw_values[(raw["device"], sensor, start)] = (body["unit"], end, body["v"])
            elif kind == "processed":
                opened = self.opener.open(m.topic, m.payload)
                self.opener.commit(opened)
                self.processed_by.add(opened.src)
                for w in opened.data["windows"]:
                    self.processed[(w["device"], w["sensor"], w["start"])] += 1
            elif kind == "status" and m.payload:
                self.status["/".join(m.topic.split("/")[3:])] = orjson.loads(m.payload)
        self.changed.set()

    def state(self, key: str) -> object:
        return self.status.get(key, {}).get("state")


@pytest.fixture
async def pipeline(stack: Stack, keyring: KeyRing, base: str, tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    sink_port = free_port()
    env = pipeline_env(
        stack,
        base,
        tmp_path,
        "e2e",
        DEVICES,
        sink_port,
        IOTPIPE_OFFLINE_AFTER="3",
        IOTPIPE_FIT_INTERVAL="2",
        IOTPIPE_LOG_DIR=str(tmp_path / "log"),
    )
    wire = Wire(keyring)
    watcher = bus_for(stack, TAP)
    watcher.subscribe(f"{base}/v2/#", wire.handle, sealed=False)
    await watcher.start()
    await watcher.wait_connected()
    await asyncio.wait_for(watcher.subscribed.wait(), 10)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(service: str, name: str | None = None, **extra_env: str) -> None:
        procs[name or service] = spawn(service, {**env, **extra_env}, tmp_path, name)

    for service in SERVICES:
        if service != "sensor_reader":
            start(service)
    # A second preprocessor in the same shared subscription: windows must still be processed once.
    start("preprocessor", "preprocessor_2", IOTPIPE_INSTANCE="e2e-2")
    try:
        yield {"wire": wire, "procs": procs, "sink": f"http://127.0.0.1:{sink_port}", "tmp": tmp_path, "start": start}
    finally:
        stop_all(procs.values())
        await watcher.stop()


async def sink_records(url: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/records") as response:
        return await response.json()  # type: ignore[no-any-return]


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_every_reading_is_accounted_for(
    pipeline: dict[str, object], stack: Stack, base: str, redis_reader_password: str
) -> None:
    wire: Wire = pipeline["wire"]  # type: ignore[assignment]
    procs: dict[str, subprocess.Popen[bytes]] = pipeline["procs"]  # type: ignore[assignment]
    sink: str = pipeline["sink"]  # type: ignore[assignment]
    tmp: Path = pipeline["tmp"]  # type: ignore[assignment]

    try:
        # Consumers first: on a broker that has never seen them, their durable sessions begin when they
        # first subscribe (each publishes `online` right after its SUBSCRIBE, so online means subscribed).
        await wait_until(
            lambda: (
                all(wire.state(f"service/{n}/e2e") == "online" for n in STATUS_NAMES[1:])
                and wire.state("service/preprocessor/e2e-2") == "online"
            ),
            60,
            "every consumer to report online",
        )
        pipeline["start"]("sensor_reader")  # type: ignore[operator]
        await wait_until(lambda: wire.state("service/sensor-reader/e2e") == "online", 30, "the reader online")
        await wait_until(lambda: len({k[2] for k in wire.readings}) >= 6, 60, "six windows of raw readings")
        await wait_until(
            lambda: wire.state("device/dev-a") == "online" and wire.state("device/dev-b") == "online",
            30,
            "the monitor to publish devices online",
        )

        # A device that keeps failing is `fault` with the reason, while the others keep flowing.
        await wait_until(lambda: wire.state("device/dead-adc") == "fault", 30, "dead-adc reported fault")
        assert "bus" in str(wire.status["device/dead-adc"]["reason"])

        def reader_counters() -> dict[str, object]:
            devices = wire.status.get("service/sensor-reader/e2e", {}).get("devices") or {}
            return devices.get("dead-adc", {})  # type: ignore[no-any-return, union-attr]

        # Per-device counters in the reader's own (retained) status: errors by kind, bus reopens.
        await wait_until(lambda: reader_counters().get("reopens", 0) >= 1, 20, "dead-adc reopen counted")
        assert reader_counters()["errors"]["bus"] >= 3 and reader_counters()["state"] == "fault"

        # Clean stop of the reader: it publishes its own `offline` and its last window first.
        procs["sensor_reader"].send_signal(signal.SIGTERM)
        assert procs["sensor_reader"].wait(30) == 0
        await wait_until(lambda: wire.state("service/sensor-reader/e2e") == "offline", 15, "reader offline")
        published = dict(wire.readings)
        total = sum(published.values())
        assert total > 100

        redis = aioredis.Redis(
            port=stack.ports.redis, username="reader", password=redis_reader_password, decode_responses=True
        )

        async def in_redis() -> dict[tuple[str, str, int], int]:
            found = {}
            for device, sensor in {(d, s) for d, s, _ in published}:
                for member in await redis.zrange(f"{base}:series:{device}:{sensor}", 0, -1):
                    window = orjson.loads(member)
                    found[(device, sensor, window["start"])] = window["n"]
            return found

        async def at_sink() -> dict[tuple[str, str, int], int]:
            return {
                (r["device"], r["sensor"], r["start"]): r["n"]
                for r in await sink_records(sink)
                if r["type"] == "window"
            }

        async def redis_done() -> bool:
            return await in_redis() == published

        async def sink_done() -> bool:
            return await at_sink() == published

        try:
            await wait_until(redis_done, 30, "every published window in Redis")
            await wait_until(sink_done, 30, "every published window at the cloud-sink")
        except AssertionError:
            got_redis, got_sink = await in_redis(), await at_sink()
            missing = {k: v for k, v in published.items() if got_redis.get(k) != v}
            missing_sink = {k: v for k, v in published.items() if got_sink.get(k) != v}
            raise AssertionError(
                f"{len(published)} windows published; not in Redis as published: "
                f"{sorted(missing.items())[:10]} (extra: {len(set(got_redis) - set(published))}); "
                f"not at the sink: {sorted(missing_sink.items())[:10]}"
            ) from None
        assert sum((await in_redis()).values()) == total

        # Values, not only counts: every window in Redis and at the cloud-sink carries the contract's
        # aggregates of the readings the reader published for it, exactly (window_reference.mismatches:
        # rounded to 6 decimals; only a true value on a rounding tie may come out either way).
        def wrong_aggregates(windows: list[tuple[str, dict[str, object]]]) -> list[str]:
            problems = []
            for device, w in windows:
                unit, end, values = wire.raw_values[(device, str(w["sensor"]), int(w["start"]))]  # type: ignore[call-overload]
                found = mismatches(w, values)
                if (w["unit"], w["end"]) != (unit, end):
                    found.append(f"unit/end {w['unit']}/{w['end']}, want {unit}/{end}")
                problems += [f"{device}/{w['sensor']}/{w['start']}: {p}" for p in found]
            return problems

        stored = [
            (device, orjson.loads(member))
            for device, sensor in {(d, s) for d, s, _ in published}
            for member in await redis.zrange(f"{base}:series:{device}:{sensor}", 0, -1)
        ]
        uploaded = [(str(r["device"]), r) for r in await sink_records(sink) if r["type"] == "window"]
        assert len(stored) == len(published) and len(uploaded) >= len(published)
        for where, windows in (("Redis", stored), ("the cloud-sink", uploaded)):
            wrong = wrong_aggregates(windows)
            assert not wrong, f"{len(wrong)} aggregates in {where} differ from the contract's: {wrong[:5]}"
        # Two preprocessors shared the raw stream, and every window was processed exactly once.
        assert set(wire.processed) == set(published) and set(wire.processed.values()) == {1}
        assert wire.processed_by == {"preprocessor/e2e", "preprocessor/e2e-2"}
        latest = await redis.hgetall(f"{base}:latest:dev-a")
        assert set(latest) == {"temperature", "humidity"} and all(float(v) for v in latest.values())
        await redis.aclose()

        # Silence → the monitor calls both devices offline, and the alert reaches the cloud.
        await wait_until(lambda: wire.state("device/dev-a") == "offline", 20, "dev-a offline")

        async def offline_alert_at_sink() -> bool:
            return any(r["type"] == "alert" and r.get("kind") == "offline" for r in await sink_records(sink))

        await wait_until(offline_alert_at_sink, 20, "the offline alert at the cloud-sink")

        # kill -9: no clean shutdown, so the broker publishes the Last Will.
        procs["preprocessor"].send_signal(signal.SIGKILL)
        procs["preprocessor"].wait(10)
        await wait_until(lambda: wire.state("service/preprocessor/e2e") == "offline", 15, "preprocessor Will")

        # The wire: only sealed envelopes on pipeline topics, only status JSON on status topics.
        for m in wire.messages:
            kind = m.topic.split("/")[2]
            doc = orjson.loads(m.payload) if m.payload else None
            if kind in ("raw", "processed", "health", "alerts"):
                assert set(doc) == {"v", "alg", "kid", "ct"} and doc["v"] == 1 and doc["alg"] == "fernet"
            else:
                assert (kind == "status" and doc is None) or doc["state"] in ("online", "offline", "fault")
        assert {m.topic.split("/")[2] for m in wire.messages} >= {"raw", "processed", "health", "alerts", "status"}

        assert raw_connect(stack, None, None) != "Success"  # anonymous refused on the pipeline's broker
        for service in ("cache_writer", "cloud_forwarder", "monitor", "cloud_sink"):
            assert procs[service].poll() is None, f"{service} died"
        assert not (tmp / "dead.jsonl").exists()
    except BaseException:
        for service in (*SERVICES, "preprocessor_2"):
            out = (tmp / f"{service}.out").read_text(errors="replace")[-3000:]
            os.write(2, f"\n===== {service} =====\n{out}".encode())
        raise
