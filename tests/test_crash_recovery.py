"""Crashes mid-stream (kill -9) of the cache-writer, Redis, the broker, the preprocessor and the
cloud-forwarder: every acknowledged window ends up in Redis exactly once and at the cloud at least
once, because services acknowledge only after the effect is durable, durable sessions hold what
arrives while a service is down, publishers replay what the broker may have lost, and Redis keeps
an append-only file.

Every test reports, per sink, what was lost, duplicated and unexpected against what was published:
- Redis: a window stored under two members, or written as new twice (the cache-writer's own
  `iotpipe_windows_written` counter, in its status, counts the windows whose ZADD added them), is a
  duplicate; a redelivered or reprocessed window it found already present is counted apart
  (`iotpipe_windows_duplicate`): a duplicate detected and collapsed, as the contract wants. Counting
  members alone would not do: a redelivered identical window collapses in the sorted set whatever
  the writer does.
- cloud-sink: the ids of `GET /records`: an id stored twice is a duplicate (`records -
  unique_records` of `GET /stats`), an id the sink recognised and did not store again
  (`duplicate_records`, where the sink de-duplicates by record id) is a duplicate detected and
  collapsed.
Controls show the counting can see what it looks for: windows published a second time after each
recovery (as a raw batch reprocessed after a crash would be), a second POST of accepted records
under a new Idempotency-Key, and a broker kill with the publishers' replay switched off, which
loses windows."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import iotpipe._mqtt
import orjson
import pytest
import redis.asyncio as aioredis
from iotpipe import KeyRing, PlainMessage, Topics, counter
from iotpipe.devstack import redis_password_file
from servers import (
    TAP,
    Stack,
    bus_for,
    free_port,
    health_doc,
    processed_payload,
    run_servers,
    service_env,
    spawn,
    stop_all,
    unseal,
    wait_online,
    wait_until,
)

WINDOWS = 400
REPUBLISHED = 10  # windows published a second time after recovery: duplicates the counting must see
STATUS_INTERVAL = 0.1  # s between the services' heartbeats (status and health file, with counters)


@pytest.fixture
async def private_stack(tmp_path: Path, secrets_dir: Path) -> AsyncIterator[Stack]:
    """Servers of this test's own: it kills them."""
    with run_servers(tmp_path / "servers", secrets_dir) as stack:
        yield stack


