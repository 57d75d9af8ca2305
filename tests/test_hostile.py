"""The hostile-input battery (issue 10; ../shared/notes/reliability.md items 10-16; docs/security.md):
one real pipeline (sensor-reader with genuine simulated devices, preprocessor, cache-writer,
cloud-forwarder -> cloud-sink, monitor) against the session's real broker and Redis, attacked back to
back as an insider would, each time with the one credential named (a service's MQTT password, and for
some attacks the key ring).

Every attack asserts four things:
1. the refusal where it happens: the broker's reason code, or the receiving services'
   `iotpipe_rejected{reason=...}` counters moved by exactly the attack's messages and, as they
   dead-letter, their dead-letter files gained exactly those entries (nothing else was refused);
2. genuine data keeps flowing: a genuine device's window that *started after* the attack reaches Redis
   (`latest_start` moves past the attack) and the cloud-sink;
3. nothing hostile got in: no Redis key, sink record or device status for the forged device;
4. no service died, and no service log (nor dead-letter file) holds key material, a password or the
   plaintext sealed inside a hostile message.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import math
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import redis.exceptions
from cryptography.fernet import Fernet
from iotpipe import (
    Alert,
    ConfigError,
    HealthReport,
    KeyRing,
    Opener,
    PlainMessage,
    Processed,
    RawBatch,
    Sealer,
    Topics,
    counter,
)
from iotpipe._envelope import REPLAY_WINDOW
from iotpipe.devstack import mqtt_password_file, redis_password_file
from sensor_reader.service import Settings as ReaderSettings
from servers import (
    TAP,
    WINDOW_MAX_AGE,
    Stack,
    bus_for,
    free_port,
    health_doc,
    owned_client_id,
    service_counters,
    service_env,
    spawn,
    stop_all,
    unseal,
    wait_online,
    wait_until,
)
from test_boundary import ACCEPTED, REFUSED, Client
from test_broker import raw_connect
from test_message_ttl import primary_key
from test_redis_acl import DANGEROUS, READER_ONLY, SERVER_REFUSED, WRITER_ONLY

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

# The genuine devices and their sensors.
GENUINE = {"gen-a": ("temperature", "humidity"), "gen-b": ("pressure",)}
DEVICES = """
[[devices]]
id = "gen-a"
driver = "simulated"
interval = 0.05
[devices.params]
sensors = ["temperature", "humidity"]
spike_probability = 0.0
dropout_probability = 0.0

[[devices]]
id = "gen-b"
driver = "simulated"
interval = 0.05
[devices.params]
sensors = ["pressure"]
spike_probability = 0.0
dropout_probability = 0.0
"""
WINDOW_MS = 500
# A short message TTL (the default is 7 days): a message sealed longer ago than this is refused.
MESSAGE_TTL = 300
# service name -> its module
MODULES = {
    "preprocessor": "preprocessor",
    "cache-writer": "cache_writer",
    "cloud-forwarder": "cloud_forwarder",
    "monitor": "monitor",
    "sensor-reader": "sensor_reader",
}
CONSUMERS = ("preprocessor", "cache-writer", "cloud-forwarder", "monitor")
PROCESSED_CONSUMERS = ("cache-writer", "cloud-forwarder", "monitor")
WAIT = 45  # s: generous, the machine is shared
# The preprocessor's per-device allowance, smaller than shipped (200 windows/s, a burst of 3,600,
# 50,000 devices) so that a flood of a few thousand windows is shed: still 10x what a genuine device
# delivers here (2 windows/s).
FLOOD_RATE, FLOOD_BURST, FLOOD_DEVICES = 20, 400, 100


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def marker() -> str:
    """A plaintext to seal inside a hostile message: it must never appear in a log."""
    return f"PT{uuid.uuid4().hex[:20]}"


# -- the insider's tools --------------------------------------------------------------------------


class Insider:
    """A holder of `user`'s MQTT password with a bare paho MQTT 5 client (what any MQTT library
    does): it publishes whatever bytes on whatever topic, past every check of our own Bus."""

    def __init__(self, stack: Stack, user: str | None, client_id: str | None = None) -> None:
        """`client_id` as given, by default one of `user`'s own (`<user>-<id>`, the broker's rule)."""
        self.client = Client(stack, user, client_id or owned_client_id(str(user), f"evil-{uuid.uuid4().hex[:8]}"))

    async def connect(self) -> str:
        return await asyncio.to_thread(self.client.connect)

    async def __aenter__(self) -> Insider:
        reason = await self.connect()
        assert reason == "Success", reason
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The PUBACK's reason code (0/16 accepted, 135 refused)."""
        return await asyncio.to_thread(self.client.publish, topic, payload, retain)

    async def publish_anything(self, topic: str, payload: bytes) -> int | str:
        """Publish even a topic the MQTT spec forbids (wildcards, NUL): paho's own check is skipped,
        as a hostile client would. The PUBACK's reason code, or the reason the broker dropped us."""
        self.client.client._raise_for_invalid_topic = lambda _topic: None  # type: ignore[method-assign]
        info = self.client.client.publish(topic, payload, qos=1)
        outcome: list[int | str] = []

        def answered() -> bool:
            if info.mid in self.client.pubacks:
                outcome.append(self.client.pubacks.pop(info.mid))
            elif not self.client.disconnects.empty():
                outcome.append(self.client.disconnects.get())
            return bool(outcome)

        await wait_until(answered, 15, f"the broker's answer to a publish on {topic[:60]!r}")
        return outcome[0]

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)

    async def subscribe(self, topic_filter: str) -> int:
        return await asyncio.to_thread(self.client.subscribe, topic_filter)

    def received(self) -> list[mqtt.MQTTMessage]:
        return list(self.client.messages.queue)


def seal_inner(keyring: KeyRing, plaintext: bytes) -> bytes:
    """A valid envelope around any plaintext: what a key-ring holder can make (Fernet directly)."""
    token = keyring.encrypt(plaintext).decode("ascii")
    return orjson.dumps({"v": 1, "alg": "fernet", "kid": keyring.primary_kid, "ct": token})


def inner(topic: str, data: bytes, src: str = "sensor-reader/evil", boot: str | None = None, seq: int = 1) -> bytes:
    """The sealed document (docs/contract.md) around `data`, given as raw JSON bytes."""
    head = orjson.dumps({"topic": topic, "src": src, "boot": boot or uuid.uuid4().hex[:16], "seq": seq, "ts": now_ms()})
    return head[:-1] + b',"data":' + data + b"}"


def raw_data(device: str, start: int, value: bytes = b"21.5", unit: bytes = b'"degC"') -> bytes:
    """A RawBatch for `device` (one sensor, one reading) as JSON bytes, with `value` and `unit`
    spliced in as given (so they can be what JSON or the contract forbids)."""
    return (
        b'{"windows":[{"device":"%s","window":{"start":%d,"size":%d},"sensors":{"s":{"unit":%s,"t":[%d],"v":[%s]}}}]}'
        % (device.encode(), start, WINDOW_MS, unit, start, value)
    )


