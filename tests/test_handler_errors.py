"""What the bus does with a handler's errors (iotpipe._bus), on the real broker and Redis.

Every message is queued for an offline durable session first, so the consumer receives them
together, in one batch when it reconnects: the point is what happens to the healthy batch-mates of
a bad message. Each test counts every message: stored (or handled), dead-lettered, and nothing else.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from cache_writer.service import CacheWriter, Settings
from iotpipe import BUG_RETRIES, Bus, KeyRing, Opened, PermanentError, RetryableError, Runtime, Topics, counter
from servers import Stack, bus_for, processed_payload, wait_until


def window(start: int, mean: float = 1.0) -> dict[str, object]:
    return {"sensor": "temp", "unit": "degC", "start": start, "end": start + 1000, "n": 3, "mean": mean,
            "median": mean, "min": mean, "max": mean, "std": 0.0}  # fmt: skip


async def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    await wait_until(condition, timeout, "the state this test expects")


def dead_letters(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def make_session(bus: Bus) -> None:
    """Connect once so the broker keeps a durable session (and queues for it), then go offline."""
    await bus.start()
    await asyncio.wait_for(bus.subscribed.wait(), 10)
    await bus.stop()


async def test_a_schema_failure_dead_letters_exactly_that_message(
    stack: Stack,
    keyring: KeyRing,
    base: str,
    tmp_path: Path,
    redis_reader_password: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real cache-writer: three payloads that break the contract in three ways sit in one batch
    with two good ones; the good ones are stored, exactly the bad ones are dead-lettered (with
    topic, reason, sender and sequence, still sealed), and each is counted."""
    dead_file = tmp_path / "dead.jsonl"
    env = stack.env(IOTPIPE_BASE_TOPIC=base, IOTPIPE_REDIS_PREFIX=base, IOTPIPE_DEAD_LETTER_FILE=str(dead_file))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.load(instance=f"t{uuid.uuid4().hex[:6]}", mqtt={"session_expiry": 600})
    first = CacheWriter(Runtime(settings, keyring=keyring))
    await make_session(first.runtime.bus)
    await first.close()

    topic = Topics(base).processed("d3")
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    payloads: list[object] = [
        processed_payload("d3", [window(1000)]),
        processed_payload("d 3", [window(2000)]),  # a device id the contract forbids
        processed_payload("d3", [{**window(3000), "sensor": "a/b"}]),  # not an id
        [1, 2],  # not an object
        processed_payload("d3", [window(5000)]),
    ]
    for payload in payloads:
        await producer.publish_sealed(topic, payload)
    await producer.stop()

    writer = CacheWriter(Runtime(settings, keyring=keyring))
    await writer.runtime.bus.start()
    reader = aioredis.Redis(port=stack.ports.redis, username="reader", password=redis_reader_password)
    try:
        await until(lambda: len(dead_letters(dead_file)) == 3)
        stored = await reader.zrange(f"{base}:series:d3:temp", 0, -1, withscores=True)
        await until(lambda: counter(writer.runtime.metrics.counters(), "received", "sealed") == 2)
    finally:
        await reader.aclose()
        await writer.runtime.bus.stop()
        await writer.close()
    assert [int(score) for _member, score in stored] == [1000, 5000]
    dead = dead_letters(dead_file)
    assert [d["seq"] for d in dead] == [2, 3, 4] and {d["reason"] for d in dead} == {"schema"}
    assert all(d["topic"] == topic and d["src"] == "preprocessor/test" for d in dead)
    assert all("matching regex" in d["error"] for d in dead[:2])
    assert all(orjson.loads(d["payload"])["alg"] == "fernet" for d in dead)  # sealed at rest, never plaintext
    counts = writer.runtime.metrics.counters()
    assert counter(counts, "rejected", "schema") == 3 and counter(counts, "dead_lettered", "schema") == 3
    assert counter(counts, "windows_written") == 2


