"""The fuzzers' findings (tests/test_fuzz_*.py, `make fuzz`) through the real broker and the bus:
each hostile message is refused for its reason, counted, dead-lettered and logged without a value
of the decrypted payload or a forged line, and the genuine message published right after it is
handled (battery items 10 and 12 of the reliability notes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from iotpipe import KeyRing, Opened, PlainMessage, Processed, ServiceStatus, Topics, counter
from servers import Stack, bus_for, processed_payload, wait_until

CANARY = "¤sealed-canary¤"


def window(start: int) -> dict[str, object]:
    return {"sensor": "temp", "unit": "degC", "start": start, "end": start + 1000, "n": 3, "mean": 1.0,
            "median": 1.0, "min": 1.0, "max": 1.0, "std": 0.0}  # fmt: skip


def dead_letters(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def test_hostile_sealed_payloads_are_refused_quietly_and_genuine_data_flows(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = Topics(base).processed("pre-1")
    received: list[int] = []

    async def handler(messages: Sequence[Opened[Processed]]) -> None:
        received.extend(w.start for m in messages for w in m.data.windows)

    consumer = bus_for(stack, "cache-writer", keyring=keyring)
    consumer.dead_letters.path = tmp_path / "dead.jsonl"
    consumer.subscribe(topic, handler, model=Processed)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    for bus in (consumer, producer):
        await bus.start()
        await bus.wait_connected()
    caplog.set_level(logging.WARNING)
    try:
        await asyncio.wait_for(consumer.subscribed.wait(), 10)
        hostile: list[object] = [
            {**processed_payload("d1", [window(1000)]), f"{CANARY}\nFAKE LOG LINE": 1},  # a quoted key
            processed_payload("d1", [{**window(2000), "unit": 7, "sensor": CANARY}]),
            processed_payload("d1", [{**window(3000), "start": 2**64, "end": 2**64 + 1000}]),  # past 2**53
        ]
        for payload in hostile:
            await producer.publish_sealed(topic, payload)
        await producer.publish_sealed(topic, processed_payload("d1", [window(5000)]))
        await wait_until(lambda: received == [5000], 20, "the genuine window after the hostile ones")
        await wait_until(lambda: len(dead_letters(tmp_path / "dead.jsonl")) == 3, 10, "three dead letters")
        letters = dead_letters(tmp_path / "dead.jsonl")
        assert [letter["reason"] for letter in letters] == ["schema"] * 3
        assert counter(consumer.metrics.counters(), "rejected", "schema") == 3
        for letter in letters:
            assert CANARY not in letter["error"] and "\n" not in letter["error"], letter["error"]
            assert CANARY.encode() not in orjson.dumps(letter)  # the payload stays sealed
        assert CANARY not in caplog.text and "FAKE LOG LINE" not in caplog.text
    finally:
        for bus in (consumer, producer):
            await bus.stop()


async def test_a_deeply_nested_plain_status_is_a_schema_rejection_and_the_next_is_read(
    stack: Stack, base: str, tmp_path: Path
) -> None:
    """A service status is plain JSON: any user that may publish one can send it, no key needed.
    100,000 nested arrays raised RecursionError inside the decoder, which the bus could only file
    as an unexpected bug ("malformed: unexpected RecursionError"); now it is a counted schema
    rejection like any other malformed status."""
    topic = Topics(base).service_status("sensor-reader", "r1")
    received: list[str] = []

    async def handler(messages: Sequence[PlainMessage[ServiceStatus]]) -> None:
        received.extend(m.data.client_id for m in messages if m.data is not None)

    consumer = bus_for(stack, "monitor")
    consumer.dead_letters.path = tmp_path / "dead.jsonl"
    consumer.subscribe(f"{base}/v2/status/service/+/+", handler, model=ServiceStatus, sealed=False)
    producer = bus_for(stack, "sensor-reader")
    for bus in (consumer, producer):
        await bus.start()
        await bus.wait_connected()
    try:
        await asyncio.wait_for(consumer.subscribed.wait(), 10)
        deep = b"[" * 100_000 + b"]" * 100_000
        await producer.publish(topic, b'{"state": "online", "client_id": "x", "ts": 1, "extra": ' + deep + b"}")
        await producer.publish(topic, orjson.dumps({"state": "online", "client_id": "genuine", "ts": 2}))
        await wait_until(lambda: received == ["genuine"], 20, "the genuine status after the nested one")
        assert counter(consumer.metrics.counters(), "rejected", "schema") == 1
        (letter,) = dead_letters(tmp_path / "dead.jsonl")
        assert letter["reason"] == "schema" and letter["error"] == "JSON nested too deeply"
    finally:
        for bus in (consumer, producer):
            await bus.stop()
