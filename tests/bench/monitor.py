"""The monitor's anomaly scoring on this machine (monitor.anomaly): CPU per window, CPU per refit
cycle and peak RSS, for the new detector (per-sensor normalisation, one IsolationForest per sensor
kind) and the one it replaced (one IsolationForest per (device, sensor), copied below as
`OldDetector`), driven the same way. Figures only, no assertions.

Workloads (one window per sensor per second, n=10 readings each, ~1e-4 of windows a 20-sigma spike):
  50       10 devices x 5 sensors,      batches of 50 windows (one per second)
  1000     100 devices x 10 sensors,    batches of 1,000 windows
  20000    5,000 devices x 4 sensors,   batches of 2,000 windows (ten per second)

Each (detector, workload) runs in its own child process, so its peak RSS (ru_maxrss, which includes
the ~160 MB that importing the monitor costs: python, numpy, iotpipe, sklearn and the scipy it pulls
in) is its own. Measured with time.process_time (every thread of the process: the machine is shared).
- scoring: µs of CPU per window for what Monitor.on_processed does besides I/O (distinct devices and
  last-seen, scoring and learning, the cooldown and building AnomalyAlerts), models fitted, windows
  built beforehand (not counted).
- refit: CPU s of one refit cycle (snapshot on the loop + fit, which the service runs in a thread).
  New: every kind, reservoirs full. Old: every sensor's model on a full 2,000-window history.
New: each workload is warmed up (min_fit_samples windows per sensor) and run until every kind's
reservoir is full, refitted once, then scored for --seconds simulated seconds.
Old: at 20,000 sensors a refit would take ~20 CPU-minutes and the histories ~tens of GB, so beyond
--old-models sensors the figures are extrapolated (marked ~): refit = CPU per model x sensors; RSS =
RSS measured with --old-models full histories and models + (sensors - measured) x the measured cost
of one; scoring is measured (the fitted models are shared by every sensor: one call per sensor and
batch costs the same whichever model it is) but on at most --old-batches batches.

    uv run --frozen python tests/bench/monitor.py [--seconds 10] [--sizes 50,1000,20000]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "shared"), str(ROOT / "services" / "monitor")]

from iotpipe import AnomalyAlert, Window  # noqa: E402
from monitor.anomaly import AnomalyDetector  # noqa: E402
from monitor.service import Settings  # noqa: E402
from sklearn.ensemble import IsolationForest  # noqa: E402

WORKLOADS = {50: (10, 5, 50), 1000: (100, 10, 1000), 20000: (5000, 4, 2000)}  # devices, sensors, batch
SENSOR_KINDS = ["temperature", "humidity", "pressure", "co2", "light", "vibration", "current", "voltage", "flow", "ph"]
READINGS = 10
SPIKE_PROBABILITY = 1e-4
COOLDOWN_MS = 60_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Fleet:
    """Synthetic sensors: each its own level and noise (so only normalisation makes them alike)."""

    def __init__(self, devices: int, sensors: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.keys = [(f"dev-{d:05d}", SENSOR_KINDS[s]) for d in range(devices) for s in range(sensors)]
        self.level = self.rng.uniform(-50, 1000, len(self.keys))
        self.noise = self.rng.uniform(0.01, 5, len(self.keys))
        self.second = 0

    def readings(self) -> np.ndarray:
        x = self.rng.normal(size=(len(self.keys), READINGS)) * self.noise[:, None] + self.level[:, None]
        spikes = self.rng.random(len(self.keys)) < SPIKE_PROBABILITY
        x[spikes] += 20 * self.noise[spikes, None]
        return x

    def windows(self) -> list[Window]:
        """One window per sensor for the next second."""
        x = self.readings()
        mean, median, low, high, std = x.mean(1), np.median(x, 1), x.min(1), x.max(1), x.std(1)
        start = 1_800_000_000_000 + self.second * 1000
        self.second += 1
        return [
            Window(
                device=device,
                sensor=sensor,
                unit="u",
                start=start,
                end=start + 1000,
                n=READINGS,
                mean=float(mean[i]),
                median=float(median[i]),
                min=float(low[i]),
                max=float(high[i]),
                std=float(std[i]),
            )
            for i, (device, sensor) in enumerate(self.keys)
        ]

    def batches(self, size: int) -> list[list[Window]]:
        windows = self.windows()
        return [windows[i : i + size] for i in range(0, len(windows), size)]


def alert(window: Window, score: float, now: int) -> AnomalyAlert:
    return AnomalyAlert(
        device=window.device,
        sensor=window.sensor,
        start=window.start,
        end=window.end,
        mean=window.mean,
        score=round(score, 4),
        ts=now,
    )


class NewService:
    """Monitor.on_processed without its I/O, on the new detector (as in monitor/service.py)."""

    def __init__(self, detector: AnomalyDetector) -> None:
        self.detector = detector
        self.last_seen: dict[str, int] = {}
        self.last_anomaly: dict[tuple[str, str], int] = {}

    def step(self, windows: Sequence[Window], now: int) -> list[AnomalyAlert]:
        devices = dict.fromkeys(window.device for window in windows)
        for device in devices:
            self.last_seen[device] = now
        decisions = self.detector.observe(windows)
        alerts = []
        for index in np.flatnonzero(decisions < 0):
            window = windows[index]
            key = (window.device, window.sensor)
            if now - self.last_anomaly.get(key, -(10**18)) < COOLDOWN_MS:
                continue
            self.last_anomaly[key] = now
            alerts.append(alert(window, float(decisions[index]), now))
        return alerts


# -- the detector this replaced (services/monitor/monitor/anomaly.py before issue 9), verbatim ----
OldKey = tuple[str, str]


def old_features(window: Window) -> list[float]:
    return [window.mean, window.std, window.max - window.min]


class OldDetector:
    def __init__(
        self, history: int = 2000, min_samples: int = 30, contamination: float = 0.01, n_estimators: int = 50
    ) -> None:
        self.history = history
        self.min_samples = min_samples
        self.contamination = contamination
        self.n_estimators = n_estimators
        self.seed = 0
        self._buffers: dict[OldKey, collections.deque[list[float]]] = {}
        self._models: dict[OldKey, IsolationForest] = {}

    def observe(self, key: OldKey, row: list[float]) -> None:
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = collections.deque(maxlen=self.history)
        buf.append(row)

    def score(self, key: OldKey, rows: list[list[float]]) -> np.ndarray | None:
        model = self._models.get(key)
        if model is None:
            return None
        scores: np.ndarray = model.decision_function(np.asarray(rows, dtype=np.float64))
        return scores

    def snapshot(self) -> dict[OldKey, np.ndarray]:
        return {k: np.asarray(b, dtype=np.float64) for k, b in self._buffers.items() if len(b) >= self.min_samples}

    def fit(self, data: Mapping[OldKey, np.ndarray]) -> dict[OldKey, IsolationForest]:
        models = {}
        for key, rows in data.items():
            model = IsolationForest(
                n_estimators=self.n_estimators, contamination=self.contamination, random_state=self.seed
            )
            model.fit(rows)
            models[key] = model
        return models

    def install(self, models: Mapping[OldKey, IsolationForest]) -> None:
        self._models.update(models)


class OldService:
    """The old Monitor.on_processed without its I/O (grouped per sensor, one model call per sensor)."""

    def __init__(self, detector: OldDetector) -> None:
        self.detector = detector
        self.last_seen: dict[str, int] = {}
        self.last_anomaly: dict[tuple[str, str], int] = {}

    def step(self, windows: Sequence[Window], now: int) -> list[AnomalyAlert]:
        pending: dict[OldKey, list[tuple[list[float], Window]]] = {}
        devices: set[str] = set()
        for window in windows:
            self.last_seen[window.device] = now
            devices.add(window.device)
            pending.setdefault((window.device, window.sensor), []).append((old_features(window), window))
        alerts = []
        for key, items in pending.items():
            scores = self.detector.score(key, [row for row, _ in items])
            for index, (row, window) in enumerate(items):
                self.detector.observe(key, row)
                if scores is None or scores[index] >= 0:
                    continue
                if now - self.last_anomaly.get(key, -(10**18)) < COOLDOWN_MS:
                    continue
                self.last_anomaly[key] = now
                alerts.append(alert(window, float(scores[index]), now))
        return alerts


# -- the runs (each in a child process) -------------------------------------------------------------
def timed_scoring(
    step: Any, fleet: Fleet, batch: int, seconds: int, max_batches: int | None = None
) -> tuple[float, int, int]:
    """CPU µs per window over `seconds` simulated seconds (or `max_batches` batches), alerts raised."""
    cpu, windows, alerts, batches = 0.0, 0, 0, 0
    for _ in range(seconds):
        for windows_batch in fleet.batches(batch):
            now = 1_800_000_000_000 + fleet.second * 1000
            started = time.process_time()
            alerts += len(step(windows_batch, now))
            cpu += time.process_time() - started
            windows += len(windows_batch)
            batches += 1
            if max_batches is not None and batches >= max_batches:
                return cpu / windows * 1e6, windows, alerts
    return cpu / windows * 1e6, windows, alerts


def run_new(size: int, seconds: int) -> dict[str, Any]:
    devices, sensors, batch = WORKLOADS[size]
    baseline = rss_mb()
    settings = Settings.model_construct()  # the service's defaults (model_construct: no env, no files)
    detector = AnomalyDetector(
        min_samples=settings.min_fit_samples,
        contamination=settings.contamination,
        reservoir=settings.fit_history,
    )
    service = NewService(detector)
    fleet = Fleet(devices, sensors)
    per_kind = devices  # every device has every kind
    warm_up = settings.min_fit_samples + math.ceil(settings.fit_history / per_kind) + 1
    for _ in range(warm_up):
        for windows in fleet.batches(batch):
            service.step(windows, 0)
    started = time.process_time()
    data = detector.snapshot()
    detector.install(detector.fit(data))
    refit = time.process_time() - started
    rows = max(len(d.rows) for d in data.values())
    us, scored, alerts = timed_scoring(service.step, fleet, batch, seconds)
    return {
        "refit_s": refit,
        "kinds": len(data),
        "reservoir_rows": rows,
        "us_per_window": us,
        "windows": scored,
        "alerts": alerts,
        "rss_baseline_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_old(size: int, seconds: int, old_models: int, old_batches: int) -> dict[str, Any]:
    devices, sensors, batch = WORKLOADS[size]
    baseline = rss_mb()
    detector = OldDetector()
    service = OldService(detector)
    fleet = Fleet(devices, sensors)
    measured = min(size, old_models)
    keys = fleet.keys[:measured]
    # Full histories (2,000 windows) for the measured sensors, through observe as the service does.
    for _ in range(detector.history):
        x = fleet.readings()[:measured]
        mean, std, spread = x.mean(1), x.std(1), x.max(1) - x.min(1)
        for i, key in enumerate(keys):
            detector.observe(key, [float(mean[i]), float(std[i]), float(spread[i])])
    started = time.process_time()
    models = detector.fit(detector.snapshot())
    per_model = (time.process_time() - started) / measured
    detector.install(models)
    measured_rss = rss_mb()
    per_sensor_mb = (measured_rss - baseline) / measured
    fitted = list(models.values())
    for i, key in enumerate(fleet.keys):  # every sensor scored by one of the fitted models
        detector._models[key] = fitted[i % measured]
    us, scored, alerts = timed_scoring(
        service.step, fleet, batch, seconds, max_batches=old_batches if size > measured else None
    )
    return {
        "refit_s": per_model * size,
        "refit_extrapolated": size > measured,
        "us_per_window": us,
        "windows": scored,
        "alerts": alerts,
        "rss_baseline_mb": baseline,
        "peak_rss_mb": max(peak_rss_mb(), measured_rss + (size - measured) * per_sensor_mb),
        "rss_extrapolated": size > measured,
    }


def child(args: argparse.Namespace) -> None:
    kind, size = args.child
    if kind == "new":
        result = run_new(int(size), args.seconds)
    else:
        result = run_old(int(size), args.seconds, args.old_models, args.old_batches)
    print(json.dumps(result))


def fmt(value: float, extrapolated: bool, unit: str) -> str:
    return f"{'~' if extrapolated else ''}{value:,.{2 if value < 10 else 0}f} {unit}"


def table(results: Iterable[tuple[str, int, dict[str, Any]]]) -> None:
    print(f"{'detector':8} {'sensors':>8} {'batch':>6} {'µs CPU/window':>14} {'refit CPU':>12} {'peak RSS':>12}  notes")
    for kind, size, r in results:
        alerts = "alerts n/a: models shared" if r.get("refit_extrapolated") else f"{r['alerts']} alerts"
        notes = f"{r['windows']:,} windows scored, {alerts}; RSS after imports {r['rss_baseline_mb']:.0f} MB"
        if kind == "new":
            notes += f"; {r['kinds']} kinds x {r['reservoir_rows']:,} rows"
        print(
            f"{kind:8} {size:>8,} {WORKLOADS[size][2]:>6,} {r['us_per_window']:>14,.1f} "
            f"{fmt(r['refit_s'], r.get('refit_extrapolated', False), 's'):>12} "
            f"{fmt(r['peak_rss_mb'], r.get('rss_extrapolated', False), 'MB'):>12}  {notes}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="simulated seconds scored (new)")
    parser.add_argument("--sizes", default="50,1000,20000", help=f"sensor counts among {list(WORKLOADS)}")
    parser.add_argument("--old-models", type=int, default=50, help="old: sensors given a real history and model")
    parser.add_argument("--old-batches", type=int, default=2, help="old: batches scored beyond --old-models")
    parser.add_argument("--skip-old", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("DETECTOR", "SENSORS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in ("old", "new"):
            if kind == "old" and args.skip_old:
                continue
            command = [sys.executable, __file__, "--child", kind, str(size), "--seconds", str(args.seconds)]
            command += ["--old-models", str(args.old_models), "--old-batches", str(args.old_batches)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append((kind, size, json.loads(out.strip().splitlines()[-1])))
            print(f"  done: {kind} {size}", file=sys.stderr, flush=True)
    table(results)


if __name__ == "__main__":
    main()
