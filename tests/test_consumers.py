"""Every recipe of docs/consumers.md, run against one live stack: the real sensor-reader with the
shipped simulated devices (services/sensor_reader/examples/simulated.toml, what `make run` has), the
preprocessor and the exporter (Home Assistant discovery on), read on the public broker as `reader`.

- mosquitto_sub: the command lines are taken from the doc's marked blocks (`<!-- recipe: ... -->`)
  and run as they are, with only the stack's ports, topic base and discovery prefix put in
  (`secrets/` is the stack's);
- Node-RED 4.1.8 (tests/node) runs the shipped flow with the doc's command, and the file it writes
  is read;
- Home Assistant: what the doc's discovery command prints is fed to Home Assistant's own code
  (tests/ha: its discovery topic matcher, its MQTT sensor schema, its unit and state-class tables,
  its template engine);
- Telegraf (not installable here): the shipped config, which the doc embeds, parsed and applied to
  the real messages as Telegraf's mqtt_consumer and JSON parser document it (the doc's one command
  line for it, `telegraf --config docs/recipes/telegraf.conf`, is not run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from iotpipe import KeyRing, Topics
from iotpipe.devstack import mqtt_password_file
from servers import ROOT, Stack, bus_for, free_port, service_env, spawn, stop_all, wait_online, wait_until
from test_docs import known
from test_exporter import PublicSub

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto_sub (make deps)")

DOC = ROOT / "docs/consumers.md"
RECIPES = ROOT / "docs/recipes"
SIMULATED = ROOT / "services/sensor_reader/examples/simulated.toml"
NODE_RED = ROOT / "tests/node/node_modules/.bin/node-red"
HA_PYTHON = ROOT / "var/ha-venv/bin/python"
HA_VALIDATE = ROOT / "tests/ha/validate.py"
# `make run`'s public broker ports, as the doc's commands name them (iotpipe.cli, `stack`).
DOC_PORT, DOC_TLS_PORT = "11883", "18893"
# What each simulated sensor must be in Home Assistant: (device class, unit), by the simulator's units.
MICRO = "\u03bcg/m\u00b3"  # Greek mu, as the exporter (and Home Assistant since core PR #144853) spells it
HA_KIND = {
    "temperature": ("temperature", "°C"),
    "humidity": ("humidity", "%"),
    "pressure": ("pressure", "hPa"),
    "soil_moisture": ("moisture", "%"),
    "light": ("illuminance", "lx"),
    "pm2_5": ("pm25", MICRO),
}
# Every marked recipe and the test that runs it: a recipe added to the doc without a test fails.
RUN_HERE = {
    "mosquitto_sub state",
    "mosquitto_sub sensor",
    "mosquitto_sub availability",
    "mosquitto_sub alerts",
    "mosquitto_sub tls",
    "mosquitto_sub discovery",
    "node-red",
    "telegraf.conf",
}
RECIPE_BLOCK = re.compile(r"<!-- recipe: ([^>]+?) -->\n```(\w+)\n(.*?)```\n", re.S)


def recipes() -> dict[str, str]:
    """The doc's marked code blocks: name -> text."""
    return {name: body for name, _lang, body in RECIPE_BLOCK.findall(DOC.read_text())}


def simulated_devices() -> dict[str, list[str]]:
    """device -> its sensors, as the shipped simulator configuration has them."""
    doc = tomllib.loads(SIMULATED.read_text())
    return {d["id"]: list(d["params"]["sensors"]) for d in doc["devices"]}


