"""`make test-compose`: the real docker-compose.yml, from a clean checkout, brought up with one
command and tried from outside (issue 11). The engine is podman behind its Docker API, driven by
docker-compose; base images are stand-ins of the same names (tests/compose/engine.py says how).

1. every image built from the real Dockerfiles (on the stand-in bases);
2. `up` with no secrets made beforehand (the one-shot `secrets` service makes them), waited for
   until every container is healthy; timed (cold: the images built too, when they were not there);
3. the contract from outside, as a third party: anonymous refused (both broker ports, Redis, the
   sink's ingest), the retained `online` status of every service on the public broker, the latest
   values in Redis (as `reader`) for every simulated device, the cloud-sink receiving records;
4. `--scale preprocessor=3`: the three replicas share the raw stream, every window once;
5. one service's process killed (SIGKILL): the restart policy brings it back, no window lost; then
   the preprocessor scaled from 3 back to 1 and recreated, no window lost either;
6. `docker compose logs <service>`: that service's JSON lines, and only its;
7. `down -v`: nothing of the project left; then a warm `up` (images built, secrets kept: not one of
   them changed), timed, and down again.

Windows are counted as the fault battery counts them (tests/faults/harness.py), per window of one
sensor: every simulated device yields one window per second per sensor, so each series is
contiguous, and over a segment of the run each window must be in Redis and at the cloud-sink
exactly once (lost / duplicated / unexpected). Only devices polled often enough that a window cannot
be empty by chance (the simulated driver drops 1 % of reads: `STRICT_READS`) are held to
contiguity; the others' windows must agree between Redis and the sink. A control pauses the reader
and shows that the count sees the windows missing.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import signal
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from engine import ROOT, Compose, HealthScheduler, Podman, checkout, ensure_standins, run
from iotpipe import counter
from prometheus_client.parser import text_string_to_metric_families
from servers import wait_until

import redis

pytestmark = pytest.mark.skipif(
    os.environ.get("IOTPIPE_COMPOSE_TEST") != "1",
    reason="brings docker-compose.yml up under podman: `make test-compose`",
)

PROJECT = "iotpipetest"
SERVICES = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor", "exporter")
BASE = "iotpipe"
WINDOW_MS = 1000  # the sensor-reader's default (compose sets none)
# Reads per window from which a device's window cannot be empty by chance (0.01 ** 5 = 1e-10).
STRICT_READS = 5
# The short form (CI): the same steps, with less observed between them.
SHORT = os.environ.get("IOTPIPE_COMPOSE_SHORT") == "1"


def simulated_devices() -> dict[str, tuple[float, list[str]]]:
    doc = tomllib.loads((ROOT / "services/sensor_reader/examples/simulated.toml").read_text())
    return {d["id"]: (float(d["interval"]), list(d["params"]["sensors"])) for d in doc["devices"]}


DEVICES = simulated_devices()
STRICT = {device for device, (interval, _) in DEVICES.items() if WINDOW_MS / 1000 / interval >= STRICT_READS}


def now_window() -> int:
    return int(time.time() * 1000) // WINDOW_MS * WINDOW_MS


class Report:
    """What the run prints at the end: timings and counts, one line each."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.started = time.monotonic()

    def add(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.started:6.0f} s]"
        self.lines.append(f"{stamp} {line}")
        print(f"compose: {stamp} {line}", flush=True)


# --- a third party's view -------------------------------------------------------------------------