def start_writer(stack: Stack, base: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = service_env(
        stack, base, tmp_path, "crash", IOTPIPE_RETRY_MAX_DELAY="0.5", IOTPIPE_STATUS_INTERVAL=str(STATUS_INTERVAL)
    )
    return spawn("cache_writer", env, tmp_path, "cache-writer")


def window(i: int) -> dict[str, object]:
    return {
        "device": "d1",
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


@dataclass
class Tally:
    """One sink's accounting against what was published."""

    sink: str
    lost: list[Any] = field(default_factory=list)  # published, not there
    duplicated: int = 0  # there (or written as new) more than once
    unexpected: list[Any] = field(default_factory=list)  # there, but never published, or not as published
    collapsed: float = 0  # duplicates that reached the sink and were recognised as such

    def __str__(self) -> str:
        return (
            f"{self.sink}: lost {len(self.lost)} {self.lost[:10]}, duplicated {self.duplicated}, "
            f"unexpected {len(self.unexpected)} {self.unexpected[:10]}, "
            f"duplicates detected and collapsed {self.collapsed:g}"
        )


def report(test: str, *tallies: Tally) -> str:
    text = f"{test}: " + "; ".join(str(t) for t in tallies)
    print(text)  # in the captured output of every run (pytest -rA or -s shows it for passing runs)
    return text


def reader_client(stack: Stack) -> aioredis.Redis:
    password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
    return aioredis.Redis(port=stack.ports.redis, username="reader", password=password)


async def stored(stack: Stack, key: str) -> list[tuple[dict[str, Any], int]]:
    """(window, score) of every member of a series."""
    client = reader_client(stack)
    try:
        return [(orjson.loads(m), int(score)) for m, score in await client.zrange(key, 0, -1, withscores=True)]
    finally:
        await client.aclose()


async def latest_has(stack: Stack, base: str, device: str, sensor: str) -> bool:
    client = reader_client(stack)
    try:
        return bool(await client.hexists(f"{base}:latest_start:{device}", sensor))
    except (aioredis.ConnectionError, OSError):
        return False
    finally:
        await client.aclose()


def tally_series(
    members: Sequence[tuple[dict[str, Any], Hashable]], published: Mapping[Any, Mapping[str, Any]], written: float
) -> Tally:
    """Stored windows (window, key) against the windows published (key -> window; the key is the
    start within one series), given how many windows the cache-writer reported writing as new."""
    counts = collections.Counter(key for _window, key in members)
    return Tally(
        "redis",
        lost=sorted(set(published) - set(counts)),
        duplicated=sum(c - 1 for c in counts.values()) + max(0, int(written) - len(counts)),
        unexpected=sorted({key for window, key in members if published.get(key) != window}),
    )


async def sink_tally(url: str, published: Mapping[str, Mapping[str, Any]]) -> tuple[Tally, dict[str, int]]:
    """The cloud-sink's window records against the windows published (record id -> window), and its
    /stats. A duplicate stored there is allowed (at least once) but must be a copy of the same record;
    one the sink recognised (by record id, or a whole batch by its key) counts as collapsed."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/records") as response:
            records = orjson.loads(await response.read())
        async with http.get(f"{url}/stats") as response:
            stats = await response.json()
    windows = [r for r in records if r.get("type") == "window"]
    ids = collections.Counter(r["id"] for r in windows)
    as_published = {
        r["id"] for r in windows if {k: v for k, v in r.items() if k not in ("type", "id")} == published.get(r["id"])
    }
    tally = Tally(
        "cloud-sink",
        lost=sorted(set(published) - set(ids)),
        duplicated=sum(c - 1 for c in ids.values()),
        unexpected=sorted(set(ids) - as_published),
        collapsed=stats.get("duplicate_records", stats.get("duplicate_batches", 0)),
    )
    return tally, stats


async def settled_counters(
    workdir: Path, service: str, instance: str, since: float, interval: float
) -> dict[str, float]:
    """The service's counters from a heartbeat taken at least two intervals after `since` (unix s):
    every increment for work that was done by then is in it (the heartbeat and the handlers share
    one event loop, and the increment follows the work's completion in the same step)."""
    due_ms = (since + 2 * interval) * 1000
    await wait_until(
        lambda: health_doc(workdir, service, instance).get("ts", 0) >= due_ms, 30, f"a {service} heartbeat"
    )
    return health_doc(workdir, service, instance)["counters"]  # type: ignore[no-any-return]


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
    """Redis: exactly once. No window lost, none stored twice, none written as new twice (the
    writers' own count); REPUBLISHED windows published again after recovery are recognised as
    present (counted, not written): the control that the count sees duplicates."""
    stack = private_stack
    topics = Topics(base)
    writer = start_writer(stack, base, tmp_path)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    written_by_killed = 0  # what a killed writer had written: the series' size, as nothing else writes to it
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
            await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(i)]))
            if i == WINDOWS // 2:
                if victim in ("cache-writer", "broker"):
                    writer.send_signal(signal.SIGKILL)  # from here on, the broker queues for its session
                    writer.wait(10)
                else:
                    stack.redis.kill()
        if victim == "cache-writer":
            written_by_killed = await windows_in_redis(stack, base)
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
            written_by_killed = await windows_in_redis(stack, base)
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

        # Windows already stored, published again (new sequence numbers: what a raw batch reprocessed
        # after a crash produces), then END, a new window of a sensor of its own. The writer handles
        # messages in order, so END in Redis means everything before it was handled.
        await producer.wait_connected()
        for i in range(REPUBLISHED):
            await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(i)]))
        await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [END]))
        await wait_until(lambda: latest_has(stack, base, "d1", "end"), 30, "the END window in Redis")
        counters = await settled_counters(tmp_path, "cache-writer", "crash", time.time(), STATUS_INTERVAL)
        # Written as new to this series, by every writer process together (END is in a series of its own).
        written = written_by_killed + counter(counters, "windows_written") - 1
        tally = tally_series(
            await stored(stack, f"{base}:series:d1:temp"), {i * 1000: window(i) for i in range(WINDOWS)}, written
        )
        tally.collapsed = counter(counters, "windows_duplicate")
        text = report(f"kill -9 {victim}", tally)
        assert not tally.lost and not tally.unexpected and tally.duplicated == 0, text
        # The control: the republished windows reached the writer and were counted as present. (Any
        # more are redeliveries or replays of what the crash left unacknowledged, collapsed alike.)
        assert tally.collapsed >= REPUBLISHED, text
        if victim == "redis":
            # One writer throughout. A window Redis applied whose reply the kill swallowed is retried
            # and then found present, so "written" can fall short of WINDOWS, never exceed it.
            assert written <= WINDOWS and written + tally.collapsed >= WINDOWS + REPUBLISHED, text
        else:
            assert written == WINDOWS, text  # every window written as new exactly once, across both writers
    finally:
        await producer.stop()
        stop_all([writer])


