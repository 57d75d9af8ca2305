"""cache-writer against the real Redis (project config: AOF, ACL users, no default user)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from cache_writer.service import CacheWriter, Settings
from iotpipe import KeyRing, Opened, Runtime
from servers import Stack


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


def message(base: str, device: str, windows: list[dict[str, object]], seq: int = 1) -> Opened:
    return Opened(
        f"{base}/v1/processed/{device}", "preprocessor/x", "boot", seq, 0, {"device": device, "windows": windows}
    )


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
    counts = writer.runtime.metrics.snapshot()
    assert counts["iotpipe_windows_written"] == 2 and counts["iotpipe_windows_duplicate"] == 2


async def test_schema_errors_are_counted_not_written(writer: CacheWriter, reader: aioredis.Redis, base: str) -> None:
    bad = [
        Opened(f"{base}/v1/processed/d3", "x/y", "b", 1, 0, {"device": "other", "windows": [window("t", 0, 1)]}),
        Opened(f"{base}/v1/processed/d3", "x/y", "b", 2, 0, {"device": "d3", "windows": [{"sensor": "a/b"}]}),
        Opened(f"{base}/v1/processed/d3", "x/y", "b", 3, 0, [1, 2]),
    ]
    await writer.handle([*bad, message(base, "d3", [window("temp", 0, 5.0)])])
    assert await reader.hgetall(f"{base}:latest:d3") == {"temp": "5.0"}
    assert writer.runtime.metrics.snapshot()["iotpipe_rejected{reason=schema}"] == 3


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
