"""A device's `fault` (its status and the alert that reaches the cloud) comes only from the
sensor-reader's sealed health report (`<base>/v2/health/<source>`, docs/contract.md), never from the
plaintext service status, which anyone holding the sensor-reader's MQTT password can write.

The monitor runs in-process (`serve`, its whole lifecycle) on the real broker; third-party watchers
see what it publishes: device statuses (the read-only user) and alerts (the cloud-forwarder's user,
with the key ring). Each negative case is followed by a genuine report, handled after it on the same
subscription: once that one's effect is seen, the hostile one has been handled too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet
from fakes.uart import PMS5003Emulator
from iotpipe import (
    MAX_HEALTH_VALID_MS,
    Alert,
    HealthReport,
    KeyRing,
    Opened,
    PermanentError,
    PlainMessage,
    Runtime,
    SchemaError,
    Sealer,
    Topics,
    counter,
    decode,
    serve,
)
from monitor.service import Monitor, Settings
from sensor_reader.service import SensorReader
from sensor_reader.service import Settings as ReaderSettings
from servers import TAP, Stack, bus_for, service_env, spawn, stop_all, wait_online, wait_until


class Watch:
    """What the monitor published, as third parties see it: device statuses and alerts."""

    def __init__(self) -> None:
        self.devices: dict[str, list[dict[str, Any]]] = {}  # device -> its statuses, in order
        self.alerts: list[Alert] = []
        self.wire: list[PlainMessage[None]] = []

    def state(self, device: str) -> object:
        history = self.devices.get(device)
        return history[-1]["state"] if history else None

    def alerted(self, device: str, kind: str) -> int:
        return sum(1 for a in self.alerts if a.device == device and a.kind == kind)

    async def on_wire(self, messages: Sequence[PlainMessage[None]]) -> None:
        for m in messages:
            self.wire.append(m)
            if "/status/device/" in m.topic and m.payload:
                self.devices.setdefault(Topics.device_of(m.topic), []).append(orjson.loads(m.payload))

    async def on_alert(self, messages: Sequence[Opened[Alert]]) -> None:
        self.alerts.extend(m.data for m in messages)


@contextlib.asynccontextmanager
async def watching(stack: Stack, keyring: KeyRing, base: str) -> AsyncIterator[Watch]:
    watch = Watch()
    topics = Topics(base)
    wire = bus_for(stack, TAP)
    wire.subscribe(f"{topics.root}/#", watch.on_wire, sealed=False)
    alerts = bus_for(stack, "cloud-forwarder", keyring=keyring)
    alerts.subscribe(topics.all("alerts"), watch.on_alert, model=Alert)
    for bus in (wire, alerts):
        await bus.start()
        await bus.wait_connected()
        await asyncio.wait_for(bus.subscribed.wait(), 10)
    try:
        yield watch
    finally:
        for bus in (wire, alerts):
            await bus.stop()


@contextlib.asynccontextmanager
async def monitor_running(
    stack: Stack, base: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, **env: str
) -> AsyncIterator[Monitor]:
    """The monitor as `python -m monitor` runs it (settings from the environment, heartbeat, health
    file, clean stop), in this process so the test can read its state."""
    environment = service_env(stack, base, workdir, "mon", IOTPIPE_CHECK_INTERVAL="0.2", **env)
    for key, value in environment.items():
        if key.startswith("IOTPIPE_"):
            monkeypatch.setenv(key, value)
    made: list[Monitor] = []

    def factory(runtime: Any) -> Monitor:
        made.append(Monitor(runtime))
        return made[0]

    stop = asyncio.Event()
    task = asyncio.create_task(serve(Settings.load(), factory, stop))
    await wait_online(stack, Topics(base).service_status("monitor", "mon"))
    try:
        yield made[0]
    finally:
        stop.set()
        await task


def rejected(monitor: Monitor, reason: str) -> float:
    return counter(monitor.runtime.metrics.counters(), "rejected", reason)


def dead_letters(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "dead.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def report(valid_for: int = 60_000, **devices: tuple[str, str | None]) -> dict[str, Any]:
    """A HealthReport payload: device -> (state, reason)."""
    entries = {d: {"state": s, **({"reason": r} if r else {})} for d, (s, r) in devices.items()}
    return {"valid_for": valid_for, "devices": entries}


async def test_a_forged_plaintext_status_claiming_a_fault_changes_no_device(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10, case 4: the sensor-reader's MQTT password alone (no key ring) must not make the
    monitor call a device `fault` or send a fault alert to the cloud."""
    topics = Topics(base)
    forger = bus_for(stack, "sensor-reader")  # the password, not the key ring
    reader = bus_for(stack, "sensor-reader", keyring=keyring)
    async with watching(stack, keyring, base) as watch, monitor_running(stack, base, tmp_path, monkeypatch) as monitor:
        for bus in (forger, reader):
            await bus.start()
            await bus.wait_connected()
        try:
            forged = {
                "state": "online",
                "client_id": "sensor-reader-evil",
                "ts": time.time_ns() // 1_000_000,
                "devices": {"victim": {"state": "fault", "reason": "forged: chip on fire"}},
            }
            evil = topics.service_status("sensor-reader", "evil")
            await forger.publish(evil, orjson.dumps(forged), retain=True)
            # Handled in order after the forged status: once it is known, the forgery was handled.
            await forger.publish(topics.service_status("sensor-reader", "later"), orjson.dumps(forged), retain=True)
            await wait_until(lambda: "sensor-reader/later" in monitor.services, 20, "the statuses handled")
            assert monitor.services["sensor-reader/evil"]["state"] == "online"  # still shown: display only
            assert "victim" not in monitor.device_state
            assert counter(monitor.runtime.metrics.counters(), "alerts", "fault") == 0

            # A genuine sealed report still makes a fault, and its alert is the only one the cloud gets.
            await reader.publish_sealed(topics.health("r1"), report(real=("fault", "bus: no ACK")))
            await wait_until(lambda: watch.alerted("real", "fault") == 1, 20, "the genuine fault alert")
            await wait_until(lambda: watch.state("real") == "fault", 20, "the genuine fault status")
            assert watch.devices["real"][-1]["reason"] == "bus: no ACK"
            assert [a.device for a in watch.alerts] == ["real"]
            assert "victim" not in watch.devices
        finally:
            for bus in (forger, reader):
                await bus.stop()


