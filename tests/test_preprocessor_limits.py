"""A valid raw batch can hold thousands of sensors; its processed output must still fit what every
receiver accepts, or it wedges the pipeline (the broker drops a client that sends an oversize
packet, and the durable session hands the batch back forever). The preprocessor splits its output."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson
from iotpipe import KeyRing, Opened, Processed, RawBatch, Topics, decode, encode
from preprocessor.service import fitting, process
from servers import Stack, bus_for, free_port, service_env, spawn, stop_all, wait_online, wait_until

MAX_BYTES = 1 << 20  # IOTPIPE_MAX_PAYLOAD_BYTES's default


def wide_batch(sensors: int, start: int = 1_000_000) -> dict[str, Any]:
    return {
        "device": "wide",
        "window": {"start": start, "size": 1000},
        "sensors": {f"s{i}": {"unit": "u", "t": [start], "v": [float(i)]} for i in range(sensors)},
    }


def test_a_processed_message_too_large_to_seal_is_split_in_order() -> None:
    raw = decode(orjson.dumps({"windows": [wide_batch(14_000)]}), RawBatch)
    windows = process(raw.windows, kernel=5)
    assert len(encode(Processed(windows=windows))) > 0.7 * MAX_BYTES  # sealed whole, it would exceed the limit
    parts = fitting(windows, MAX_BYTES)
    assert len(parts) > 1 and all(len(encode(p)) <= 0.7 * MAX_BYTES for p in parts)
    assert [w for p in parts for w in p.windows] == windows
    # Ids at their longest still fit: the bound per window holds.
    longest = [msgspec.structs.replace(w, device="d" * 64, sensor="s" * 64, unit="u" * 32) for w in windows]
    assert all(len(encode(p)) <= 0.7 * MAX_BYTES for p in fitting(longest, MAX_BYTES))
    assert fitting(windows[:3], MAX_BYTES) == [Processed(windows=windows[:3])]


async def test_a_huge_valid_batch_is_processed_and_the_stream_keeps_flowing(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    topics = Topics(base)
    received: list[Opened[Processed]] = []
    changed = asyncio.Event()

    async def on_processed(messages: Sequence[Opened[Processed]]) -> None:
        received.extend(messages)
        changed.set()

    watcher = bus_for(stack, "cache-writer", keyring=keyring)
    watcher.subscribe(topics.all("processed"), on_processed, model=Processed)
    producer = bus_for(stack, "sensor-reader", keyring=keyring)
    instance = f"pp{uuid.uuid4().hex[:6]}"
    proc = spawn("preprocessor", service_env(stack, base, tmp_path, instance, free_port()), tmp_path, "pp")
    try:
        for bus in (watcher, producer):
            await bus.start()
            await bus.wait_connected()
        await asyncio.wait_for(watcher.subscribed.wait(), 10)
        await wait_online(stack, topics.service_status("preprocessor", instance))
        wide = {"windows": [wide_batch(14_000)]}
        sealed = producer.sealer.seal(topics.raw("reader-1"), wide)  # type: ignore[union-attr]
        assert len(sealed) < MAX_BYTES, "the input itself is within the limit"
        await producer.publish(topics.raw("reader-1"), sealed)
        normal = {
            "device": "d1",
            "window": {"start": 5000, "size": 1000},
            "sensors": {"t": {"unit": "C", "t": [5000], "v": [1.0]}},
        }
        await producer.publish_sealed(topics.raw("reader-1"), {"windows": [normal]})

        def windows(device: str) -> int:
            return sum(1 for m in received for w in m.data.windows if w.device == device)

        await wait_until(lambda: windows("wide") == 14_000 and windows("d1") == 1, 60, "every window processed")
        assert len({m.seq for m in received if m.data.windows[0].device == "wide"}) > 1  # split across messages
        assert proc.poll() is None
    finally:
        await producer.stop()
        await watcher.stop()
        stop_all([proc])
