"""An insider's flood, as its own process (so its CPU is not the test's): valid raw batches for one
device, sealed with the key ring and published with the sensor-reader's broker password, at a
given rate of messages for a given time. Prints how many windows the broker acknowledged (JSON).

    python tests/flooder.py <port> <secrets dir> <topic> <device> <seconds> <messages/s> <windows/message>
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from iotpipe import Bus, KeyRing, MqttSettings
from iotpipe.devstack import mqtt_password_file

WINDOW_MS = 1000


def batch(device: str, first: int, windows: int, now_ms: int) -> dict[str, object]:
    """`windows` distinct windows of `device` (two sensors, one reading each) in the last day (what
    a reader replaying its spool would send): they pass every check but the device's allowance."""
    latest = now_ms - now_ms % WINDOW_MS - 10 * WINDOW_MS
    out = []
    for i in range(first, first + windows):
        start = latest - (i % 86_400) * WINDOW_MS
        reading = {"unit": "1", "t": [start], "v": [float(i % 10)]}
        out.append(
            {"device": device, "window": {"start": start, "size": WINDOW_MS}, "sensors": {"a": reading, "b": reading}}
        )
    return {"windows": out}


async def flood(port: int, secrets: str, topic: str, device: str, seconds: float, rate: float, per: int) -> int:
    from pathlib import Path

    bus = Bus(
        MqttSettings(host="127.0.0.1", port=port, session_expiry=0, connect_timeout=15),
        client_id=f"sensor-reader-flooder-{time.monotonic_ns()}",  # <user>-<id>, as the broker may require
        keyring=KeyRing.from_file(Path(secrets) / "keyring"),
        src="sensor-reader/flooder",
        username="sensor-reader",
        password_file=mqtt_password_file(Path(secrets), "sensor-reader"),
    )
    await bus.start()
    await bus.wait_connected(30)
    loop = asyncio.get_running_loop()
    began = loop.time()
    sent = 0
    pending: set[asyncio.Task[None]] = set()
    while (elapsed := loop.time() - began) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            data = batch(device, sent * per, per, time.time_ns() // 1_000_000)
            task = asyncio.create_task(bus.publish_sealed(topic, data, kind="raw"))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
            if len(pending) >= 200:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(max(0.0, began + due / rate - loop.time()))
    await asyncio.gather(*pending)
    await bus.stop()
    return sent * per


if __name__ == "__main__":
    port, secrets, topic, device, seconds, rate, per = sys.argv[1:8]
    windows = asyncio.run(flood(int(port), secrets, topic, device, float(seconds), float(rate), int(per)))
    sys.stdout.write(orjson.dumps({"windows": windows}).decode() + "\n")
