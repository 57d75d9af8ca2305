"""Crashes mid-stream (kill -9) of the cache-writer and of Redis: every acknowledged window ends up in
Redis exactly once, because the writer acknowledges only after the write, its durable session holds
what arrives while it is down, and Redis keeps an append-only file."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import iotpipe._mqtt
import orjson
import pytest
import redis.asyncio as aioredis
from iotpipe import KeyRing, PlainMessage, Topics
from iotpipe.devstack import redis_password_file
from servers import Stack, bus_for, free_port, run_servers, service_env, spawn, stop_all
from test_e2e import wait_until

WINDOWS = 400


@pytest.fixture
async def private_stack(tmp_path: Path, secrets_dir: Path) -> AsyncIterator[Stack]:
    """Servers of this test's own: it kills them."""
    with run_servers(tmp_path / "servers", secrets_dir) as stack:
        yield stack


def start_writer(stack: Stack, base: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = service_env(stack, base, tmp_path, "crash", IOTPIPE_RETRY_MAX_DELAY="0.5")
    return spawn("cache_writer", env, tmp_path, "cache-writer")


async def wait_online(stack: Stack, topic: str) -> None:
    """The service's retained status says online: it is published after its SUBSCRIBE on the same
    connection, so the broker has its subscription (and durable session) by then."""
    online = asyncio.Event()

    async def on_status(messages: Sequence[PlainMessage]) -> None:
        if any(m.payload and orjson.loads(m.payload)["state"] == "online" for m in messages):
            online.set()

    watcher = bus_for(stack, "reader")
    watcher.subscribe(topic, on_status, sealed=False)
    await watcher.start()
    try:
        await asyncio.wait_for(online.wait(), 30)
    finally:
        await watcher.stop()


def window(i: int) -> dict[str, object]:
    return {
        "sensor": "temp",
        "unit": "degC",
        "start": i * 1000,
        "end": i * 1000 + 1000,
        "n": 5,
        "mean": float(i),
        "median": float(i),
        "min": float(i),
        "max": float(i),
        "std": 0.0,
    }


async def windows_in_redis(stack: Stack, base: str) -> int:
    password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
    client = aioredis.Redis(port=stack.ports.redis, username="reader", password=password)
    try:
        return int(await client.zcard(f"{base}:series:d1:temp"))
    except (aioredis.ConnectionError, OSError):
        return -1  # Redis restarting
    finally:
        await client.aclose()


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["cache-writer", "redis", "broker"])
async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    private_stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, victim: str
) -> None:
    stack = private_stack
    topics = Topics(base)
    writer = start_writer(stack, base, tmp_path)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    try:
        # The writer's durable session must exist before we publish (its first subscribe creates it),
        # and be on the broker's disk: a session younger than the broker's last save is not restored.
        await wait_online(stack, topics.service_status("cache-writer", "crash"))
        if victim == "broker":
            saved = sum("Saving in-memory database" in line for line in stack.broker.lines)
            await wait_until(
                lambda: sum("Saving in-memory database" in line for line in stack.broker.lines) > saved,
                15,
                "the broker to save the writer's session",
            )
        for i in range(WINDOWS):
            await producer.publish_sealed(topics.processed("d1"), {"device": "d1", "windows": [window(i)]})
            if i == WINDOWS // 2:
                if victim in ("cache-writer", "broker"):
                    writer.send_signal(signal.SIGKILL)  # from here on, the broker queues for its session
                    writer.wait(10)
                else:
                    stack.redis.kill()
        if victim == "cache-writer":
            writer = start_writer(stack, base, tmp_path)  # resumes its session: the backlog is delivered
        elif victim == "broker":
            # Every publish above was acknowledged, but the broker saves only every few seconds
            # (mosquitto.conf), so killed right now it has lost what it acknowledged since its last
            # save. The producer, still running, republishes what the broker acknowledged lately as
            # soon as it reconnects (iotpipe._mqtt.REPLAY_SECONDS), into the writer's restored
            # session: nothing is lost, and the copies of what had been saved are dropped as
            # duplicates by the writer (and would be absorbed by the idempotent write anyway).
            stack.broker.kill()
            await asyncio.to_thread(stack.broker.start)
            writer = start_writer(stack, base, tmp_path)
        else:
            # Keep Redis down until the writer has noticed (its own retries, not redis-py's, are at work).
            health = tmp_path / "health" / "cache-writer-crash.json"
            await wait_until(
                lambda: health.exists() and orjson.loads(health.read_bytes()).get("redis") == "down",
                30,
                "the writer to report Redis down",
            )
            await asyncio.to_thread(stack.redis.start)  # AOF replays every acknowledged write

        async def all_written() -> bool:
            return await windows_in_redis(stack, base) == WINDOWS

        try:
            await wait_until(all_written, 60, f"all {WINDOWS} windows in Redis after the {victim} crash")
        except AssertionError as exc:
            password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
            client = aioredis.Redis(port=stack.ports.redis, username="reader", password=password)
            starts = {
                int(score) // 1000
                for _m, score in await client.zrange(f"{base}:series:d1:temp", 0, -1, withscores=True)
            }
            await client.aclose()
            missing = sorted(set(range(WINDOWS)) - starts)
            redis_log = "\n".join(stack.redis.lines[-30:])
            raise AssertionError(f"{exc}: {len(missing)} missing, e.g. {missing[:20]}\n{redis_log}") from None
        assert writer.poll() is None, "the writer survived Redis going away"
        if victim == "redis":
            log = (tmp_path / "cache-writer.out").read_text()
            assert log.count("Redis unavailable") == 1 and "Redis is back" in log  # once down, once back
    finally:
        await producer.stop()
        stop_all([writer])


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_forwarder_killed_during_cloud_outage_loses_nothing(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """The forwarder holds batches unacknowledged while the cloud is down; kill -9 it then, bring the
    cloud back and restart it: the broker redelivers, and every record arrives."""
    topics = Topics(base)
    sink_port = free_port()
    env = service_env(
        stack,
        base,
        tmp_path,
        "crash",
        sink_port,
        IOTPIPE_RETRY_MAX_DELAY="0.2",
        IOTPIPE_STATUS_INTERVAL="0.2",
        IOTPIPE_BATCH_LINGER="0.1",
    )

    def start(module: str) -> subprocess.Popen[bytes]:
        return spawn(module, env, tmp_path)

    forwarder = start("cloud_forwarder")
    sink: subprocess.Popen[bytes] | None = None
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    try:
        await wait_online(stack, topics.service_status("cloud-forwarder", "crash"))
        for i in range(50):
            await producer.publish_sealed(topics.processed("d1"), {"device": "d1", "windows": [window(i)]})
        health = tmp_path / "health" / "cloud-forwarder-crash.json"
        await wait_until(
            lambda: health.exists() and orjson.loads(health.read_bytes()).get("cloud") == "down",
            30,
            "the forwarder to find the cloud down",
        )
        forwarder.send_signal(signal.SIGKILL)
        forwarder.wait(10)
        sink = start("cloud_sink")
        forwarder = start("cloud_forwarder")

        async def stats() -> dict[str, int]:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{sink_port}/stats") as r:
                    return await r.json()  # type: ignore[no-any-return]
            except aiohttp.ClientError:
                return {}

        async def all_arrived() -> bool:
            return (await stats()).get("unique_records") == 50

        await wait_until(all_arrived, 60, "all 50 records at the cloud after the restart")
        assert not (tmp_path / "dead.jsonl").exists()
    finally:
        await producer.stop()
        stop_all([forwarder, sink])


SIM_DEVICES = """
[[devices]]
id = "dev-a"
driver = "simulated"
interval = 0.02
"""


async def test_control_broker_kill_without_publisher_replay_loses_windows(
    private_stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the broker case above: the same kill with the producer's replay switched off
    loses acknowledged windows (the broker saves only every few seconds), so that test can see loss."""
    monkeypatch.setattr(iotpipe._mqtt, "REPLAY_MAX_MESSAGES", 0)
    stack = private_stack
    topics = Topics(base)
    writer = start_writer(stack, base, tmp_path)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    try:
        await wait_online(stack, topics.service_status("cache-writer", "crash"))
        saved = sum("Saving in-memory database" in line for line in stack.broker.lines)
        await wait_until(
            lambda: sum("Saving in-memory database" in line for line in stack.broker.lines) > saved,
            15,
            "the broker to save the writer's session",
        )
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        for i in range(WINDOWS):
            await producer.publish_sealed(topics.processed("d1"), {"device": "d1", "windows": [window(i)]})
        stack.broker.kill()
        await asyncio.to_thread(stack.broker.start)
        writer = start_writer(stack, base, tmp_path)
        await producer.wait_connected(30)
        # A window published after the restart: once it is in Redis, everything that survived is too.
        await producer.publish_sealed(topics.processed("marker"), {"device": "marker", "windows": [window(0)]})
        password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
        client = aioredis.Redis(port=stack.ports.redis, username="reader", password=password)
        try:

            async def marker_written() -> bool:
                return bool(await client.zcard(f"{base}:series:marker:temp"))

            await wait_until(marker_written, 60, "the marker window in Redis")
        finally:
            await client.aclose()
        lost = WINDOWS - await windows_in_redis(stack, base)
        assert lost > 0, "without the producer's replay a broker kill must lose what it had not saved"
    finally:
        await producer.stop()
        stop_all([writer])


@pytest.mark.e2e
@pytest.mark.timeout(150)
async def test_every_service_recovers_from_a_broker_restart(
    private_stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """kill -9 the broker under the whole running pipeline: every service reconnects, resubscribes and
    says online again within a bound, and readings flow into Redis again."""
    stack = private_stack
    devices = tmp_path / "devices.toml"
    devices.write_text(SIM_DEVICES)
    sink_port = free_port()
    env = service_env(
        stack,
        base,
        tmp_path,
        "restart",
        sink_port,
        IOTPIPE_DEVICES_FILE=str(devices),
        IOTPIPE_WINDOW_MS="200",
        IOTPIPE_WINDOW_GRACE_MS="50",
        IOTPIPE_STATUS_INTERVAL="0.5",
    )
    names = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor")
    procs = []
    for module in ("cloud_sink", *(n.replace("-", "_") for n in names)):
        procs.append(spawn(module, env, tmp_path))

    def connected_services() -> set[str]:
        up = set()
        for name in names:
            path = tmp_path / "health" / f"{name}-restart.json"
            if path.exists() and orjson.loads(path.read_bytes()).get("connected"):
                up.add(name)
        return up

    async def latest_start() -> int:
        password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
        client = aioredis.Redis(port=stack.ports.redis, username="reader", password=password)
        try:
            value = await client.hget(f"{base}:latest_start:dev-a", "temperature")
        finally:
            await client.aclose()
        return int(value or 0)

    try:
        await wait_until(lambda: connected_services() == set(names), 60, "every service connected")
        await wait_until(latest_start, 30, "readings in Redis")
        stack.broker.kill()
        await wait_until(lambda: not connected_services(), 30, "every service to notice the broker is gone")
        before = await latest_start()
        await asyncio.to_thread(stack.broker.start)
        restarted = time.monotonic()
        await wait_until(lambda: connected_services() == set(names), 40, "every service reconnected")
        reconnect_s = time.monotonic() - restarted

        async def flowing_again() -> bool:
            return await latest_start() > before

        await wait_until(flowing_again, 30, "new windows in Redis after the restart")
        assert reconnect_s < 40
        for proc in procs:
            assert proc.poll() is None
    finally:
        stop_all(procs)


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_preprocessor_killed_mid_stream_every_window_once(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """Raw batches the preprocessor had not acknowledged are redelivered to its restarted session;
    a batch processed twice (killed after publishing, before acknowledging) changes nothing in Redis."""
    topics = Topics(base)
    env = service_env(stack, base, tmp_path, "crash")

    def start(module: str) -> subprocess.Popen[bytes]:
        return spawn(module, env, tmp_path)

    writer, preprocessor = start("cache_writer"), start("preprocessor")
    producer = bus_for(stack, "sensor-reader", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    try:
        await wait_online(stack, topics.service_status("cache-writer", "crash"))
        await wait_online(stack, topics.service_status("preprocessor", "crash"))
        for i in range(WINDOWS):
            start_ms = i * 1000
            data = {
                "device": "d1",
                "window": {"start": start_ms, "size": 1000},
                "sensors": {"temp": {"unit": "degC", "t": [start_ms + k for k in range(7)], "v": [20.0] * 7}},
            }
            await producer.publish_sealed(topics.raw("d1"), data)
            if i == WINDOWS // 2:
                preprocessor.send_signal(signal.SIGKILL)
                preprocessor.wait(10)
        preprocessor = start("preprocessor")

        async def all_written() -> bool:
            return await windows_in_redis(stack, base) == WINDOWS

        await wait_until(all_written, 60, f"all {WINDOWS} windows in Redis")
        password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
        client = aioredis.Redis(port=stack.ports.redis, username="reader", password=password)
        members = await client.zrange(f"{base}:series:d1:temp", 0, -1)
        await client.aclose()
        assert sorted(orjson.loads(m)["start"] for m in members) == [i * 1000 for i in range(WINDOWS)]
        assert {orjson.loads(m)["n"] for m in members} == {7}
    finally:
        await producer.stop()
        stop_all([writer, preprocessor])