@dataclass
class Live:
    """The running stack the recipes are tried on, and everything the exporter published on the
    public broker since before it started (`published`, read by mosquitto_sub as `reader`)."""

    stack: Stack
    keyring: KeyRing
    topics: Topics
    prefix: str  # Home Assistant's discovery prefix
    workdir: Path
    client_dir: Path  # a third party's working directory: `secrets/` is the stack's
    devices: dict[str, list[str]]
    published: PublicSub
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def for_stack(self, text: str) -> str:
        """A doc command as it is, but for this stack: its ports, topic base and discovery prefix."""
        out = re.sub(rf"\b{DOC_PORT}\b", str(self.stack.ports.public), text)
        out = re.sub(rf"\b{DOC_TLS_PORT}\b", str(self.stack.ports.public_tls), out)
        out = out.replace("'iotpipe/v2/", f"'{self.topics.root}/").replace("'homeassistant/", f"'{self.prefix}/")
        assert out != text, f"not a command for make run's public broker: {text}"
        return out

    def reader_password(self) -> str:
        return mqtt_password_file(self.stack.secrets_dir, "reader").read_text().strip()

    def states(self) -> dict[str, list[dict[str, Any]]]:
        """device -> every state the exporter published for it, in order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for device in self.devices:
            out[device] = [orjson.loads(p) for p in self.published.on(self.topics.device(device, "state")) if p]
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.workdir.glob("*.out"))


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def complete(state: dict[str, Any], sensors: list[str]) -> bool:
    """A state with a number for every sensor of its device, and its time."""
    return all(is_number(state.get(s)) for s in sensors) and is_number(state.get("ts"))


@pytest.fixture(scope="module")
def live(stack: Stack, keyring: KeyRing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("consumers")
    (workdir / "health").mkdir()
    client_dir = workdir / "client"
    client_dir.mkdir()
    (client_dir / "secrets").symlink_to(stack.secrets_dir)
    base = f"t{uuid.uuid4().hex[:12]}"
    topics = Topics(base)
    prefix = f"{base}ha"
    published = PublicSub(stack, f"{topics.root}/devices/#", topics.exporter_state, f"{prefix}/sensor/+/+/config")
    live = Live(stack, keyring, topics, prefix, workdir, client_dir, simulated_devices(), published)
    env = service_env(
        stack,
        base,
        workdir,
        "c1",
        IOTPIPE_DEVICES_FILE=str(SIMULATED),
        IOTPIPE_PUBLIC__HOST="127.0.0.1",
        IOTPIPE_PUBLIC__PORT=str(stack.ports.public),
        IOTPIPE_HA_DISCOVERY="true",
        IOTPIPE_HA_PREFIX=prefix,
        IOTPIPE_STATUS_INTERVAL="1",
    )

    async def started() -> None:
        # The consumers first (online = subscribed), then the readings.
        for service in ("preprocessor", "exporter"):
            live.procs.append(spawn(service, env, workdir))
        for service in ("preprocessor", "exporter"):
            await wait_online(stack, topics.service_status(service, "c1"), timeout=60)
        live.procs.append(spawn("sensor_reader", env, workdir))

        def everything_published() -> bool:
            states = live.states()
            return all(
                states[d]
                and complete(states[d][-1], sensors)
                and published.latest(topics.device(d, "availability")) == "online"
                and all(published.latest(f"{prefix}/sensor/{d}/{s}/config") for s in sensors)
                for d, sensors in live.devices.items()
            )

        await wait_until(everything_published, 90, "every simulated device's state, availability and discovery")

    try:
        asyncio.run(started())
    except BaseException:
        stop_all(live.procs)
        published.close()
        print(live.logs())
        raise
    try:
        yield live
    finally:
        stop_all(live.procs)
        published.close()


class Command:
    """A doc command run as a user runs it (`bash -c`, in the third party's directory): each line it
    prints, with when it arrived."""

    def __init__(self, live: Live, text: str, env: dict[str, str] | None = None) -> None:
        self.text = live.for_stack(text)
        self.proc = subprocess.Popen(
            ["bash", "-c", self.text],
            cwd=live.client_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: stopped whole (the shell, mosquitto_sub)
        )
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def by_topic(self) -> dict[str, list[tuple[float, str]]]:
        """`-v` output: topic -> [(arrived, payload)]."""
        out: dict[str, list[tuple[float, str]]] = {}
        for at, line in list(self.lines):
            topic, _, payload = line.partition(" ")
            out.setdefault(topic, []).append((at, payload))
        return out

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __repr__(self) -> str:
        return f"{self.text!r} printed {[line for _, line in self.lines][-10:]}"


@contextlib.contextmanager
def running(live: Live, *names: str) -> Iterator[list[Command]]:
    blocks = recipes()
    commands = [Command(live, blocks[name]) for name in names]
    try:
        yield commands
    finally:
        for command in commands:
            command.close()


def test_every_recipe_in_the_doc_is_run_here_or_is_a_shipped_file() -> None:
    blocks = recipes()
    assert set(blocks) == RUN_HERE
    # Every mosquitto_sub line of the doc is in a recipe block this module runs.
    text = DOC.read_text()
    unmarked = RECIPE_BLOCK.sub("", text)
    assert "mosquitto_sub -h" not in unmarked
    # The Telegraf block is the shipped file, byte for byte; the Node-RED flow is named.
    assert blocks["telegraf.conf"] == (RECIPES / "telegraf.conf").read_text()
    shipped = ("node-red-flow.json", "node-red-flow_cred.json", "node-red-settings.js", "telegraf.conf")
    assert sorted(p.name for p in RECIPES.iterdir()) == sorted(shipped)
    for name in (f"recipes/{file}" for file in shipped):
        assert f"]({name})" in text and (ROOT / "docs" / name).is_file(), name
    # It names only settings the services have.
    assert set(re.findall(r"\bIOTPIPE_[A-Z0-9_]*[A-Z0-9]", text)) - known() == set()
    # Linked from the README and the operations guide.
    assert "docs/consumers.md" in (ROOT / "README.md").read_text()
    assert "(consumers.md)" in (ROOT / "docs/operations.md").read_text()


@pytest.mark.timeout(240)
async def test_mosquitto_sub_recipes_read_each_device_as_the_doc_says(live: Live) -> None:
    topics, devices = live.topics, live.devices
    with running(
        live, "mosquitto_sub state", "mosquitto_sub tls", "mosquitto_sub sensor", "mosquitto_sub availability"
    ) as (state, tls, sensor, availability):
        state_topics = {topics.device(d, "state"): d for d in devices}

        def fresh_states(command: Command) -> bool:
            """Every device's state, twice: the retained one and a live one."""
            seen = command.by_topic()
            return all(len(seen.get(t, [])) >= 2 for t in state_topics)

        for command in (state, tls):
            await wait_until(lambda c=command: fresh_states(c), 30, f"every device's state from {command}")
            seen = command.by_topic()
            assert set(seen) == set(state_topics), command
            for topic, messages in seen.items():
                for _, payload in messages:
                    assert complete(orjson.loads(payload), devices[state_topics[topic]]), (topic, payload)
                # Each after the retained one: within 5 s of its window closing.
                late = [arrived - orjson.loads(p)["ts"] / 1000 for arrived, p in messages[1:]]
                assert max(late) < 5.0, (topic, late)

        # One sensor's bare number: a value greenhouse-1's state had.
        await wait_until(lambda: len(sensor.lines) >= 2, 30, f"values from {sensor}")
        for _, line in list(sensor.lines):
            value = orjson.loads(line)
            assert is_number(value), sensor
            await wait_until(
                lambda v=value: v in {s["temperature"] for s in live.states()["greenhouse-1"]},
                10,
                f"{line} in a state of greenhouse-1",
            )

        wanted = {topics.device(d, "availability") for d in devices} | {topics.exporter_state}
        await wait_until(lambda: wanted <= set(availability.by_topic()), 15, f"availability from {availability}")
        assert {t: [p for _, p in m] for t, m in availability.by_topic().items()} == {t: ["online"] for t in wanted}


@pytest.mark.timeout(240)
async def test_the_alerts_recipe_prints_each_alert(live: Live) -> None:
    monitor = bus_for(live.stack, "monitor", keyring=live.keyring)
    await monitor.start()
    await monitor.wait_connected()
    alert_topic = live.topics.device("greenhouse-2", "alert")
    try:
        with running(live, "mosquitto_sub alerts") as (alerts,):
            # mosquitto_sub says nothing once subscribed: alerts go until one is printed (each its own).
            sent: list[dict[str, Any]] = []
            for attempt in range(30):
                alert = {
                    "kind": "offline",
                    "device": "greenhouse-2",
                    "reason": f"no data for 30s ({attempt})",
                    "last_seen": 1000,
                    "ts": time.time_ns() // 1_000_000,
                }
                sent.append(alert)
                await monitor.publish_sealed(live.topics.alerts("greenhouse-2"), alert, kind="alert")
                with contextlib.suppress(AssertionError):
                    await wait_until(lambda: alerts.lines, 1, "an alert")
                    break
            printed = alerts.by_topic()
            assert set(printed) == {alert_topic}, alerts
            for _, payload in printed[alert_topic]:
                assert orjson.loads(payload) in sent
    finally:
        await monitor.stop()


def ha_validate(request: dict[str, Any]) -> dict[str, Any]:
    """tests/ha/validate.py in the pinned Home Assistant environment."""
    if not HA_PYTHON.exists():
        pytest.fail(f"Home Assistant is not installed for the tests ({HA_PYTHON}): run `make test-deps`")
    done = subprocess.run(
        [str(HA_PYTHON), str(HA_VALIDATE)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def as_home_assistant_2025_4(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with micro spelt as Home Assistant 2025.4 spells it (the micro sign, U+00B5). The
    exporter spells it with the Greek mu (U+03BC), as Home Assistant does since core PR #144853, whose
    sensor platform converts the old spelling; 2025.4 is the newest release installable here (Python
    3.13.0), and it would warn about the new one. Nothing else is changed."""
    unit = config.get("unit_of_measurement")
    if unit is None:
        return config
    return {**config, "unit_of_measurement": unit.replace("\u03bc", "\u00b5")}


@pytest.mark.timeout(240)
async def test_home_assistant_takes_every_discovery_config_of_every_simulated_sensor(live: Live) -> None:
    wanted = {f"{live.prefix}/sensor/{d}/{s}/config": (d, s) for d, sensors in live.devices.items() for s in sensors}
    with running(live, "mosquitto_sub discovery") as (discovery,):
        await wait_until(lambda: set(wanted) <= set(discovery.by_topic()), 30, f"every config from {discovery}")
        printed = {t: m[-1][1] for t, m in discovery.by_topic().items()}
    assert set(printed) == set(wanted), "a config for something not simulated"
    configs = {topic: orjson.loads(payload) for topic, payload in printed.items()}

    # Every topic the configs name holds a retained message (what Home Assistant gets on subscribing).
    named = {c["state_topic"] for c in configs.values()} | {
        a["topic"] for c in configs.values() for a in c["availability"]
    }
    late = PublicSub(live.stack, *named)
    try:
        await wait_until(lambda: all(late.latest(t) for t in named), 15, "a retained message on every named topic")
        retained = {topic: payload for _, is_retained, topic, payload in late.messages if is_retained}
    finally:
        late.close()
    assert set(retained) == named

    for_ha = {topic: as_home_assistant_2025_4(config) for topic, config in configs.items()}
    answer = ha_validate({"prefix": live.prefix, "messages": for_ha, "states": retained})
    assert answer["version"] == "2025.4.4"
    unique_ids: set[str] = set()
    identifiers: dict[str, list[str]] = {}
    for topic, (device, sensor) in wanted.items():
        config, result = configs[topic], answer["results"][topic]
        what = f"{topic}: {result}"
        # Home Assistant's discovery topic matcher: a sensor, the device as node, the sensor as object.
        assert result["topic"] == {"component": "sensor", "node_id": device, "object_id": sensor}, what
        # Its MQTT sensor schema takes the config whole: no error, no warning, no key dropped as unknown.
        assert "error" not in result and result["warnings"] == [], what
        assert set(config) <= set(result["config"]), set(config) - set(result["config"])
        # The device class and unit each simulated sensor kind must have, valid together for Home
        # Assistant, with a state class it allows for that class (long-term statistics).
        device_class, unit = HA_KIND[sensor]
        assert (config["device_class"], config["unit_of_measurement"]) == (device_class, unit), what
        assert as_home_assistant_2025_4(config)["unit_of_measurement"] in result["units"], what
        assert config["state_class"] == "measurement" and "measurement" in result["state_classes"], what
        # The state topic is the device's, and Home Assistant's template engine gets this sensor's
        # value out of the retained state.
        assert config["state_topic"] == live.topics.device(device, "state")
        state = orjson.loads(retained[config["state_topic"]])
        assert float(result["rendered"]) == state[sensor], what
        # Available while the device and the exporter are: both retained `online` now.
        assert config["availability_mode"] == "all"
        assert {a["topic"] for a in config["availability"]} == {
            live.topics.device(device, "availability"),
            live.topics.exporter_state,
        }
        for entry in config["availability"]:
            assert retained[entry["topic"]] == entry["payload_available"] == "online"
        unique_ids.add(config["unique_id"])
        # One Home Assistant device per iotpipe device, the same block on each of its sensors.
        assert config["device"]["name"] == device and config["device"]["identifiers"], what
        assert identifiers.setdefault(device, config["device"]["identifiers"]) == config["device"]["identifiers"]
    assert len(unique_ids) == len(wanted)
    assert len({tuple(i) for i in identifiers.values()}) == len(live.devices)


@pytest.mark.timeout(240)
async def test_node_red_runs_the_shipped_flow_and_writes_every_device_state(live: Live, tmp_path: Path) -> None:
    """The doc's commands, with the suite's Node-RED, the shipped files copied (Node-RED may rewrite
    its flow and credentials files: never the repository's), a user directory and an output file of
    the test's own, and the editor on a free port (PORT, which the shipped settings read)."""
    recipes_dir = tmp_path / "recipes"
    shutil.copytree(RECIPES, recipes_dir)
    user_dir = tmp_path / "node-red"
    out_file = tmp_path / "out" / "states.jsonl"
    command = recipes()["node-red"]
    for doc_text, ours in (
        ("OUT_FILE=/tmp/iotpipe-states.jsonl ", f"OUT_FILE={out_file} "),
        ("node-red --userDir ", f"{NODE_RED} --userDir "),
        ("var/node-red", str(user_dir)),
        ("docs/recipes/", f"{recipes_dir}/"),
    ):
        assert doc_text in command
        command = command.replace(doc_text, ours)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTPIPE_", "MQTT_"))}
    env["PORT"] = str(free_port())
    node_red = Command(live, command, env=env)

    def log() -> str:
        return "\n".join(line for _, line in list(node_red.lines))

    def written() -> dict[str, list[dict[str, Any]]]:
        """device -> the states Node-RED wrote for it."""
        out: dict[str, list[dict[str, Any]]] = {}
        if out_file.exists():
            for line in out_file.read_text().splitlines():
                entry = json.loads(line)
                out.setdefault(entry["topic"].split("/")[3], []).append(entry["state"])
        return out

    try:
        try:
            await wait_until(
                lambda: all(
                    any(complete(s, sensors) for s in written().get(d, [])) for d, sensors in live.devices.items()
                ),
                150,  # Node-RED starts in seconds, more on a busy machine
                "a state of every device in the file the flow writes",
            )
        except AssertionError:
            print(log()[-5000:])
            raise
        assert set(written()) == set(live.devices)
        # What Node-RED got is what the exporter published, message for message.
        for device, states in written().items():
            await wait_until(
                lambda d=device, s=states: all(state in live.states()[d] for state in s),
                10,
                f"{device}'s states as published",
            )
        text = log()
        assert f"Server now running at http://127.0.0.1:{env['PORT']}/" in text, text[-3000:]
        assert "Connected to broker" in text and "[error]" not in text, text[-3000:]
    finally:
        node_red.close()


def mqtt_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (`+` one level, `#` the rest), as the broker does for Telegraf."""
    levels, names = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(names) or (level != "+" and level != names[i]):
            return False
    return len(levels) == len(names)


def telegraf_metric(conf: dict[str, Any], topic: str, payload: bytes) -> dict[str, Any]:
    """What Telegraf's mqtt_consumer makes of one message, per its documentation
    (plugins/inputs/mqtt_consumer/README.md, plugins/parsers/json/README.md): the JSON parser keeps
    numeric values as fields (strings and booleans dropped unless configured), the time key becomes
    the metric's time and is no field; `topic_parsing` entries whose topic matches (same levels) turn
    the levels named in `tags` into tags (`_` skips a level); `topic_tag` (default "topic") adds
    the topic unless empty; `name_override` names the measurement."""
    assert conf["data_format"] == "json"
    document = orjson.loads(payload)
    assert isinstance(document, dict)
    time_key = conf.get("json_time_key")
    fields = {k: v for k, v in document.items() if k != time_key and is_number(v)}
    metric_time = None
    if time_key:
        assert conf["json_time_format"] == "unix_ms"
        metric_time = int(document[time_key]) * 1_000_000  # ns
    tags: dict[str, str] = {}
    if conf.get("topic_tag", "topic"):
        tags[conf.get("topic_tag", "topic")] = topic
    for parsing in conf.get("topic_parsing", []):
        if mqtt_matches(parsing["topic"], topic):
            spec, levels = parsing["tags"].split("/"), topic.split("/")
            assert len(spec) == len(levels), "topic_parsing needs one name per topic level"
            tags |= {name: level for name, level in zip(spec, levels, strict=True) if name != "_"}
    return {"name": conf.get("name_override", "mqtt_consumer"), "tags": tags, "fields": fields, "time": metric_time}


@pytest.mark.timeout(240)  # the stack's start-up included, when this runs first
def test_the_telegraf_recipe_maps_each_state_message_to_a_metric_per_device(live: Live) -> None:
    conf_text = (RECIPES / "telegraf.conf").read_text()
    # The recipe is for the shipped topic base; the stack's is its own.
    conf = tomllib.loads(conf_text.replace('"iotpipe/v2/', f'"{live.topics.root}/'))
    (consumer,) = conf["inputs"]["mqtt_consumer"]
    assert conf["outputs"]["file"]
    # Credentials and broker from the environment (Telegraf substitutes ${VAR} in the file).
    assert consumer["servers"] == ["tcp://${MQTT_HOST}:${MQTT_PORT}"]
    assert (consumer["username"], consumer["password"]) == ("${MQTT_USER}", "${MQTT_PASSWORD}")
    assert consumer["qos"] == 1
    # Everything the exporter has published under devices/: the filters take the states only.
    messages = [(topic, payload) for _, _, topic, payload in list(live.published.messages) if payload]
    state_topics = {live.topics.device(d, "state") for d in live.devices}
    others = {t for t, _ in messages} - state_topics
    assert others and state_topics <= {t for t, _ in messages}
    for topic in state_topics | others:
        taken = any(mqtt_matches(f, topic) for f in consumer["topics"])
        assert taken == (topic in state_topics), topic
    latest: dict[str, dict[str, Any]] = {}
    for topic, payload in messages:
        if topic not in state_topics:
            continue
        device = topic.split("/")[3]
        state = latest[device] = orjson.loads(payload)
        assert all(is_number(v) for v in state.values()), state  # nothing the JSON parser would drop
        metric = telegraf_metric(consumer, topic, payload.encode())
        assert metric == {
            "name": "iotpipe",
            "tags": {"device": device},
            "fields": {key: value for key, value in state.items() if key != "ts"},
            "time": state["ts"] * 1_000_000,
        }
    # Each device's latest metric has a field for each of its sensors.
    for device, state in latest.items():
        assert set(
            telegraf_metric(consumer, live.topics.device(device, "state"), orjson.dumps(state))["fields"]
        ) == set(live.devices[device])
    assert set(latest) == set(live.devices)
