"""The cache-writer's Redis write, against its alternatives: CPU of redis-server and wall time per window.

Writes a W-fleet-like stream (5,000 devices x 4 sensors, one window each per step, 500 windows per
call) into a real redis-server (append-only file, fsync every second: the shipped persistence) in
three ways, and prints per window the server's CPU (/proc) and the wall time including this client:

- `lua-batched`: the shipped script (cache_writer.service.WRITE_WINDOWS), one call per 500 windows;
- `lua-per-window`: the same checks, one script call per window in one pipeline (the writer before
  contract v2);
- `plain-pipeline`: ZADD + ZREMRANGEBYRANK per window and one HSET per device and hash, pipelined.
  Cheapest for the server, but not what the contract needs: no duplicate detection (a redelivered
  window is counted as written) and a late, older window overwrites `latest`.

Figures, not assertions. Run: `uv run python tests/bench/redis_write.py [--steps 40]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache_writer.service import WINDOWS_PER_CALL, WRITE_WINDOWS
from servers import free_port

PER_WINDOW = """
if redis.call('ZCOUNT', KEYS[1], ARGV[1], ARGV[1]) > 0 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
local newest = redis.call('HGET', KEYS[3], ARGV[4])
if not newest or tonumber(newest) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
end
return 1
"""
SENSORS = ("temperature", "humidity", "pressure", "light")
HISTORY = 1440
MEMBER = (
    b'{"device":"fl-00001","end":1795977933800,"max":21.3,"mean":21.3,"median":21.3,"min":21.3,"n":1,'
    b'"sensor":"temperature","start":%d,"std":0.0,"unit":"degC"}'
)


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def writers(client: redis.Redis) -> dict[str, Callable[[str, list[str], int], None]]:
    batched = client.register_script(WRITE_WINDOWS)
    per_window = client.register_script(PER_WINDOW)

    def lua_batched(prefix: str, devices: list[str], start: int) -> None:
        keys: list[str] = []
        args: list[object] = [HISTORY]
        for device in devices:
            for sensor in SENSORS:
                keys += [
                    f"{prefix}:series:{device}:{sensor}",
                    f"{prefix}:latest:{device}",
                    f"{prefix}:latest_start:{device}",
                ]
                args += [start, MEMBER % start, sensor, "21.3"]
        batched(keys=keys, args=args)

    def lua_per_window(prefix: str, devices: list[str], start: int) -> None:
        pipe = client.pipeline(transaction=False)
        for device in devices:
            for sensor in SENSORS:
                keys = [
                    f"{prefix}:series:{device}:{sensor}",
                    f"{prefix}:latest:{device}",
                    f"{prefix}:latest_start:{device}",
                ]
                per_window(keys=keys, args=[start, MEMBER % start, HISTORY, sensor, "21.3"], client=pipe)
        pipe.execute()

    def plain_pipeline(prefix: str, devices: list[str], start: int) -> None:
        pipe = client.pipeline(transaction=False)
        for device in devices:
            for sensor in SENSORS:
                pipe.zadd(f"{prefix}:series:{device}:{sensor}", {MEMBER % start: start})
                pipe.zremrangebyrank(f"{prefix}:series:{device}:{sensor}", 0, -(HISTORY + 1))
            pipe.hset(f"{prefix}:latest:{device}", mapping=dict.fromkeys(SENSORS, "21.3"))
            pipe.hset(f"{prefix}:latest_start:{device}", mapping=dict.fromkeys(SENSORS, start))
        pipe.execute()

    return {"lua-batched": lua_batched, "lua-per-window": lua_per_window, "plain-pipeline": plain_pipeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=40, help="windows per sensor written by each way")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="redis-bench-"))
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # wait-ok: polling for the server to accept connections, bounded by the deadline
        per_call = WINDOWS_PER_CALL // len(SENSORS)
        devices = [f"fl-{i:05d}" for i in range(args.devices)]
        print(
            f"{args.devices} devices x {len(SENSORS)} sensors, {args.steps} windows per sensor, "
            f"{per_call * len(SENSORS)} windows per call"
        )
        print(f"  {'way':<16} {'redis CPU µs/window':>20} {'wall µs/window':>15}")
        for name, write in writers(client).items():
            before, started = server_cpu(server.pid), time.perf_counter()
            for step in range(args.steps):
                start = 1_795_977_932_000 + step * 1000
                for first in range(0, len(devices), per_call):
                    write(name, devices[first : first + per_call], start)
            windows = args.steps * len(devices) * len(SENSORS)
            cpu = (server_cpu(server.pid) - before) / windows * 1e6
            wall = (time.perf_counter() - started) / windows * 1e6
            print(f"  {name:<16} {cpu:>20.2f} {wall:>15.2f}")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
