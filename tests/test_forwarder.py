"""cloud-forwarder (its outbox and uploader) against a cloud that fails the ways real ones do, the outbox
on its own, and the cloud-sink's de-duplication. Crashes and outages with real processes: test_outbox.py."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession, web
from cloud_forwarder.outbox import Outbox, OutboxFull, Row
from cloud_forwarder.service import (
    CloudForwarder,
    Settings,
    alert_record,
    batch_body,
    batch_id,
    outbox_rows,
    window_records,
    window_rows,
)
from cloud_sink.app import Settings as SinkSettings
from cloud_sink.app import make_app
from iotpipe import (
    AnomalyClose,
    AnomalyOpen,
    CloudBatch,
    Evidence,
    FloodAlert,
    KeyRing,
    OfflineAlert,
    Opened,
    Processed,
    RetryableError,
    Runtime,
    Topics,
    WindowRecord,
    counter,
    decode,
    encode,
)
from servers import Stack, bus_for, free_port, processed_payload, wait_until, window_payload


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


class FlakyCloud:
    """Answers with the scripted statuses first, then 400 for any batch holding a `refused` record id,
    else accepts. Every body must be a valid CloudBatch whose batch_id is its Idempotency-Key."""

    def __init__(self, script: list[tuple[int, dict[str, str]]], refused: frozenset[str] = frozenset()) -> None:
        self.script = list(script)
        self.refused = refused
        self.requests: list[tuple[dict[str, str], dict[str, object]]] = []
        self.statuses: list[int] = []

    async def ingest(self, request: web.Request) -> web.Response:
        raw = await request.read()
        batch = decode(raw, CloudBatch)
        assert batch.batch_id == request.headers["Idempotency-Key"] == batch_id(batch.records)
        self.requests.append((dict(request.headers), orjson.loads(raw)))
        if self.script:
            status, headers = self.script.pop(0)
        elif self.refused & {r.id for r in batch.records}:
            status, headers = 400, {}
        else:
            status, headers = 200, {}
        self.statuses.append(status)
        return web.Response(status=status, headers=headers, text="scripted" if status != 200 else "accepted")

    def accepted(self) -> list[str]:
        """Record ids of every request answered 2xx, in order."""
        return [
            r["id"]  # type: ignore[index]
            for (_h, body), status in zip(self.requests, self.statuses, strict=True)
            if status == 200
            for r in body["records"]  # type: ignore[attr-defined]
        ]


class Harness:
    """A cloud-forwarder on the real broker (its bus and the bus's retry mechanism, in this
    process) uploading to `cloud`, and a publisher sealing processed windows as the preprocessor."""

    def __init__(self, stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, cloud: FlakyCloud) -> None:
        self.stack, self.keyring, self.base, self.tmp_path, self.cloud = stack, keyring, base, tmp_path, cloud
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/ingest"
        self.runner: web.AppRunner | None = None
        self.publisher = bus_for(stack, "preprocessor", keyring=keyring)
        self.seq = 0

    async def serve_cloud(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self.cloud.ingest)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def start(self, monkeypatch: pytest.MonkeyPatch, **extra: str) -> CloudForwarder:
        env = self.stack.env(
            **{
                "IOTPIPE_BASE_TOPIC": self.base,
                "IOTPIPE_CLOUD_URL": self.url,
                "IOTPIPE_RETRY_MAX_DELAY": "0.05",
                "IOTPIPE_REQUEST_TIMEOUT": "2",
                "IOTPIPE_BATCH_LINGER": "0.2",
                "IOTPIPE_CLOUD_TOKEN_FILE": str(self.stack.secrets_dir / "cloud_token"),
                "IOTPIPE_DEAD_LETTER_FILE": str(self.tmp_path / "dead.jsonl"),
                "IOTPIPE_OUTBOX_FILE": str(self.tmp_path / "outbox.sqlite3"),
                **extra,
            }
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        self.forwarder = CloudForwarder(
            Runtime(Settings.load(instance=f"t{uuid.uuid4().hex[:6]}"), keyring=self.keyring)
        )
        await self.forwarder.runtime.bus.start()
        self.uploader = asyncio.create_task(self.forwarder.run())
        await self.publisher.start()
        await self.publisher.wait_connected()
        async with asyncio.timeout(10):
            await self.forwarder.runtime.bus.subscribed.wait()
        return self.forwarder

    async def publish(self, device: str, starts: list[int]) -> None:
        windows = [window_payload(start) for start in starts]
        await self.publisher.publish_sealed(Topics(self.base).processed(device), processed_payload(device, windows))

    async def close(self) -> None:
        await self.publisher.stop()
        if not hasattr(self, "forwarder"):
            return
        self.uploader.cancel()
        await asyncio.gather(self.uploader, return_exceptions=True)
        await self.forwarder.close()
        await self.forwarder.runtime.bus.stop()
        if self.runner is not None:
            await self.runner.cleanup()


async def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    await wait_until(condition, timeout, "the state this test expects")


@pytest.fixture
async def harness(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> AsyncIterator[Callable[[FlakyCloud], Harness]]:
    made: list[Harness] = []

    def make(cloud: FlakyCloud) -> Harness:
        made.append(Harness(stack, keyring, base, tmp_path, cloud))
        return made[-1]

    yield make
    for h in made:
        await h.close()


def accepted_ids(cloud: FlakyCloud) -> list[str]:
    return [r["id"] for _h, body in cloud.requests[len(cloud.requests) - 1 :] for r in body["records"]]  # type: ignore[index, union-attr]


def uploaded(forwarder: CloudForwarder) -> float | None:
    return counter(forwarder.runtime.metrics.counters(), "records_uploaded")


async def test_retries_5xx_and_429_with_one_idempotency_key(harness, stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cloud = FlakyCloud([(500, {}), (503, {}), (429, {"Retry-After": "0"})])
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0, 1000, 2000])
    await until(lambda: len(cloud.requests) == 4 and uploaded(forwarder) == 3)
    keys = {headers["Idempotency-Key"] for headers, _body in cloud.requests}
    assert keys == {batch_id([WindowRecord(id=f"d1/temp/{s}", **window_fields(s)) for s in (0, 1000, 2000)])}
    token = (stack.secrets_dir / "cloud_token").read_text().strip()
    assert all(headers["Authorization"] == f"Bearer {token}" for headers, _ in cloud.requests)
    assert accepted_ids(cloud) == ["d1/temp/0", "d1/temp/1000", "d1/temp/2000"]
    counts = forwarder.runtime.metrics.counters()
    assert counter(counts, "records_uploaded") == 3 and counter(counts, "batches", "retried") == 3
    await until(lambda: forwarder.outbox.records == 0)  # deleted once accepted


async def test_retry_after_is_honoured(harness, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Our own backoff is capped at 0.05 s here; the cloud asks for 0.6 s: the retry waits that long."""
    cloud = FlakyCloud([(503, {"Retry-After": "0.6"})])
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch, IOTPIPE_RETRY_MAX_DELAY="5")
    await h.publish("d1", [0])
    await until(lambda: len(cloud.requests) == 1)
    first = asyncio.get_running_loop().time()
    await until(lambda: len(cloud.requests) == 2)
    assert asyncio.get_running_loop().time() - first >= 0.55
    await until(lambda: uploaded(forwarder) == 1)


