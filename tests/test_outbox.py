"""The cloud-forwarder's outbox and the cloud-sink's durable de-duplication, with real processes.

The forwarder and the sink run as subprocesses (tests/servers.py `spawn`) against the real broker;
a crash is kill -9. Each test waits on conditions (the sink's /stats, the forwarder's health file,
the outbox's own SQLite file, read beside it) and never on a fixed delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from iotpipe import KeyRing, PlainMessage, Topics, counter
from servers import (
    TAP,
    Stack,
    bus_for,
    free_port,
    processed_payload,
    service_env,
    spawn,
    stop_all,
    wait_until,
    window_payload,
)

pytestmark = pytest.mark.e2e


def outbox_ids(path: Path) -> list[str]:
    """The record ids in an outbox, oldest first, read beside the running forwarder (WAL allows it)."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        return [row[0] for row in db.execute("SELECT id FROM outbox ORDER BY key")]


def forget(path: Path) -> None:
    """What losing the outbox would be: the database and its write-ahead log gone."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class Rig:
    """A producer sealing processed windows as the preprocessor does, a cloud-forwarder process, and a
    cloud-sink process (durable store) it uploads to, all for one test."""

    def __init__(self, stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, instance: str) -> None:
        self.stack, self.base, self.tmp, self.instance = stack, base, tmp_path, instance
        self.topics = Topics(base)
        self.sink_port = free_port()
        self.sink_url = f"http://127.0.0.1:{self.sink_port}"
        self.outbox = tmp_path / f"outbox-{instance}.sqlite3"  # service_env's
        self.env = service_env(
            stack,
            base,
            tmp_path,
            instance,
            self.sink_port,
            IOTPIPE_SINK_DB_FILE=str(tmp_path / "sink.sqlite3"),
            IOTPIPE_RETRY_MAX_DELAY="0.2",
            IOTPIPE_STATUS_INTERVAL="0.2",
            IOTPIPE_BATCH_LINGER="0.05",
        )
        self.producer = bus_for(stack, "preprocessor", keyring=keyring)
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.sink: subprocess.Popen[bytes] | None = None
        self.published: list[str] = []  # record ids, in publishing order

    async def __aenter__(self) -> Rig:
        await self.producer.start()
        await self.producer.wait_connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()
        stop_all([self.forwarder, self.sink])

    # -- processes --------------------------------------------------------------------------------
    async def start_forwarder(self, wait: bool = True, **env: str) -> None:
        """Start the forwarder; with `wait`, until it is subscribed (not needed once its durable
        session exists: the broker queues for it meanwhile)."""
        since_ms = time.time_ns() // 1_000_000
        self.forwarder = spawn("cloud_forwarder", {**self.env, **env}, self.tmp, "cloud-forwarder")
        if wait:
            await self.wait_online(since_ms)

    def kill_forwarder(self) -> None:
        assert self.forwarder is not None
        self.forwarder.send_signal(signal.SIGKILL)
        self.forwarder.wait(10)

    def stop_forwarder(self) -> None:
        stop_all([self.forwarder])
        assert self.forwarder is not None and self.forwarder.returncode == 0, "a clean stop"

    async def start_sink(self, durable: bool = True) -> None:
        env = dict(self.env)
        if not durable:
            del env["IOTPIPE_SINK_DB_FILE"]
        self.sink = spawn("cloud_sink", env, self.tmp, "cloud-sink")
        await wait_until(lambda: self.get("/healthz"), 20, "the cloud-sink to serve")

    def kill_sink(self) -> None:
        assert self.sink is not None
        self.sink.send_signal(signal.SIGKILL)
        self.sink.wait(10)

    async def wait_online(self, since_ms: int) -> None:
        """A heartbeat of this forwarder process (boot_ts at or after `since_ms`) on its status
        topic: published once connected, after its SUBSCRIBE, so the broker has its subscription
        and durable session by then (a retained status from an earlier process is older)."""
        online = asyncio.Event()

        async def on_status(messages: Sequence[PlainMessage[Any]]) -> None:
            for m in messages:
                doc = orjson.loads(m.payload) if m.payload else {}
                if doc.get("state") == "online" and doc.get("boot_ts", 0) >= since_ms:
                    online.set()

        watcher = bus_for(self.stack, TAP)
        watcher.subscribe(self.topics.service_status("cloud-forwarder", self.instance), on_status, sealed=False)
        await watcher.start()
        try:
            await asyncio.wait_for(online.wait(), 30)
        finally:
            await watcher.stop()

    # -- what the forwarder and the sink say -------------------------------------------------------
    def health(self) -> dict[str, Any] | None:
        path = self.tmp / "health" / f"cloud-forwarder-{self.instance}.json"
        try:
            return orjson.loads(path.read_bytes())  # type: ignore[no-any-return]
        except (OSError, orjson.JSONDecodeError):
            return None

    def counter(self, name: str, *labels: str) -> float:
        return counter((self.health() or {}).get("counters", {}), name, *labels)

    def log(self) -> str:
        return (self.tmp / "cloud-forwarder.out").read_text(errors="replace")

    async def get(self, path: str) -> Any:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{self.sink_url}{path}") as r:
                return await r.json() if r.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def stats(self) -> dict[str, int]:
        return await self.get("/stats") or {}

    async def sink_ids(self) -> list[str]:
        return [r["id"] for r in await self.get("/records") or []]

    # -- publishing ---------------------------------------------------------------------------------
    async def publish(self, device: str, starts: Sequence[int]) -> None:
        await self.producer.publish_sealed(
            self.topics.processed(device), processed_payload(device, [window_payload(s) for s in starts])
        )
        self.published += [f"{device}/temp/{s}" for s in starts]

    async def publish_many(self, device: str, messages: int, per_message: int, first: int = 0) -> None:
        for i in range(messages):
            start = (first + i * per_message) * 1000
            await self.publish(device, [start + j * 1000 for j in range(per_message)])


MakeRig = Callable[[str], Awaitable[Rig]]


@pytest.fixture
async def rig(stack: Stack, keyring: KeyRing, base: str, tmp_path: Path) -> AsyncIterator[MakeRig]:
    made: list[Rig] = []

    async def make(instance: str) -> Rig:
        made.append(await Rig(stack, keyring, base, tmp_path, instance).__aenter__())
        return made[-1]

    try:
        yield make
    finally:
        for r in made:
            await r.__aexit__()


class Gate:
    """A proxy in front of the cloud-sink. Closed, it passes each POST on (the sink stores it and
    answers 2xx) but keeps the answer from the forwarder until released: the forwarder is then
    exactly between "the cloud accepted" and "deleted from the outbox"."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/ingest"
        self.closed = False
        self.release = asyncio.Event()
        self.held: list[list[str]] = []  # record ids of each POST the sink accepted and we held
        self.runner: web.AppRunner | None = None

    async def ingest(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: request.headers[k] for k in ("Content-Type", "Idempotency-Key") if k in request.headers}
        async with aiohttp.ClientSession() as http, http.post(self.upstream, data=body, headers=headers) as r:
            status, answer = r.status, await r.read()
        if self.closed and 200 <= status < 300:
            self.held.append([rec["id"] for rec in orjson.loads(body)["records"]])
            await self.release.wait()
        return web.Response(status=status, body=answer, content_type="application/json")

    async def __aenter__(self) -> Gate:
        app = web.Application()
        app.router.add_post("/ingest", self.ingest)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.runner is not None
        await self.runner.cleanup()


