"""The exporter (services/exporter) against the real brokers: what a third party holding only the
`reader` password sees on the public broker, read with mosquitto_sub (not with our code): each
device's state within 5 s of its window closing, units and per-sensor values, availability that
flips, a per-device rate limit, the exporter's Last Will, and Home Assistant discovery configs
checked against Home Assistant's own rules for every simulated sensor kind, removed when the device
goes away."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from iotpipe import KeyRing, Topics, counter
from iotpipe._health import check_health
from iotpipe._settings import health_file_for
from iotpipe.devstack import mqtt_password_file
from servers import (
    TAP,
    Stack,
    bus_for,
    free_port,
    health_doc,
    processed_payload,
    service_env,
    spawn,
    stop_all,
    wait_online,
    wait_until,
)

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto_sub (make deps)")


class PublicSub:
    """mosquitto_sub logged in to the public broker as a third party (`reader`): every message it
    prints, with when it arrived."""

    def __init__(self, stack: Stack, *filters: str, user: str = "reader") -> None:
        password = mqtt_password_file(stack.secrets_dir, user).read_text().strip()
        argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(stack.ports.public), "-u", user, "-P", password]
        argv += ["-i", f"{user}-{uuid.uuid4().hex[:8]}", "-q", "1", "-F", "%r %t %p"]
        for topic_filter in filters:
            argv += ["-t", topic_filter]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.messages: list[tuple[float, bool, str, str]] = []  # (arrived, retained, topic, payload)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            retained, topic, payload = ([*line.rstrip("\n").split(" ", 2), "", ""])[:3]
            self.messages.append((time.time(), retained == "1", topic, payload))

    def on(self, topic: str) -> list[str]:
        return [payload for _, _, t, payload in list(self.messages) if t == topic]

    def latest(self, topic: str) -> str | None:
        payloads = self.on(topic)
        return payloads[-1] if payloads else None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def window(device: str, sensor: str, unit: str, end: int, mean: float) -> dict[str, Any]:
    return {
        "device": device,
        "sensor": sensor,
        "unit": unit,
        "start": end - 1000,
        "end": end,
        "n": 10,
        "mean": mean,
        "median": mean,
        "min": mean - 1,
        "max": mean + 1,
        "std": 0.5,
    }


class Rig:
    """An exporter process and a sealed-window publisher (the `preprocessor` user) for one test."""

    def __init__(self, stack: Stack, keyring: KeyRing, base: str, workdir: Path, **env: str) -> None:
        self.stack, self.base, self.workdir = stack, base, workdir
        self.topics = Topics(base)
        self.env = service_env(
            stack,
            base,
            workdir,
            "t1",
            **{
                "IOTPIPE_PUBLIC__HOST": "127.0.0.1",
                "IOTPIPE_PUBLIC__PORT": str(stack.ports.public),
                "IOTPIPE_STATUS_INTERVAL": "1",
                "IOTPIPE_CHECK_INTERVAL": "0.2",
                "IOTPIPE_HA_PREFIX": f"{base}ha",
                **env,
            },
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.publisher = bus_for(stack, "preprocessor", keyring=keyring)

    def start(self) -> None:
        self.proc = spawn("exporter", self.env, self.workdir)

    async def __aenter__(self) -> Rig:
        await self.publisher.start()
        await self.publisher.wait_connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        stop_all([self.proc])
        await self.publisher.stop()

    async def send(self, *windows: dict[str, Any]) -> None:
        device = windows[0]["device"]
        await self.publisher.publish_sealed(
            self.topics.processed("test"), processed_payload(device, windows), kind="processed"
        )

    async def online(self, sub: PublicSub) -> None:
        """The exporter is up on both brokers: its retained state on the public broker says online
        (so `sub` is subscribed too), and its status on the pipeline broker (so it has subscribed)."""
        await wait_until(lambda: sub.latest(self.topics.exporter_state) == "online", 30, "the exporter online")
        await wait_online(self.stack, self.topics.service_status("exporter", "t1"))

    def log(self) -> str:
        path = self.workdir / "exporter.out"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "health").mkdir()
    return tmp_path


async def test_a_third_party_reads_each_device_state_within_5_s_of_its_window_closing(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    topics = Topics(base)
    dev = f"{topics.root}/devices"
    sub = PublicSub(stack, f"{dev}/#", topics.exporter_state)
    # What the exporter may do on the pipeline broker: nothing plaintext ever appears there.
    tap_seen: list[str] = []

    async def on_any(messages: Any) -> None:
        tap_seen.extend(m.topic for m in messages)

    tap = bus_for(stack, TAP)
    tap.subscribe(f"{base}/#", on_any, sealed=False)
    await tap.start()
    await tap.wait_connected()
    await asyncio.wait_for(tap.subscribed.wait(), 10)
    try:
        async with Rig(stack, keyring, base, workdir, IOTPIPE_STATE_INTERVAL="0.2") as rig:
            rig.start()
            await rig.online(sub)
            for round_ in range(3):
                end = _now_ms()
                await rig.send(
                    window("greenhouse-1", "temperature", "degC", end, 21.5 + round_),
                    window("greenhouse-1", "humidity", "%RH", end, 48.25),
                )
                await rig.send(window("weather-station", "pm2_5", "ug/m3", end, 12.0 + round_))
                want = {"temperature": 21.5 + round_, "humidity": 48.25, "ts": end}
                await wait_until(
                    lambda w=want: any(orjson.loads(p or "null") == w for p in sub.on(f"{dev}/greenhouse-1/state")),
                    10,
                    f"greenhouse-1's state of round {round_}",
                )
                for device, state in (("greenhouse-1", want), ("weather-station", {"pm2_5": 12.0 + round_, "ts": end})):
                    await wait_until(
                        lambda d=device, s=state: any(
                            orjson.loads(p or "null") == s for p in sub.on(f"{dev}/{d}/state")
                        ),
                        10,
                        f"{device}'s state",
                    )
                    arrived = next(
                        at
                        for at, _, topic, payload in sub.messages
                        if topic == f"{dev}/{device}/state" and orjson.loads(payload) == state
                    )
                    assert arrived - end / 1000 < 5.0, f"{device}: {arrived - end / 1000:.2f} s after the window closed"
            assert sub.latest(f"{dev}/greenhouse-1/units") == '{"temperature":"degC","humidity":"%RH"}'
            assert sub.latest(f"{dev}/weather-station/units") == '{"pm2_5":"ug/m3"}'
            assert float(sub.latest(f"{dev}/greenhouse-1/sensor/temperature") or "nan") == 23.5
            assert float(sub.latest(f"{dev}/greenhouse-1/sensor/humidity") or "nan") == 48.25
            assert sub.latest(f"{dev}/greenhouse-1/availability") == "online"
            # A window older than the one shown does not move the state back.
            await rig.send(window("greenhouse-1", "temperature", "degC", end - 5000, -40.0))
            await rig.send(window("greenhouse-1", "temperature", "degC", _now_ms(), 30.0))
            await wait_until(
                lambda: float(sub.latest(f"{dev}/greenhouse-1/sensor/temperature") or "nan") == 30.0, 10, "newest"
            )
            assert -40.0 not in [float(p) for p in sub.on(f"{dev}/greenhouse-1/sensor/temperature")]
        # A late subscriber gets everything retained at once.
        late = PublicSub(stack, f"{dev}/greenhouse-1/#")
        try:
            await wait_until(lambda: late.latest(f"{dev}/greenhouse-1/state") is not None, 10, "the retained state")
            assert orjson.loads(late.latest(f"{dev}/greenhouse-1/state") or "{}")["temperature"] == 30.0
        finally:
            late.close()
        projection = [t for t in tap_seen if t.startswith(f"{dev}/") or t == topics.exporter_state]
        assert tap_seen and not projection, "projection on the pipeline broker"
    finally:
        sub.close()
        await tap.stop()


# Home Assistant's rules, from its source (homeassistant/components/sensor/const.py: DEVICE_CLASS_UNITS
# and DEVICE_CLASS_STATE_CLASSES; homeassistant/const.py for the unit strings), for the classes a
# simulated (or real) iotpipe sensor can have.
MICRO_CUBIC = "\u03bcg/m\u00b3"  # Greek small letter mu, as Home Assistant spells micro since 2025
HA_UNITS = {
    "temperature": {"°C", "°F", "K"},
    "humidity": {"%"},
    "moisture": {"%"},
    "illuminance": {"lx"},
    "pressure": {"mPa", "Pa", "hPa", "kPa", "bar", "cbar", "mbar", "mmHg", "inHg", "inH₂O", "psi"},
    "pm1": {MICRO_CUBIC},
    "pm25": {MICRO_CUBIC},
    "pm10": {MICRO_CUBIC},
}
HA_STATE_CLASSES = {key: {"measurement"} for key in HA_UNITS}
# homeassistant/components/mqtt/schemas.py (MQTT_ENTITY_COMMON_SCHEMA, availability), config.py
# (MQTT_RO_SCHEMA) and sensor.py (_PLATFORM_SCHEMA_BASE): every key a sensor's discovery config may have
# (a misspelt one would be dropped silently by Home Assistant's REMOVE_EXTRA).
HA_SENSOR_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device",
    "device_class", "enabled_by_default", "encoding", "entity_category", "expire_after", "force_update",
    "icon", "json_attributes_template", "json_attributes_topic", "last_reset_value_template", "name",
    "object_id", "options", "origin", "payload_available", "payload_not_available", "qos", "state_class",
    "state_topic", "suggested_display_precision", "unique_id", "unit_of_measurement", "value_template",
}  # fmt: skip
HA_DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
    "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
TOPIC_LEVEL = re.compile(r"^[a-zA-Z0-9_-]+$")  # homeassistant/components/mqtt/discovery.py: node_id, object_id
VALUE_TEMPLATE = re.compile(r"^\{\{ value_json\['([A-Za-z0-9_-]+)'\] \}\}$")

# Every sensor kind the simulator has (services/sensor_reader/sensor_reader/drivers/simulated.py), the
# PMS5003's other two, a generic one, and what Home Assistant must make of each.
SIMULATED = {
    "temperature": ("degC", "temperature", "°C"),
    "humidity": ("%RH", "humidity", "%"),
    "pressure": ("hPa", "pressure", "hPa"),
    "soil_moisture": ("%", "moisture", "%"),
    "light": ("lx", "illuminance", "lx"),
    "pm2_5": ("ug/m3", "pm25", MICRO_CUBIC),
    "pm1_0": ("ug/m3", "pm1", MICRO_CUBIC),
    "pm10": ("ug/m3", "pm10", MICRO_CUBIC),
    "level": ("1", None, None),
}


def check_ha_sensor_config(config: dict[str, Any], retained: dict[str, str]) -> str:
    """Check one discovery config as Home Assistant's MQTT sensor schema would; the sensor key its
    value_template reads. `retained`: what the public broker holds, topic -> payload."""
    assert set(config) <= HA_SENSOR_KEYS, set(config) - HA_SENSOR_KEYS
    assert isinstance(config["state_topic"], str) and config["state_topic"] in retained, "state_topic exists"
    match = VALUE_TEMPLATE.match(config["value_template"])
    assert match, config["value_template"]
    key = match.group(1)
    assert isinstance(orjson.loads(retained[config["state_topic"]])[key], float)
    device_class = config.get("device_class")
    if device_class is not None:
        assert config.get("unit_of_measurement") in HA_UNITS[device_class], config
        assert config.get("state_class") in HA_STATE_CLASSES[device_class]
    assert config.get("state_class") in (None, "measurement", "total", "total_increasing")
    assert config["availability_mode"] in ("all", "any", "latest")
    assert config["availability"], "availability"
    for entry in config["availability"]:
        assert set(entry) <= {"topic", "payload_available", "payload_not_available", "value_template"}
        assert retained.get(entry["topic"]) == entry.get("payload_available", "online"), entry["topic"]
    device = config["device"]
    assert set(device) <= HA_DEVICE_KEYS and (device.get("identifiers") or device.get("connections"))
    assert isinstance(config["origin"]["name"], str)
    assert isinstance(config["unique_id"], str) and config["unique_id"]
    assert config.get("qos", 0) in (0, 1, 2)
    return key


async def test_home_assistant_discovery_describes_every_simulated_sensor_and_goes_with_the_device(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    topics = Topics(base)
    prefix = f"{base}ha"
    sub = PublicSub(stack, f"{prefix}/sensor/+/+/config", f"{topics.root}/devices/#", topics.exporter_state)
    try:
        async with Rig(stack, keyring, base, workdir, IOTPIPE_HA_DISCOVERY="true", IOTPIPE_FORGET_AFTER="6") as rig:
            rig.start()
            await rig.online(sub)
            end = _now_ms()
            await rig.send(
                *(window("sim", s, unit, end, 10.0 + i) for i, (s, (unit, *_)) in enumerate(SIMULATED.items()))
            )
            await rig.send(window("sim", "ts", "s", end, 1.0))  # reserved: not projected
            configs = {s: f"{prefix}/sensor/sim/{s}/config" for s in SIMULATED}
            await wait_until(lambda: all(sub.latest(t) for t in configs.values()), 15, "every discovery config")
            await wait_until(lambda: sub.latest(topics.device("sim", "state")), 10, "the state")
            await wait_until(lambda: sub.latest(topics.device("sim", "availability")) == "online", 10, "availability")
            retained: dict[str, str] = {}
            for _, _, topic, payload in sub.messages:
                retained[topic] = payload
            unique_ids = set()
            for sensor, (_unit, device_class, ha_unit) in SIMULATED.items():
                topic = configs[sensor]
                assert all(TOPIC_LEVEL.match(level) for level in topic.split("/")[2:4])
                config = orjson.loads(retained[topic])
                assert check_ha_sensor_config(config, retained) == sensor
                assert config.get("device_class") == device_class, sensor
                assert config.get("unit_of_measurement") == ha_unit, sensor
                unique_ids.add(config["unique_id"])
                assert topics.exporter_state in [a["topic"] for a in config["availability"]]
                assert topics.device("sim", "availability") in [a["topic"] for a in config["availability"]]
            assert len(unique_ids) == len(SIMULATED)
            assert sub.latest(f"{prefix}/sensor/sim/ts/config") is None
            assert orjson.loads(retained[topics.device("sim", "state")])["ts"] == end  # the window's, not the sensor's
            # Silent past IOTPIPE_FORGET_AFTER: every config and every retained topic of it emptied.
            await wait_until(lambda: all(sub.latest(t) == "" for t in configs.values()), 20, "configs removed")
            await wait_until(lambda: sub.latest(topics.device("sim", "state")) == "", 10, "state cleared")
            assert sub.latest(topics.device_sensor("sim", "temperature")) == ""
            assert sub.latest(topics.device("sim", "availability")) == ""
    finally:
        sub.close()
    # Nothing of it is left on the broker for a newcomer (whose retained messages of all three filters
    # come together: the exporter's state says it is subscribed).
    late = PublicSub(stack, f"{prefix}/sensor/sim/+/config", f"{topics.root}/devices/sim/#", topics.exporter_state)
    try:
        await wait_until(lambda: late.latest(topics.exporter_state) is not None, 10, "the newcomer subscribed")
        assert [m[2] for m in late.messages if m[2] != topics.exporter_state] == []
    finally:
        late.close()


async def test_availability_goes_offline_when_a_device_is_silent_and_back_when_it_returns(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    topics = Topics(base)
    availability = topics.device("d1", "availability")
    sub = PublicSub(stack, availability, topics.exporter_state)
    try:
        async with Rig(stack, keyring, base, workdir, IOTPIPE_OFFLINE_AFTER="1.5") as rig:
            rig.start()
            await rig.online(sub)
            await rig.send(window("d1", "temp", "degC", _now_ms(), 20.0))
            await wait_until(lambda: sub.latest(availability) == "online", 10, "online")
            went_online = time.time()
            await wait_until(lambda: sub.latest(availability) == "offline", 10, "offline once silent")
            assert time.time() - went_online >= 1.0, "offline before offline_after"
            await rig.send(window("d1", "temp", "degC", _now_ms(), 21.0))
            await wait_until(lambda: sub.latest(availability) == "online", 10, "online again")
            assert sub.on(availability) == ["online", "offline", "online"]
    finally:
        sub.close()


async def test_one_state_per_device_per_interval_and_the_latest_value_wins(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    topics = Topics(base)
    state, other = topics.device("fast", "state"), topics.device("calm", "state")
    sub = PublicSub(stack, state, other, topics.exporter_state)
    interval = 1.0
    try:
        async with Rig(stack, keyring, base, workdir, IOTPIPE_STATE_INTERVAL=str(interval)) as rig:
            rig.start()
            await rig.online(sub)
            started = time.time()
            end = _now_ms()
            for i in range(40):  # 40 windows of one device as fast as they go: a sensor gone wild
                await rig.send(window("fast", "v", "1", end + i, float(i)))
            await rig.send(window("calm", "v", "1", end, 1.0))
            await wait_until(
                lambda: sub.latest(state) and orjson.loads(sub.latest(state) or "{}")["v"] == 39.0, 15, "latest"
            )
            await wait_until(lambda: sub.latest(other) is not None, 10, "the other device, not held up")
            elapsed = time.time() - started
            arrivals = [at for at, _, topic, _ in sub.messages if topic == state]
            assert len(arrivals) <= 1 + math.ceil(elapsed / interval), (len(arrivals), elapsed)
            assert all(b - a >= interval * 0.8 for a, b in itertools.pairwise(arrivals)), arrivals
        counters = orjson.loads((workdir / "health" / "exporter-t1.json").read_bytes())["counters"]
        assert counter(counters, "projection_superseded") > 0
    finally:
        sub.close()


async def test_the_exporter_says_offline_when_it_stops_and_its_will_does_when_it_dies(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    topics = Topics(base)
    sub = PublicSub(stack, topics.exporter_state)
    try:
        async with Rig(stack, keyring, base, workdir) as rig:
            rig.start()
            await rig.online(sub)
            assert rig.proc is not None
            rig.proc.send_signal(signal.SIGTERM)
            assert rig.proc.wait(30) == 0, rig.log()
            await wait_until(lambda: sub.latest(topics.exporter_state) == "offline", 10, "offline on a clean stop")
            rig.start()
            await wait_until(lambda: sub.latest(topics.exporter_state) == "online", 30, "online again")
            rig.proc.kill()  # no DISCONNECT: the public broker publishes the Will
            rig.proc.wait(10)
            await wait_until(lambda: sub.latest(topics.exporter_state) == "offline", 10, "the Last Will")
            assert sub.on(topics.exporter_state)[-4:] == ["online", "offline", "online", "offline"]
    finally:
        sub.close()


async def test_the_exporter_restarted_still_forgets_a_device_that_went_away(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    """The device table survives a restart: a device seen before it and silent since is removed."""
    topics = Topics(base)
    state = topics.device("gone", "state")
    sub = PublicSub(stack, state, topics.exporter_state)
    try:
        async with Rig(stack, keyring, base, workdir, IOTPIPE_FORGET_AFTER="5") as rig:
            rig.start()
            await rig.online(sub)
            await rig.send(window("gone", "v", "1", _now_ms(), 3.0))
            await wait_until(lambda: sub.latest(state), 10, "the state")
            assert rig.proc is not None
            rig.proc.send_signal(signal.SIGTERM)
            assert rig.proc.wait(30) == 0, rig.log()
            rig.start()
            await wait_until(lambda: sub.latest(state) == "", 30, "the state cleared by the restarted exporter")
    finally:
        sub.close()


def public_bus(stack: Stack, user: str) -> Any:
    """A Bus logged in to the PUBLIC broker as `user` (not started)."""
    from iotpipe import Bus, MqttSettings

    settings = MqttSettings(host="127.0.0.1", port=stack.ports.public, session_expiry=0, connect_timeout=15)
    return Bus(
        settings,
        client_id=f"{user}-test-{uuid.uuid4().hex[:8]}",
        keyring=None,
        src=f"{user}/test",
        username=user,
        password_file=mqtt_password_file(stack.secrets_dir, user),
    )


async def test_on_the_public_broker_only_the_exporter_writes_and_only_its_projection(stack: Stack, base: str) -> None:
    """A third party cannot forge the projection; the exporter's password writes nothing but it (not
    the statuses or alerts the bridge brings, not discovery under another level layout)."""
    from iotpipe import PermanentError

    topics = Topics(base)
    reader, exporter = public_bus(stack, "reader"), public_bus(stack, "exporter")
    for bus in (reader, exporter):
        await bus.start()
        await bus.wait_connected()
    try:
        for topic in (topics.device("d", "state"), topics.device_sensor("d", "s"), topics.exporter_state):
            with pytest.raises(PermanentError, match="refused"):
                await reader.publish(topic, b"1", retain=True)
            await exporter.publish(topic, b"", retain=True)  # accepted (an empty retained: leaves nothing)
        await exporter.publish(f"{base}ha/sensor/d/s/config", b"", retain=True)
        for topic in (
            topics.service_status("monitor", "x"),
            topics.device_status("d"),
            topics.alerts("d"),
            topics.processed("x"),
            f"{base}ha/sensor/d/s/other",
            f"{topics.root}/devices/d/s",
        ):
            with pytest.raises(PermanentError, match="refused"):
                await exporter.publish(topic, b"{}", retain=True)
    finally:
        for bus in (reader, exporter):
            await bus.stop()


async def test_a_third_party_cannot_take_the_exporters_connection(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    """The public broker has no client-id rule: a third party connecting under the exporter's client
    id would end the exporter's connection (and fire its Will) again and again. Its id has a random
    suffix, so the obvious `exporter-<instance>` is nobody's."""
    from iotpipe import MqttConnection, MqttSettings

    topics = Topics(base)
    state = topics.device("d1", "state")
    sub = PublicSub(stack, state, topics.exporter_state)
    password = mqtt_password_file(stack.secrets_dir, "reader").read_text().strip()
    intruder = MqttConnection(
        MqttSettings(host="127.0.0.1", port=stack.ports.public, session_expiry=0, connect_timeout=10),
        "exporter-t1",
        username="reader",
        password=password,
        reconnect=False,
    )
    try:
        async with Rig(stack, keyring, base, workdir) as rig:
            rig.start()
            await rig.online(sub)
            await intruder.start()
            await intruder.wait_connected()
            await rig.send(window("d1", "v", "1", _now_ms(), 5.0))
            await wait_until(lambda: sub.latest(state) is not None, 10, "the state, with the intruder connected")
            assert intruder.connected.is_set()
            assert sub.on(topics.exporter_state) == ["online"], "the exporter lost its connection"
    finally:
        await intruder.stop(will=False, timeout=2)
        sub.close()


