"""ns per window of the window lag observation the bus makes once a batch is handled
(`WindowLag.observe` over a 500-window processed message, as `Bus._done` calls it), against
prometheus_client's own `Histogram.observe` once per window (what it would cost without it).

    uv run --frozen python tests/bench/lag.py

Two shapes: one window end for all 500 windows (a real processed message: every device's window
closes at the same moment) and 500 distinct ends (the worst case). Best of 7 repeats of 200 calls;
on a shared machine, run it twice.
"""

from __future__ import annotations

import time
import timeit
from types import SimpleNamespace

from iotpipe import Window
from iotpipe._health import LAG_BUCKETS, WindowLag
from prometheus_client import CollectorRegistry, Histogram

WINDOWS = 500
CALLS, REPEATS = 200, 7


def measure(spread: int) -> dict[str, float]:
    """ns per window of each way, for WINDOWS windows with `spread` distinct ends."""
    now = time.time_ns() // 1_000_000
    windows = [
        Window("dev", f"s{i}", "C", now - 2000, now - 1000 + i % spread, 10, 1.0, 1.0, 0.0, 2.0, 0.1)
        for i in range(WINDOWS)
    ]
    items = [(None, SimpleNamespace(data=SimpleNamespace(windows=windows)))]
    lag = WindowLag()
    histogram = Histogram("x", "x", ["stage"], buckets=LAG_BUCKETS, registry=CollectorRegistry()).labels("handled")

    def ours() -> None:
        now_ms = time.time_ns() // 1_000_000
        lag.observe("handled", now_ms, (w.span[1] for _msg, item in items for w in item.data.windows))

    def client() -> None:
        now_ms = time.time_ns() // 1_000_000
        for w in windows:
            histogram.observe((now_ms - w.end) / 1000)

    return {
        name: min(timeit.repeat(fn, number=CALLS, repeat=REPEATS)) / CALLS / WINDOWS * 1e9
        for name, fn in (("WindowLag.observe", ours), ("Histogram.observe", client))
    }


def main() -> None:
    for shape, spread in (("one end (a real batch)", 1), (f"{WINDOWS} distinct ends", WINDOWS)):
        for name, ns in measure(spread).items():
            print(f"{shape:24s} {name:18s} {ns:7.0f} ns per window")


if __name__ == "__main__":
    main()