def processed_data(device: str, start: int, value: bytes = b"21.5", unit: bytes = b'"degC"') -> bytes:
    """A Processed message for `device` as JSON bytes, `value` (the mean) and `unit` spliced in."""
    return (
        b'{"windows":[{"device":"%s","sensor":"s","unit":%s,"start":%d,"end":%d,"n":1,'
        b'"mean":%s,"median":21.5,"min":21.5,"max":21.5,"std":0.0}]}'
        % (device.encode(), unit, start, start + 1000, value)
    )


def health_data(device: str, start: int, value: bytes = b"30000", unit: bytes = b'"bus: no ACK"') -> bytes:
    """A HealthReport claiming `device` failing, `value` (valid_for) and `unit` (the reason) spliced in."""
    return b'{"valid_for":%s,"devices":{"%s":{"state":"fault","reason":%s}}}' % (value, device.encode(), unit)


def alert_data(device: str, start: int, value: bytes = b"21.5", unit: bytes = b'"s"') -> bytes:
    """An anomaly episode's open alert for `device`, `value` (the window mean in its evidence) and
    `unit` (the sensor) spliced in."""
    return (
        b'{"kind":"anomaly_open","device":"%s","sensor":%s,"episode":"s/%d","anomaly":"level_shift",'
        b'"start":%d,"end":%d,"score":7.5,"evidence":{"mean":%s,"min":21.5,"max":21.5,"std":0.0,"n":10,'
        b'"windows":3},"ts":%d}' % (device.encode(), unit, start, start, start + 1000, value, start + 1000)
    )


@dataclass(frozen=True)
class Target:
    """A kind of sealed topic: the user who may publish on it (whose password the insider holds),
    the services that receive it, its payload model and an accepted payload for a device."""

    user: str
    receivers: tuple[str, ...]
    make: Callable[..., bytes]
    model: Any

    def topic(self, topics: Topics, kind: str, device: str) -> str:
        # Alerts name their device in the topic; the others the publishing instance.
        return topics.alerts(device) if kind == "alerts" else str(getattr(topics, kind)("evil"))

    @staticmethod
    def device(data: Any) -> str:
        if isinstance(data, HealthReport):
            return next(iter(data.devices))
        return str(data.windows[0].device if hasattr(data, "windows") else data.device)


TARGETS = {
    "raw": Target("sensor-reader", ("preprocessor",), raw_data, RawBatch),
    "processed": Target("preprocessor", PROCESSED_CONSUMERS, processed_data, Processed),
    "health": Target("sensor-reader", ("monitor",), health_data, HealthReport),
    "alerts": Target("monitor", ("cloud-forwarder",), alert_data, Alert),
}
KINDS = list(TARGETS)


# -- what the tests' read-everything user sees on the wire ------------------------------------------


@dataclass
class Watch:
    keyring: KeyRing
    topics: Topics
    instance: str
    raw: list[tuple[int, bytes, dict[str, Any]]] = field(default_factory=list)  # (arrival ms, payload, inner)
    processed: collections.Counter[tuple[str, str, int]] = field(default_factory=collections.Counter)
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: collections.defaultdict(list))
    seen: list[tuple[int, str]] = field(default_factory=list)  # (arrival ms, topic) of every message

    async def handle(self, messages: Sequence[PlainMessage[None]]) -> None:
        for m in messages:
            arrived = now_ms()
            self.seen.append((arrived, m.topic))
            kind = m.topic.split("/")[2]
            if kind == "status" and m.payload:
                self.statuses["/".join(m.topic.split("/")[3:])].append(orjson.loads(m.payload))
            elif m.topic == self.topics.raw(self.instance):
                with contextlib.suppress(Exception):  # hostile copies on this topic: not genuine
                    doc = unseal(self.keyring, m.payload)
                    if doc["src"] == f"sensor-reader/{self.instance}":
                        self.raw.append((arrived, m.payload, doc))
            elif m.topic == self.topics.processed(self.instance):
                with contextlib.suppress(Exception):
                    doc = unseal(self.keyring, m.payload)
                    for w in doc["data"]["windows"]:
                        self.processed[(w["device"], w["sensor"], w["start"])] += 1

    def states(self, key: str) -> list[object]:
        return [s.get("state") for s in self.statuses.get(key, [])]

    def kinds_since(self, t: int) -> set[str]:
        return {topic.split("/")[2] for arrived, topic in self.seen if arrived > t}


@dataclass
class Snapshot:
    rejected: dict[str, collections.Counter[str]]
    dead: dict[str, int]
    t: int


