"""cache-writer against the real Redis (project config: AOF, ACL users, no default user)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from cache_writer.service import CacheWriter, Settings
from iotpipe import KeyRing, Opened, Processed, Runtime, counter, decode
from servers import Stack, processed_payload


def window(sensor: str, start: int, mean: float) -> dict[str, object]:
    return {
        "sensor": sensor,
        "unit": "degC",
        "start": start,
        "end": start + 1000,
        "n": 10,
        "mean": mean,
        "median": mean,
        "min": mean - 1,
        "max": mean + 1,
        "std": 0.5,
    }


def message(base: str, device: str, windows: list[dict[str, object]], seq: int = 1) -> Opened[Processed]:
    topic = f"{base}/v2/processed/{device}"
    data = decode(orjson.dumps(processed_payload(device, windows)), Processed, topic)
    return Opened(topic, "preprocessor/x", "boot", seq, 0, data)


@pytest.fixture
async def writer(
    stack: Stack, keyring: KeyRing, base: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[CacheWriter]:
    for key, value in stack.env(IOTPIPE_BASE_TOPIC=base, IOTPIPE_REDIS_PREFIX=base, IOTPIPE_HISTORY="3").items():
        monkeypatch.setenv(key, value)
    component = CacheWriter(Runtime(Settings.load(instance="t"), keyring=keyring))
    yield component
    await component.close()


@pytest.fixture
async def reader(stack: Stack, redis_reader_password: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(
        port=stack.ports.redis, username="reader", password=redis_reader_password, decode_responses=True
    )
    yield client
    await client.aclose()


async def test_latest_and_bounded_history(writer: CacheWriter, reader: aioredis.Redis, base: str) -> None:
    await writer.handle([message(base, "d1", [window("temp", 1000 * i, 20.0 + i) for i in range(5)])])
    assert await reader.hget(f"{base}:latest:d1", "temp") == "24.0"
    series = await reader.zrange(f"{base}:series:d1:temp", 0, -1, withscores=True)
    assert [int(score) for _member, score in series] == [2000, 3000, 4000]  # history = 3
    assert orjson.loads(series[-1][0])["mean"] == 24.0


async def test_redelivered_and_late_windows_are_idempotent(
    writer: CacheWriter, reader: aioredis.Redis, base: str
) -> None:
    await writer.handle([message(base, "d2", [window("temp", 5000, 21.5)])])
    before = await reader.zrange(f"{base}:series:d2:temp", 0, -1, withscores=True)
    # A redelivery, a reprocessed copy (new seq) and a late older window from another instance.
    await writer.handle([message(base, "d2", [window("temp", 5000, 21.5)], seq=2)])
    await writer.handle([message(base, "d2", [window("temp", 5000, 99.0)], seq=3)])
    await writer.handle([message(base, "d2", [window("temp", 4000, 10.0)], seq=4)])
    after = await reader.zrange(f"{base}:series:d2:temp", 0, -1, withscores=True)
    assert after[-1] == before[-1] and len(after) == 2
    assert await reader.hget(f"{base}:latest:d2", "temp") == "21.5"  # the late window did not win
    counts = writer.runtime.metrics.counters()
    assert counter(counts, "windows_written") == 2 and counter(counts, "windows_duplicate") == 2


async def test_redis_requires_auth_and_reader_is_read_only(
    stack: Stack, redis_reader_password: str, secrets_dir: Path
) -> None:
    anonymous = aioredis.Redis(port=stack.ports.redis)
    with pytest.raises(redis.exceptions.AuthenticationError):
        await anonymous.ping()
    await anonymous.aclose()
    reader = aioredis.Redis(port=stack.ports.redis, username="reader", password=redis_reader_password)
    with pytest.raises(redis.exceptions.NoPermissionError):
        await reader.set("x", "1")
    await reader.aclose()
    config = (Path(stack.broker.cwd) / "redis.conf").read_text()
    assert "appendonly yes" in config
