"""cloud-forwarder against a cloud that fails the ways real ones do, and the cloud-sink's de-duplication."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession, web
from cloud_forwarder.service import CloudForwarder, Settings, alert_record, batch_id, window_records
from cloud_sink.app import Settings as SinkSettings
from cloud_sink.app import make_app
from iotpipe import KeyRing, OfflineAlert, Opened, Processed, Runtime, Topics, WindowRecord, decode, encode
from servers import Stack, bus_for, free_port


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


class FlakyCloud:
    """Answers with the scripted statuses first, then accepts."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], dict[str, object]]] = []

    async def ingest(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), orjson.loads(await request.read())))
        if self.script:
            status, headers = self.script.pop(0)
            return web.Response(status=status, headers=headers, text="scripted")
        return web.json_response({"status": "accepted"})


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

    async def start(self, monkeypatch: pytest.MonkeyPatch) -> CloudForwarder:
        env = self.stack.env(
            IOTPIPE_BASE_TOPIC=self.base,
            IOTPIPE_CLOUD_URL=self.url,
            IOTPIPE_RETRY_MAX_DELAY="0.05",
            IOTPIPE_REQUEST_TIMEOUT="2",
            IOTPIPE_BATCH_LINGER="0.2",
            IOTPIPE_CLOUD_TOKEN_FILE=str(self.stack.secrets_dir / "cloud_token"),
            IOTPIPE_DEAD_LETTER_FILE=str(self.tmp_path / "dead.jsonl"),
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        self.forwarder = CloudForwarder(
            Runtime(Settings.load(instance=f"t{uuid.uuid4().hex[:6]}"), keyring=self.keyring)
        )
        await self.forwarder.runtime.bus.start()
        await self.publisher.start()
        await self.publisher.wait_connected()
        async with asyncio.timeout(10):
            await self.forwarder.runtime.bus.subscribed.wait()
        return self.forwarder

    async def publish(self, device: str, starts: list[int]) -> None:
        windows = [window_payload(start) for start in starts]
        await self.publisher.publish_sealed(Topics(self.base).processed(device), {"device": device, "windows": windows})

    async def close(self) -> None:
        await self.publisher.stop()
        await self.forwarder.runtime.bus.stop()
        await self.forwarder.close()
        if self.runner is not None:
            await self.runner.cleanup()


def window_payload(start: int) -> dict[str, object]:
    return {
        "sensor": "temp",
        "unit": "degC",
        "start": start,
        "end": start + 1000,
        "n": 5,
        "mean": 1.5,
        "median": 1.5,
        "min": 1.0,
        "max": 2.0,
        "std": 0.25,
    }


async def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


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


async def test_retries_5xx_and_429_with_one_idempotency_key(harness, stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cloud = FlakyCloud([(500, {}), (503, {}), (429, {"Retry-After": "0"})])
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0, 1000, 2000])
    await until(
        lambda: len(cloud.requests) == 4 and forwarder.runtime.metrics.snapshot().get("iotpipe_records_uploaded") == 3
    )
    keys = {headers["Idempotency-Key"] for headers, _body in cloud.requests}
    assert keys == {
        batch_id([WindowRecord(id=f"d1/temp/{s}", device="d1", **window_fields(s)) for s in (0, 1000, 2000)])
    }
    token = (stack.secrets_dir / "cloud_token").read_text().strip()
    assert all(headers["Authorization"] == f"Bearer {token}" for headers, _ in cloud.requests)
    assert accepted_ids(cloud) == ["d1/temp/0", "d1/temp/1000", "d1/temp/2000"]
    counts = forwarder.runtime.metrics.snapshot()
    assert counts["iotpipe_records_uploaded"] == 3 and counts["iotpipe_batches{outcome=retried}"] == 3


async def test_a_long_outage_keeps_the_batch_and_says_so_once(harness, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """Forty failures in a row: nothing is dropped, it goes on retrying, and the log says once that
    the cloud is down and once that it is back (not once per retry)."""
    caplog.set_level(logging.INFO, logger="iotpipe._bus")
    cloud = FlakyCloud([(502, {})] * 40)
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0, 1000])
    await until(lambda: forwarder.runtime.metrics.snapshot().get("iotpipe_records_uploaded") == 2, timeout=30)
    assert len(cloud.requests) == 41
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cloud unavailable" in m for m in messages) == 1
    assert sum("cloud is back" in m for m in messages) == 1


async def test_4xx_is_dead_lettered_not_retried(harness, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The cloud refuses one message's records: that message alone is dead-lettered (sealed, with
    its topic, reason and sender), and the next one still reaches the cloud."""
    cloud = FlakyCloud([(400, {})])
    h = harness(cloud)
    await h.serve_cloud()
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0, 1000])
    await until(lambda: (tmp_path / "dead.jsonl").exists())
    await h.publish("d2", [5000])
    await until(lambda: forwarder.runtime.metrics.snapshot().get("iotpipe_records_uploaded") == 1)
    assert len(cloud.requests) == 2
    (line,) = (tmp_path / "dead.jsonl").read_bytes().splitlines()
    dead = orjson.loads(line)
    assert dead["reason"] == "cloud_rejected" and "HTTP 400" in dead["error"]
    assert dead["topic"].endswith("/processed/d1") and dead["src"].startswith("preprocessor/") and dead["seq"] == 1
    assert orjson.loads(dead["payload"])["alg"] == "fernet"  # still sealed at rest
    assert forwarder.runtime.metrics.snapshot()["iotpipe_dead_lettered{reason=cloud_rejected}"] == 1
    assert accepted_ids(cloud) == ["d2/temp/5000"]


async def test_unreachable_cloud_is_retried(harness, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cloud = FlakyCloud([])
    h = harness(cloud)
    forwarder = await h.start(monkeypatch)
    await h.publish("d1", [0])
    await until(lambda: forwarder.health() == {"cloud": "down"})
    await h.serve_cloud()  # the cloud comes up after refused connections
    await until(lambda: forwarder.runtime.metrics.snapshot().get("iotpipe_records_uploaded") == 1)
    assert forwarder.health() == {"cloud": "up"}
    assert len(cloud.requests) == 1 and accepted_ids(cloud) == ["d1/temp/0"]


def window_fields(start: int) -> dict[str, object]:
    return {k: v for k, v in window_payload(start).items()}


def test_alert_and_window_records() -> None:
    processed = decode(
        orjson.dumps(
            {"device": "d1", "windows": [window_payload(1) | {"sensor": "t"}, window_payload(1) | {"sensor": "h"}]}
        ),
        Processed,
    )
    windows = Opened("b/v1/processed/d1", "p/x", "boot", 7, 0, processed)
    alert = Opened(
        "b/v1/alerts/d1", "monitor/x", "boot", 9, 0, OfflineAlert(device="d1", reason=None, last_seen=None, ts=1)
    )
    assert [r.id for r in window_records(windows)] == ["d1/t/1", "d1/h/1"]
    record = alert_record(alert)
    wire = orjson.loads(encode(record))
    assert wire["type"] == "alert" and wire["kind"] == "offline" and wire["id"] == "d1/alert/monitor/x/boot/9"


def records(n: int) -> list[dict[str, object]]:
    return [{"type": "window", "id": f"d1/temp/{i}", "device": "d1", "sensor": "temp", "start": i} for i in range(n)]


async def test_sink_deduplicates_by_idempotency_key(tmp_path: Path) -> None:
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
            async with http.get(f"{url}/stats") as r:
                stats = await r.json()
    finally:
        await runner.cleanup()
    assert stats == {"batches": 1, "duplicate_batches": 1, "records": 2, "unique_records": 2}
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
