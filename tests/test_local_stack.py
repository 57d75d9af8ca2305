"""`make run`'s stack (iotpipe stack → honcho → Procfile) as a user starts it: TLS between services,
generated secrets, rendered configs, per-service log files, and a clean stop on Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from iotpipe.devstack import redis_password_file
from servers import ROOT, free_port
from test_e2e import wait_until

DEVICES = ("greenhouse-1", "greenhouse-2", "weather-station")
LOGS = ("sensor-reader", "preprocessor", "cache-writer", "cloud-forwarder", "monitor", "cloud-sink", "broker")


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_local_stack_fills_redis_within_30s_and_stops_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for part in ("Procfile", "mosquitto", "redis", "services/sensor_reader/examples"):
        src = ROOT / part
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, root / part)
        else:
            shutil.copy(src, root / part)
    ports = {name: str(free_port()) for name in ("MQTT", "MQTT_TLS", "REDIS", "SINK")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
    env.update({f"IOTPIPE_STACK_{name}_PORT": port for name, port in ports.items()})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
    output = (tmp_path / "stack.out").open("wb")
    stack = subprocess.Popen(
        [sys.executable, "-m", "iotpipe.cli", "stack", "--root", str(root)],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        await wait_until(lambda: redis_password_file(root / "secrets", "reader").exists(), 30, "secrets")
        redis = aioredis.Redis(
            port=int(ports["REDIS"]),
            username="reader",
            decode_responses=True,
            password=redis_password_file(root / "secrets", "reader").read_text().strip(),
        )

        async def all_devices_cached() -> bool:
            try:
                return all([await redis.hlen(f"iotpipe:latest:{d}") for d in DEVICES])
            except (aioredis.ConnectionError, OSError):
                return False  # Redis still starting

        await wait_until(all_devices_cached, 30, "latest values of every simulated device in Redis")
        await redis.aclose()

        def all_online() -> bool:
            files = [root / "var/health" / f"{name}-local.json" for name in LOGS[:5]]
            return all(f.exists() and orjson.loads(f.read_bytes())["state"] == "online" for f in files)

        await wait_until(all_online, 30, "every service's health file to say online")
        stack.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert stack.wait(30) == 0 or stack.returncode in (-signal.SIGINT, 130)
    except BaseException:
        os.write(2, (tmp_path / "stack.out").read_bytes()[-5000:])
        raise
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
        output.close()
    text = (tmp_path / "stack.out").read_text(errors="replace")
    assert "sensor-reader.1" in text and "| " in text  # honcho's per-service prefixes
    for name in LOGS:
        assert (root / "var/log" / f"{name}.log").stat().st_size > 0, name
    # Services talked TLS to the broker, and every one of them said offline on its way out.
    assert "on port " + ports["MQTT_TLS"] in (root / "var/log/broker.log").read_text()
    for name in LOGS[:5]:
        health = orjson.loads((root / "var/health" / f"{name}-local.json").read_bytes())
        assert health["state"] == "offline", name
    assert "Traceback" not in text
