"""What the sensor-reader's write-ahead spool costs per window (sensor_reader.spool).

Two measurements, each for the two target loads (docs/operations.md, "The spool"):

  small  W-fleet: 5,000 windows/s, each 1 device x 4 sensors x 1 reading (1 Hz, 1 s windows)
  large  100 windows/s, each 1 device x 10 sensors x 250 readings (250 Hz, 1 s windows)

file    SpoolFile.write alone, flat out, one transaction per commit tick as the outbox issues them
        (a tick's windows in, the previous tick's acknowledged rows out): wall and thread CPU per
        window, and the slowest transaction (a WAL checkpoint with its fsync lands in some).
outbox  the whole Outbox, paced at the target rate for --seconds, with a publish that the "broker"
        acknowledges at once: process CPU (every thread) per window with the spool, and the same
        without it (IOTPIPE_SPOOL_MAX_BYTES=0); the difference is what the spool costs the reader.
        Sealing is done up front and not counted (it is paid with or without a spool; its cost
        is printed for scale).

    uv run --frozen python tests/bench/spool.py [--seconds 5] [--dir /path/on/the/target/disk]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT / "services" / "sensor_reader")]

from iotpipe import KeyRing, RawBatch, RawWindow, Sealer, Series, WindowSpan  # noqa: E402
from sensor_reader.spool import COMMIT_INTERVAL, Outbox, SpoolFile, Window  # noqa: E402

LOADS = {"small": (5000, 4, 1), "large": (100, 10, 250)}  # windows/s, sensors, readings per sensor


def sealed_windows(kind: str, count: int) -> tuple[list[Window], float]:
    """`count` realistic sealed windows (distinct payloads) and the µs sealing took per window."""
    _rate, sensors, readings = LOADS[kind]
    ring = KeyRing([("k1", KeyRing.generate_line("k1").split()[1].encode())])
    sealer = Sealer(ring, "sensor-reader/bench")
    out = []
    started = time.perf_counter()
    for i in range(count):
        device = f"dev-{i % 5000}"
        start = 1_795_533_424_000 + (i // 5000) * 1000
        step = 1000 // readings
        window = RawWindow(
            device=device,
            window=WindowSpan(start=start, size=1000),
            sensors={
                f"s{s}": Series(
                    unit="degC",
                    t=[start + k * step for k in range(readings)],
                    v=[round(20 + ((i + s + k) % 97) / 7, 3) for k in range(readings)],
                )
                for s in range(sensors)
            },
        )
        batch = RawBatch(windows=[window])
        topic = f"iotpipe/v2/raw/{device}"
        out.append(Window(device, start, sensors * readings, topic, sealer.seal(topic, batch), int(time.time() * 1000)))
    return out, (time.perf_counter() - started) / count * 1e6


def bench_file(kind: str, windows: list[Window], directory: Path, synchronous: str) -> dict[str, float]:
    rate = LOADS[kind][0]
    per_tick = max(1, round(rate * COMMIT_INTERVAL))
    spool = SpoolFile(directory / f"file-{kind}-{synchronous}.sqlite3")
    spool.open()
    assert spool._db is not None
    spool._db.execute(f"PRAGMA synchronous={synchronous}")
    times = []
    next_id, acked_upto = 1, 0
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    for first in range(0, len(windows), per_tick):
        batch = [
            Window(w.device, w.start, w.readings, w.topic, w.payload, w.sealed_at)
            for w in windows[first : first + per_tick]
        ]
        for w in batch:
            w.id = next_id
            next_id += 1
        t0 = time.perf_counter()
        spool.write(acked_upto, [], 0, 0, [w.row() for w in batch])
        times.append(time.perf_counter() - t0)
        acked_upto = batch[-1].id  # acknowledged before the next tick
    spool.write(acked_upto, [], 0, 0, [])
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    size = sum(p.stat().st_size for p in directory.glob(f"file-{kind}-{synchronous}.sqlite3*"))
    spool.close()
    n = len(windows)
    return {
        "wall_us": wall / n * 1e6,
        "cpu_us": cpu / n * 1e6,
        "tx_median_ms": statistics.median(times) * 1e3,
        "tx_max_ms": max(times) * 1e3,
        "per_tick": per_tick,
        "file_mb": size / 2**20,
    }


async def bench_outbox(
    kind: str, windows: list[Window], directory: Path | None, seconds: float, ack_after: float
) -> dict[str, float]:
    rate = LOADS[kind][0]
    connected = asyncio.Event()
    connected.set()
    published = 0

    async def publish(_topic: str, _payload: bytes) -> None:
        await asyncio.sleep(ack_after)  # the PUBACK

    def on_published(_w: Window) -> None:
        nonlocal published
        published += 1

    spool = SpoolFile(directory / f"outbox-{kind}-{ack_after}.sqlite3") if directory else None
    outbox = Outbox(
        spool,
        max_bytes=256 << 20 if spool else 0,
        publish=publish,
        connected=connected,
        max_in_memory=100_000,  # the slow broker: in flight are not spilled, so all go through the file
        max_in_flight=100_000,
        ttl_ms=7 * 24 * 3600 * 1000,
        on_published=on_published,
        on_dropped=lambda w, r: None,
    )
    await outbox.start()
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    tick = 0.005  # windows close spread over time: put them in 5 ms slices
    per_slice = rate * tick
    wall0, cpu0 = time.perf_counter(), time.process_time()
    began = loop.time()
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - began) / tick * per_slice) + 1)
        while sent < due:
            w = windows[sent % len(windows)]
            outbox.put(Window(w.device, w.start, w.readings, w.topic, w.payload, w.sealed_at))
            sent += 1
        await asyncio.sleep(tick)
    while published < total:
        await asyncio.sleep(0.01)  # wait-ok: the benchmark waits for its own publisher
    written = outbox.written
    await outbox.close(2.0)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"cpu_us": cpu / total * 1e6, "core_share": cpu / wall, "wall_s": wall, "written": written / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="paced outbox run length per load")
    parser.add_argument("--dir", type=Path, default=None, help="where the spool files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, spool in {directory}, tick {COMMIT_INTERVAL}s")
        for kind in LOADS:
            rate = LOADS[kind][0]
            windows, seal_us = sealed_windows(kind, min(20_000, int(rate * 4)))
            size = statistics.mean(len(w.payload) for w in windows)
            print(f"\n{kind}: {rate}/s, sealed window {size:.0f} B, sealing {seal_us:.1f} us/window (paid anyway)")
            for sync in ("NORMAL", "FULL"):
                r = bench_file(kind, windows, directory, sync)
                print(
                    f"  file   synchronous={sync:6} {r['wall_us']:7.1f} us/window wall, {r['cpu_us']:7.1f} us CPU;"
                    f" {r['per_tick']} per tx, tx median {r['tx_median_ms']:.2f} ms, max {r['tx_max_ms']:.1f} ms,"
                    f" files {r['file_mb']:.1f} MiB"
                )
            without = asyncio.run(bench_outbox(kind, windows, None, args.seconds, 0.0))
            print(
                f"  outbox, no spool:                     {without['cpu_us']:7.1f} us CPU/window"
                f" ({without['core_share']:.1%} of a core)"
            )
            for ack_after, what in ((0.0, "broker acks at once "), (0.05, "broker acks in 50 ms")):
                r = asyncio.run(bench_outbox(kind, windows, directory, args.seconds, ack_after))
                print(
                    f"  outbox, spool, {what}: {r['cpu_us']:7.1f} us CPU/window ({r['core_share']:.1%} of a core),"
                    f" {r['written']:.0%} written: +{r['cpu_us'] - without['cpu_us']:.1f} us/window"
                )


if __name__ == "__main__":
    main()