END = {**window(0), "sensor": "end"}  # a new window on a sensor of its own, published last


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_forwarder_killed_during_cloud_outage_loses_nothing(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """The forwarder's outbox holds the records while the cloud is down; kill -9 it then, bring the
    cloud back and restart it: the broker redelivers, and every record arrives.

    Cloud: at least once. A record may legitimately arrive twice across a kill -9 (a batch the cloud
    accepted whose acknowledgement the kill lost is sent again, possibly batched differently, so
    under another Idempotency-Key; here the cloud is down until after the kill, so none are
    expected, but none are forbidden): allowed, but every copy must be the same record under the
    same id, so de-duplicating by id gives exactly what was published (no loss, nothing unexpected).
    The control POSTs accepted records again under a new key, and the count must see exactly those."""
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
    sink_url = f"http://127.0.0.1:{sink_port}"
    published = {f"d1/temp/{i * 1000}": window(i) for i in range(50)}

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
            await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(i)]))
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

        tally, counts = await sink_tally(sink_url, published)
        text = report("kill -9 cloud-forwarder", tally)
        assert not tally.lost and not tally.unexpected, text
        assert tally.duplicated == counts["records"] - counts["unique_records"], text  # the sink counts alike

        # Control: 5 accepted records POSTed again in a batch of another key, as a redelivery batched
        # otherwise would be. Whether the sink stores them again or recognises them by id, the count
        # must see exactly 5 more duplicates, and nothing lost or unexpected.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{sink_url}/records") as r:
                records = [record for record in await r.json() if record["type"] == "window"]
            again = {"batch_id": "control", "records": records[:5]}
            async with http.post(f"{sink_url}/ingest", json=again, headers={"Idempotency-Key": "control"}) as r:
                assert r.status == 200
        control, counts = await sink_tally(sink_url, published)
        text = report("kill -9 cloud-forwarder, control", control)
        assert control.duplicated + control.collapsed == tally.duplicated + tally.collapsed + 5, text
        assert control.duplicated == counts["records"] - counts["unique_records"], text
        assert not control.lost and not control.unexpected, text
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
            await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(i)]))
        stack.broker.kill()
        await asyncio.to_thread(stack.broker.start)
        writer = start_writer(stack, base, tmp_path)
        await producer.wait_connected(30)
        # A window published after the restart: once it is in Redis, everything that survived is too.
        await producer.publish_sealed(topics.processed("marker"), processed_payload("marker", [window(0)]))
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
        # The same accounting as the tests above, and it must report the loss as loss.
        counters = await settled_counters(tmp_path, "cache-writer", "crash", time.time(), STATUS_INTERVAL)
        written = counter(counters, "windows_written") - 1  # the marker, in a series of its own
        tally = tally_series(
            await stored(stack, f"{base}:series:d1:temp"), {i * 1000: window(i) for i in range(WINDOWS)}, written
        )
        text = report("kill -9 broker, no publisher replay (control)", tally)
        assert len(tally.lost) == lost and not tally.unexpected and tally.duplicated == 0, text
    finally:
        await producer.stop()
        stop_all([writer])


