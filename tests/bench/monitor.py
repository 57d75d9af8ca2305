"""`make bench-monitor`: the monitor's anomaly detection on labelled synthetic streams, side by side
with a robust z-score baseline, in the same run. Figures only, no assertions.

Streams: 10 Hz sensors, 1 s windows, kinds temperature / humidity / pressure / pm2_5 with the
simulated driver's base, amplitude and noise (sensor_reader/drivers/simulated.py): a slow wave of
that amplitude (period 20-90 min, random phase), a random walk (0.1 amplitude per 10 min), white
noise, single-reading spikes (1% of readings, 3-6x the amplitude, as the simulated driver makes
them) and missing readings (1%). Readings become windows exactly as the preprocessor makes them
(`aggregate_array`: width-5 median filter, then mean/median/min/max/std, rounded to 6 places) and the
detector sees them as the service does: every window of the second in one batch,
`Detector.observe(batch, now)`, and a refit (snapshot + fit + install) every `fit_interval` (60 s).

Half of the sensors carry faults, one after another after a 75 min warm-up (the drift check's: 70
min), each followed by 6-10 min of normal: level_shift (+-3-5 sigma of the readings, 1-4 min), stuck
(the value at onset, exactly, 1-4 min), noise (sigma x3-6, 0.5-2 min), drift (added to the wave: a ramp
to +-2-3x the normal peak-to-peak, i.e. out of the normal range, over 8 min),
dropout (every reading 0, 0.5-2 min), out_of_range (beyond the chip's range by 1-20% of it,
10-60 s) and missing_readings (60-90% of readings lost, 1-3 min: a flaky bus). The other half never
fault: their alerts after the warm-up are the false alarms.

Per fault kind: recall (an episode opened / an alert raised from its start to 60 s after its end),
median detection delay (end of the window that raised it - fault start), alerts per event (new: open
and close alerts; baseline: alerts). False alarms: per sensor-hour on fault-free sensors after the
warm-up. CPU: time.process_time (every thread) per window of `observe` plus refits, on fault-free
fleets of 50 and 20,000 sensors (batches of 2,000 windows at 20,000), after a warm-up of `history`
windows; the baseline the same way.

Baseline (issue 13): per sensor, median/MAD of the last 300 windows' mean and std, an alert when
|z| > 4 for either, at most one per sensor per 60 s.

    uv run --frozen python tests/bench/monitor.py [--short] [--seeds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT / "services" / "monitor"), str(ROOT / "services" / "preprocessor")]

from iotpipe import AnomalyClose, AnomalyOpen, Window  # noqa: E402
from monitor.detect import CHIP_RANGES, Config, Detector  # noqa: E402
from preprocessor.service import AGGREGATE_DECIMALS  # noqa: E402
from preprocessor.windows import aggregate_array, round_aggregates  # noqa: E402

# kind -> (unit, base, amplitude of the slow wave, noise sigma): the simulated driver's profiles
PROFILES = {
    "temperature": ("degC", 21.0, 3.0, 0.15),
    "humidity": ("%RH", 45.0, 8.0, 0.8),
    "pressure": ("hPa", 1013.0, 4.0, 0.3),
    "pm2_5": ("ug/m3", 12.0, 6.0, 1.0),
}
HZ = 10
SPIKE_PROBABILITY = 0.01
MISSING_PROBABILITY = 0.01
FAULTS = ("level_shift", "stuck", "noise", "drift", "dropout", "out_of_range", "missing_readings")
ABRUPT = {"level_shift", "stuck", "dropout", "out_of_range", "missing_readings", "noise"}
GRACE_S = 60
FIT_INTERVAL_S = 60
T0_MS = 1_800_000_000_000


@dataclass
class Event:
    sensor: int
    kind: str
    start: float  # s
    end: float
    sign: float
    size: float
    value: float = float("nan")  # stuck: the value at onset


@dataclass
class Fleet:
    """Synthetic sensors and their labelled faults, generated one second at a time."""

    sensors: int
    seed: int
    faulty: int = 0
    warm_up_s: float = 0.0
    duration_s: float = 0.0
    rng: np.random.Generator = field(init=False)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = self.rng = np.random.default_rng(self.seed)
        n = self.sensors
        kinds = list(PROFILES)
        self.kind = [kinds[i % len(kinds)] for i in range(n)]
        self.keys = [(f"dev-{i // 4:05d}", self.kind[i]) for i in range(n)]
        prof = np.array([PROFILES[k][1:] for k in self.kind])
        self.base, self.amp, self.sigma = prof.T
        self.period = rng.uniform(20, 90, n) * 60
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.walk = np.zeros(n)
        self.walk_step = 0.1 * self.amp / np.sqrt(600)
        self.low = np.array([CHIP_RANGES[k][0] for k in self.kind])
        self.high = np.array([CHIP_RANGES[k][1] for k in self.kind])
        self.units = [PROFILES[k][0] for k in self.kind]
        self.second = 0
        for sensor in range(self.faulty):
            t = self.warm_up_s + rng.uniform(0, 300)
            order = list(rng.permutation(FAULTS))
            while True:
                kind = order.pop() if order else str(rng.choice(FAULTS))
                duration = {
                    "level_shift": rng.uniform(60, 240),
                    "stuck": rng.uniform(60, 240),
                    "noise": rng.uniform(30, 120),
                    "drift": 480.0,
                    "dropout": rng.uniform(30, 120),
                    "out_of_range": rng.uniform(10, 60),
                    "missing_readings": rng.uniform(60, 180),
                }[kind]
                if t + duration + GRACE_S > self.duration_s:
                    break
                size = {
                    "level_shift": rng.uniform(3, 5),
                    "noise": rng.uniform(3, 6),
                    "drift": rng.uniform(2, 3),
                    "out_of_range": rng.uniform(0.01, 0.2),
                    "missing_readings": rng.uniform(0.6, 0.9),
                }.get(kind, 0.0)
                self.events.append(Event(sensor, kind, t, t + duration, float(rng.choice((-1.0, 1.0))), size))
                t += duration + rng.uniform(360, 600)
        self._active: dict[int, list[Event]] = {}
        for event in self.events:
            self._active.setdefault(event.sensor, []).append(event)

    def readings(self) -> tuple[np.ndarray, np.ndarray]:
        """(values (n, HZ), kept (n, HZ) bool) for the next second."""
        rng, n = self.rng, self.sensors
        t = self.second + np.arange(HZ) / HZ
        self.walk += rng.normal(0, 1, n) * self.walk_step
        clean = (
            self.base[:, None]
            + self.amp[:, None] * np.sin(2 * np.pi * t[None, :] / self.period[:, None] + self.phase[:, None])
            + self.walk[:, None]
        )
        noise = rng.normal(0, 1, (n, HZ)) * self.sigma[:, None]
        spikes = rng.random((n, HZ)) < SPIKE_PROBABILITY
        spike = rng.uniform(3, 6, (n, HZ)) * self.amp[:, None] * rng.choice((-1.0, 1.0), (n, HZ))
        values = clean + noise + np.where(spikes, spike, 0.0)
        kept = rng.random((n, HZ)) >= MISSING_PROBABILITY
        for sensor, events in self._active.items():
            for e in events:
                if not e.start <= self.second < e.end:
                    continue
                row = values[sensor]
                if e.kind == "level_shift":
                    row += e.sign * e.size * self.sigma[sensor]
                elif e.kind == "stuck":
                    if np.isnan(e.value):
                        e.value = float(row[0])
                    row[:] = e.value
                elif e.kind == "noise":
                    row += rng.normal(0, 1, HZ) * self.sigma[sensor] * np.sqrt(e.size**2 - 1)
                elif e.kind == "drift":  # to 2-3x the normal peak-to-peak (2 amplitudes) away
                    row += e.sign * e.size * 2 * self.amp[sensor] * (t - e.start) / (e.end - e.start)
                elif e.kind == "dropout":
                    row[:] = 0.0
                elif e.kind == "out_of_range":
                    span = self.high[sensor] - self.low[sensor]
                    row[:] = (self.high[sensor] if e.sign > 0 else self.low[sensor]) + e.sign * e.size * span
                elif e.kind == "missing_readings":
                    kept[sensor] &= rng.random(HZ) >= e.size
        kept[:, 0] |= ~kept.any(axis=1)  # a sensor with no reading sends no window; keep one
        return values, kept

    def windows(self) -> list[Window]:
        """One window per sensor for the next second, as the preprocessor makes them."""
        values, kept = self.readings()
        series = [values[i][kept[i]] for i in range(self.sensors)]
        counts, stats = aggregate_array(series, 5)
        rows = round_aggregates(stats, AGGREGATE_DECIMALS).tolist()
        start = T0_MS + self.second * 1000
        self.second += 1
        return [
            Window(d, s, u, start, start + 1000, n, *row)
            for (d, s), u, n, row in zip(self.keys, self.units, counts.tolist(), rows, strict=True)
        ]


class Baseline:
    """Robust z-score: median/MAD of the last 300 windows' mean and std, |z| > 4, 60 s cooldown."""

    def __init__(self, sensors: int, history: int = 300, cooldown_s: float = 60.0) -> None:
        self.ring = np.full((sensors, history, 2), np.nan)
        self.count = np.zeros(sensors, dtype=np.int64)
        self.last = np.full(sensors, -1e18)
        self.history, self.cooldown = history, cooldown_s

    def step(self, slots: np.ndarray, x: np.ndarray, t: float) -> np.ndarray:
        """Slots that alert for this batch of (mean, std)."""
        ring = self.ring[slots]
        ready = self.count[slots] >= self.history
        median = np.median(ring, axis=1)
        mad = np.median(np.abs(ring - median[:, None, :]), axis=1) * 1.4826
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.abs(x - median) / np.maximum(mad, 1e-12)
        hit = ready & (z > 4).any(axis=1) & (t - self.last[slots] >= self.cooldown)
        self.last[slots[hit]] = t
        self.ring[slots, self.count[slots] % self.history] = x
        self.count[slots] += 1
        return slots[hit]