async def test_a_long_outage_keeps_the_batch_and_says_so_once(harness, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """Forty failures in a row: nothing is dropped, it goes on retrying, and the log says once that
    the cloud is down and once that it is back (not once per retry)."""
    caplog.set_level(logging.INFO, logger="cloud_forwarder.service")
    cloud = FlakyCloud([(502, {})] * 40)
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0, 1000])
    await until(lambda: uploaded(forwarder) == 2, timeout=30)
    assert len(cloud.requests) == 41
    assert len({headers["Idempotency-Key"] for headers, _body in cloud.requests}) == 1  # the same records each time
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cloud unavailable" in m for m in messages) == 1
    assert sum("cloud is back" in m for m in messages) == 1


async def test_4xx_dead_letters_only_the_refused_record(harness, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The cloud refuses one record of a batch: the batch is split until that record is alone, the
    others are uploaded once each, and the refused one alone is dead-lettered (its record JSON, with
    the topic, reason and sender of its message), counted, and not retried."""
    cloud = FlakyCloud([], refused=frozenset({"d1/temp/2000"}))
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch, IOTPIPE_BATCH_LINGER="0.5")
    await h.publish("d1", [0, 1000, 2000, 3000])
    await h.publish("d2", [5000, 6000])
    await until(lambda: (tmp_path / "dead.jsonl").exists() and uploaded(forwarder) == 5)
    (line,) = (tmp_path / "dead.jsonl").read_bytes().splitlines()
    dead = orjson.loads(line)
    assert dead["reason"] == "cloud_rejected" and "HTTP 400" in dead["error"]
    assert dead["topic"].endswith("/processed/d1") and dead["src"].startswith("preprocessor/") and dead["seq"] == 1
    assert dead["id"] == "d1/temp/2000"
    record = decode(dead["payload"].encode(), WindowRecord)
    assert record == WindowRecord(id="d1/temp/2000", **window_fields(2000))
    assert counter(forwarder.runtime.metrics.counters(), "dead_lettered", "cloud_rejected") == 1
    assert sorted(cloud.accepted()) == ["d1/temp/0", "d1/temp/1000", "d1/temp/3000", "d2/temp/5000", "d2/temp/6000"]
    alone = [body for (_h, body), status in zip(cloud.requests, cloud.statuses, strict=True) if status == 400]
    assert sum(body["records"] == [orjson.loads(record_json(record))] for body in alone) == 1  # type: ignore[index]
    assert len(cloud.requests) <= 1 + 2 * 3  # bisecting 6 records: a few requests, not one per record
    # Not retried, and the next records still go through.
    await h.publish("d3", [7000])
    await until(lambda: uploaded(forwarder) == 6)
    assert cloud.accepted()[-1] == "d3/temp/7000"
    assert sum(1 for _h, body in cloud.requests if "d1/temp/2000" in str(body)) == len(alone)
    assert forwarder.outbox.records == 0


async def test_unreachable_cloud_is_retried(harness, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cloud = FlakyCloud([])
    h = harness(cloud)
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0])
    await until(lambda: forwarder.health()["cloud"] == "down")
    # The message was acknowledged as soon as its record was in the outbox.
    assert forwarder.health()["outbox"]["records"] == 1
    assert counter(forwarder.runtime.metrics.counters(), "received", "sealed") == 1
    await h.serve_cloud()  # the cloud comes up after refused connections
    await until(lambda: uploaded(forwarder) == 1)
    assert forwarder.health()["cloud"] == "up" and forwarder.health()["outbox"]["records"] == 0
    assert len(cloud.requests) == 1 and accepted_ids(cloud) == ["d1/temp/0"]


async def test_after_an_outage_the_first_post_takes_what_arrived_meanwhile(harness, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each retry takes the oldest records afresh (up to IOTPIPE_BATCH_MAX): what arrived during the
    outage goes in the first POST after it, not one stale batch at a time."""
    cloud = FlakyCloud([])
    h = harness(cloud)
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0])
    await until(lambda: forwarder.health()["cloud"] == "down")
    await h.publish("d1", [1000, 2000])
    await until(lambda: forwarder.outbox.records == 3)
    await h.serve_cloud()
    await until(lambda: uploaded(forwarder) == 3)
    posted = [[r["id"] for r in body["records"]] for _h, body in cloud.requests]  # type: ignore[attr-defined]
    assert posted == [["d1/temp/0", "d1/temp/1000", "d1/temp/2000"]]