async def test_alerts_are_projected_in_plain_json(stack: Stack, keyring: KeyRing, base: str, workdir: Path) -> None:
    topics = Topics(base)
    alert_topic = topics.device("d1", "alert")
    sub = PublicSub(stack, alert_topic, topics.exporter_state)
    monitor = bus_for(stack, "monitor", keyring=keyring)
    await monitor.start()
    await monitor.wait_connected()
    now = _now_ms()
    alert = {"kind": "offline", "device": "d1", "reason": "no data for 30s", "last_seen": 1000, "ts": now}
    # An anomaly episode: its open and its close, each projected as it is (plain JSON, same topic).
    episode = {
        "device": "d1",
        "sensor": "temperature",
        "episode": "temperature/5000",
        "anomaly": "stuck",
        "start": 5000,
    }
    opened = {
        "kind": "anomaly_open",
        **episode,
        "end": 10000,
        "score": 5.0,
        "evidence": {"mean": 21.5, "min": 21.5, "max": 21.5, "std": 0.0, "n": 10, "windows": 5, "normal_std": 0.12},
        "ts": now,
    }
    closed = {
        "kind": "anomaly_close",
        **episode,
        "end": 65000,
        "windows": 60,
        "peak": 60.0,
        "anomalies": ["stuck"],
        "reason": "normal",
        "ts": now,
    }
    try:
        async with Rig(stack, keyring, base, workdir) as rig:
            rig.start()
            await rig.online(sub)
            for payload in (alert, opened, closed):
                await monitor.publish_sealed(topics.alerts("d1"), payload, kind="alert")
            await wait_until(lambda: len(sub.on(alert_topic)) == 3, 10, "the alerts")
            assert [orjson.loads(p) for p in sub.on(alert_topic)] == [alert, opened, closed]
            assert not [m for m in sub.messages if m[2] == alert_topic and m[1]], "alerts are not retained"
    finally:
        await monitor.stop()
        sub.close()


async def test_the_exporter_is_unhealthy_while_the_public_broker_is_unreachable(
    stack: Stack, keyring: KeyRing, base: str, workdir: Path
) -> None:
    # As compose once had it: the pipeline broker fine, the public one never reached (there, a
    # certificate without the public broker's name). The healthcheck must say so, not `ok`.
    async with Rig(
        stack, keyring, base, workdir, IOTPIPE_PUBLIC__PORT=str(free_port()), IOTPIPE_PUBLIC_UNHEALTHY_AFTER="1"
    ) as rig:
        rig.start()
        await wait_online(stack, rig.topics.service_status("exporter", "t1"))
        health_file = health_file_for(workdir / "health", "exporter", "t1")
        await wait_until(
            lambda: "public broker unreachable" in check_health(health_file, 60)[1], 30, "the exporter unhealthy"
        )
        assert health_doc(workdir, "exporter", "t1")["projection"]["public"] == "down"