@pytest.mark.e2e
@pytest.mark.timeout(150)
async def test_every_service_recovers_from_a_broker_restart(
    private_stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """kill -9 the broker under the whole running pipeline: every service reconnects, resubscribes and
    says online again within a bound, and readings flow into Redis again.

    Accounting, against a durable subscriber of the test's own (its session survives the restart as
    the services' do) that sees every raw and processed message the broker delivers:
    - the processed stream against the raw one: nothing lost. mosquitto (2.0.11) does not restore
      shared subscriptions (`$share/preprocessor/...`) from its persistence file, so raw windows the
      reader publishes after the restart and before the preprocessor has re-subscribed reach no
      preprocessor; the reader's second replay (iotpipe._mqtt.REPLAY_SETTLE after its reconnect)
      delivers them, and the broker's ack-before-save gap is covered by the first;
    - Redis against the processed stream: exactly once (the writer's own count of windows written
      as new equals the windows stored; redeliveries are counted apart, as present);
    - the cloud-sink against the processed stream: at least once; a duplicate (a batch resent after
      the restart) is allowed, but only as a copy of the same record under the same id."""
    stack = private_stack
    topics = Topics(base)
    devices = tmp_path / "devices.toml"
    devices.write_text(SIM_DEVICES)
    sink_port = free_port()
    status_interval = 0.2
    env = service_env(
        stack,
        base,
        tmp_path,
        "restart",
        sink_port,
        IOTPIPE_DEVICES_FILE=str(devices),
        IOTPIPE_WINDOW_MS="200",
        IOTPIPE_WINDOW_GRACE_MS="50",
        IOTPIPE_STATUS_INTERVAL=str(status_interval),
    )
    names = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor")
    raw: dict[tuple[str, int], int] = {}  # (sensor, start) -> readings, as the reader published them
    sealed_at: dict[int, float] = {}  # window start -> when the reader sealed it (unix s)
    processed: dict[tuple[str, int], dict[str, Any]] = {}  # (sensor, start) -> window, as the preprocessor did

    async def on_raw(messages: Sequence[PlainMessage]) -> None:
        for m in messages:
            inner = unseal(keyring, m.payload)
            for data in inner["data"]["windows"]:
                sealed_at[data["window"]["start"]] = inner["ts"] / 1000
                for sensor, body in data["sensors"].items():
                    raw[(sensor, data["window"]["start"])] = len(body["v"])

    async def on_processed(messages: Sequence[PlainMessage]) -> None:
        for m in messages:
            for w in unseal(keyring, m.payload)["data"]["windows"]:
                processed[(w["sensor"], w["start"])] = w

    wire = bus_for(stack, TAP, client_id=f"wire-{base}", session_expiry=600)
    wire.subscribe(topics.raw("restart"), on_raw, sealed=False)  # the instance, "restart", publishes them
    wire.subscribe(topics.all("processed"), on_processed, sealed=False)
    await wire.start()
    await wire.wait_connected()
    await asyncio.wait_for(wire.subscribed.wait(), 10)
    procs = []
    for module in ("cloud_sink", *(n.replace("-", "_") for n in names)):
        procs.append(spawn(module, env, tmp_path))
    reader = procs[1]

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
        # Windows the reader sealed before this may precede a consumer's first subscription (its durable
        # session begins there, and the services start in no particular order): not the pipeline's to
        # account for.
        up = time.time()
        # Every session (the services' and the test's subscriber's) on the broker's disk before the kill:
        # the broker saves every few seconds (mosquitto.conf), and a younger session is not restored.
        saved = sum("Saving in-memory database" in line for line in stack.broker.lines)
        await wait_until(
            lambda: sum("Saving in-memory database" in line for line in stack.broker.lines) > saved,
            15,
            "the broker to save every session",
        )
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

        # The reader republishes what the broker acknowledged lately at its reconnect and once more
        # REPLAY_SETTLE s later, when the preprocessor has subscribed again: wait for that second one.
        reader_log = tmp_path / "sensor_reader.out"
        await wait_until(lambda: reader_log.read_text().count("republished") >= 2, 30, "the reader's second replay")
        # The reader stops cleanly (publishing its last window first); then everything drains.
        reader.send_signal(signal.SIGTERM)
        assert reader.wait(30) == 0

        async def in_redis() -> list[tuple[dict[str, Any], tuple[str, int]]]:
            return [
                (w, (sensor, w["start"]))
                for sensor in ("temperature", "humidity")
                for w, _score in await stored(stack, f"{base}:series:dev-a:{sensor}")
            ]

        def accountable(start: int) -> bool:
            return sealed_at.get(start, 0) >= up

        def unprocessed() -> set[int]:
            return {start for _sensor, start in raw if accountable(start)} - {start for _sensor, start in processed}

        async def drained() -> bool:
            # Nothing in progress: every raw window without a processed one is older than the newest
            # processed (the preprocessor handles them in order), and both sinks hold what was processed.
            newest = max((start for _sensor, start in processed), default=-1)
            if not raw or any(start > newest for start in unprocessed()):
                return False
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{sink_port}/records") as r:
                at_sink = {(w["sensor"], w["start"]) for w in await r.json() if w["type"] == "window"}
            due = {key for key in processed if accountable(key[1])}
            return due <= {key for _w, key in await in_redis()} <= set(processed) and due <= at_sink <= set(processed)

        async def tallies(written: float) -> tuple[Tally, Tally, Tally]:
            stream = Tally(
                "processed stream",
                lost=sorted(unprocessed()),
                unexpected=sorted(key for key, w in processed.items() if raw.get(key) != w["n"]),
            )
            redis_tally = tally_series(await in_redis(), processed, written)
            cloud, _stats = await sink_tally(
                f"http://127.0.0.1:{sink_port}",
                {f"dev-a/{sensor}/{start}": w for (sensor, start), w in processed.items()},
            )
            redis_tally.lost = [key for key in redis_tally.lost if accountable(key[1])]
            cloud.lost = [key for key in cloud.lost if accountable(int(key.rsplit("/", 1)[1]))]
            return stream, redis_tally, cloud

        try:
            await wait_until(drained, 30, "the pipeline to drain after the reader stopped")
            counters = await settled_counters(tmp_path, "cache-writer", "restart", time.time(), status_interval)
            # Drained again: the reader's last windows (flushed as it stopped) can reach the processed
            # stream after the first check, and the forwarder uploads them up to a batch linger later.
            await wait_until(drained, 30, "the pipeline to drain after the counters settled")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {report('not drained', *await tallies(0))}") from None
        members = await in_redis()
        stream, redis_tally, cloud = await tallies(counter(counters, "windows_written"))
        redis_tally.collapsed = counter(counters, "windows_duplicate")
        text = report("kill -9 broker under the pipeline", stream, redis_tally, cloud)
        assert not stream.lost, text
        assert not stream.unexpected, text
        assert not redis_tally.lost and not redis_tally.unexpected and redis_tally.duplicated == 0, text
        assert counter(counters, "windows_written") == len(members), text
        assert not cloud.lost and not cloud.unexpected, text  # duplicates allowed (at least once), as copies
    finally:
        stop_all(procs)
        await wire.stop()


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_preprocessor_killed_mid_stream_every_window_once(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    """Raw batches the preprocessor had not acknowledged are redelivered to its restarted session;
    a batch processed twice (killed after publishing, before acknowledging) changes nothing in Redis.

    Redis: exactly once. The processed stream is at least once here (a reprocessed batch is published
    twice), so duplicates do reach the cache-writer, which never crashed: it must count each such
    window as present, never as written, so "written" equals the windows stored. The control
    publishes REPUBLISHED raw batches again, which the count must see as duplicates."""
    topics = Topics(base)
    env = service_env(stack, base, tmp_path, "crash", IOTPIPE_STATUS_INTERVAL=str(STATUS_INTERVAL))

    def raw(start_ms: int, sensor: str = "temp") -> dict[str, object]:
        window = {
            "device": "d1",
            "window": {"start": start_ms, "size": 1000},
            "sensors": {sensor: {"unit": "degC", "t": [start_ms + k for k in range(7)], "v": [20.0] * 7}},
        }
        return {"windows": [window]}

    def processed(start_ms: int) -> dict[str, object]:
        values = {"n": 7, "mean": 20.0, "median": 20.0, "min": 20.0, "max": 20.0, "std": 0.0}
        return {"device": "d1", "sensor": "temp", "unit": "degC", "start": start_ms, "end": start_ms + 1000, **values}

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
            await producer.publish_sealed(topics.raw("d1"), raw(i * 1000))
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

        # Raw batches published again (the control), then one of a sensor of its own that marks the end:
        # the preprocessor and the writer each handle their messages in order.
        for i in range(REPUBLISHED):
            await producer.publish_sealed(topics.raw("d1"), raw(i * 1000))
        await producer.publish_sealed(topics.raw("d1"), raw(0, "end"))
        await wait_until(lambda: latest_has(stack, base, "d1", "end"), 30, "the end window in Redis")
        counters = await settled_counters(tmp_path, "cache-writer", "crash", time.time(), STATUS_INTERVAL)
        written = counter(counters, "windows_written") - 1  # the end window
        published = {i * 1000: processed(i * 1000) for i in range(WINDOWS)}
        tally = tally_series(await stored(stack, f"{base}:series:d1:temp"), published, written)
        tally.collapsed = counter(counters, "windows_duplicate")
        text = report("kill -9 preprocessor", tally)
        assert not tally.lost and not tally.unexpected and tally.duplicated == 0, text
        assert written == WINDOWS, text  # each window written as new once, however often it was processed
        assert tally.collapsed >= REPUBLISHED, text  # the control's duplicates were seen, and collapsed
    finally:
        await producer.stop()
        stop_all([writer, preprocessor])
