"""What load this machine sustains through the whole pipeline with the real sensor-reader:

    uv run --frozen python tests/faults/load.py --devices 34 --sensors 6 --hz 100 --seconds 60

Starts the pipeline of the fault battery (tests/faults/harness.py), lets it run, and prints the
readings/s the reader got to the broker and that arrived in Redis and at the cloud-sink (windows
that started within the measured interval), the lag of the newest window in Redis, and CPU per
process (% of one core). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iotpipe import KeyRing
from iotpipe.devstack import ensure_secrets

from faults.harness import Load, Pipeline, now_ms


async def measure(load: Load, seconds: float, warmup: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="iotpipe-load-"))
    try:
        secrets_dir = ensure_secrets(tmp / "secrets")
        keyring = KeyRing.from_file(secrets_dir / "keyring")
        async with Pipeline(tmp / "run", secrets_dir, keyring, load) as p:
            await p.hold(warmup)  # wait-ok: warm-up, not a test
            cpu0, t0, t0_ms = p.cpu(), time.monotonic(), now_ms()
            lags = []

            async def lag() -> None:
                client = p.redis_client()
                try:
                    starts = [
                        int(s)
                        for key in p.series_keys()[:: max(1, len(p.series_keys()) // 20)]
                        for _m, s in await client.zrange(key[2], -1, -1, withscores=True)
                    ]
                finally:
                    await client.aclose()
                if starts:
                    lags.append((now_ms() - min(starts) - load.window_ms) / 1000)

            await p.hold(seconds, every=5, sample=lag)  # wait-ok: the measured interval
            cpu1, t1, t1_ms = p.cpu(), time.monotonic(), now_ms()
            wire_rate = p.rate(seconds)
            lo = t0_ms - t0_ms % load.window_ms + load.window_ms
            hi = t1_ms - t1_ms % load.window_ms - load.window_ms
            rows, summary = await p.finish(drain_timeout=300)
            redis_n = sum(w[0]["n"] for k, w in (await p.redis_windows()).items() if lo <= k[2] < hi)
            cloud_n = sum(
                r["n"] for r in await p.cloud_records() if r.get("type") == "window" and lo <= r["start"] < hi
            )
            span = (hi - lo) / 1000
            elapsed = t1 - t0
    except BaseException:
        print(f"kept for a look: {tmp} (services' output in {tmp}/run/log)")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nconfigured: {load.devices} devices x {load.sensors} sensors at {load.hz:g} Hz = {load.rate:,.0f} readings/s"
    )
    print(f"  reaching the broker (test's raw subscriber):   {wire_rate:>10,.0f} readings/s")
    print(f"  in Redis, windows started in {span:.0f} s:           {redis_n / span:>10,.0f} readings/s")
    print(f"  at the cloud-sink, same windows:                 {cloud_n / span:>10,.0f} readings/s")
    print(f"  lag of the oldest newest window in Redis, every 5 s: {', '.join(f'{x:.1f}' for x in lags)} s")
    print(f"  CPU over {elapsed:.0f} s, % of one core (2 cores = 200 %):")
    for name in sorted(cpu1):
        print(f"    {name:<28} {100 * (cpu1[name] - cpu0.get(name, 0)) / elapsed:6.1f} %")
    total = sum(cpu1[n] - cpu0.get(n, 0) for n in cpu1)
    print(f"    {'total':<28} {100 * total / elapsed:6.1f} %")
    print(summary)
    lost = [r for r in rows if not r.clean]
    print("accounting:", "clean" if not lost else f"NOT CLEAN {lost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=Load.devices)
    parser.add_argument("--sensors", type=int, default=Load.sensors)
    parser.add_argument("--hz", type=float, default=Load.hz)
    parser.add_argument("--window-ms", type=int, default=Load.window_ms)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    a = parser.parse_args()
    asyncio.run(measure(Load(a.devices, a.sensors, a.hz, a.window_ms), a.seconds, a.warmup))


if __name__ == "__main__":
    main()