class Consumer:
    """A bus with a scripted handler: records every call and what it finally handled."""

    def __init__(self, stack: Stack, keyring: KeyRing, base: str, dead_file: Path, client_id: str) -> None:
        self.calls: list[list[int]] = []
        self.handled: list[int] = []
        self.fail: Callable[[list[int]], None] = lambda _ids: None
        self.bus = bus_for(stack, "cache-writer", keyring=keyring, client_id=client_id, session_expiry=600)
        self.bus.dead_letters.path = dead_file
        self.bus.subscribe(Topics(base).all("processed"), self.handle)

    async def handle(self, messages: Sequence[Opened[Any]]) -> None:
        ids = [m.data["windows"][0]["start"] for m in messages]
        self.calls.append(ids)
        self.fail(ids)
        self.handled.extend(ids)


async def queue_then_consume(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, fail: Callable[[list[int]], None], n: int = 5
) -> tuple[Consumer, list[dict[str, Any]]]:
    client_id = f"test-errors-{uuid.uuid4().hex[:8]}"
    dead_file = tmp_path / "dead.jsonl"
    await make_session(Consumer(stack, keyring, base, dead_file, client_id).bus)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    for i in range(n):
        await producer.publish_sealed(Topics(base).processed("d1"), processed_payload("d1", [window(i)]))
    await producer.stop()
    consumer = Consumer(stack, keyring, base, dead_file, client_id)
    consumer.fail = fail
    await consumer.bus.start()
    try:
        await until(lambda: len(consumer.handled) + len(dead_letters(dead_file)) >= n)
    finally:
        await consumer.bus.stop()
    return consumer, dead_letters(dead_file)


async def test_a_handler_bug_on_one_message_dead_letters_it_after_bounded_retries(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    def poisoned(ids: list[int]) -> None:
        if 2 in ids:
            raise ValueError("cannot handle window 2")

    consumer, dead = await queue_then_consume(stack, keyring, base, tmp_path, poisoned)
    assert sorted(consumer.handled) == [0, 1, 3, 4]  # every healthy message, exactly once
    (letter,) = dead
    assert letter["reason"] == "handler_error" and letter["seq"] == 3
    assert letter["error"].startswith("ValueError: cannot handle window 2 at test_handler_errors.py:")
    # Bounded: the poison was tried 1 + BUG_RETRIES times alone (after any batch attempts), no more.
    assert sum(call == [2] for call in consumer.calls) == 1 + BUG_RETRIES
    assert sum(2 in call for call in consumer.calls) <= 2 * (1 + BUG_RETRIES)
    assert counter(consumer.bus.metrics.counters(), "dead_lettered", "handler_error") == 1


async def test_a_permanent_error_dead_letters_one_message_without_retrying_it(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    def refuses_3(ids: list[int]) -> None:
        if 3 in ids:
            raise PermanentError("window 3 can never be stored")

    consumer, dead = await queue_then_consume(stack, keyring, base, tmp_path, refuses_3)
    assert sorted(consumer.handled) == [0, 1, 2, 4]
    (letter,) = dead
    assert letter["reason"] == "permanent" and letter["seq"] == 4 and "never be stored" in letter["error"]
    assert sum(call == [3] for call in consumer.calls) == 1  # retrying cannot help, so it is not retried


async def test_a_retryable_error_holds_the_batch_until_the_dependency_is_back(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="iotpipe._bus")
    outage = {"left": 4}

    def flaky(_ids: list[int]) -> None:
        if outage["left"]:
            outage["left"] -= 1
            raise RetryableError("connection refused", dependency="redis")

    consumer, dead = await queue_then_consume(stack, keyring, base, tmp_path, flaky)
    assert sorted(consumer.handled) == [0, 1, 2, 3, 4] and dead == []
    assert consumer.calls[0] == consumer.calls[4]  # the same batch, held and retried whole
    messages = [r.getMessage() for r in caplog.records]
    assert sum("redis unavailable" in m for m in messages) == 1
    assert sum("redis is back" in m for m in messages) == 1
