"""Delivery promises of docs/contract.md ("Delivery"), checked by behaviour on the shipped broker
configuration: the queue of an offline durable session holds far more than mosquitto's silent
default of 1,000 messages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from iotpipe import PlainMessage, Topics
from servers import Stack, bus_for

MOSQUITTO_DEFAULT_QUEUE = 1000
QUEUED = 3 * MOSQUITTO_DEFAULT_QUEUE  # about 2.5 s to publish with a save after every change


@pytest.mark.timeout(60)
async def test_an_offline_durable_session_keeps_well_over_a_thousand_messages(stack: Stack, base: str) -> None:
    topics = Topics(base)
    topic = topics.raw("d1")
    client_id = f"queue-{uuid.uuid4().hex[:8]}"
    received: list[bytes] = []
    end = asyncio.Event()

    async def handler(messages: Sequence[PlainMessage]) -> None:
        for m in messages:
            received.append(m.payload)
            if m.payload == b"end":
                end.set()

    def consumer(session_expiry: int):  # type: ignore[no-untyped-def]
        bus = bus_for(stack, "preprocessor", client_id=client_id, session_expiry=session_expiry)
        bus.subscribe(topic, handler, sealed=False)
        return bus

    # A durable session (clean_start=False, expiry > 0) that subscribed, then went away.
    first = consumer(session_expiry=600)
    await first.start()
    await first.wait_connected()
    await asyncio.wait_for(first.subscribed.wait(), 10)
    await first.stop()

    producer = bus_for(stack, "sensor-reader")
    await producer.start()
    await producer.wait_connected()
    # Resumed with expiry 0: the session, and its queue, end when this test disconnects.
    second = consumer(session_expiry=0)
    try:
        # Every publish is acknowledged by the broker (QoS 1), i.e. accepted for the offline session.
        await asyncio.gather(*(producer.publish(topic, str(i).encode()) for i in range(QUEUED)))
        await second.start()
        await second.wait_connected()
        # Same publisher, same topic: delivered after the whole backlog (MQTT keeps the order).
        await producer.publish(topic, b"end")
        await asyncio.wait_for(end.wait(), 30)
        backlog = received[:-1]
        assert len(backlog) == QUEUED, f"{QUEUED - len(backlog)} of {QUEUED} queued messages were dropped"
        assert sorted(int(p) for p in backlog) == list(range(QUEUED))
    finally:
        await second.stop()
        await producer.stop()