# --- kill -9 mid-upload ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outbox", ["kept", "lost (control)"])
async def test_kill_9_between_the_clouds_2xx_and_the_delete(rig: MakeRig, outbox: str) -> None:
    """kill -9 while the forwarder holds a POST the cloud already accepted and more records wait in
    its outbox (all of their MQTT messages acknowledged): after a restart every record is at the
    cloud exactly once by id; the batch accepted before the crash is uploaded again and the cloud
    counts it as duplicates. The control loses the outbox file at the crash instead: the same checks
    then find the records that were only in it missing, so this test can see loss."""
    r = await rig("kill")
    await r.start_sink()
    async with Gate(f"{r.sink_url}/ingest") as gate:
        await r.start_forwarder(IOTPIPE_CLOUD_URL=gate.url, IOTPIPE_BATCH_MAX="50", IOTPIPE_REQUEST_TIMEOUT="60")
        await r.publish_many("d1", messages=20, per_message=5)
        await wait_until(lambda: _unique(r, 100), 30, "the first 100 records at the sink")

        gate.closed = True
        await r.publish_many("d1", messages=40, per_message=5, first=100)
        # Every message acknowledged into the outbox, one POST accepted by the sink and held.
        await wait_until(
            lambda: gate.held and len(outbox_ids(r.outbox)) == 200 and r.counter("received", "sealed") == 60,
            30,
            "200 records in the outbox and a POST held",
        )
        (held,) = gate.held
        waiting = outbox_ids(r.outbox)
        assert set(held) <= set(waiting)  # accepted by the cloud, not yet deleted
        r.kill_forwarder()
        if outbox != "kept":
            forget(r.outbox)
        gate.closed = False
        gate.release.set()

        await r.start_forwarder(IOTPIPE_CLOUD_URL=gate.url, IOTPIPE_BATCH_MAX="50", IOTPIPE_REQUEST_TIMEOUT="60")
        await r.publish("marker", [0])  # uploaded after everything the outbox held before it
        await wait_until(lambda: _at_sink(r, "marker/temp/0"), 30, "the marker at the sink")

    ids = await r.sink_ids()
    stats = await r.stats()
    missing = set(r.published) - set(ids)
    assert len(ids) == len(set(ids)) == stats["records"] == stats["unique_records"]  # never stored twice
    if outbox == "kept":
        assert missing == set()
        assert sorted(ids) == sorted(r.published)
        assert stats["duplicate_records"] == len(held)  # the accepted batch came again: counted, not stored
    else:
        assert missing == set(waiting) - set(held) and len(missing) >= 100, "the control must see the loss"
    assert not (r.tmp / "dead.jsonl").exists()


