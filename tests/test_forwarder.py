"""cloud-forwarder against a cloud that fails the ways real ones do, and the cloud-sink's de-duplication."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession, web
from cloud_forwarder.service import CloudForwarder, Settings, batch_id
from cloud_sink.app import Settings as SinkSettings
from cloud_sink.app import make_app
from iotpipe import KeyRing, Opened, Runtime
from servers import Stack, free_port


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


@pytest.fixture
async def forwarder_factory(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[str], CloudForwarder]]:
    made: list[CloudForwarder] = []

    def make(url: str) -> CloudForwarder:
        env = stack.env(
            IOTPIPE_BASE_TOPIC=base,
            IOTPIPE_CLOUD_URL=url,
            IOTPIPE_RETRY_MAX_TIME="0.5",
            IOTPIPE_RETRY_MAX_DELAY="0.05",
            IOTPIPE_REQUEST_TIMEOUT="2",
            IOTPIPE_CLOUD_TOKEN_FILE=str(stack.secrets_dir / "cloud_token"),
            IOTPIPE_DEAD_LETTER_FILE=str(tmp_path / "dead.jsonl"),
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        forwarder = CloudForwarder(Runtime(Settings.load(instance="t"), keyring=keyring))
        made.append(forwarder)
        return forwarder

    yield make
    for forwarder in made:
        await forwarder.close()


async def upload_to(
    cloud: FlakyCloud, make: Callable[[str], CloudForwarder], batch: list[dict[str, object]]
) -> CloudForwarder:
    """Serve `cloud`, upload one batch through a fresh forwarder, stop serving."""
    app = web.Application()
    app.router.add_post("/ingest", cloud.ingest)
    runner, url = await serve(app)
    try:
        forwarder = make(f"{url}/ingest")
        await forwarder.upload(batch)
    finally:
        await runner.cleanup()
    return forwarder


def records(n: int) -> list[dict[str, object]]:
    return [{"type": "window", "id": f"d1/temp/{i}", "device": "d1", "sensor": "temp", "start": i} for i in range(n)]


async def test_retries_5xx_and_429_with_one_idempotency_key(forwarder_factory, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    cloud = FlakyCloud([(500, {}), (503, {}), (429, {"Retry-After": "0"})])
    forwarder = await upload_to(cloud, forwarder_factory, records(3))
    assert len(cloud.requests) == 4
    keys = {headers["Idempotency-Key"] for headers, _body in cloud.requests}
    assert keys == {batch_id(records(3))}
    token = (stack.secrets_dir / "cloud_token").read_text().strip()
    assert all(headers["Authorization"] == f"Bearer {token}" for headers, _ in cloud.requests)
    assert cloud.requests[-1][1]["records"] == records(3)
    counts = forwarder.runtime.metrics.snapshot()
    assert counts["iotpipe_records_uploaded"] == 3 and counts["iotpipe_batches{outcome=retried}"] == 3


async def test_outage_longer_than_one_round_keeps_the_batch(forwarder_factory) -> None:  # type: ignore[no-untyped-def]
    """More failures than one `retry_max_time` round allows: nothing is dropped, it goes on retrying."""
    cloud = FlakyCloud([(502, {})] * 40)
    forwarder = await upload_to(cloud, forwarder_factory, records(2))
    assert len(cloud.requests) == 41
    assert forwarder.runtime.metrics.snapshot()["iotpipe_batches{outcome=retry_round}"] >= 1
    assert forwarder.runtime.metrics.snapshot()["iotpipe_records_uploaded"] == 2


async def test_4xx_is_dead_lettered_not_retried(forwarder_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cloud = FlakyCloud([(400, {})])
    forwarder = await upload_to(cloud, forwarder_factory, records(2))
    assert len(cloud.requests) == 1
    (line,) = (tmp_path / "dead.jsonl").read_bytes().splitlines()
    assert orjson.loads(line)["batch"]["records"] == records(2)
    assert forwarder.runtime.metrics.snapshot()["iotpipe_records_dead_lettered"] == 2


async def test_unreachable_cloud_is_retried(forwarder_factory) -> None:  # type: ignore[no-untyped-def]
    cloud = FlakyCloud([])
    port = free_port()
    forwarder = forwarder_factory(f"http://127.0.0.1:{port}/ingest")
    app = web.Application()
    app.router.add_post("/ingest", cloud.ingest)
    original = forwarder._post
    attempts = 0

    async def post_then_start_cloud(body: bytes, key: str) -> None:
        nonlocal attempts, runner
        attempts += 1
        if attempts == 3:  # the cloud comes up after two refused connections
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        await original(body, key)

    runner = None
    forwarder._post = post_then_start_cloud  # type: ignore[method-assign]
    try:
        await forwarder.upload(records(1))
    finally:
        if runner is not None:
            await runner.cleanup()
    assert attempts == 3 and len(cloud.requests) == 1


def test_alert_and_window_records() -> None:
    from cloud_forwarder.service import to_records

    windows = Opened(
        "b/v1/processed/d1",
        "p/x",
        "boot",
        7,
        0,
        {"device": "d1", "windows": [{"sensor": "t", "start": 1}, {"sensor": "h", "start": 1}]},
    )
    alert = Opened("b/v1/alerts/d1", "monitor/x", "boot", 9, 0, {"kind": "offline"})
    assert [r["id"] for r in to_records(windows, "processed")] == ["d1/t/1", "d1/h/1"]
    (record,) = to_records(alert, "alerts")
    assert record["type"] == "alert" and record["kind"] == "offline" and record["id"] == "d1/alert/monitor/x/boot/9"


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
