"""sensor-reader across a broker crash: pending windows are bounded, counted when dropped, and the
rest are delivered once the broker is back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from iotpipe import serve
from sensor_reader.service import SensorReader, Settings
from servers import run_servers
from test_e2e import wait_until

DEVICES = """
[[devices]]
id = "d1"
driver = "simulated"
interval = 0.01
"""


@pytest.mark.timeout(90)
async def test_broker_crash_bounds_pending_windows_then_recovers(
    tmp_path: Path, secrets_dir: Path, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES)
    with run_servers(tmp_path / "servers", secrets_dir) as servers:  # a broker of this test's own
        for key, value in servers.env(
            IOTPIPE_BASE_TOPIC=base,
            IOTPIPE_DEVICES_FILE=str(devices),
            IOTPIPE_WINDOW_MS="50",
            IOTPIPE_WINDOW_GRACE_MS="10",
            IOTPIPE_MAX_PENDING_WINDOWS="5",
            IOTPIPE_HEALTH_DIR=str(tmp_path / "health"),
        ).items():
            monkeypatch.setenv(key, value)
        components: list[SensorReader] = []

        def factory(runtime):  # type: ignore[no-untyped-def]
            components.append(SensorReader(runtime))
            return components[-1]

        stop = asyncio.Event()
        task = asyncio.create_task(serve(Settings.load(instance="outage"), factory, stop))
        try:
            await wait_until(
                lambda: (
                    components and components[0].runtime.metrics.snapshot().get("iotpipe_readings{device=d1}", 0) > 0
                ),
                30,
                "first readings published",
            )
            reader = components[0]
            servers.broker.kill()  # kill -9
            await wait_until(
                lambda: reader.runtime.metrics.snapshot().get("iotpipe_readings_dropped{device=d1}", 0) > 0,
                30,
                "windows dropped once 5 are pending",
            )
            assert len(reader._publishing) <= 5
            published_before = reader.runtime.metrics.snapshot()["iotpipe_readings{device=d1}"]
            servers.broker.start()
            await wait_until(
                lambda: reader.runtime.metrics.snapshot()["iotpipe_readings{device=d1}"] > published_before,
                40,
                "publishing to resume after the broker restart",
            )
            assert task.done() is False
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
