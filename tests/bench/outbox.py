"""The cloud-forwarder's outbox on this machine: µs per record to enqueue (one transaction per bus
batch, on the outbox thread, as the forwarder does) and to take out (head + delete after a 2xx), for
both synchronous levels; and what the same work would cost the event loop if it ran there inline.

    uv run --frozen python tests/bench/outbox.py [--records 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from cloud_forwarder.outbox import Outbox, Row, Synchronous
from cloud_forwarder.service import outbox_rows, window_records
from iotpipe import Opened, Processed, decode

WINDOW = (
    b'{"device":"greenhouse-1","sensor":"temperature","unit":"degC","start":%d,"end":%d,"n":10,'
    b'"mean":21.3,"median":21.3,"min":21.1,"max":21.5,"std":0.12}'
)


def rows_for(n: int, offset: int) -> list[Row]:
    """Records as the handler makes them: one processed message per record, greenhouse-sized."""
    out = []
    for i in range(offset, offset + n):
        start = i * 1000
        data = decode(b'{"windows":[' + WINDOW % (start, start + 1000) + b"]}", Processed)
        message = Opened("iotpipe/v2/processed/greenhouse-1", "preprocessor/1", "boot", i, 0, data)
        out += outbox_rows(message, window_records(message))
    return out


async def run(records: int, batch: int, synchronous: Synchronous, directory: Path) -> None:
    outbox = Outbox(directory / f"o-{synchronous}-{batch}.sqlite3", 1 << 40, synchronous)
    batches = [rows_for(batch, i) for i in range(0, records, batch)]
    t0 = time.perf_counter()
    for rows in batches:
        await outbox.add(rows)
    enqueue = time.perf_counter() - t0
    t0 = time.perf_counter()
    while outbox.records:
        await outbox.delete(await outbox.head(200))
    dequeue = time.perf_counter() - t0
    size = outbox.usage.bytes
    await outbox.close()
    n = len(batches) * batch
    print(
        f"{synchronous:6} bus batch {batch:4}: enqueue {enqueue / n * 1e6:6.1f} µs/record "
        f"({enqueue / len(batches) * 1e3:6.2f} ms/transaction), upload-side head+delete "
        f"{dequeue / n * 1e6:5.1f} µs/record; {size >> 10} KiB in use after draining"
    )


def inline_cost(records: int, batch: int, directory: Path) -> None:
    """The same transactions called directly (what the loop would block for without the thread)."""
    outbox = Outbox(directory / f"inline-{batch}.sqlite3", 1 << 40, "FULL")
    batches = [rows_for(batch, i) for i in range(0, records, batch)]
    worst = 0.0
    t0 = time.perf_counter()
    for rows in batches:
        t = time.perf_counter()
        outbox._add(rows)
        worst = max(worst, time.perf_counter() - t)
    total = time.perf_counter() - t0
    asyncio.run(outbox.close())
    print(
        f"inline FULL bus batch {batch:4}: {total / len(batches) * 1e3:6.2f} ms/transaction on the loop, "
        f"worst {worst * 1e3:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        for synchronous in ("FULL", "NORMAL"):
            for batch in (1, 10, 64, 200):
                asyncio.run(
                    run(min(args.records, 2_000 if batch == 1 else args.records), batch, synchronous, directory)
                )
        for batch in (1, 64, 200):
            inline_cost(min(args.records, 2_000), batch, directory)


if __name__ == "__main__":
    main()
