from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import orjson
from iotpipe import KeyRing, Topics
from sensor_reader.config import load_devices
from servers import ROOT, Stack, bus_for, processed_payload

WINDOW = {
    "sensor": "t",
    "unit": "C",
    "start": 0,
    "end": 1000,
    "n": 1,
    "mean": 1.5,
    "median": 1.5,
    "min": 1.5,
    "max": 1.5,
    "std": 0.0,
}


async def test_iotpipe_sub_opens_sealed_messages(stack: Stack, keyring: KeyRing, base: str) -> None:
    topics = Topics(base)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    try:
        # Retained, so the subscriber gets it whenever it connects: no race with its start-up.
        payload = producer.sealer.seal(topics.processed("d9"), processed_payload("d9", [WINDOW]))  # type: ignore[union-attr]
        await producer.publish(topics.processed("d9"), payload, retain=True)
        result = subprocess.run(
            # Processed windows are on the pipeline broker only: an operator watches them as a
            # service that may read them.
            [sys.executable, "-m", "iotpipe.cli", "sub", f"{base}/v2/processed/#", "-n", "1", "--user", "cache-writer"],
            env=stack.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        await producer.publish(topics.processed("d9"), b"", retain=True)
    finally:
        await producer.stop()
    assert result.returncode == 0, result.stderr
    line = orjson.loads(result.stdout.splitlines()[0])
    assert line["topic"] == topics.processed("d9") and line["data"] == processed_payload("d9", [WINDOW])
    assert line["src"] == "preprocessor/test"


async def test_iotpipe_sub_reads_the_public_broker_as_reader_by_default(
    stack: Stack, keyring: KeyRing, base: str
) -> None:
    """Third parties' view: statuses as they are and alerts opened, bridged from the pipeline broker."""
    topics = Topics(base)
    monitor = bus_for(stack, "monitor", keyring=keyring)
    await monitor.start()
    await monitor.wait_connected()
    alert = {"kind": "offline", "device": "d9", "reason": "no data", "last_seen": None, "ts": 1_700_000_000_000}
    try:
        await monitor.publish(topics.device_status("d9"), b'{"state": "offline"}', retain=True)
        await monitor.publish(topics.alerts("d9"), monitor.sealer.seal(topics.alerts("d9"), alert), retain=True)  # type: ignore[union-attr]
        result = subprocess.run(
            [sys.executable, "-m", "iotpipe.cli", "sub", f"{base}/v2/#", "-n", "2"],
            env=stack.env(IOTPIPE_MQTT__PORT=str(stack.ports.public)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        for topic in (topics.device_status("d9"), topics.alerts("d9")):
            await monitor.publish(topic, b"", retain=True)
    finally:
        await monitor.stop()
    assert result.returncode == 0, result.stderr
    lines = {line["topic"]: line for line in map(orjson.loads, result.stdout.splitlines())}
    assert lines[topics.device_status("d9")]["data"] == {"state": "offline"}
    assert lines[topics.alerts("d9")]["src"] == "monitor/test"


async def test_iotpipe_sub_exits_quietly_when_its_output_closes(stack: Stack, keyring: KeyRing, base: str) -> None:
    """`iotpipe sub | head -1`: once head has its line and exits, sub must stop with status 0 and
    no traceback, as Unix tools do, while messages keep arriving."""
    topics = Topics(base)
    producer = bus_for(stack, "preprocessor", keyring=keyring)
    await producer.start()
    await producer.wait_connected()
    command = f"set -o pipefail; {sys.executable} -m iotpipe.cli sub '{base}/v2/processed/#' --user monitor | head -1"
    proc = await asyncio.create_subprocess_shell(
        command, env=stack.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, executable="/bin/bash"
    )

    async def keep_publishing() -> None:
        while True:
            await producer.publish_sealed(topics.processed("d9"), processed_payload("d9", [WINDOW]))
            await asyncio.sleep(0.05)  # wait-ok: paced publishing, a load, not a wait

    feeder = asyncio.create_task(keep_publishing())
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        await producer.stop()
    assert proc.returncode == 0, stderr.decode()
    assert len(stdout.splitlines()) == 1 and orjson.loads(stdout)["data"]["windows"][0]["device"] == "d9"
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()


def test_iotpipe_sub_reports_a_bad_setup_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "sub", "--secrets-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "cannot read key ring file" in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_devices_example_is_valid(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[[devices]]" in b]
    assert blocks, "README shows a devices file"
    path = tmp_path / "devices.toml"
    path.write_text(blocks[0])
    drivers = {d.driver for d, _ in load_devices(path)}
    assert drivers == {"mcp3008", "bme280", "sht31", "pms5003"}
    assert tomllib.loads(blocks[0])["devices"][0]["id"] == "bed-1-soil"