@dataclass
class Pipeline:
    stack: Stack
    keyring: KeyRing
    topics: Topics
    base: str
    instance: str
    workdir: Path
    sink: str
    redis: aioredis.Redis
    watch: Watch
    procs: dict[str, subprocess.Popen[bytes]]
    markers: list[str] = field(default_factory=list)

    # -- the services' own view: counters and dead letters -------------------------------------
    def rejected(self, service: str) -> collections.Counter[str]:
        counters = service_counters(self.workdir, service, self.instance)
        return collections.Counter({k: int(v) for k, v in counters.get("rejected", {}).items()})

    def dead_letters(self, service: str) -> list[dict[str, Any]]:
        path = self.workdir / f"dead-{service}.jsonl"
        return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []

    def snapshot(self) -> Snapshot:
        return Snapshot(
            {s: self.rejected(s) for s in CONSUMERS}, {s: len(self.dead_letters(s)) for s in CONSUMERS}, now_ms()
        )

    async def settled(self) -> None:
        """Every consumer has written its health file (counters) since now: what it counted up to
        now is in it."""
        mark = now_ms()
        await wait_until(
            lambda: all(health_doc(self.workdir, s, self.instance).get("ts", 0) > mark for s in CONSUMERS),
            WAIT,
            "a heartbeat of every consumer",
        )

    async def refused(
        self, before: Snapshot, expected: dict[str, dict[str, int]], topics: set[str] | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """Each service in `expected` refused exactly those messages by reason (every other consumer
        refused nothing), and dead-lettered exactly those (a duplicate is only counted), on `topics`.
        Returns the new dead letters per service."""

        def delta(service: str) -> collections.Counter[str]:
            now = self.rejected(service)
            now.subtract(before.rejected[service])
            return +now

        try:
            await wait_until(
                lambda: all(delta(s)[r] >= n for s, reasons in expected.items() for r, n in reasons.items()),
                WAIT,
                f"the refusals {expected}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; refused: { {s: dict(delta(s)) for s in CONSUMERS} }") from None
        await self.settled()
        letters = {}
        for service in CONSUMERS:
            want = collections.Counter(expected.get(service, {}))
            assert delta(service) == want, f"{service} refused {dict(delta(service))}, expected {dict(want)}"
            letters[service] = self.dead_letters(service)[before.dead[service] :]
            want.pop("duplicate", None)  # counted quietly: a QoS 1 redelivery looks alike
            got = collections.Counter(letter["reason"] for letter in letters[service])
            assert got == want, f"{service} dead-lettered {dict(got)}, expected {dict(want)}"
            if topics is not None:
                assert {letter["topic"] for letter in letters[service]} <= topics
        return letters

    # -- genuine data -----------------------------------------------------------------------
    async def latest_starts(self) -> dict[str, int]:
        out = {}
        for device in GENUINE:
            starts = await self.redis.hvals(f"{self.base}:latest_start:{device}")
            out[device] = max((int(s) for s in starts), default=0)
        return out

    async def sink_records(self, device: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.sink}/records", params={"device": device}) as r:
            return await r.json()  # type: ignore[no-any-return]

    async def flowing(self, after: int, sink: bool = True, timeout: float = WAIT) -> None:
        """A window of every genuine device that started after `after` (unix ms) is in Redis, and
        one of them at the cloud-sink."""

        async def in_redis() -> bool:
            return all(start > after for start in (await self.latest_starts()).values())

        async def at_sink() -> bool:
            return any(r["type"] == "window" and r["start"] > after for r in await self.sink_records("gen-a"))

        try:
            await wait_until(in_redis, timeout, f"genuine windows started after {after} in Redis")
            if sink:
                await wait_until(at_sink, timeout, f"a genuine window started after {after} at the cloud-sink")
        except AssertionError:
            raise AssertionError(f"genuine data stopped flowing; services: {self.exits()}\n{self.tails()}") from None
        self.alive()

    def tails(self, lines: int = 10) -> str:
        """The end of each service's output, for a failure's message."""
        return "\n".join(
            f"== {name}\n" + "\n".join((self.workdir / f"{name}.out").read_text(errors="replace").splitlines()[-lines:])
            for name in self.procs
        )

    def exits(self) -> dict[str, int | None]:
        return {name: proc.poll() for name, proc in self.procs.items()}

    def alive(self) -> None:
        assert all(code is None for code in self.exits().values()), f"a service died: {self.exits()}"

    async def nothing_from(self, device: str, sensors: Sequence[str] = ("s",)) -> None:
        """No Redis key, cloud record or device status names `device`."""
        assert await self.redis.hgetall(f"{self.base}:latest:{device}") == {}
        assert await self.redis.hgetall(f"{self.base}:latest_start:{device}") == {}
        for sensor in sensors:
            assert await self.redis.zrange(f"{self.base}:series:{device}:{sensor}", 0, -1) == []
        assert await self.sink_records(device) == []
        assert f"device/{device}" not in self.watch.statuses

    # -- secrets --------------------------------------------------------------------------------
    def secrets(self) -> list[str]:
        """Every secret a service holds: the key ring's keys, passwords, the cloud token."""
        d = self.stack.secrets_dir
        found = [line.split()[1] for line in (d / "keyring").read_text().splitlines() if line.strip()[:1] not in "#"]
        found += [p.read_text().strip() for p in d.glob("*_password")]
        found.append((d / "cloud_token").read_text().strip())
        return [s for s in found if s]

    def no_leaks(self) -> None:
        """No service log, output or dead-letter file holds a secret or a sealed hostile plaintext."""
        files = [*(self.workdir / "log").glob("*.log"), *self.workdir.glob("*.out"), *self.workdir.glob("dead-*")]
        assert len(files) >= 10, files
        for path in files:
            text = path.read_text(errors="replace")
            for secret in self.secrets():
                assert secret not in text, f"a secret in {path.name}"
            for plaintext in self.markers:
                assert plaintext not in text, f"a sealed plaintext ({plaintext}) in {path.name}"

    async def done(self, after: int, forged: Sequence[str] = ()) -> None:
        """The end of every attack: genuine data flows, nothing forged got in, nothing leaked."""
        await self.flowing(after)
        for device in forged:
            await self.nothing_from(device)
        self.no_leaks()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipe(stack: Stack, keyring: KeyRing, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pipeline]:
    workdir = tmp_path_factory.mktemp("hostile")
    base = f"t{uuid.uuid4().hex[:12]}"  # `t...`: a prefix the tests' Redis users may reach
    instance = f"h{uuid.uuid4().hex[:6]}"
    topics = Topics(base)
    devices = workdir / "devices.toml"
    devices.write_text(DEVICES)
    sink_port = free_port()
    env = service_env(
        stack,
        base,
        workdir,
        instance,
        sink_port,
        IOTPIPE_DEVICES_FILE=str(devices),
        IOTPIPE_WINDOW_MS=str(WINDOW_MS),
        IOTPIPE_WINDOW_GRACE_MS="100",
        IOTPIPE_STATUS_INTERVAL="0.5",
        IOTPIPE_BATCH_LINGER="0.2",
        IOTPIPE_CHECK_INTERVAL="0.5",
        IOTPIPE_MESSAGE_TTL=str(MESSAGE_TTL),
        IOTPIPE_FLOOD_RATE=str(FLOOD_RATE),
        IOTPIPE_FLOOD_BURST=str(FLOOD_BURST),
        IOTPIPE_FLOOD_DEVICES=str(FLOOD_DEVICES),
        IOTPIPE_CLOUD_TOKEN_FILE=str(stack.secrets_dir / "cloud_token"),
        IOTPIPE_SINK_TOKEN_FILE=str(stack.secrets_dir / "cloud_token"),
        IOTPIPE_LOG_DIR=str(workdir / "log"),
    )
    del env[WINDOW_MAX_AGE]  # the shipped clock bounds (the suite widens the past one for its 1970 dates)
    watch = Watch(keyring, topics, instance)
    tap = bus_for(stack, TAP)
    tap.subscribe(f"{topics.root}/#", watch.handle, sealed=False)
    await tap.start()
    await tap.wait_connected()
    await asyncio.wait_for(tap.subscribed.wait(), 15)
    password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
    redis = aioredis.Redis(port=stack.ports.redis, username="reader", password=password, decode_responses=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(service: str) -> None:
        own = {"IOTPIPE_DEAD_LETTER_FILE": str(workdir / f"dead-{service}.jsonl")}
        procs[service] = spawn(MODULES.get(service, service), {**env, **own}, workdir, service)

    pipeline = Pipeline(
        stack, keyring, topics, base, instance, workdir, f"http://127.0.0.1:{sink_port}", redis, watch, procs
    )
    try:
        start("cloud_sink")
        for service in CONSUMERS:
            start(service)
        # Consumers first: their durable sessions exist (online is published after SUBSCRIBE).
        await asyncio.gather(*(wait_online(stack, topics.service_status(s, instance), 60) for s in CONSUMERS))
        start("sensor-reader")
        await pipeline.flowing(now_ms(), timeout=90)
        yield pipeline
    finally:
        stop_all(procs.values())
        await tap.stop()
        await redis.aclose()


# -- item 10: fuzzed payloads ------------------------------------------------------------------


def fuzz_cases(kind: str, keyring: KeyRing, topic: str, device: str, secret: str) -> list[tuple[str, bytes, str]]:
    """(what, payload, the reason it is refused for). The sealed ones are valid envelopes around
    plaintexts that differ from an accepted one only where named; `secret` sits in their values."""
    make = TARGETS[kind].make
    start = now_ms() // WINDOW_MS * WINDOW_MS
    unit = b'"%s"' % secret.encode()

    def sealed(data: bytes) -> bytes:
        return seal_inner(keyring, inner(topic, data))

    return [
        # The password alone: not an envelope at all.
        ("empty", b"", "malformed"),
        ("malformed JSON", b'{"v":1,"alg":', "malformed"),
        ("deep nesting", b"[" * 200_000, "malformed"),
        ("NaN literal", b'{"v":NaN,"alg":"fernet","kid":"k","ct":"x"}', "malformed"),
        ("1e999", b'{"v":1e999,"alg":"fernet","kid":"k","ct":"x"}', "malformed"),
        ("invalid UTF-8", b'{"v":1,"alg":"\xff\xfe","kid":"k","ct":"x"}', "malformed"),
        # The key ring too: a valid envelope around a bad plaintext.
        ("sealed malformed JSON", sealed(make(device, start, unit=unit)[:-7]), "malformed"),
        (
            "sealed wrong schema",
            sealed(b'{"windows":[{"device":"%s","extra":%s}]}' % (device.encode(), unit)),
            "schema",
        ),
        # A refusal names the rule and where, never the key: this one's would forge a log line.
        ("sealed unknown key", sealed(b'{"%s\\n%s forged":1}' % (secret.encode(), secret.encode())), "schema"),
        ("sealed NaN literal", sealed(make(device, start, b"NaN", unit)), "malformed"),
        ("sealed Infinity literal", sealed(make(device, start, b"-Infinity", unit)), "malformed"),
        ("sealed 1e999", sealed(make(device, start, b"1e999", unit)), "schema"),
        ("sealed deep nesting", sealed(b'{"windows":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "malformed"),
        ("sealed invalid UTF-8 in the data", sealed(make(device, start, unit=b'"\xff' + unit[1:])), "schema"),
        (
            "sealed invalid UTF-8 in the envelope",
            seal_inner(keyring, inner(topic, make(device, start, unit=unit)).replace(b"sensor-reader/evil", b"\xff")),
            "malformed",
        ),
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_fuzzed_payloads_are_refused_by_validation_and_the_stream_flows(
    pipe: Pipeline, keyring: KeyRing, kind: str
) -> None:
    """Item 10: malformed JSON, wrong schema, NaN/Infinity, 1e999, deep nesting, invalid UTF-8, both
    as the envelope and inside a valid one: each is refused by the receiving services' validation,
    counted and dead-lettered, and the next genuine message is processed."""
    target = TARGETS[kind]
    device = f"evil-fuzz-{kind}"
    topic = target.topic(pipe.topics, kind, device)
    secret = marker()
    pipe.markers.append(secret)
    cases = fuzz_cases(kind, keyring, topic, device, secret)
    # The control: the same plaintext with nothing altered opens.
    good = seal_inner(keyring, inner(topic, target.make(device, now_ms(), unit=b'"%s"' % secret.encode())))
    assert target.device(Opener(keyring).open(topic, good, target.model).data) == device
    before = pipe.snapshot()
    async with Insider(pipe.stack, target.user) as insider:
        for what, payload, _reason in cases:
            assert await insider.publish(topic, payload) in ACCEPTED, what  # the broker cannot look inside
    attacked = now_ms()
    reasons = collections.Counter(reason for _what, _payload, reason in cases)
    letters = await pipe.refused(before, {r: dict(reasons) for r in target.receivers}, {topic})
    for receiver in target.receivers:  # the project's own errors only (no RecursionError, say)
        assert not [x["error"] for x in letters[receiver] if x["error"].startswith("unexpected")]
    await pipe.done(attacked, forged=[device])


# -- item 11: oversize ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_an_oversize_message_is_refused_by_size_before_decrypting(
    pipe: Pipeline, keyring: KeyRing, kind: str
) -> None:
    """Item 11. Over the services' payload limit (1 MiB), under the broker's packet limit (2 MiB):
    the broker delivers it, and each receiver refuses it by its size alone: it is an authentic
    envelope padded with JSON whitespace, which would open if the size were not checked first."""
    target = TARGETS[kind]
    device = f"evil-big-{kind}"
    topic = target.topic(pipe.topics, kind, device)
    genuine = Sealer(keyring, f"{target.user}/evil").seal(topic, orjson.loads(target.make(device, now_ms())))
    padded = b" " * ((3 << 19) - len(genuine)) + genuine  # 1.5 MiB
    assert target.device(Opener(keyring, max_bytes=4 << 20).open(topic, padded, target.model).data) == device
    before = pipe.snapshot()
    async with Insider(pipe.stack, target.user) as insider:
        assert await insider.publish(topic, padded) in ACCEPTED
    attacked = now_ms()
    letters = await pipe.refused(before, {r: {"malformed": 1} for r in target.receivers}, {topic})
    for receiver in target.receivers:
        (letter,) = letters[receiver]
        assert "exceeds" in letter["error"] and letter["bytes"] == len(padded)
        assert "payload" not in letter  # too big to keep; its size is
    await pipe.done(attacked, forged=[device])


# -- item 12: tokens that do not authenticate -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_tokens_that_do_not_authenticate_are_refused_and_nothing_secret_is_logged(
    pipe: Pipeline, keyring: KeyRing, kind: str
) -> None:
    """Item 12: a wrong key (under the genuine key id), a flipped byte, a truncated and an empty token:
    each counted as undecryptable, no crash, and no log holds a key, a password or the plaintext."""
    target = TARGETS[kind]
    user = target.user
    device = f"evil-key-{kind}"
    topic = target.topic(pipe.topics, kind, device)
    secret = marker()
    pipe.markers.append(secret)
    data = orjson.loads(target.make(device, now_ms(), unit=b'"%s"' % secret.encode()))
    stranger = KeyRing([(keyring.primary_kid, Fernet.generate_key())])
    envelope = orjson.loads(Sealer(keyring, f"{user}/evil").seal(topic, data))
    token = bytearray(base64.urlsafe_b64decode(envelope["ct"]))
    token[len(token) // 2] ^= 0x01
    payloads = {
        "wrong key": Sealer(stranger, f"{user}/evil").seal(topic, data),
        "flipped byte": orjson.dumps({**envelope, "ct": base64.urlsafe_b64encode(bytes(token)).decode()}),
        "truncated": orjson.dumps({**envelope, "ct": envelope["ct"][: len(envelope["ct"]) // 2]}),
        "empty": orjson.dumps({**envelope, "ct": ""}),
    }
    before = pipe.snapshot()
    async with Insider(pipe.stack, user) as insider:
        for what, payload in payloads.items():
            assert await insider.publish(topic, payload) in ACCEPTED, what
    attacked = now_ms()
    await pipe.refused(before, {r: {"undecryptable": len(payloads)} for r in target.receivers}, {topic})
    await pipe.done(attacked, forged=[device])


# -- item 13: replay ------------------------------------------------------------------------------


async def test_replays_are_dropped_or_refused(pipe: Pipeline, keyring: KeyRing) -> None:
    """Item 13, with a genuine raw message captured off the wire (the sensor-reader's password and
    the key ring): the same message again on its topic is dropped as a duplicate, counted quietly
    (no log line, no dead letter) and processed once; on another topic it is refused
    (`topic_mismatch`); re-dated beyond the services' TTL it no longer authenticates
    (`undecryptable`); a sequence number older than the sender's replay window is `stale`."""
    topics, instance = pipe.topics, pipe.instance
    await wait_until(lambda: pipe.watch.raw, WAIT, "a genuine raw message")
    _arrived, captured, doc = pipe.watch.raw[-1]
    windows = {(w["device"], s, w["window"]["start"]) for w in doc["data"]["windows"] for s in w["sensors"]}
    # Processed already: a window that started after it is in Redis (one preprocessor, in order).
    await pipe.flowing(max(start for _d, _s, start in windows) + WINDOW_MS, sink=False)
    kid, key = primary_key(pipe.stack.secrets_dir / "keyring")
    plaintext = keyring.decrypt(orjson.loads(captured)["ct"].encode(), ttl=None)
    old = Fernet(key).encrypt_at_time(plaintext, int(time.time()) - MESSAGE_TTL - 60)
    redated = orjson.dumps({"v": 1, "alg": "fernet", "kid": kid, "ct": old.decode()})
    elsewhere = topics.raw("evil-replay")
    # A sender of the insider's own, far ahead in its sequence, then one of its messages from long before.
    probe, boot, start = f"probe-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:16], now_ms() // WINDOW_MS * WINDOW_MS
    ahead = seal_inner(keyring, inner(elsewhere, raw_data(probe, start), boot=boot, seq=REPLAY_WINDOW + 10))
    behind = seal_inner(keyring, inner(elsewhere, raw_data(probe, start - WINDOW_MS), boot=boot, seq=1))

    before = pipe.snapshot()
    async with Insider(pipe.stack, "sensor-reader") as insider:
        assert await insider.publish(topics.raw(instance), captured) in ACCEPTED
        assert await insider.publish(elsewhere, captured) in ACCEPTED
        assert await insider.publish(topics.raw(instance), redated) in ACCEPTED
        assert await insider.publish(elsewhere, ahead) in ACCEPTED

        async def ahead_stored() -> bool:
            return bool(await pipe.redis.zrangebyscore(f"{pipe.base}:series:{probe}:s", start, start))

        await wait_until(ahead_stored, WAIT, "the sender's message far ahead in its sequence")
        assert await insider.publish(elsewhere, behind) in ACCEPTED
    attacked = now_ms()
    letters = await pipe.refused(
        before,
        {"preprocessor": {"duplicate": 1, "topic_mismatch": 1, "undecryptable": 1, "stale": 1}},
        {elsewhere, topics.raw(instance)},
    )
    assert {(x["reason"], x["topic"]) for x in letters["preprocessor"]} == {
        ("topic_mismatch", elsewhere),
        ("undecryptable", topics.raw(instance)),
        ("stale", elsewhere),
    }
    await pipe.done(attacked)
    assert all(pipe.watch.processed[w] == 1 for w in windows), "a replayed window was processed again"
    assert await pipe.redis.zrange(f"{pipe.base}:series:{probe}:s", 0, -1, withscores=True) != []
    assert await pipe.redis.zrangebyscore(f"{pipe.base}:series:{probe}:s", start - WINDOW_MS, start - 1) == []
    assert "(duplicate)" not in (pipe.workdir / "log" / "preprocessor.log").read_text()  # quietly


# -- item 14 and case 8: ids that are not ids ---------------------------------------------------------

# A topic level that is not an id, and how the broker refuses a publish with it: PUBACK 0x87 (guard
# rule 3, or the ACL for an extra level), or, for what MQTT itself forbids, by closing the connection.
BAD_LEVELS = {
    "slash": ("a/b", REFUSED),
    "plus": ("+", "Protocol error"),
    "hash": ("#", "Protocol error"),
    "wildcard inside": ("a+b", "Protocol error"),
    "dollar": ("$x", REFUSED),
    "empty": ("", REFUSED),
    "NUL": ("a\x00b", "Malformed packet"),
    "64k characters": ("x" * 65_000, REFUSED),
    "300 characters": ("x" * 300, REFUSED),
    "space": ("has space", REFUSED),
    "colon": ("a:b", REFUSED),
    "non-ASCII": ("g\u00e9rard", REFUSED),
}


async def test_topics_with_ids_the_contract_forbids_are_refused_by_the_broker(pipe: Pipeline, keyring: KeyRing) -> None:
    """Item 14 and issue 10 case 8, on the wire: the sensor-reader's password and the key ring, an
    authentic raw batch for a forged device, published on topics whose last level is not an id. The
    broker refuses each, no subscriber (not even the read-everything user) sees it, no service has
    anything to refuse."""
    device = "evil-topic"
    before = pipe.snapshot()
    outcomes = {}
    for what, (level, _expected) in BAD_LEVELS.items():
        topic = f"{pipe.topics.root}/raw/{level}"
        payload = Sealer(keyring, "sensor-reader/evil").seal(topic, orjson.loads(raw_data(device, now_ms())))
        async with Insider(pipe.stack, "sensor-reader") as insider:
            outcomes[what] = await insider.publish_anything(topic, payload)
    attacked = now_ms()
    assert outcomes == {what: expected for what, (_level, expected) in BAD_LEVELS.items()}
    await pipe.refused(before, {})
    await pipe.done(attacked, forged=[device])
    bad = {f"{pipe.topics.root}/raw/{level}" for level, _ in BAD_LEVELS.values()}
    assert not bad & {topic for _t, topic in pipe.watch.seen}


BAD_IDS = {
    "slash": "a/b",
    "plus": "a+b",
    "hash": "#",
    "dollar": "$SYS",
    "empty": "",
    "NUL": "a\x00b",
    "64k characters": "x" * 65_536,
}


async def test_ids_the_contract_forbids_are_refused_at_configuration(pipe: Pipeline) -> None:
    """Item 14 at configuration: a sensor-reader whose devices file names such a device exits at
    once with one clear line (exit 2, no traceback) and never connects; the instance and topic base
    settings, and every topic built from an id, refuse the same values. The running pipeline is
    untouched."""
    started = now_ms()
    procs = {}
    for n, (what, bad) in enumerate(BAD_IDS.items()):
        devices = pipe.workdir / f"bad-devices-{n}.toml"
        escaped = orjson.dumps(bad).decode()  # a JSON string is a TOML basic string (NUL as \u0000)
        devices.write_text(f'[[devices]]\nid = {escaped}\ndriver = "simulated"\n')
        env = service_env(pipe.stack, pipe.base, pipe.workdir / "bad", f"bad{n}", IOTPIPE_DEVICES_FILE=str(devices))
        procs[what] = spawn("sensor_reader", env, pipe.workdir, f"bad-reader-{n}")
    for n, (what, proc) in enumerate(procs.items()):
        assert await asyncio.to_thread(proc.wait, 60) == 2, what
        said = (pipe.workdir / f"bad-reader-{n}.out").read_text()
        lines = said.strip().splitlines()
        assert len(lines) == 1 and "configuration error" in said and "devices[0]" in said and ".id:" in said, said
        assert "Traceback" not in said and len(said) < 500, what
        assert not [line for line in pipe.stack.broker.lines if f"sensor-reader-bad{n} " in line], what
    for bad in BAD_IDS.values():
        for setting in ("instance", "base_topic"):
            with pytest.raises(ConfigError, match=f"IOTPIPE_{setting.upper()}"):
                ReaderSettings.load(**{setting: bad})
        with pytest.raises(ConfigError):
            Topics(bad)
        for build in (pipe.topics.raw, pipe.topics.processed, pipe.topics.alerts, pipe.topics.device_status):
            with pytest.raises(ConfigError):
                build(bad)
    await pipe.done(started)


# -- item 15: ACL negatives ---------------------------------------------------------------------


async def test_anonymous_and_wrong_passwords_are_refused(pipe: Pipeline) -> None:
    """Item 15: no login without a service's own password (a third party's is not one)."""
    started = now_ms()
    reader = mqtt_password_file(pipe.stack.secrets_dir, "reader").read_text().strip()
    for user, password in ((None, None), ("cache-writer", "wrong"), ("nobody", "x"), ("reader", reader)):
        client_id = owned_client_id(str(user), "x")
        assert await asyncio.to_thread(raw_connect, pipe.stack, user, password, client_id) == "Not authorized", user
    await pipe.done(started)


# Per user: topics it may not publish on (each refused with 0x87), and the kinds of topic it may read.
NOT_WRITABLE = {
    "sensor-reader": ("processed/evil", "alerts/gen-a", "status/device/gen-a", "status/service/monitor/evil"),
    "preprocessor": ("raw/evil", "health/evil", "status/device/gen-a", "status/service/monitor/evil"),
    "cache-writer": ("processed/evil", "raw/evil", "status/service/preprocessor/evil"),
    "cloud-forwarder": ("processed/evil", "alerts/gen-a", "raw/evil"),
    "monitor": ("raw/evil", "processed/evil", "health/evil"),
    TAP: ("raw/evil", "processed/evil", "status/device/gen-a", "alerts/gen-a", "status/service/monitor/evil"),
}
READABLE = {
    "sensor-reader": {"status/service/sensor-reader"},
    "preprocessor": {"raw", "status/service/preprocessor"},
    "cache-writer": {"processed", "status/service/cache-writer"},
    "cloud-forwarder": {"processed", "alerts", "status/service/cloud-forwarder"},
    "monitor": {"processed", "health", "status/service"},
}


async def test_no_user_publishes_or_reads_outside_its_acl(pipe: Pipeline, keyring: KeyRing) -> None:
    """Item 15: each service user (its password and the key ring) refused every publish outside its
    ACL, the read-everything test user refused every publish, and a subscription to everything
    delivers each user only what its ACL lets it read, while the pipeline carries on."""
    device = "evil-acl"
    started = now_ms()
    before = pipe.snapshot()
    thieves: dict[str, Insider] = {}
    try:
        for user, forbidden in NOT_WRITABLE.items():
            async with Insider(pipe.stack, user) as insider:
                for suffix in forbidden:
                    topic = f"{pipe.topics.root}/{suffix}"
                    payload = Sealer(keyring, f"{user}/evil").seal(topic, orjson.loads(raw_data(device, now_ms())))
                    assert await insider.publish(topic, payload) == REFUSED, (user, topic)
                    assert await insider.publish(topic, b'{"state":"fault"}', retain=True) == REFUSED, (user, topic)
        for user in READABLE:
            thieves[user] = thief = Insider(pipe.stack, user)
            assert await thief.connect() == "Success"
            assert await thief.subscribe(f"{pipe.topics.root}/#") in (0, 1)  # granted, then filtered
        subscribed = now_ms()
        # Until the pipeline carried every kind since, and the users who may read them got some.
        await wait_until(
            lambda: pipe.watch.kinds_since(subscribed) >= {"raw", "processed", "health", "status"}, WAIT, "traffic"
        )
        await wait_until(
            lambda: (
                any("/raw/" in m.topic for m in thieves["preprocessor"].received())
                and any("/processed/" in m.topic for m in thieves["cache-writer"].received())
                and any("/health/" in m.topic for m in thieves["monitor"].received())
            ),
            WAIT,
            "the deliveries each user may have",
        )
        for user, thief in thieves.items():
            got = {m.topic.split("/", 2)[2] for m in thief.received()}
            outside = {t for t in got if not any(t == k or t.startswith(f"{k}/") for k in READABLE[user])}
            assert not outside, f"{user} read {sorted(outside)[:5]}"
    finally:
        for thief in thieves.values():
            await asyncio.to_thread(thief.client.close)
    await pipe.refused(before, {})
    await pipe.done(started, forged=[device])


# -- issue 10 cases 1, 2 and 4 against the running pipeline -------------------------------------------


async def test_no_user_can_join_the_preprocessors_share_group_and_the_pipeline_loses_nothing(
    pipe: Pipeline,
) -> None:
    """Case 1: users who may read raw data (the test user) or not (other services) subscribe to
    `$share/preprocessor/<base>/v2/raw/+` while the pipeline runs: refused (0x87), they get nothing,
    and every raw window published meanwhile reaches Redis and the cloud-sink."""
    group = f"$share/preprocessor/{pipe.topics.all('raw')}"
    started = now_ms()
    thieves = [Insider(pipe.stack, user) for user in (TAP, "monitor", "cache-writer", "sensor-reader")]
    try:
        for thief in thieves:
            assert await thief.connect() == "Success"
            assert await thief.subscribe(group) == REFUSED
            assert await thief.subscribe(f"$share/preprocessor-x/{pipe.topics.all('raw')}") == REFUSED
        await wait_until(
            lambda: sum(1 for arrived, _p, _d in pipe.watch.raw if arrived > started) >= 4, WAIT, "raw batches"
        )
        assert all(not thief.received() for thief in thieves)
    finally:
        for thief in thieves:
            await asyncio.to_thread(thief.client.close)
    published = {
        (w["device"], sensor, w["window"]["start"])
        for arrived, _p, doc in pipe.watch.raw
        if arrived > started
        for w in doc["data"]["windows"]
        for sensor in w["sensors"]
    }

    async def all_stored() -> bool:
        for device, sensor, start in published:
            if not await pipe.redis.zrangebyscore(f"{pipe.base}:series:{device}:{sensor}", start, start):
                return False
        uploaded = {
            (device, r["sensor"], r["start"])
            for device in GENUINE
            for r in await pipe.sink_records(device)
            if r["type"] == "window"
        }
        return published <= uploaded

    await wait_until(all_stored, WAIT, f"the {len(published)} windows published meanwhile in Redis and the cloud")
    await pipe.done(started)


async def test_no_user_can_take_the_running_cache_writers_client_id(pipe: Pipeline) -> None:
    """Case 2: other users connecting as the running cache-writer's client id are refused; the
    broker never ends its connection (no takeover in its log, no Will), and it keeps writing."""
    victim = f"cache-writer-{pipe.instance}"
    started = now_ms()
    connections = [line for line in pipe.stack.broker.lines if f" as {victim} (" in line]
    for user in ("sensor-reader", "preprocessor", "monitor", "cloud-forwarder", TAP):
        intruder = Insider(pipe.stack, user, client_id=victim)
        try:
            assert await intruder.connect() == "Not authorized", user
        finally:
            await intruder.close()
    await pipe.done(started)
    assert not [line for line in pipe.stack.broker.lines if f"{victim} already connected" in line]
    assert [line for line in pipe.stack.broker.lines if f" as {victim} (" in line] == connections
    assert "offline" not in pipe.watch.states(f"service/cache-writer/{pipe.instance}")
    assert health_doc(pipe.workdir, "cache-writer", pipe.instance)["connected"] is True


async def test_a_forged_plaintext_fault_status_changes_no_device(pipe: Pipeline) -> None:
    """Case 4: with the sensor-reader's MQTT password alone, a retained plaintext status claiming a
    genuine device failing: the monitor shows the status (display only) but publishes no `fault`,
    sends no fault alert, and the cloud gets none."""
    forged_topic = pipe.topics.service_status("sensor-reader", "evil")
    forged = {
        "state": "online",
        "client_id": "sensor-reader-evil",
        "ts": now_ms(),
        "devices": {"gen-a": {"state": "fault", "reason": "forged"}, "victim": {"state": "fault", "reason": "forged"}},
    }
    async with Insider(pipe.stack, "sensor-reader") as insider:
        assert await insider.publish(forged_topic, orjson.dumps(forged), retain=True) in ACCEPTED
        try:
            await wait_until(
                lambda: "sensor-reader/evil" in health_doc(pipe.workdir, "monitor", pipe.instance).get("services", {}),
                WAIT,
                "the monitor to have the forged status",
            )
            attacked = now_ms()
            await pipe.done(attacked, forged=["victim"])
            await pipe.settled()
            monitor = health_doc(pipe.workdir, "monitor", pipe.instance)
            assert monitor["device_states"]["gen-a"] == "online"
            assert "victim" not in monitor["device_states"]
            assert counter(monitor["counters"], "alerts", "fault") == 0
            assert "fault" not in pipe.watch.states("device/gen-a")
            alerts = [r for r in await pipe.sink_records("gen-a") if r["type"] == "alert"]
            assert not [r for r in alerts if r["kind"] == "fault"]
        finally:
            await insider.publish(forged_topic, b"", retain=True)


# -- issue 10 case 3: the Redis users against the running cache-writer --------------------------------


def redis_attacks(base: str) -> list[tuple[str, tuple[str, ...], type[Exception]]]:
    """(user, command, the refusal) for every dangerous command of tests/test_redis_acl.py, aimed at
    the genuine device's own keys."""

    def aimed(args: tuple[str, ...]) -> tuple[str, ...]:
        keys = {"{p}:latest:d1": f"{base}:latest:gen-a", "{p}:series:d1:temp": f"{base}:series:gen-a:temperature"}
        return tuple(keys.get(a, a.replace("{p}", base)) for a in args)

    def refusal(name: str) -> type[Exception]:
        return redis.exceptions.ResponseError if name in SERVER_REFUSED else redis.exceptions.NoPermissionError

    return [
        *(
            (user, aimed(args), refusal(name))
            for user in ("reader", "cache-writer")
            for name, args in DANGEROUS.items()
        ),
        *(("reader", aimed(args), refusal(name)) for name, args in READER_ONLY.items()),
        *(("cache-writer", aimed(args), refusal(name)) for name, args in WRITER_ONLY.items()),
    ]


async def test_the_redis_users_cannot_stall_cut_or_rewrite_the_running_pipeline(pipe: Pipeline) -> None:
    """Case 3: with `reader`'s Redis password (a third party's), then with the cache-writer's, every
    dangerous command (CLIENT PAUSE/KILL/LIST, KEYS, FLUSHALL, CONFIG, EVAL, writes to the genuine
    device's keys...) is refused while the pipeline writes; windows keep arriving at once (a 30 s
    pause would have held them past the wait) and the genuine device's values are untouched."""
    clients = {
        user: aioredis.Redis(
            port=pipe.stack.ports.redis,
            username=user,
            password=redis_password_file(pipe.stack.secrets_dir, user).read_text().strip(),
            socket_timeout=10,
        )
        for user in ("reader", "cache-writer")
    }
    attacks = redis_attacks(pipe.base)
    started = now_ms()
    try:
        for user, command, refusal in attacks:
            with pytest.raises(refusal):
                await clients[user].execute_command(*command)
            assert await clients[user].ping(), (user, command)  # refused, still connected
    finally:
        for client in clients.values():
            await client.aclose()
    attacked = now_ms()
    await pipe.flowing(attacked, timeout=20)
    await pipe.done(attacked)
    assert health_doc(pipe.workdir, "cache-writer", pipe.instance)["redis"] == "up"
    # `latest` is the genuine device's newest window still (it moves with the series, nobody rewrote it).
    newest = await pipe.redis.zrange(f"{pipe.base}:series:gen-a:temperature", -1, -1, withscores=True)
    latest = await pipe.redis.hget(f"{pipe.base}:latest_start:gen-a", "temperature")
    assert int(latest or 0) >= int(newest[0][1]) > started
    assert len(attacks) > 60


# -- issue 10 cases 5 and 6: window times and huge readings -----------------------------------------

YEAR_MS = 365 * 24 * 3600 * 1000


async def test_windows_dated_far_ahead_or_far_back_are_refused_and_latest_keeps_moving(
    pipe: Pipeline, keyring: KeyRing
) -> None:
    """Case 5, with the shipped clock bounds: windows of the genuine device's own sensor dated 10
    years ahead and 30 days back, raw (the sensor-reader's password and the key ring) and processed
    (the preprocessor's): each refused by every consumer by reason, and `latest` keeps following the
    genuine windows instead of being pinned ten years ahead."""
    now = now_ms() // WINDOW_MS * WINDOW_MS
    ahead, back = now + 10 * YEAR_MS, now - 30 * 24 * 3600 * 1000

    def raw_window(start: int) -> dict[str, Any]:
        return {"device": "gen-a", "window": {"start": start, "size": WINDOW_MS},
                "sensors": {"temperature": {"unit": "degC", "t": [start], "v": [99.0]}}}  # fmt: skip

    def processed_window(start: int) -> dict[str, Any]:
        return {"device": "gen-a", "sensor": "temperature", "unit": "degC", "start": start, "end": start + WINDOW_MS,
                "n": 1, "mean": 99.0, "median": 99.0, "min": 99.0, "max": 99.0, "std": 0.0}  # fmt: skip

    raw_topic, processed_topic = pipe.topics.raw("evil"), pipe.topics.processed("evil")
    before = pipe.snapshot()
    async with Insider(pipe.stack, "sensor-reader") as reader, Insider(pipe.stack, "preprocessor") as preprocessor:
        sealed = Sealer(keyring, "sensor-reader/evil").seal(
            raw_topic, {"windows": [raw_window(ahead), raw_window(back)]}
        )
        assert await reader.publish(raw_topic, sealed) in ACCEPTED
        windows = {"windows": [processed_window(ahead), processed_window(back)]}
        sealed = Sealer(keyring, "preprocessor/evil").seal(processed_topic, windows)
        assert await preprocessor.publish(processed_topic, sealed) in ACCEPTED
    attacked = now_ms()
    both = {"window_future": 1, "window_too_old": 1}
    letters = await pipe.refused(before, {service: both for service in CONSUMERS}, {raw_topic, processed_topic})
    for service in CONSUMERS:
        assert sorted((x["reason"], x["windows"]) for x in letters[service]) == [
            ("window_future", [0]),
            ("window_too_old", [1]),
        ]
    await pipe.done(attacked)
    latest = int(await pipe.redis.hget(f"{pipe.base}:latest_start:gen-a", "temperature") or 0)
    assert attacked < latest < now_ms() + 60_000
    series = f"{pipe.base}:series:gen-a:temperature"
    assert await pipe.redis.zrangebyscore(series, now_ms() + 60_000, "+inf") == []
    assert await pipe.redis.zrangebyscore(series, "-inf", now - 24 * 3600 * 1000) == []  # the pipeline is younger
    assert not [r for r in await pipe.sink_records("gen-a") if r.get("start") in (ahead, back)]
    monitor = health_doc(pipe.workdir, "monitor", pipe.instance)
    assert monitor["device_states"]["gen-a"] == "online"


async def test_huge_readings_give_finite_aggregates_and_their_neighbours_go_through(
    pipe: Pipeline, keyring: KeyRing
) -> None:
    """Case 6: five readings of 1.7e308 (finite, but their sum is not), beside another device's
    ordinary ones in the same raw message: the preprocessor publishes finite aggregates, no
    consumer refuses the processed message, and both devices' windows reach Redis and the cloud."""
    huge, calm = f"huge-{uuid.uuid4().hex[:6]}", f"calm-{uuid.uuid4().hex[:6]}"
    start = now_ms() // WINDOW_MS * WINDOW_MS
    stamps = [start + 10 * i for i in range(5)]
    windows = [
        {"device": device, "window": {"start": start, "size": WINDOW_MS},
         "sensors": {"s": {"unit": "u", "t": stamps, "v": values}}}
        for device, values in ((huge, [1.7e308] * 5), (calm, [1.0, 2.0, 3.0, 4.0, 5.0]))
    ]  # fmt: skip
    topic = pipe.topics.raw("evil")
    before = pipe.snapshot()
    async with Insider(pipe.stack, "sensor-reader") as insider:
        sealed = Sealer(keyring, "sensor-reader/evil").seal(topic, {"windows": windows})
        assert await insider.publish(topic, sealed) in ACCEPTED
    attacked = now_ms()

    async def stored(device: str) -> list[dict[str, Any]]:
        return [orjson.loads(m) for m in await pipe.redis.zrange(f"{pipe.base}:series:{device}:s", 0, -1)]

    async def both_stored() -> bool:
        return bool(await stored(huge)) and bool(await stored(calm))

    await wait_until(both_stored, WAIT, "both devices' windows in Redis")
    (window,) = await stored(huge)
    aggregates = [window[k] for k in ("mean", "median", "min", "max", "std")]
    assert all(isinstance(v, float) and math.isfinite(v) for v in aggregates), window
    assert window["mean"] == pytest.approx(1.7e308) and window["std"] == 0.0
    assert [w["mean"] for w in await stored(calm)] == [3.0]
    await pipe.refused(before, {})  # nobody refused anything
    await pipe.done(attacked)

    async def at_sink() -> bool:
        return bool(await pipe.sink_records(huge)) and bool(await pipe.sink_records(calm))

    await wait_until(at_sink, WAIT, "both devices' windows at the cloud-sink")
    (record,) = await pipe.sink_records(huge)
    assert all(math.isfinite(record[k]) for k in ("mean", "median", "min", "max", "std"))


# -- item 16 and issue 10 case 7: a flood from one device -------------------------------------------


async def test_a_flood_from_one_device_is_shed_and_alerted_and_the_others_keep_their_pace(
    pipe: Pipeline, keyring: KeyRing
) -> None:
    """Item 16, case 7: with the sensor-reader's password and the key ring, 4,000 valid windows of one
    device in a burst of messages, then 300 windows of as many new device ids. The preprocessor
    admits the device's allowance and sheds the rest, counted under its name (neither refused nor
    dead-lettered: every window is either in Redis or counted shed), with one sealed flood alert that
    reaches the cloud; its device table stays within its bound; and every genuine window published
    during the flood reaches Redis, those after it at the usual pace."""
    flood, spray = f"flood-{uuid.uuid4().hex[:6]}", f"spray-{uuid.uuid4().hex[:4]}"
    topic = pipe.topics.raw("evil")
    start = now_ms() // WINDOW_MS * WINDOW_MS - 60_000

    def window(device: str, begin: int) -> dict[str, Any]:
        return {"device": device, "window": {"start": begin, "size": WINDOW_MS},
                "sensors": {"s": {"unit": "u", "t": [begin], "v": [1.0]}}}  # fmt: skip

    sent = 4_000
    messages = [
        {"windows": [window(flood, start - (i + j) * WINDOW_MS) for j in range(100)]} for i in range(0, sent, 100)
    ]
    messages += [{"windows": [window(f"{spray}-{i + j}", start) for j in range(100)]} for i in range(0, 300, 100)]
    sealer = Sealer(keyring, "sensor-reader/evil")
    before = pipe.snapshot()
    began = now_ms()
    async with Insider(pipe.stack, "sensor-reader") as insider:
        for message in messages:
            assert await insider.publish(topic, sealer.seal(topic, message)) in ACCEPTED
    ended = now_ms()

    def shed() -> int:
        return int(counter(service_counters(pipe.workdir, "preprocessor", pipe.instance), "windows_shed", flood))

    async def admitted() -> int:
        return len(await pipe.redis.zrange(f"{pipe.base}:series:{flood}:s", 0, -1))

    async def accounted() -> bool:
        return shed() + await admitted() == sent

    await wait_until(accounted, WAIT, f"each of the {sent} flood windows in Redis or counted shed")
    allowance = FLOOD_BURST + FLOOD_RATE * ((ended - began) / 1000 + 5)
    assert FLOOD_BURST <= await admitted() <= allowance, (await admitted(), shed())
    await pipe.refused(before, {})  # shed, not refused: no dead letter either

    async def alerted() -> list[dict[str, Any]]:
        return [r for r in await pipe.sink_records(flood) if r["type"] == "alert" and r["kind"] == "flood"]

    await wait_until(alerted, WAIT, "the flood alert at the cloud-sink")
    (alert,) = await alerted()
    assert alert["shed"] >= 1 and f"alerts/{flood}" in {t.split("/", 2)[2] for _a, t in pipe.watch.seen}
    fairness = health_doc(pipe.workdir, "preprocessor", pipe.instance)["fairness"]
    assert fairness["devices"] <= FLOOD_DEVICES and fairness["evicted"] >= 300 - FLOOD_DEVICES, fairness

    # The genuine devices: every window the reader published during the flood is in Redis, and one
    # started after it arrives within a few windows' time.
    during = {
        (w["device"], sensor, w["window"]["start"])
        for arrived, _p, doc in pipe.watch.raw
        if began <= arrived <= ended
        for w in doc["data"]["windows"]
        for sensor in w["sensors"]
    }

    async def all_stored() -> bool:
        for device, sensor, begin in during:
            if not await pipe.redis.zrangebyscore(f"{pipe.base}:series:{device}:{sensor}", begin, begin):
                return False
        return True

    await wait_until(all_stored, WAIT, f"the {len(during)} genuine windows published during the flood in Redis")
    await pipe.flowing(ended, timeout=15)
    await pipe.done(ended)