class PublicBroker:
    """A third-party client of the public broker (what Home Assistant would be): `reader` over TLS,
    subscribed to every status, the exporter's projection and Home Assistant's discovery topics.
    Holds the latest message per topic (JSON where it is JSON, else the text)."""

    def __init__(self, ca: Path, password: str) -> None:
        self.status: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"compose-test-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set("reader", password)
        self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = lambda client, *_: client.subscribe(
            [
                (f"{BASE}/v2/status/#", 1),
                (f"{BASE}/v2/devices/#", 1),
                (f"{BASE}/v2/exporter/#", 1),
                ("homeassistant/#", 1),
            ]
        )
        self.client.on_message = self._on_message
        self.client.connect("localhost", 8883)
        self.client.loop_start()

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.payload:
                try:
                    self.status[msg.topic] = json.loads(msg.payload)
                except ValueError:  # online/offline: plain text
                    self.status[msg.topic] = msg.payload.decode()
            else:
                self.status.pop(msg.topic, None)

    def services(self, service: str) -> dict[str, dict[str, Any]]:
        """Instance -> status of one service."""
        prefix = f"{BASE}/v2/status/service/{service}/"
        with self._lock:
            return {t[len(prefix) :]: s for t, s in self.status.items() if t.startswith(prefix)}

    def online(self, service: str) -> dict[str, dict[str, Any]]:
        return {i: s for i, s in self.services(service).items() if s.get("state") == "online"}

    def topic(self, topic: str) -> Any:
        with self._lock:
            return self.status.get(topic)

    def projected(self, device: str, sensors: list[str]) -> bool:
        """The device's projection complete, as a third party sees it: a state with a number for
        every sensor, `online`, and one Home Assistant discovery config per sensor naming that state."""
        state = self.topic(f"{BASE}/v2/devices/{device}/state")
        configs = [self.topic(f"homeassistant/sensor/{device}/{s}/config") for s in sensors]
        return (
            isinstance(state, dict)
            and all(isinstance(state.get(s), (int, float)) for s in sensors)
            and self.topic(f"{BASE}/v2/devices/{device}/availability") == "online"
            and all(
                isinstance(c, dict) and c.get("state_topic") == f"{BASE}/v2/devices/{device}/state" for c in configs
            )
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# The singletons' /metrics on the host (docker-compose.yml; the scaled preprocessor only exposes it).
METRICS_PORTS = {
    "sensor-reader": 19201,
    "cache-writer": 19203,
    "cloud-forwarder": 19204,
    "monitor": 19205,
    "exporter": 19206,
}


def scrape(port: int) -> set[str]:
    """The metric family names a Prometheus scrape of 127.0.0.1:`port` gets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return {family.name for family in text_string_to_metric_families(response.read().decode())}


def sink(path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:8080{path}", timeout=30) as response:
        return json.loads(response.read())


# --- counting windows ------------------------------------------------------------------------------


@dataclass
class Tally:
    lost: list[tuple[str, str, int]] = field(default_factory=list)
    duplicated: list[tuple[str, str, int]] = field(default_factory=list)
    unexpected: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def __str__(self) -> str:
        return f"{len(self.lost)}/{len(self.duplicated)}/{len(self.unexpected)}"


class Windows:
    """Every window of a segment [t0, t1) in Redis (as `reader`) and at the cloud-sink."""

    def __init__(self, reader: redis.Redis) -> None:
        self.redis = reader

    def found(self, t0: int, t1: int) -> dict[str, collections.Counter[tuple[str, str, int]]]:
        in_redis: collections.Counter[tuple[str, str, int]] = collections.Counter()
        at_sink: collections.Counter[tuple[str, str, int]] = collections.Counter()
        for device, (_, sensors) in DEVICES.items():
            for sensor in sensors:
                for _member, score in self.redis.zrangebyscore(
                    f"{BASE}:series:{device}:{sensor}", t0, t1 - 1, withscores=True
                ):
                    in_redis[(device, sensor, int(score))] += 1
            for record in sink(f"/records?device={device}"):
                if record.get("type") == "window" and t0 <= record["start"] < t1:
                    at_sink[(device, str(record["sensor"]), int(record["start"]))] += 1
        return {"redis": in_redis, "cloud": at_sink}

    def tally(self, t0: int, t1: int) -> dict[str, Tally]:
        found = self.found(t0, t1)
        expected = {
            (device, sensor, start)
            for device in STRICT
            for sensor in DEVICES[device][1]
            for start in range(t0, t1, WINDOW_MS)
        }
        # The other devices' windows: whatever either sink holds must be in both.
        others = {key for held in found.values() for key in held if key[0] not in STRICT}
        out = {}
        for where, held in found.items():
            out[where] = Tally(
                lost=sorted((expected | others) - set(held)),
                duplicated=sorted(key for key, n in held.items() if n > 1),
                unexpected=sorted(key for key in held if key[0] in STRICT and key not in expected),
            )
        return out

    def caught_up(self, t0: int, t1: int) -> bool:
        """Both sinks hold the last window of the segment of every strict series."""
        found = self.found(t1 - WINDOW_MS, t1)
        last = {(d, s, t1 - WINDOW_MS) for d in STRICT for s in DEVICES[d][1]}
        return all(last <= set(counter) for counter in found.values())

    async def settle(self, t0: int, t1: int, timeout: float) -> dict[str, Tally]:
        """The tally once both sinks hold every window of the segment, or when `timeout` is up."""
        deadline = time.monotonic() + timeout
        while True:
            tally = self.tally(t0, t1)
            if all(t.clean for t in tally.values()) or time.monotonic() > deadline:
                return tally
            await asyncio.sleep(1)  # wait-ok: re-tallying until clean, bounded by the deadline


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class System:
    podman: Podman
    compose: Compose
    health: HealthScheduler
    project_dir: Path
    report: Report


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    report = Report()
    workdir = tmp_path_factory.mktemp("engine")
    podman = Podman(workdir)
    timings = ensure_standins(podman, workdir)
    report.add(
        "stand-in base images: "
        + (", ".join(f"{image} built in {t:.0f} s" for image, t in timings.items()) or "all there already")
    )
    project_dir = checkout(tmp_path_factory.mktemp("checkout"))
    assert sorted(p.name for p in (project_dir / "secrets").iterdir()) == ["README.md"], "a clean checkout"
    with podman.api():
        compose = Compose(podman, project_dir, PROJECT)
        compose("down", "--volumes", "--remove-orphans", timeout=300, check=False)  # an interrupted run's
        health = HealthScheduler(compose)
        health.start()
        try:
            yield System(podman, compose, health, project_dir, report)
        finally:
            compose("down", "--volumes", "--remove-orphans", timeout=300, check=False)
            health.stop()
            print("\n".join(["", "compose test summary:", *report.lines]), flush=True)


async def all_healthy(compose: Compose, expected: int, timeout: float, what: str) -> float:
    """Seconds until `expected` containers run and all are healthy."""
    started = time.monotonic()

    def healthy() -> bool:
        states = compose.health()
        return len(states) == expected and set(states.values()) == {"healthy"}

    try:
        await wait_until(healthy, timeout, what)
    except AssertionError:
        raise AssertionError(f"{what}: {compose.health()}") from None
    return time.monotonic() - started


def project_images(compose: Compose) -> list[str]:
    out = compose.podman("images", "--format", "{{.Repository}}").stdout.split()
    return [image for image in out if PROJECT in image]


def secrets_digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "README.md"
    }


def anonymous_refused(ca: Path) -> dict[str, str]:
    """What an anonymous client gets at each door (empty: refused everywhere)."""
    let_in = {}
    for port, tls in ((1883, []), (8883, ["--cafile", str(ca)])):
        result = run(
            ["mosquitto_sub", "-h", "localhost", "-p", str(port), *tls, "-t", f"{BASE}/#", "-C", "1", "-W", "10"],
            timeout=30,
            check=False,
        )
        if result.returncode == 0 or "not authori" not in (result.stdout + result.stderr).lower():
            let_in[f"mqtt {port}"] = (result.stdout + result.stderr).strip()
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_timeout=10).ping()
        let_in["redis"] = "PING answered without a password"
    except redis.exceptions.AuthenticationError:
        pass
    except redis.exceptions.ResponseError as exc:
        if "NOAUTH" not in str(exc):
            let_in["redis"] = str(exc)
    request = urllib.request.Request("http://127.0.0.1:8080/ingest", data=b"{}", method="POST")
    try:
        urllib.request.urlopen(request, timeout=30)
        let_in["sink ingest"] = "accepted without a token"
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            let_in["sink ingest"] = f"HTTP {exc.code}"
    return let_in


def log_lines(compose: Compose, service: str) -> list[str]:
    """`docker compose logs <service>`, each line without its `<container> | ` prefix."""
    out = compose("logs", "--no-color", service).stdout.splitlines()
    return [line.split("| ", 1)[1] for line in out if "| " in line]


def kill_process(compose: Compose, container: str) -> int:
    """SIGKILL the container's process from the host (a process cannot SIGKILL its own PID 1)."""
    pid = int(compose.inspect(container)["State"]["Pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.timeout(3600)
async def test_docker_compose_up_for_real(system: System) -> None:
    compose, report, project_dir = system.compose, system.report, system.project_dir
    secrets_dir = project_dir / "secrets"
    containers = len(SERVICES) + 4  # and the two brokers, Redis, the cloud-sink (not the one-shot)

    # 1 + 2: build and bring up, with one command, from a clean checkout.
    cold = not project_images(compose)
    started = time.monotonic()
    compose("up", "--detach", "--build", timeout=3600)
    up_returned = time.monotonic() - started
    await all_healthy(compose, containers, 300, "every container healthy after the first up")
    first_up = time.monotonic() - started
    how = "cold: every image built" if cold else "images of an earlier run there, rebuilt where changed"
    report.add(
        f"first `up --build` ({how}): "
        f"{first_up:.0f} s to all {containers} containers healthy (the command returned after {up_returned:.0f} s)"
    )
    one_shot = compose.containers("secrets")
    assert [c["ExitCode"] for c in one_shot] == [0], one_shot
    made = secrets_digest(secrets_dir)
    assert {"keyring", "ca_crt", "ca_key", "mqtt_reader_password"} <= set(made), sorted(made)
    owner = secrets_dir.stat()
    assert {(p.stat().st_uid, p.stat().st_gid) for p in secrets_dir.iterdir()} == {(owner.st_uid, owner.st_gid)}

    # 3: the contract from outside, as a third party.
    ca = secrets_dir / "ca_crt"
    assert anonymous_refused(ca) == {}
    public = PublicBroker(ca, (secrets_dir / "mqtt_reader_password").read_text().strip())
    reader = redis.Redis(
        host="127.0.0.1",
        port=6379,
        username="reader",
        password=(secrets_dir / "redis_reader_password").read_text().strip(),
        decode_responses=True,
        socket_timeout=30,
    )
    windows = Windows(reader)
    try:
        await wait_until(lambda: all(public.online(s) for s in SERVICES), 120, "every service online")
        assert {s: len(public.online(s)) for s in SERVICES} == dict.fromkeys(SERVICES, 1)

        def latest_for_every_device() -> bool:
            return all(set(reader.hgetall(f"{BASE}:latest:{d}")) == set(DEVICES[d][1]) for d in DEVICES)

        await wait_until(latest_for_every_device, 120, "the latest values of every simulated device in Redis")
        await wait_until(lambda: sink("/stats")["records"] > 0, 120, "records at the cloud-sink")
        try:
            await wait_until(
                lambda: all(public.projected(d, sensors) for d, (_, sensors) in DEVICES.items()),
                60,
                "every device's projection (state, availability, discovery) on the public broker",
            )
        except AssertionError as exc:
            seen = sorted(t for t in public.status if "/status/" not in t)
            raise AssertionError(
                f"{exc}; projection topics seen: {seen[:40]}; exporter log: {log_lines(compose, 'exporter')[-20:]}"
            ) from None
        assert public.topic(f"{BASE}/v2/exporter/state") == "online"
        # Prometheus, as a scraper on the host sees it: each singleton's /metrics on its loopback port,
        # with its windows' lag observed (the sensor-reader, which handles none, its published readings).
        scraped = {service: scrape(port) for service, port in METRICS_PORTS.items()}
        for service, families in scraped.items():
            wanted = "iotpipe_published" if service == "sensor-reader" else "iotpipe_window_lag_seconds"
            assert wanted in families, f"{service}'s /metrics lacks {wanted}: {sorted(families)}"
        for device in DEVICES:
            assert any(r["type"] == "window" for r in sink(f"/records?device={device}")), device
        # And from inside, so far: nothing but JSON lines, no error, from any Python service.
        for service in (*SERVICES, "cloud-sink"):
            lines = log_lines(compose, service)
            bad = [line for line in lines if not line.startswith("{") or '"level":"ERROR"' in line]
            assert lines and not bad, f"{service} logged: {bad[:5]}"
        report.add(
            f"from outside: anonymous refused (MQTT 1883, 8883, Redis, the sink's ingest); {len(SERVICES)} "
            f"services online on the public broker; latest values of {len(DEVICES)} devices in Redis and "
            "their projection (state, availability, Home Assistant discovery) on the public broker; "
            f"/metrics of {len(METRICS_PORTS)} services scraped on the host's loopback; "
            f"{sink('/stats')['records']} records at the cloud-sink"
        )

        # The control: the reader paused, its windows missing; the count must see them.
        t0 = now_window()
        reader_ctr = compose.containers("sensor-reader")[0]["Names"][0]
        await wait_until(lambda: now_window() >= t0 + 3 * WINDOW_MS, 10, "three windows")
        compose.podman("pause", reader_ctr)
        paused_at = now_window()
        await wait_until(lambda: now_window() >= paused_at + 5 * WINDOW_MS, 10, "five seconds paused")
        compose.podman("unpause", reader_ctr)
        t1 = now_window() + 3 * WINDOW_MS
        await wait_until(lambda: now_window() >= t1 + 2 * WINDOW_MS, 10, "the segment to end")
        await wait_until(lambda: windows.caught_up(t0, t1), 120, "the pipeline past the pause")
        control = windows.tally(t0, t1)
        series = sum(len(DEVICES[d][1]) for d in STRICT)
        for where, tally in control.items():
            assert len(tally.lost) >= 3 * series, f"the count did not see the pause at {where}: {tally}"
            assert not tally.duplicated and not tally.unexpected, f"{where}: {tally}"
        report.add(
            f"control (the reader paused 5 s): lost/dup/unexp redis {control['redis']}, cloud {control['cloud']} "
            "(the count sees missing windows)"
        )

        # 4: three preprocessors share the raw stream, each window processed once.
        t0 = now_window()
        duplicates_before = sink("/stats")["duplicate_records"]
        compose("up", "--detach", "--scale", "preprocessor=3", timeout=600)
        await all_healthy(compose, containers + 2, 180, "three preprocessors healthy")
        await wait_until(lambda: len(public.online("preprocessor")) == 3, 60, "three preprocessors online")
        counts = {i: counter(s["counters"], "windows") for i, s in public.online("preprocessor").items()}

        def each_processed_more() -> bool:
            now = {i: counter(s["counters"], "windows") for i, s in public.online("preprocessor").items()}
            return set(now) == set(counts) and all(now[i] > counts[i] for i in counts)

        await wait_until(each_processed_more, 120, "each of the three preprocessors processing windows")
        t1 = now_window() + (5 if SHORT else 20) * WINDOW_MS
        await wait_until(lambda: now_window() >= t1 + 2 * WINDOW_MS, 60, "the segment to end")
        scaled = await windows.settle(t0, t1, 120)
        shared = {i: counter(s["counters"], "windows") - counts[i] for i, s in public.online("preprocessor").items()}
        duplicates = sink("/stats")["duplicate_records"] - duplicates_before
        report.add(
            f"--scale preprocessor=3: windows computed per replica {sorted(shared.values())}; "
            f"lost/dup/unexp redis {scaled['redis']}, cloud {scaled['cloud']}; copies the sink recognised: {duplicates}"
        )
        assert all(t.clean for t in scaled.values()), scaled
        assert duplicates == 0, "a window was processed twice"

        # 5a: one service's process killed; the restart policy brings it back; nothing lost.
        t0 = now_window()
        writer = compose.containers("cache-writer")[0]["Names"][0]
        restarts = int(compose.inspect(writer)["RestartCount"])
        killed_pid = kill_process(compose, writer)
        killed_at = time.monotonic()

        def restarted() -> bool:
            state = compose.inspect(writer)
            return int(state["RestartCount"]) > restarts and state["State"]["Running"]

        await wait_until(restarted, 60, "the cache-writer restarted by its restart policy")
        back_in = time.monotonic() - killed_at
        assert int(compose.inspect(writer)["State"]["Pid"]) != killed_pid
        await all_healthy(compose, containers + 2, 120, "the cache-writer healthy again")
        t1 = now_window() + (5 if SHORT else 15) * WINDOW_MS
        await wait_until(lambda: now_window() >= t1 + 2 * WINDOW_MS, 60, "the segment to end")
        crash = await windows.settle(t0, t1, 180)
        report.add(
            f"cache-writer's process killed (SIGKILL): running again after {back_in:.1f} s; "
            f"lost/dup/unexp redis {crash['redis']}, cloud {crash['cloud']}"
        )
        assert all(t.clean for t in crash.values()), crash

        # 5b: back to one preprocessor, then recreated; nothing lost.
        t0 = now_window()
        compose("up", "--detach", "--scale", "preprocessor=1", timeout=600)
        await all_healthy(compose, containers, 180, "one preprocessor left")
        compose("up", "--detach", "--force-recreate", "--no-deps", "preprocessor", timeout=600)
        await all_healthy(compose, containers, 180, "the recreated preprocessor healthy")
        t1 = now_window() + (5 if SHORT else 15) * WINDOW_MS
        await wait_until(lambda: now_window() >= t1 + 2 * WINDOW_MS, 60, "the segment to end")
        # A preprocessor stopped as the last of its group keeps its session; the new one adopts it
        # IOTPIPE_SHARE_ADOPT_AFTER (30 s) after it said offline (docs/operations.md).
        redeployed = await windows.settle(t0, t1, 240)
        report.add(
            "preprocessor scaled 3 -> 1 and recreated: "
            f"lost/dup/unexp redis {redeployed['redis']}, cloud {redeployed['cloud']}"
        )
        assert all(t.clean for t in redeployed.values()), redeployed

        # 6: `docker compose logs <service>`: its JSON lines, only its.
        logs = log_lines(compose, "cache-writer")
        docs = [json.loads(line) for line in logs]
        assert docs and {d["service"] for d in docs} == {"cache-writer"}, logs[:5]
        assert all({"ts", "level", "msg"} <= set(d) for d in docs)
        report.add(f"`logs cache-writer`: {len(docs)} JSON lines, all the cache-writer's")
    finally:
        public.close()
        reader.close()

    # 7: down, volumes included: nothing left. Then a warm up: images built, secrets kept.
    started = time.monotonic()
    compose("down", "--volumes", "--remove-orphans", timeout=600)
    down_took = time.monotonic() - started
    assert compose.leftovers() == {"containers": [], "volumes": [], "networks": []}
    report.add(f"`down --volumes`: {down_took:.0f} s; no container, volume or network of the project left")

    started = time.monotonic()
    compose("up", "--detach", timeout=1200)
    await all_healthy(compose, containers, 300, "every container healthy after the warm up")
    warm_up = time.monotonic() - started
    assert secrets_digest(secrets_dir) == made, "a secret changed on the second up"
    report.add(f"warm `up` (images built, new volumes, ./secrets kept, none changed): {warm_up:.0f} s to all healthy")
    compose("down", "--volumes", "--remove-orphans", timeout=600)
    assert compose.leftovers() == {"containers": [], "volumes": [], "networks": []}