async def _unique(r: Rig, n: int) -> bool:
    return (await r.stats()).get("unique_records") == n


async def _at_sink(r: Rig, record_id: str) -> bool:
    return record_id in await r.sink_ids()


@pytest.mark.timeout(150)
async def test_kill_9_at_arbitrary_points_of_a_stream(rig: MakeRig) -> None:
    """kill -9 three times in a stream of 150 messages (after the 30th, 75th and 120th), restarting
    at once while the stream goes on. The producer stays at most 10 messages ahead of the cloud, so
    each kill lands with messages queued at the broker, records in the outbox and POSTs in flight.
    Every record arrives exactly once by id."""
    r = await rig("stream")
    await r.start_sink()
    await r.start_forwarder(IOTPIPE_BATCH_MAX="20")
    total_messages, per_message, ahead = 150, 4, 10
    kills = 0
    for i in range(total_messages):
        await wait_until(lambda i=i: _at_least(r, (i - ahead) * per_message), 60, "the cloud to keep up")  # type: ignore[misc]
        await r.publish_many("d1", messages=1, per_message=per_message, first=i * per_message)
        if i in (30, 75, 120):
            # A burst right before the kill, so that it lands with records on their way even when
            # the forwarder had caught up with the stream.
            await r.publish_many(f"burst{kills}", messages=ahead, per_message=per_message)
            assert (await r.stats())["unique_records"] < len(r.published), "records still on their way"
            r.kill_forwarder()
            kills += 1
            await r.start_forwarder(wait=False, IOTPIPE_BATCH_MAX="20")
    await wait_until(lambda: _unique(r, len(r.published)), 60, "every record at the sink")
    ids = await r.sink_ids()
    assert len(r.published) == (total_messages + 3 * ahead) * per_message
    assert kills == 3 and len(ids) == len(set(ids)) and sorted(ids) == sorted(r.published)
    assert not (r.tmp / "dead.jsonl").exists()


async def _at_least(r: Rig, n: int) -> bool:
    return n <= 0 or (await r.stats()).get("unique_records", 0) >= n


# --- a cloud outage -------------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_cloud_outage_the_outbox_holds_the_backlog_not_the_broker(rig: MakeRig) -> None:
    """The cloud is down while 300 messages flow: the forwarder acknowledges every one (its outbox
    holds the 300 records) and says once that the cloud is down. The broker's queue for it is then
    measured directly: stopped, restarted on an empty outbox, it is handed only the 5 messages
    published while it was away (the control: the measurement does see queued messages) and the
    marker published after, none of the 300. The cloud comes back: every record arrives once."""
    r = await rig("outage")
    spare = r.tmp / "spare-outbox.sqlite3"
    await r.start_forwarder()
    await r.publish_many("d1", messages=300, per_message=1)
    await wait_until(
        lambda: (
            r.counter("received", "sealed") == 300
            and len(outbox_ids(r.outbox)) == 300
            and (r.health() or {}).get("cloud") == "down"
        ),
        60,
        "300 messages acknowledged into the outbox while the cloud is down",
    )
    assert (r.health() or {})["outbox"]["records"] == 300
    assert r.log().count("cloud unavailable") == 1
    r.stop_forwarder()

    await r.publish_many("d2", messages=5, per_message=1)  # queued by the broker: nobody to take them
    await r.start_forwarder(IOTPIPE_OUTBOX_FILE=str(spare))
    await r.publish("d2", [999_000])
    await wait_until(lambda: "d2/temp/999000" in outbox_ids(spare), 30, "the marker in the spare outbox")
    assert outbox_ids(spare) == [f"d2/temp/{i * 1000}" for i in range(5)] + ["d2/temp/999000"]
    r.stop_forwarder()

    await r.start_sink()
    await r.start_forwarder()
    await wait_until(lambda: _unique(r, 300), 60, "the 300 records at the cloud")
    await wait_until(lambda: not outbox_ids(r.outbox), 10, "the outbox emptied")
    r.stop_forwarder()
    await r.start_forwarder(IOTPIPE_OUTBOX_FILE=str(spare))
    await wait_until(lambda: _unique(r, 306), 60, "the spare outbox's records at the cloud")
    ids = await r.sink_ids()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(r.published)
    assert (await r.stats())["duplicate_records"] == 0


