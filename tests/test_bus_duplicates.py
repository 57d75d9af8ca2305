"""A duplicate delivered in the same handler batch as its original reaches the handler once.

The replay window records a message only after its batch was handled (so a redelivery of a message
whose handling failed is processed again), so a duplicate right behind its original, in the same
batch, must be caught within the batch. That is what a QoS 1 redelivery, or a replay of captured
bytes, looks like: the same sealed payload twice.

To make the two copies land in one batch every time (not by luck of thread scheduling), the handler
holds its current batch until a gate message, published after both copies on the same connection,
has been delivered on another subscription: by then both copies sit in the queue behind the held
batch, and the next batch takes what is queued."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from iotpipe import KeyRing, Opened, PlainMessage, Sealer, Topics, counter
from servers import TAP, Stack, bus_for


@pytest.mark.timeout(60)
async def test_a_duplicate_in_the_same_batch_reaches_the_handler_once(
    stack: Stack, keyring: KeyRing, base: str
) -> None:
    topics = Topics(base)
    topic, gate_topic = topics.processed("d1"), topics.processed("gate")
    sealer = Sealer(keyring, "preprocessor/dup")
    first, duplicated, last = (sealer.seal(topic, {"n": n}) for n in range(3))  # seq 1, 2, 3

    batches: list[list[int]] = []
    holding = asyncio.Event()
    gate = asyncio.Event()
    done = asyncio.Event()

    async def handler(messages: Sequence[Opened]) -> None:
        batches.append([m.seq for m in messages if m.src == "preprocessor/dup"])
        if len(batches) == 1:
            holding.set()
            try:
                await asyncio.wait_for(gate.wait(), 20)
            except TimeoutError:
                raise AssertionError("the gate was not delivered while this batch was held") from None
        if any(m.seq == 3 for m in messages):
            done.set()

    async def on_gate(_messages: Sequence[PlainMessage]) -> None:
        gate.set()

    consumer = bus_for(stack, TAP, keyring=keyring)
    consumer.subscribe(topic, handler)
    consumer.subscribe(gate_topic, on_gate, sealed=False)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    for bus in (consumer, producer):
        await bus.start()
        await bus.wait_connected()
    try:
        await asyncio.wait_for(consumer.subscribed.wait(), 10)
        await producer.publish(topic, first)
        await asyncio.wait_for(holding.wait(), 10)  # the handler holds the batch [1]
        await producer.publish(topic, duplicated)
        await producer.publish(topic, duplicated)  # the same bytes again: a redelivery / replay
        await producer.publish(gate_topic, b"go")
        await producer.publish(topic, last)
        await asyncio.wait_for(done.wait(), 20)
        assert batches[0] == [1]
        delivered = [seq for batch in batches for seq in batch]
        assert delivered == [1, 2, 3], f"handler batches: {batches}"
        assert counter(consumer.metrics.counters(), "rejected", "duplicate") == 1
    finally:
        for bus in (consumer, producer):
            await bus.stop()
