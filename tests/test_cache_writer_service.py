"""The cache-writer as it runs (a subprocess on the real broker and Redis): the series keeps exactly
the newest IOTPIPE_HISTORY windows (by start), 1440 unless configured."""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from iotpipe import KeyRing, Topics, counter
from servers import (
    Stack,
    bus_for,
    processed_payload,
    service_counters,
    service_env,
    spawn,
    stop_all,
    wait_online,
    wait_until,
)


def window(i: int) -> dict[str, object]:
    return {
        "device": "d1",
        "sensor": "temp",
        "unit": "degC",
        "start": i * 1000,
        "end": i * 1000 + 1000,
        "n": 3,
        "mean": 20.0 + i,
        "median": 20.0 + i,
        "min": 19.0 + i,
        "max": 21.0 + i,
        "std": 0.5,
    }


@pytest.fixture
async def reader(stack: Stack, redis_reader_password: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(
        port=stack.ports.redis, username="reader", password=redis_reader_password, decode_responses=True
    )
    yield client
    await client.aclose()


async def write_through_service(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, starts: list[int], per_message: int = 1, **env: str
) -> None:
    """Run a cache-writer, publish the windows `per_message` to a processed message in the order
    given (as several preprocessors would), and return once it has handled every one of them (by its
    own counters)."""
    topics = Topics(base)
    writer: subprocess.Popen[bytes] = spawn(
        "cache_writer", service_env(stack, base, tmp_path, "hist", IOTPIPE_STATUS_INTERVAL="0.1", **env), tmp_path
    )
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    try:
        await wait_online(stack, topics.service_status("cache-writer", "hist"))
        await producer.start()
        await producer.wait_connected()
        messages = [starts[i : i + per_message] for i in range(0, len(starts), per_message)]
        await asyncio.gather(
            *(
                producer.publish_sealed(topics.processed("d1"), processed_payload("d1", [window(i) for i in m]))
                for m in messages
            )
        )

        def handled() -> float:
            counts = service_counters(tmp_path, "cache-writer", "hist")
            return counter(counts, "windows_written") + counter(counts, "windows_duplicate")

        await wait_until(lambda: handled() >= len(starts), 30, f"the writer to handle {len(starts)} windows")
        assert counter(service_counters(tmp_path, "cache-writer", "hist"), "windows_written") == len(starts)
    finally:
        await producer.stop()
        stop_all([writer])


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_history_keeps_the_newest_windows_by_start(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, reader: aioredis.Redis
) -> None:
    """IOTPIPE_HISTORY=5 and 8 windows arriving out of order: the 5 newest starts remain, whatever
    the order they came in (an older window arriving last is not kept over a newer one)."""
    starts = list(range(8))
    random.Random(3).shuffle(starts)
    starts.remove(0)
    starts.append(0)  # the oldest arrives last: added, then trimmed at once
    await write_through_service(stack, keyring, base, tmp_path, starts, IOTPIPE_HISTORY="5")
    series = await reader.zrange(f"{base}:series:d1:temp", 0, -1, withscores=True)
    assert [int(score) for _member, score in series] == [3000, 4000, 5000, 6000, 7000]
    assert [orjson.loads(member) for member, _score in series] == [window(i) for i in range(3, 8)]
    assert await reader.hget(f"{base}:latest_start:d1", "temp") == "7000"


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_history_defaults_to_1440_windows(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, reader: aioredis.Redis
) -> None:
    """No IOTPIPE_HISTORY: 1441 windows written (a day of minutes and one more, 8 messages), the
    oldest one is gone and 1440 remain."""
    await write_through_service(stack, keyring, base, tmp_path, list(range(1441)), per_message=181)
    key = f"{base}:series:d1:temp"
    assert await reader.zcard(key) == 1440
    scores = [int(score) for _member, score in await reader.zrange(key, 0, -1, withscores=True)]
    assert scores == [i * 1000 for i in range(1, 1441)]