# --- the outbox at its budget ---------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_a_full_outbox_stops_acknowledging_says_so_once_and_loses_nothing(rig: MakeRig) -> None:
    """A 64 KiB budget (about 170 records) and the cloud down while 250 records come in: the outbox
    fills, the forwarder stops acknowledging (ReceiveMaximum 10: at most 10 messages in flight to
    it, the broker keeps the rest), says so once in its log, its health and a counter, and keeps
    retrying. The cloud comes back: uploads make room, the held messages go in, and every record
    arrives once."""
    r = await rig("full")
    budget = 64 << 10
    await r.start_forwarder(IOTPIPE_OUTBOX_MAX_BYTES=str(budget), IOTPIPE_MQTT__RECEIVE_MAXIMUM="10")
    await r.publish_many("d1", messages=125, per_message=2)
    await wait_until(lambda: ((r.health() or {}).get("outbox") or {}).get("full"), 60, "the outbox to say it is full")
    retries = r.counter("errors", "retry")
    await wait_until(lambda: r.counter("errors", "retry") >= retries + 20, 60, "more retries")
    health = r.health() or {}
    acknowledged = counter(health["counters"], "received", "sealed")
    assert acknowledged < 125, "a full outbox must stop acknowledging"
    assert health["outbox"]["records"] == len(outbox_ids(r.outbox)) == acknowledged * 2 < 250
    assert health["outbox"]["bytes"] <= budget
    assert counter(health["counters"], "outbox_full") == 1
    assert r.log().count("no longer acknowledging MQTT messages") == 1

    await r.start_sink()
    await wait_until(lambda: _unique(r, 250), 90, "all 250 records at the cloud")
    ids = await r.sink_ids()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(r.published)
    await wait_until(lambda: not (r.health() or {}).get("outbox", {}).get("full", True), 10, "full to clear")
    # The health file is rewritten at each heartbeat and at once when the outbox clears, which can be
    # before the last held messages are handled: wait for the heartbeat that counts them all.
    await wait_until(lambda: r.counter("received", "sealed") >= 125, 30, "every message acknowledged")
    assert r.counter("received", "sealed") == 125
    assert r.counter("outbox_full") == 1
    assert r.log().count("outbox has room again") == 1
    assert not (r.tmp / "dead.jsonl").exists()


# --- the cloud-sink's durable de-duplication --------------------------------------------------------


def records(first: int, n: int) -> list[dict[str, object]]:
    return [{"type": "window", "id": f"d1/temp/{i}", "device": "d1", "start": i} for i in range(first, first + n)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("store", ["file", "memory (control)"])
async def test_a_restarted_sink_still_refuses_to_double_count(rig: MakeRig, store: str) -> None:
    """Records 0-4 in one batch; kill -9 the sink; the same batch again and records 3-7 in another:
    with its store on disk the sink still counts 8 records, each once. The control keeps the store
    in memory and counts the re-sent records again: the test can see double counting."""
    r = await rig("sink")
    durable = store == "file"
    await r.start_sink(durable)

    async def post(key: str, body: list[dict[str, object]]) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{r.sink_url}/ingest", json={"batch_id": key, "records": body}, headers={"Idempotency-Key": key}
            ) as response,
        ):
            assert response.status == 200

    await post("k1", records(0, 5))
    r.kill_sink()
    await r.start_sink(durable)
    await post("k1", records(0, 5))
    await post("k2", records(3, 5))
    stats = await r.stats()
    ids = await r.sink_ids()
    if store == "file":
        assert stats == {
            "batches": 2,
            "duplicate_batches": 1,
            "records": 8,
            "duplicate_records": 7,
            "unique_records": 8,
        }
        assert ids == [f"d1/temp/{i}" for i in range(8)]
    else:
        assert stats["records"] == 8 and stats["duplicate_records"] == 2  # 0-4 stored a second time
        assert stats["duplicate_batches"] == 0