async def test_401_is_retried_not_dead_lettered(harness, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A refused token refuses us, not a record: held and retried until it is fixed, never bisected
    into dead letters."""
    cloud = FlakyCloud([(401, {})] * 3)
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0, 1000])
    await until(lambda: uploaded(forwarder) == 2)
    assert len(cloud.requests) == 4 and not (tmp_path / "dead.jsonl").exists()


def record_json(record: WindowRecord) -> bytes:
    return encode(record)


def window_fields(start: int) -> dict[str, object]:
    return {k: v for k, v in window_payload(start).items()}


def test_alert_and_window_records() -> None:
    processed = decode(
        orjson.dumps(
            processed_payload("d1", [window_payload(1) | {"sensor": "t"}, window_payload(1) | {"sensor": "h"}])
        ),
        Processed,
    )
    windows = Opened("b/v2/processed/d1", "p/x", "boot", 7, 0, processed)
    alert = Opened(
        "b/v2/alerts/d1", "monitor/x", "boot", 9, 0, OfflineAlert(device="d1", reason=None, last_seen=None, ts=1)
    )
    assert [r.id for r in window_records(windows)] == ["d1/t/1", "d1/h/1"]
    record = alert_record(alert)
    wire = orjson.loads(encode(record))
    assert wire["type"] == "alert" and wire["kind"] == "offline" and wire["id"] == "d1/alert/monitor/x/boot/9"
    rows = window_rows(windows)
    # The rows the forwarder stores are written directly: byte for byte the WindowRecords' JSON.
    assert rows == outbox_rows(windows, window_records(windows))
    body = batch_body(batch_id(rows), rows)
    batch = decode(body, CloudBatch)  # the body built from stored JSON is a valid CloudBatch
    assert batch.batch_id == batch_id(window_records(windows)) and batch.records == window_records(windows)
    assert (rows[0].topic, rows[0].src, rows[0].boot, rows[0].seq) == ("b/v2/processed/d1", "p/x", "boot", 7)


def test_a_flood_alert_goes_to_the_cloud_with_its_count() -> None:
    flood = FloodAlert(device="d1", shed=4000, since=5, reason="over its allowance", ts=6)
    record = alert_record(Opened("b/v2/alerts/d1", "preprocessor/x", "boot", 3, 0, flood))
    body = batch_body(batch_id([record]), outbox_rows(Opened("t", "s", "b", 1, 0, None), [record]))
    (uploaded,) = decode(body, CloudBatch).records
    assert uploaded == record and (record.kind, record.shed, record.since) == ("flood", 4000, 5)
    assert record.id == "d1/alert/preprocessor/x/boot/3"


def test_anomaly_episodes_go_to_the_cloud_with_their_evidence() -> None:
    evidence = Evidence(mean=0.0, min=0.0, max=0.0, std=0.0, n=10, windows=2, normal=21.2, scale=0.05)
    opened = AnomalyOpen(
        device="d1",
        sensor="temperature",
        episode="temperature/5000",
        anomaly="dropout",
        start=5000,
        end=7000,
        score=1.0,
        evidence=evidence,
        ts=8,
    )
    closed = AnomalyClose(
        device="d1",
        sensor="temperature",
        episode="temperature/5000",
        anomaly="dropout",
        start=5000,
        end=60000,
        windows=55,
        peak=1.0,
        anomalies=["dropout", "level_shift"],
        reason="normal",
        ts=9,
    )
    records = [
        alert_record(Opened("b/v2/alerts/d1", "monitor/x", "boot", seq, 0, a)) for seq, a in ((4, opened), (5, closed))
    ]
    body = batch_body(batch_id(records), outbox_rows(Opened("t", "s", "b", 1, 0, None), records))
    first, second = decode(body, CloudBatch).records
    assert first == records[0] and second == records[1]
    assert (first.kind, first.episode, first.anomaly, first.evidence) == (
        "anomaly_open",
        "temperature/5000",
        "dropout",
        evidence,
    )
    assert (second.kind, second.episode, second.windows, second.anomalies, second.reason) == (
        "anomaly_close",
        "temperature/5000",
        55,
        ["dropout", "level_shift"],
        "normal",
    )


# --- the outbox on its own ------------------------------------------------------------------------


def row(i: int, size: int = 200) -> Row:
    return Row(id=f"d1/temp/{i}", body=b'{"id":"d1/temp/%d","pad":"%s"}' % (i, b"x" * size), topic="b/v2/processed/d1")


async def test_outbox_keeps_order_ignores_redelivered_ids_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    outbox = Outbox(path, 1 << 30)
    assert await outbox.add([row(i) for i in range(5)]) == 5
    assert await outbox.add([row(3), row(4), row(5)]) == 1  # a redelivered message: its records are here
    assert [r.id for r in await outbox.head(10)] == [f"d1/temp/{i}" for i in range(6)]
    await outbox.delete(await outbox.head(2))
    await outbox.close()
    with pytest.raises(RetryableError):  # a handler still running during shutdown holds its batch
        await outbox.add([row(9)])
    again = Outbox(path, 1 << 30)
    try:
        assert again.records == 4 and again.usage.bytes > 0
        assert [r.id for r in await again.head(10)] == [f"d1/temp/{i}" for i in range(2, 6)]
        assert await again.add([row(0)]) == 1  # uploaded and deleted before: a new record (the cloud de-duplicates)
        assert [r.id for r in await again.head(10)][-1] == "d1/temp/0"
    finally:
        await again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_outbox_refuses_a_batch_past_its_budget_unless_empty(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", 1 << 16)
    try:
        assert await outbox.add([row(i, 20_000) for i in range(10)]) == 10  # empty: accepted, however big
        with pytest.raises(OutboxFull) as refused:
            await outbox.add([row(100)])
        assert refused.value.dependency == "outbox" and isinstance(refused.value, RetryableError)
        assert outbox.records == 10
        await outbox.delete(await outbox.head(10))
        assert outbox.records == 0
        added = 0
        with pytest.raises(OutboxFull):
            for i in range(1000):
                added += await outbox.add([row(200 + i)])
        assert 0 < outbox.usage.bytes <= 1 << 16 and outbox.records == added
        # Full, it takes nothing, however small, until uploads free a tenth of the budget.
        await outbox.delete(await outbox.head(1))
        with pytest.raises(OutboxFull):
            await outbox.add([row(5000, 0)])
        while outbox.usage.bytes > (1 << 16) - outbox.resume_margin - 1024:
            await outbox.delete(await outbox.head(1))
        assert await outbox.add([row(5000, 0)]) == 1 and not outbox.full
    finally:
        await outbox.close()


def records(n: int, first: int = 0) -> list[dict[str, object]]:
    return [
        {"type": "window", "id": f"d1/temp/{i}", "device": "d1", "sensor": "temp", "start": i}
        for i in range(first, first + n)
    ]


async def test_sink_deduplicates_by_idempotency_key_and_record_id(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    runner, url = await serve(make_app(SinkSettings(token_file=token_file, store_file=tmp_path / "r.jsonl")))
    try:
        async with ClientSession() as http:
            body = {"batch_id": "b1", "records": records(2)}
            auth = {"Authorization": "Bearer s3cret"}
            for _ in range(2):
                async with http.post(f"{url}/ingest", json=body, headers={**auth, "Idempotency-Key": "k1"}) as r:
                    assert r.status == 200
            async with http.post(f"{url}/ingest", json=body, headers={"Idempotency-Key": "k2"}) as r:
                assert r.status == 401
            async with http.post(f"{url}/ingest", json=body, headers=auth) as r:
                assert r.status == 400
            bad = {"batch_id": "b3", "records": [{"type": "window"}]}
            async with http.post(f"{url}/ingest", json=bad, headers={**auth, "Idempotency-Key": "k3"}) as r:
                assert r.status == 400  # a record without an id
            # Another batch (a retry that was split differently) overlapping by one record id.
            overlap = {"batch_id": "b4", "records": records(2, first=1)}
            async with http.post(f"{url}/ingest", json=overlap, headers={**auth, "Idempotency-Key": "k4"}) as r:
                assert await r.json() == {"status": "accepted", "batch_id": "b4", "records": 1, "duplicates": 1}
            async with http.get(f"{url}/stats") as r:
                stats = await r.json()
            async with http.get(f"{url}/records") as r:
                ids = [rec["id"] for rec in await r.json()]
    finally:
        await runner.cleanup()
    assert stats == {"batches": 2, "duplicate_batches": 1, "records": 3, "duplicate_records": 3, "unique_records": 3}
    assert ids == ["d1/temp/0", "d1/temp/1", "d1/temp/2"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3