def refit(detector: Detector) -> None:
    detector.install(detector.fit(detector.snapshot()))


def run_quality(seed: int, sensors: int, duration_s: float, warm_up_s: float, config: Config) -> dict[str, Any]:
    fleet = Fleet(sensors, seed, faulty=sensors // 2, warm_up_s=warm_up_s, duration_s=duration_s)
    detector = Detector(config)
    baseline = Baseline(sensors)
    slots = np.arange(sensors)
    opens: list[tuple[int, float, str]] = []  # sensor, window end (s), anomaly kind
    closes: list[tuple[int, float]] = []
    base_alerts: list[tuple[int, float]] = []
    index = {key: i for i, key in enumerate(fleet.keys)}
    for second in range(int(duration_s)):
        windows = fleet.windows()
        now = T0_MS + (second + 1) * 1000
        for alert in detector.observe(windows, now):
            sensor = index[(alert.device, alert.sensor)]
            if isinstance(alert, AnomalyOpen):
                opens.append((sensor, second + 1.0, alert.anomaly))
            elif isinstance(alert, AnomalyClose):
                closes.append((sensor, second + 1.0))
        x = np.array([(w.mean, w.std) for w in windows])
        for sensor in baseline.step(slots, x, float(second)):
            base_alerts.append((int(sensor), second + 1.0))
        if (second + 1) % FIT_INTERVAL_S == 0:
            refit(detector)

    fault_free = range(fleet.faulty, sensors)
    hours = len(fault_free) * (duration_s - warm_up_s) / 3600

    def score(alerts: list[tuple[int, float]], closes: list[tuple[int, float]] | None) -> dict[str, Any]:
        by_sensor: dict[int, list[float]] = {}
        for sensor, t, *_ in alerts:
            by_sensor.setdefault(sensor, []).append(t)
        close_by: dict[int, list[float]] = {}
        for sensor, t in closes or []:
            close_by.setdefault(sensor, []).append(t)
        out: dict[str, Any] = {}
        for kind in FAULTS:
            events = [e for e in fleet.events if e.kind == kind]
            delays, per_event = [], []
            for e in events:
                hits = [t for t in by_sensor.get(e.sensor, []) if e.start <= t <= e.end + GRACE_S]
                if hits:
                    delays.append(min(hits) - e.start)
                    n_close = sum(1 for t in close_by.get(e.sensor, []) if e.start <= t <= e.end + 30 * 60)
                    # a close after the event belongs to it if it is the first close after its open
                    per_event.append(len(hits) + (min(n_close, len(hits)) if closes is not None else 0))
            out[kind] = {
                "events": len(events),
                "recall": len(delays) / len(events) if events else float("nan"),
                "delay_s": statistics.median(delays) if delays else float("nan"),
                "alerts_per_event": statistics.mean(per_event) if per_event else float("nan"),
            }
        false_alarms = sum(1 for sensor, t, *_ in alerts if sensor in fault_free and t >= warm_up_s)
        out["false_alarms_per_sensor_hour"] = false_alarms / hours
        out["false_alarms"] = false_alarms
        out["sensor_hours"] = hours
        return out

    result = {"new": score(opens, closes), "baseline": score(base_alerts, None)}
    kinds_right = {}
    for kind in FAULTS:
        expected = "dropout" if kind == "missing_readings" else kind
        matched = right = 0
        for e in (e for e in fleet.events if e.kind == kind):
            hits = [(t, k) for s, t, k in opens if s == e.sensor and e.start <= t <= e.end + GRACE_S]
            if hits:
                matched += 1
                right += min(hits)[1] == expected
        kinds_right[kind] = right / matched if matched else float("nan")
    result["new"]["kind_right"] = kinds_right
    return result


def run_cpu(sensors: int, seconds: int, seed: int, config: Config) -> dict[str, float]:
    """CPU per window of observe + refits, and of the baseline, on a fault-free fleet, after warm-up."""
    fleet = Fleet(sensors, seed)
    detector = Detector(config)
    baseline = Baseline(sensors)
    batch = 2000 if sensors > 2000 else sensors
    warm = detector.config.history + 10
    det_cpu = base_cpu = 0.0
    measured = 0
    slots = np.arange(sensors)
    for second in range(warm + seconds):
        windows = fleet.windows()
        x = np.array([(w.mean, w.std) for w in windows])
        now = T0_MS + (second + 1) * 1000
        t0 = time.process_time()
        for i in range(0, sensors, batch):
            detector.observe(windows[i : i + batch], now)
        if (second + 1) % FIT_INTERVAL_S == 0:
            refit(detector)
        t1 = time.process_time()
        for i in range(0, sensors, batch):
            baseline.step(slots[i : i + batch], x[i : i + batch], float(second))
        t2 = time.process_time()
        if second >= warm:
            det_cpu += t1 - t0
            base_cpu += t2 - t1
            measured += sensors
    return {"new_ms": 1000 * det_cpu / measured, "baseline_ms": 1000 * base_cpu / measured, "windows": measured}


def _fmt(values: Sequence[float], pattern: str) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return pattern.format(values[0])
    return f"{pattern.format(statistics.median(values))} [{pattern.format(min(values))}-{pattern.format(max(values))}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--short", action="store_true", help="one seed, 12 sensors, 40 min (drift warm-up 15 min), CPU at 50 and 200"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sensors", type=int, default=50)
    parser.add_argument("--hours", type=float, default=3.25)
    parser.add_argument("--warm-up", type=float, default=75.0, help="min before the first fault")
    parser.add_argument("--cpu-sizes", default="50,20000")
    parser.add_argument("--cpu-seconds", type=int, default=120)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = Config()
    if args.short:  # CI-sized: structure, not figures; the drift envelope warms up in 15 min, not 70
        args.seeds, args.sensors, args.hours, args.warm_up, args.cpu_sizes, args.cpu_seconds = (
            1,
            12,
            40 / 60,
            16,
            "50,200",
            10,
        )
        config = Config(lag_blocks=10, min_blocks=20)
    started = time.monotonic()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    results = []
    for seed in range(args.seeds):
        results.append(run_quality(seed, args.sensors, args.hours * 3600, args.warm_up * 60, config))
    sizes = [int(s) for s in args.cpu_sizes.split(",")]
    cpu = {size: run_cpu(size, args.cpu_seconds, 0, config) for size in sizes}

    seeds = ", ".join(str(s) for s in range(args.seeds))
    print(
        f"monitor detection, {args.sensors} sensors ({args.sensors // 2} with faults), {args.hours:g} h, seeds {seeds}"
    )
    print("median [min-max] over seeds; new = monitor.detect episodes, baseline = robust z-score |z|>4, 60 s cooldown")
    header = f"{'fault kind':<18}{'events':>7}  {'recall new':<22}{'recall base':<22}"
    header += f"{'delay s new':<22}{'delay s base':<22}{'alerts/event new':<22}{'alerts/event base':<22}kind right"
    print(header)
    for kind in FAULTS:
        new = [r["new"][kind] for r in results]
        base = [r["baseline"][kind] for r in results]
        row = f"{kind:<18}{sum(r['events'] for r in new):>7}  "
        row += f"{_fmt([r['recall'] * 100 for r in new], '{:.0f}%'):<22}"
        row += f"{_fmt([r['recall'] * 100 for r in base], '{:.0f}%'):<22}"
        row += f"{_fmt([r['delay_s'] for r in new], '{:.0f}'):<22}{_fmt([r['delay_s'] for r in base], '{:.0f}'):<22}"
        row += f"{_fmt([r['alerts_per_event'] for r in new], '{:.2f}'):<22}"
        row += f"{_fmt([r['alerts_per_event'] for r in base], '{:.2f}'):<22}"
        row += _fmt([r["new"]["kind_right"][kind] * 100 for r in results], "{:.0f}%")
        print(row)
    fa_new = [r["new"]["false_alarms_per_sensor_hour"] for r in results]
    fa_base = [r["baseline"]["false_alarms_per_sensor_hour"] for r in results]
    hours = sum(r["new"]["sensor_hours"] for r in results)
    print(
        f"{'false alarms':<18}{'':>7}  {_fmt(fa_new, '{:.3f}') + ' /sensor-h':<32}"
        f"{_fmt(fa_base, '{:.2f}') + ' /sensor-h':<32}"
        f"(fault-free sensors after the warm-up, {hours:.0f} sensor-hours in all)"
    )
    for size, figures in cpu.items():
        print(
            f"{'cpu ' + str(size) + ' sensors':<18}{'':>7}  {figures['new_ms']:.4f} ms/window{'':<5}"
            f"{figures['baseline_ms']:.4f} ms/window   (refits included, {figures['windows']} windows)"
        )
    print(f"load average at start {' '.join(load)}; {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"quality": results, "cpu": cpu, "load": load}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
