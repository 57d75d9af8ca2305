"""The preprocessor as it runs (a subprocess on the real broker): what it publishes for a raw batch is
the contract's aggregates, rounded to 6 decimal places, compared exactly with an independent
computation (tests/window_reference.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from iotpipe import KeyRing, PlainMessage, Topics
from servers import TAP, Stack, bus_for, service_env, spawn, stop_all, unseal, wait_online, wait_until
from window_reference import FIELDS, expected, near_rounding_tie, unrounded

START, SIZE = 1_795_533_424_000, 1000
# Every aggregate of these has a longer decimal expansion than 6 places (thirds, sevenths, roots),
# with a spike, a series shorter than the kernel, an even count (median of two) and a single reading.
SERIES: dict[str, list[float]] = {
    "seven": [20 + 1 / 3, 20 + 1 / 7, 21 + 2 / 3, 19 + 5 / 7, 20 + 4 / 9, 95.0, 20 + 1 / 11],
    "pair": [1 / 3, 2 / 7],
    "six": [3.14159265358979, 2.718281828459045, 2**0.5, 3**0.5, 5**0.5, (1 + 5**0.5) / 2],
    "single": [7 / 3],
}


def raw_batch(device: str) -> dict[str, Any]:
    return {
        "device": device,
        "window": {"start": START, "size": SIZE},
        "sensors": {
            sensor: {"unit": "degC", "t": [START + 10 * i for i in range(len(v))], "v": v}
            for sensor, v in SERIES.items()
        },
    }


@pytest.mark.e2e
@pytest.mark.timeout(60)
async def test_processed_aggregates_are_rounded_to_6_decimals(
    stack: Stack, keyring: KeyRing, base: str, tmp_path: Path
) -> None:
    # The input is meant to tell rounded from unrounded: each aggregate needs more than 6 decimals
    # (bar the 0.0 std of a single reading), and none sits on a rounding tie, so equality is exact.
    for values in SERIES.values():
        for field, value in unrounded(values).items():
            assert not near_rounding_tie(value)
            assert value != round(value, 6) or (field == "std" and len(values) == 1), (field, values)

    topics = Topics(base)
    preprocessor = spawn("preprocessor", service_env(stack, base, tmp_path, "round"), tmp_path)
    received: list[dict[str, Any]] = []

    async def on_processed(messages: Sequence[PlainMessage]) -> None:
        received.extend(unseal(keyring, m.payload)["data"] for m in messages)

    watcher = bus_for(stack, TAP)
    watcher.subscribe(topics.processed("round"), on_processed, sealed=False)
    producer = bus_for(stack, "sensor-reader", keyring=keyring)
    try:
        await watcher.start()
        await watcher.wait_connected()
        await asyncio.wait_for(watcher.subscribed.wait(), 10)
        await wait_online(stack, topics.service_status("preprocessor", "round"))  # its raw subscription is in
        await producer.start()
        await producer.wait_connected()
        await producer.publish_sealed(topics.raw("reader-1"), {"windows": [raw_batch("d1")]})
        await wait_until(lambda: received, 30, "the processed message")

        (data,) = received
        assert {w["device"] for w in data["windows"]} == {"d1"}
        windows = {w["sensor"]: w for w in data["windows"]}
        assert set(windows) == set(SERIES)
        for sensor, values in SERIES.items():
            got = windows[sensor]
            assert (got["unit"], got["start"], got["end"]) == ("degC", START, START + SIZE)
            # Exactly round(x, 6) of the independent computation: not merely close to it.
            assert {k: got[k] for k in ("n", *FIELDS)} == expected(values), sensor
    finally:
        await producer.stop()
        await watcher.stop()
        stop_all([preprocessor])
