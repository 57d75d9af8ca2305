"""A genuine sealed message captured off the wire and re-published after its receiver restarted is
still dropped: the receiver's replay window survives restarts (IOTPIPE_STATE_DIR). The control
shows the same replay processed again when that state is gone, so the test can see a replay."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from iotpipe import KeyRing, Opened, Processed, Topics
from servers import Stack, bus_for, free_port, service_env, spawn, stop_all, wait_online, wait_until

RAW_WINDOW = {
    "device": "d1",
    "window": {"start": 7000, "size": 1000},
    "sensors": {"t": {"unit": "C", "t": [7000], "v": [2.0]}},
}
RAW = {"windows": [RAW_WINDOW]}


@pytest.mark.parametrize("keep_state", [True, False], ids=["state-kept", "control-state-lost"])
async def test_a_replayed_message_stays_dropped_across_a_restart(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path, keep_state: bool
) -> None:
    topics = Topics(base)
    processed: list[Opened[Processed]] = []

    async def on_processed(messages: Sequence[Opened[Processed]]) -> None:
        processed.extend(messages)

    watcher = bus_for(stack, "cache-writer", keyring=keyring)
    watcher.subscribe(topics.all("processed"), on_processed, model=Processed)
    producer = bus_for(stack, "sensor-reader", keyring=keyring)
    instance = f"pp{uuid.uuid4().hex[:6]}"
    env = service_env(stack, base, tmp_path, instance, free_port())
    state = Path(env["IOTPIPE_STATE_DIR"]) / f"preprocessor-{instance}.replay.json"
    proc = spawn("preprocessor", env, tmp_path, "pp")
    try:
        for bus in (watcher, producer):
            await bus.start()
            await bus.wait_connected()
        await asyncio.wait_for(watcher.subscribed.wait(), 10)
        await wait_online(stack, topics.service_status("preprocessor", instance))
        captured = producer.sealer.seal(topics.raw("d1"), RAW)  # type: ignore[union-attr]
        await producer.publish(topics.raw("d1"), captured)
        await wait_until(lambda: len(processed) == 1, 30, "the genuine message processed")

        proc.send_signal(signal.SIGTERM)  # a clean restart saves the window; so does every 5 s
        assert proc.wait(30) == 0
        assert state.exists()
        if not keep_state:
            state.unlink()
        proc = spawn("preprocessor", env, tmp_path, "pp")
        await wait_online(stack, topics.service_status("preprocessor", instance))
        await producer.publish(topics.raw("d1"), captured)  # the replay: same bytes, same (src, boot, seq)
        # A later genuine message: once it is processed, the replay has been handled one way or the other.
        await producer.publish_sealed(
            topics.raw("d1"),
            {
                "windows": [
                    {
                        **RAW_WINDOW,
                        "window": {"start": 8000, "size": 1000},
                        "sensors": {"t": {"unit": "C", "t": [8000], "v": [3.0]}},
                    }
                ]
            },
        )

        # The replay and the later message may reach the preprocessor in one handler batch, and then
        # leave in one processed message: look at every window, not only each message's first.
        def starts() -> list[int]:
            return [w.start for m in processed for w in m.data.windows]

        await wait_until(lambda: 8000 in starts(), 30, "the later message")
        replayed = starts().count(7000) - 1
        assert replayed == (0 if keep_state else 1)
    finally:
        await producer.stop()
        await watcher.stop()
        stop_all([proc])
