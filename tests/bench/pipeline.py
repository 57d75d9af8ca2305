"""`make bench`: readings per second through preprocessor, cache-writer, cloud-forwarder and monitor.

Starts the real broker and Redis (the project's configs, ephemeral ports) and the services as
subprocesses, then publishes synthetic raw windows as the sensor-reader would (sealed, one whole
window per device per message) and measures until every window is in Redis and at the cloud-sink.
Prints throughput, CPU seconds and peak memory per service. Figures, not assertions: machines vary.

    uv run python tests/bench/pipeline.py --devices 20 --sensors 4 --readings 250 --windows 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import redis.asyncio as aioredis
from iotpipe import KeyRing, Topics
from iotpipe.devstack import ensure_secrets, redis_password_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from servers import ROOT, bus_for, free_port, run_servers

SERVICES = ("cloud_sink", "preprocessor", "cache_writer", "cloud_forwarder", "monitor")
POLL = 0.05  # s between progress checks


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS in MiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return cpu, int(hwm.split()[1]) // 1024


async def run(args: argparse.Namespace) -> None:
    base = "bench"
    windows_total = args.devices * args.sensors * args.windows
    readings_total = windows_total * args.readings
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        secrets_dir = ensure_secrets(tmp / "secrets")
        keyring = KeyRing.from_file(secrets_dir / "keyring")
        with run_servers(tmp / "servers", secrets_dir) as stack:
            sink_port = free_port()
            env = stack.env(
                IOTPIPE_BASE_TOPIC=base,
                IOTPIPE_REDIS_PREFIX=base,
                IOTPIPE_INSTANCE="bench",
                IOTPIPE_HISTORY=str(args.windows),
                IOTPIPE_CLOUD_URL=f"http://127.0.0.1:{sink_port}/ingest",
                IOTPIPE_SINK_PORT=str(sink_port),
                IOTPIPE_HEALTH_DIR=str(tmp / "health"),
                IOTPIPE_LOG_LEVEL="WARNING",
                IOTPIPE_MQTT__RECEIVE_MAXIMUM="1000",
                IOTPIPE_BATCH_MAX="1000",
                IOTPIPE_BATCH_LINGER="0.05",
                IOTPIPE_DEAD_LETTER_FILE=str(tmp / "dead.jsonl"),
                IOTPIPE_OUTBOX_FILE=str(tmp / "outbox.sqlite3"),
            )
            procs = {s: subprocess.Popen([sys.executable, "-m", s], env=env, cwd=ROOT) for s in SERVICES}
            producer = bus_for(stack, "sensor-reader", keyring=keyring, max_inflight=1000)
            try:
                await producer.start()
                await producer.wait_connected()
                redis = aioredis.Redis(
                    port=stack.ports.redis,
                    username="reader",
                    password=redis_password_file(secrets_dir, "reader").read_text().strip(),
                )
                await wait_online(stack, base)
                topics = Topics(base)
                rng = np.random.default_rng(0)
                window_ms = 1000
                t_start = 1_700_000_000_000
                payloads = []
                started = time.perf_counter()
                for w in range(args.windows):
                    start = t_start + w * window_ms
                    stamps = [start + i * window_ms // args.readings for i in range(args.readings)]
                    for d in range(args.devices):
                        device = f"dev-{d}"
                        sensors = {
                            f"s{s}": {
                                "unit": "u",
                                "t": stamps,
                                "v": np.round(rng.normal(20, 1, args.readings), 3).tolist(),
                            }
                            for s in range(args.sensors)
                        }
                        data = {"device": device, "window": {"start": start, "size": window_ms}, "sensors": sensors}
                        payloads.append((topics.raw(device), producer.sealer.seal(topics.raw(device), data)))  # type: ignore[union-attr]
                seal_time = time.perf_counter() - started
                before = {s: proc_stats(p.pid)[0] for s, p in procs.items()}
                t0 = time.perf_counter()
                await asyncio.gather(*(producer.publish(topic, payload) for topic, payload in payloads))
                t_published = time.perf_counter() - t0
                keys = [f"{base}:series:dev-{d}:s{s}" for d in range(args.devices) for s in range(args.sensors)]
                t_redis = t_sink = None
                async with aiohttp.ClientSession() as http:
                    while t_redis is None or t_sink is None:
                        if time.perf_counter() - t0 > args.timeout:
                            raise SystemExit(f"timed out after {args.timeout}s")
                        if t_redis is None:
                            pipe = redis.pipeline(transaction=False)
                            for key in keys:
                                pipe.zcard(key)
                            if sum(await pipe.execute()) >= windows_total:
                                t_redis = time.perf_counter() - t0
                        if t_sink is None:
                            async with http.get(f"http://127.0.0.1:{sink_port}/stats") as r:
                                if (await r.json())["unique_records"] >= windows_total:
                                    t_sink = time.perf_counter() - t0
                        await asyncio.sleep(POLL)
                after = {s: proc_stats(p.pid) for s, p in procs.items()}
                await redis.aclose()
            finally:
                await producer.stop()
                for p in procs.values():
                    p.send_signal(signal.SIGTERM)
                for p in procs.values():
                    p.wait(30)
    print(
        f"\n{readings_total:,} readings = {windows_total:,} windows ({args.devices} devices x {args.sensors} sensors"
        f" x {args.windows} windows x {args.readings} readings), {len(payloads):,} raw messages"
    )
    print(f"  sealing (reader side, one core):  {readings_total / seal_time:>12,.0f} readings/s")
    print(f"  published and acked by broker:    {readings_total / t_published:>12,.0f} readings/s")
    print(f"  end to end into Redis:            {readings_total / t_redis:>12,.0f} readings/s ({t_redis:.2f} s)")
    print(f"  end to end at the cloud-sink:     {readings_total / t_sink:>12,.0f} readings/s ({t_sink:.2f} s)")
    print("  per service: CPU s during the run, readings per CPU-second, peak RSS")
    for s, (cpu, rss) in after.items():
        used = cpu - before[s]
        rate = f"{readings_total / used:>12,.0f}" if used > 0 else "           -"
        print(f"    {s:<16} {used:6.2f} s  {rate} /CPU-s  {rss:5d} MiB")


async def wait_online(stack, base: str) -> None:  # type: ignore[no-untyped-def]
    online: set[str] = set()
    ready = asyncio.Event()
    import orjson

    async def on_status(messages) -> None:  # type: ignore[no-untyped-def]
        for m in messages:
            if m.payload and orjson.loads(m.payload).get("state") == "online":
                online.add(m.topic.split("/")[-2])
        if {"preprocessor", "cache-writer", "cloud-forwarder", "monitor"} <= online:
            ready.set()

    watcher = bus_for(stack, "reader")
    watcher.subscribe(f"{base}/v2/status/service/+/+", on_status, sealed=False)
    await watcher.start()
    await asyncio.wait_for(ready.wait(), 60)
    await watcher.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--sensors", type=int, default=4)
    parser.add_argument("--readings", type=int, default=250, help="readings per sensor per window")
    parser.add_argument("--windows", type=int, default=50, help="windows per device")
    parser.add_argument("--timeout", type=float, default=600)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