def sealed_at(keyring_file: Path, topic: str, data: Any, at: float) -> bytes:
    """An authentic envelope (the contract's wire format) sealed as if at unix time `at`."""
    kid, key = next(line.split() for line in keyring_file.read_text().splitlines() if line.strip()[:1] not in "#")
    inner = {"topic": topic, "src": "sensor-reader/past", "boot": uuid.uuid4().hex[:16], "seq": 1, "ts": int(at * 1000)}
    token = Fernet(key.encode()).encrypt_at_time(orjson.dumps({**inner, "data": data}), int(at))
    return orjson.dumps({"v": 1, "alg": "fernet", "kid": kid, "ct": token.decode("ascii")})


async def test_health_reports_that_are_not_genuine_and_current_are_refused_and_counted(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(base)
    health = topics.health("r1")
    reader = bus_for(stack, "sensor-reader", keyring=keyring)
    async with watching(stack, keyring, base) as watch, monitor_running(stack, base, tmp_path, monkeypatch) as monitor:
        await reader.start()
        await reader.wait_connected()
        barriers = 0

        async def genuine_barrier() -> None:
            """A genuine fault on a device of its own: seen, so everything before it was handled."""
            nonlocal barriers
            barriers += 1
            device = f"barrier-{barriers}"
            await reader.publish_sealed(health, report(**{device: ("fault", "bus: barrier")}))
            await wait_until(lambda: watch.state(device) == "fault", 20, f"{device} fault")

        try:
            fault = report(victim=("fault", "forged"))
            # Plaintext JSON on the health topic (the password alone): not an envelope.
            await reader.publish(health, orjson.dumps(fault))
            # Sealed with a key that is not in the ring.
            stranger = Sealer(KeyRing([("k9", Fernet.generate_key())]), "sensor-reader/r1")
            await reader.publish(health, stranger.seal(health, fault))
            # A genuine message for another topic (a raw batch), re-published on the health topic.
            raw = reader.sealer.seal(topics.raw("r1"), fault)  # type: ignore[union-attr]
            await reader.publish(health, raw)
            # Genuine, but its validity ended long before it arrived.
            await reader.publish(health, sealed_at(stack.secrets_dir / "keyring", health, fault, time.time() - 120))
            await genuine_barrier()
            assert watch.state("victim") is None and watch.alerted("victim", "fault") == 0
            for reason in ("malformed", "undecryptable", "topic_mismatch", "expired"):
                assert rejected(monitor, reason) == 1, reason
            letters = dead_letters(tmp_path)
            assert sorted(letter["reason"] for letter in letters) == [
                "expired",
                "malformed",
                "topic_mismatch",
                "undecryptable",
            ]
            assert all(letter["topic"] == health for letter in letters)
            assert next(x for x in letters if x["reason"] == "expired")["src"] == "sensor-reader/past"

            # A genuine fault, then the same reader's all-clear; the fault re-published is a replay.
            captured = reader.sealer.seal(health, report(replayed=("fault", "bus: it was")))  # type: ignore[union-attr]
            await reader.publish(health, captured)
            await wait_until(lambda: watch.state("replayed") == "fault", 20, "the genuine fault")
            await reader.publish_sealed(health, report(replayed=("online", None)))
            await wait_until(lambda: watch.state("replayed") == "offline", 20, "the fault over (no data: offline)")
            await reader.publish(health, captured)
            await genuine_barrier()
            assert watch.state("replayed") == "offline" and watch.alerted("replayed", "fault") == 1
            assert rejected(monitor, "duplicate") == 1  # counted, not dead-lettered (a QoS 1 resend looks alike)
            assert watch.alerted("barrier-2", "fault") == 1  # genuine reports kept flowing throughout
        finally:
            await reader.stop()


async def test_a_fault_not_renewed_ends_with_its_validity(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that stops reporting (it died) cannot leave a device `fault` for ever: once the last
    report's `valid_for` has passed, the device is online or offline by its data."""
    topics = Topics(base)
    reader = bus_for(stack, "sensor-reader", keyring=keyring)
    async with watching(stack, keyring, base) as watch, monitor_running(stack, base, tmp_path, monkeypatch) as monitor:
        await reader.start()
        await reader.wait_connected()
        try:
            await reader.publish_sealed(topics.health("r1"), report(2000, lapsed=("fault", "timeout: no answer")))
            await wait_until(lambda: watch.state("lapsed") == "fault", 20, "the fault")
            faulted = time.monotonic()
            await wait_until(lambda: watch.state("lapsed") == "offline", 20, "the fault to lapse")
            assert time.monotonic() - faulted > 1.0  # it held while valid
            assert watch.devices["lapsed"][-1]["reason"].startswith("no data")
            assert "lapsed" not in monitor.reported
        finally:
            await reader.stop()


async def test_only_the_sensor_reader_may_publish_health_and_only_the_monitor_reads_it(
    stack: Stack, keyring: KeyRing, base: str
) -> None:
    """The ACL (mosquitto/acl): a key holder that is not the reader (the preprocessor) cannot
    publish a report; of the services, only the monitor receives them (third parties see them
    sealed, like the data)."""
    topics = Topics(base)
    got: list[str] = []
    cache_writer = bus_for(stack, "cache-writer", keyring=keyring)  # a pipeline user that must not read it

    async def on_any(messages: Sequence[Opened[Any]]) -> None:
        got.extend(m.topic for m in messages)

    cache_writer.subscribe(f"{topics.root}/#", on_any)
    reader = bus_for(stack, "sensor-reader", keyring=keyring)
    preprocessor = bus_for(stack, "preprocessor", keyring=keyring)
    third_party = bus_for(stack, "monitor", keyring=keyring)  # reads health, may not write it
    buses = (cache_writer, reader, preprocessor, third_party)
    for bus in buses:
        await bus.start()
        await bus.wait_connected()
    try:
        await asyncio.wait_for(cache_writer.subscribed.wait(), 10)
        fault = report(victim=("fault", "forged"))
        for forger in (preprocessor, third_party):
            with pytest.raises(PermanentError, match="refused"):
                await forger.publish_sealed(topics.health("r1"), fault)
        await reader.publish_sealed(topics.health("r1"), fault)  # its own topic: accepted
        await preprocessor.publish_sealed(topics.processed("p1"), {"windows": []})  # what cache-writer may read
        await wait_until(lambda: got, 10, "the processed message")
        assert got == [topics.processed("p1")]
    finally:
        for bus in buses:
            await bus.stop()


def test_the_health_report_model_refuses_what_the_contract_does_not_allow() -> None:
    topic = "iotpipe/v2/health/r1"
    ok = decode(orjson.dumps(report(30_000, d1=("fault", "bus: x"), d2=("online", None))), HealthReport, topic)
    assert ok.valid_for == 30_000 and ok.devices["d1"].reason == "bus: x" and ok.devices["d2"].reason is None
    for bad, why in (
        ({"valid_for": 0, "devices": {"d1": {"state": "online"}}}, "valid_for"),
        ({"valid_for": MAX_HEALTH_VALID_MS + 1, "devices": {"d1": {"state": "online"}}}, "valid_for"),
        ({"valid_for": 1000, "devices": {}}, "devices"),
        ({"valid_for": 1000, "devices": {"d/1": {"state": "online"}}}, "devices"),
        ({"valid_for": 1000, "devices": {"d1": {"state": "melting"}}}, "state"),
        ({"valid_for": 1000, "devices": {"d1": {"state": "fault", "reason": "x" * 201}}}, "reason"),
        ({"valid_for": 1000, "devices": {"d1": {"state": "online", "extra": 1}}}, "extra"),
        ({"valid_for": 1000, "devices": {"d1": {"state": "online"}}, "until": 5}, "until"),
    ):
        with pytest.raises(SchemaError, match=why):
            decode(orjson.dumps(bad), HealthReport, topic)


def test_a_large_fleets_health_is_split_into_reports_that_each_fit_sealed(
    secrets_dir: Path, keyring: KeyRing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every device is in exactly one report, and each report, sealed, is within the payload limit
    (a device failing with a long reason full of control characters included)."""
    count = 2000
    devices = tmp_path / "devices.toml"
    devices.write_text("".join(f'[[devices]]\nid = "dev-{i:05d}"\ndriver = "simulated"\n\n' for i in range(count)))
    monkeypatch.setenv("IOTPIPE_SECRETS_DIR", str(secrets_dir))
    settings = ReaderSettings.load(
        devices_file=devices, max_payload_bytes=8192, spool_max_bytes=0, status_interval=10, instance="r1"
    )
    reader = SensorReader(Runtime(settings, keyring=keyring))
    reader.pollers["dev-00007"].state = "fault"
    reader.pollers["dev-00007"].reason = "\x01" * 500
    reports = list(reader.health_reports())
    assert len(reports) > 1
    topic = Topics().health("r1")
    named: list[str] = []
    for payload in reports:
        sealed = Sealer(keyring, "sensor-reader/r1").seal(topic, payload)
        assert len(sealed) <= 8192
        data = decode(orjson.dumps(payload), HealthReport, topic)
        assert data.valid_for == 30_000
        named.extend(data.devices)
    assert sorted(named) == sorted(reader.pollers)
    failing = next(decode(orjson.dumps(p), HealthReport, topic) for p in reports if "dev-00007" in p["devices"])
    assert failing.devices["dev-00007"].state == "fault" and len(failing.devices["dev-00007"].reason or "") == 200


DEVICES = """
[[devices]]
id = "sim-1"
driver = "simulated"
interval = 0.05
[devices.params]
sensors = ["temperature"]

# Its serial port does not exist until the test plugs the sensor in (a symlink to a pty).
[[devices]]
id = "pm-1"
driver = "pms5003"
interval = 0.2
[devices.params]
port = "{port}"
mode = "passive"
frame_timeout = 0.5
"""


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_real_sensor_reader_reports_a_failing_device_sealed_and_its_recovery(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(base)
    port = tmp_path / "ttyPMS"
    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES.format(port=port))
    env = service_env(
        stack,
        base,
        tmp_path,
        "hr",
        IOTPIPE_DEVICES_FILE=str(devices),
        IOTPIPE_WINDOW_MS="500",
        IOTPIPE_WINDOW_GRACE_MS="100",
        IOTPIPE_STATUS_INTERVAL="1",
        IOTPIPE_FAULT_AFTER="2",
        IOTPIPE_REOPEN_AFTER="1",
        IOTPIPE_READ_RETRIES="0",
        IOTPIPE_READ_TIMEOUT="1",
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with (
            watching(stack, keyring, base) as watch,
            monitor_running(stack, base, tmp_path, monkeypatch, IOTPIPE_STATUS_INTERVAL="1") as monitor,
        ):
            procs.append(spawn("preprocessor", env, tmp_path))
            await wait_online(stack, topics.service_status("preprocessor", "hr"))
            procs.append(spawn("sensor_reader", env, tmp_path))
            await wait_until(lambda: watch.state("sim-1") == "online", 60, "sim-1 online")

            # The unplugged sensor: the reader reports it failing, sealed; the monitor says fault.
            await wait_until(lambda: watch.state("pm-1") == "fault", 60, "pm-1 fault")
            assert "bus" in watch.devices["pm-1"][-1]["reason"]
            await wait_until(lambda: watch.alerted("pm-1", "fault") == 1, 20, "the fault alert")
            health = [m for m in watch.wire if m.topic == topics.health("hr")]
            assert health and all(set(orjson.loads(m.payload)) == {"v", "alg", "kid", "ct"} for m in health)
            # The plaintext status says so too, for display.
            shown = [
                orjson.loads(m.payload).get("devices", {}).get("pm-1", {}).get("state")
                for m in watch.wire
                if m.topic == topics.service_status("sensor-reader", "hr") and m.payload
            ]
            assert "fault" in shown and monitor.services["sensor-reader/hr"]["state"] == "online"

            # Plugged in: the reader reports it online again, its data flows, the monitor agrees.
            with PMS5003Emulator() as sensor:
                os.symlink(sensor.port, port)
                await wait_until(lambda: watch.state("pm-1") == "online", 90, "pm-1 online again")
                assert watch.alerted("pm-1", "fault") == 1 and watch.state("sim-1") == "online"
                assert [s["state"] for s in watch.devices["pm-1"]].count("fault") == 1
                stop_all(procs)  # before the emulator closes the pty the reader has open
    except BaseException:
        for name in ("sensor_reader", "preprocessor"):
            log = tmp_path / f"{name}.out"
            os.write(2, f"\n===== {name} =====\n{log.read_text(errors='replace')[-3000:]}".encode())
        raise
    finally:
        stop_all(procs)
