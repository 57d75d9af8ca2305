"""IOTPIPE_MESSAGE_TTL reaches the Opener a running service uses: a sealed message that authenticates
but is older than the TTL is rejected (counted as `undecryptable`) and never takes effect."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from cryptography.fernet import Fernet
from iotpipe import KeyRing, PlainMessage, Topics, counter
from iotpipe.devstack import redis_password_file
from servers import TAP, Stack, bus_for, processed_payload, service_env, spawn, stop_all, wait_until

DEVICE = "d1"


def primary_key(keyring_file: Path) -> tuple[str, bytes]:
    """The first `<kid> <fernet key>` line of a key ring file (docs/contract.md, Keys)."""
    for line in keyring_file.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            kid, key = line.split()
            return kid, key.encode()
    raise AssertionError(f"no key in {keyring_file}")


def sealed_at(kid: str, key: bytes, topic: str, data: Any, at: int) -> bytes:
    """An authentic sealed envelope (the contract's wire format), sealed as if at unix time `at`."""
    inner = {"topic": topic, "src": "preprocessor/past", "boot": uuid.uuid4().hex[:16], "seq": 1, "ts": at * 1000}
    token = Fernet(key).encrypt_at_time(orjson.dumps({**inner, "data": data}), at)
    return orjson.dumps({"v": 1, "alg": "fernet", "kid": kid, "ct": token.decode("ascii")})


def window(start: int) -> dict[str, object]:
    return {
        "sensor": "temp",
        "unit": "degC",
        "start": start,
        "end": start + 1000,
        "n": 5,
        "mean": 21.5,
        "median": 21.5,
        "min": 21.0,
        "max": 22.0,
        "std": 0.3,
    }


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_service_rejects_an_authentic_message_older_than_its_ttl(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    topics = Topics(base)
    instance = f"ttl-{uuid.uuid4().hex[:6]}"
    status: dict[str, Any] = {}

    async def on_status(messages: Sequence[PlainMessage]) -> None:
        for m in messages:
            if m.payload:
                status.update(orjson.loads(m.payload))

    watcher = bus_for(stack, TAP)
    watcher.subscribe(topics.service_status("cache-writer", instance), on_status, sealed=False)
    await watcher.start()
    env = service_env(stack, base, tmp_path, instance, IOTPIPE_MESSAGE_TTL="60", IOTPIPE_STATUS_INTERVAL="0.3")
    writer = spawn("cache_writer", env, tmp_path, "cache-writer")
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    password = redis_password_file(stack.secrets_dir, "reader").read_text().strip()
    redis = aioredis.Redis(port=stack.ports.redis, username="reader", password=password)
    try:
        await producer.wait_connected()
        # `online` is published after the writer's SUBSCRIBE on the same connection.
        await wait_until(lambda: status.get("state") == "online", 30, "the cache-writer online")

        kid, key = primary_key(stack.secrets_dir / "keyring")
        topic = topics.processed(DEVICE)
        hour_ago = int(time.time()) - 3600  # well within the 7-day default, far outside a 60 s TTL
        await producer.publish(topic, sealed_at(kid, key, topic, processed_payload(DEVICE, [window(1000)]), hour_ago))
        # Same publisher, same topic: delivered and handled after the old one (MQTT keeps the order).
        await producer.publish_sealed(topic, processed_payload(DEVICE, [window(2000)]))

        def counters() -> dict[str, float]:
            return status.get("counters") or {}  # type: ignore[no-any-return]

        await wait_until(lambda: counter(counters(), "received", "sealed") >= 1, 30, "the writer to count a message")
        assert counter(counters(), "rejected", "undecryptable") == 1, counters()
        assert counter(counters(), "received", "sealed") == 1, counters()
        starts = [int(s) for _m, s in await redis.zrange(f"{base}:series:{DEVICE}:temp", 0, -1, withscores=True)]
        assert starts == [2000]  # the fresh window only; the hour-old one never reached Redis
        assert writer.poll() is None, "the cache-writer died"
    except BaseException:
        out = (tmp_path / "cache-writer.out").read_text(errors="replace")[-3000:]
        print(f"===== cache-writer =====\n{out}")
        raise
    finally:
        stop_all([writer])
        await redis.aclose()
        await producer.stop()
        await watcher.stop()
