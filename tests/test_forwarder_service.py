"""The cloud-forwarder as it runs (a subprocess on the real broker, fed sealed processed messages)
against a cloud of the test's own: an HTTP server that answers each record's scripted statuses and
headers first, then 200, and records when every request arrived. What docs/contract.md promises:
5xx, 408, 425 and 429 are retried (honouring `Retry-After`), other 4xx are dead-lettered."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from iotpipe import KeyRing, Topics
from servers import (
    Stack,
    bus_for,
    free_port,
    processed_payload,
    service_env,
    spawn,
    stop_all,
    unseal,
    wait_online,
    wait_until,
)

Script = dict[str, list[tuple[int, dict[str, str]]]]


@dataclass
class Request:
    arrived: float  # time.monotonic() when the request reached the cloud
    ids: list[str]
    status: int  # what the cloud answered
    key: str | None


class ScriptedCloud:
    """Answers a POST carrying record `id` with the next scripted (status, headers) for that id, or
    200 once the script for it is used up."""

    def __init__(self, script: Script) -> None:
        self.script = {record_id: list(answers) for record_id, answers in script.items()}
        self.requests: list[Request] = []

    async def ingest(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        body = orjson.loads(await request.read())
        ids = [r["id"] for r in body["records"]]
        status, headers = 200, {}
        for record_id in ids:
            if self.script.get(record_id):
                status, headers = self.script[record_id].pop(0)
                break
        self.requests.append(Request(arrived, ids, status, request.headers.get("Idempotency-Key")))
        if status == 200:
            return web.json_response({"status": "accepted", "batch_id": body["batch_id"]})
        return web.Response(status=status, headers=headers, text="scripted refusal")

    def for_id(self, record_id: str) -> list[Request]:
        return [r for r in self.requests if record_id in r.ids]

    def accepted(self, record_id: str) -> bool:
        return any(r.status == 200 for r in self.for_id(record_id))


def window(i: int) -> dict[str, object]:
    return {
        "sensor": "temp",
        "unit": "degC",
        "start": i * 1000,
        "end": i * 1000 + 1000,
        "n": 5,
        "mean": 20.5,
        "median": 20.5,
        "min": 20.0,
        "max": 21.0,
        "std": 0.25,
    }


def record_id(i: int) -> str:
    return f"d1/temp/{i * 1000}"


@dataclass
class Forwarding:
    cloud: ScriptedCloud
    dead_letters: Path
    send: Callable[[int], object]  # publish window i as the preprocessor would
    keyring: KeyRing

    def dead_lettered_ids(self) -> list[str]:
        """The record ids in the dead-letter file, one entry per line, whichever way a line carries
        what was refused: the record itself (its `id`), the message as received (a sealed
        `payload`), or the refused batch."""
        ids = []
        for line in self.dead_letters.read_bytes().splitlines():
            doc = orjson.loads(line)
            if "id" in doc:
                ids.append(doc["id"])
            elif "batch" in doc:
                ids += [r["id"] for r in doc["batch"]["records"]]
            else:
                data = unseal(self.keyring, doc["payload"].encode())["data"]
                ids += [f"{data['device']}/{w['sensor']}/{w['start']}" for w in data["windows"]]
        return ids


@pytest.fixture
async def forwarding(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., object]]:
    """Start (script, **env) -> Forwarding: the scripted cloud, and a forwarder uploading to it one
    message per POST."""
    topics = Topics(base)
    runners: list[web.AppRunner] = []
    procs: list[subprocess.Popen[bytes]] = []
    producers = []

    async def start(script: Script, **env: str) -> Forwarding:
        cloud = ScriptedCloud(script)
        app = web.Application()
        app.router.add_post("/ingest", cloud.ingest)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        settings = {"IOTPIPE_BATCH_MAX": "1", "IOTPIPE_BATCH_LINGER": "0", "IOTPIPE_REQUEST_TIMEOUT": "5", **env}
        procs.append(spawn("cloud_forwarder", service_env(stack, base, tmp_path, "http", port, **settings), tmp_path))
        await wait_online(stack, topics.service_status("cloud-forwarder", "http"))
        producer = bus_for(stack, "preprocessor", keyring=keyring)
        producers.append(producer)
        await producer.start()
        await producer.wait_connected()

        async def send(i: int) -> None:
            await producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(i)]))

        return Forwarding(cloud, tmp_path / "dead.jsonl", send, keyring)

    yield start
    for producer in producers:
        await producer.stop()
    stop_all(procs)
    for runner in runners:
        await runner.cleanup()


RETRY_AFTER_S = 2.0
# The forwarder's own backoff before a first retry is well under a second (jittered, exponential from
# a fraction of a second; test_without_retry_after_the_first_retry_comes_sooner checks it), and never
# more than IOTPIPE_RETRY_MAX_DELAY: a retry >= 2 s after the refusal is the Retry-After header's
# doing. The cap is 2 s, so that a Retry-After capped at the maximum delay is still honoured in full.
RETRY_ENV = {"IOTPIPE_RETRY_MAX_DELAY": "2"}


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(forwarding, status: int) -> None:  # type: ignore[no-untyped-def]
    """429 / 503 with `Retry-After: 2`, then 200: the retry comes no sooner than 2 s after the refusal,
    with the same Idempotency-Key, and the record is accepted."""
    f: Forwarding = await forwarding({record_id(0): [(status, {"Retry-After": "2"})]}, **RETRY_ENV)
    await f.send(0)
    await wait_until(
        lambda: f.cloud.accepted(record_id(0)) or f.dead_letters.exists(), 30, "the record accepted or dead-lettered"
    )
    assert not f.dead_letters.exists()
    refused, retried = f.cloud.for_id(record_id(0))
    assert (refused.status, retried.status) == (status, 200)
    assert retried.arrived - refused.arrived >= RETRY_AFTER_S - 0.05, "retried before Retry-After elapsed"
    assert refused.key == retried.key


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_without_retry_after_the_first_retry_comes_sooner(forwarding) -> None:  # type: ignore[no-untyped-def]
    """The premise of the Retry-After test: with the same settings and no header, the forwarder's own
    backoff retries well within 2 s, so a retry that waited 2 s was waiting for the header."""
    f: Forwarding = await forwarding({record_id(0): [(503, {})]}, **RETRY_ENV)
    await f.send(0)
    await wait_until(
        lambda: f.cloud.accepted(record_id(0)) or f.dead_letters.exists(), 30, "the record accepted or dead-lettered"
    )
    refused, retried = f.cloud.for_id(record_id(0))
    assert (refused.status, retried.status) == (503, 200)
    assert retried.arrived - refused.arrived < RETRY_AFTER_S - 0.1


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [408, 425, 500])
async def test_retryable_statuses_are_retried_until_accepted(forwarding, status: int) -> None:  # type: ignore[no-untyped-def]
    f: Forwarding = await forwarding({record_id(0): [(status, {})]}, IOTPIPE_RETRY_MAX_DELAY="0.2")
    await f.send(0)
    await wait_until(
        lambda: f.cloud.accepted(record_id(0)) or f.dead_letters.exists(), 30, "the record accepted or dead-lettered"
    )
    assert [r.status for r in f.cloud.for_id(record_id(0))] == [status, 200]
    assert not f.dead_letters.exists()


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [400, 422])
async def test_other_4xx_is_dead_lettered_not_retried(forwarding, status: int) -> None:  # type: ignore[no-untyped-def]
    """A permanent refusal: the batch goes to the dead-letter file, is never POSTed again (so the
    record never arrives), and the forwarder goes on with the next message."""
    f: Forwarding = await forwarding({record_id(0): [(status, {})]}, IOTPIPE_RETRY_MAX_DELAY="0.2")
    await f.send(0)
    await wait_until(
        lambda: f.dead_letters.exists() or f.cloud.accepted(record_id(0)), 30, "the batch dead-lettered or accepted"
    )
    await f.send(1)
    await wait_until(lambda: f.cloud.accepted(record_id(1)), 30, "the next record accepted")
    assert [r.status for r in f.cloud.for_id(record_id(0))] == [status]  # one POST, no retry
    assert not f.cloud.accepted(record_id(0))
    assert f.dead_lettered_ids() == [record_id(0)]
