"""monitor.detect on hand-built series whose right answer is known from how they were built: the
fault's onset and end are chosen here, and each test checks the episode the detector opens and
closes against them (not against the detector's own earlier output)."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from iotpipe import Alert as AlertUnion
from iotpipe import AnomalyClose, AnomalyOpen, Window, decode, encode
from monitor.detect import CHIP_RANGES, Config, Detector

HZ = 10
T0 = 1_800_000_000_000
LEVEL, SIGMA = 21.0, 0.15  # a temperature sensor: 21 degC, 0.15 degC of noise per reading
# A fast drift warm-up (5-window blocks, 10 older than a 20-block lag: 150 windows) for the tests.
CONFIG = Config(block=5, blocks=100, lag_blocks=20, min_blocks=10)
ONSET = 400  # window index at which every fault starts (after the warm-ups: 120 windows; drift: 150)


def readings(count: int, seed: int = 0, wave: float = 0.5) -> np.ndarray:
    """(count, HZ) readings of a healthy sensor: level, a slow wave (period 30 min), white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(count)[:, None] + np.arange(HZ)[None, :] / HZ
    return LEVEL + wave * np.sin(2 * np.pi * t / 1800) + rng.normal(0, SIGMA, (count, HZ))


def window(i: int, values: np.ndarray, sensor: str = "temperature", device: str = "d1") -> Window:
    """The aggregates of one window's readings, computed here with numpy."""
    start = T0 + i * 1000
    return Window(
        device,
        sensor,
        "degC",
        start,
        start + 1000,
        len(values),
        float(values.mean()),
        float(np.median(values)),
        float(values.min()),
        float(values.max()),
        float(values.std()),
    )


def run(
    detector: Detector,
    series: Sequence[np.ndarray],
    first: int = 0,
    refit_every: int = 300,
    sensor: str = "temperature",
) -> list[tuple[int, AlertUnion]]:
    """Feed one window per batch, as the service does at one window per sensor per second; refit
    the forests every `refit_every` windows. Returns (window index, alert)."""
    out = []
    for i, values in enumerate(series, start=first):
        for alert in detector.observe([window(i, values, sensor)], T0 + (i + 1) * 1000):
            out.append((i, alert))
        if (i + 1) % refit_every == 0:
            detector.install(detector.fit(detector.snapshot()))
    return out


def inject(values: np.ndarray, start: int, end: int, fault: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = values.copy()
    out[start:end] = fault(out[start:end])
    return out


def test_a_healthy_sensor_raises_nothing() -> None:
    detector = Detector(CONFIG)
    assert run(detector, readings(2400)) == []
    assert detector.open_episodes == 0 and detector.fitted == ["temperature"]


END = ONSET + 60
FAULTS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], int]] = {
    # fault: (anomaly kind expected, what it does to the readings, windows it may take to open)
    "level_shift": ("level_shift", lambda v: v + 4 * SIGMA, 3),
    "level_shift_down": ("level_shift", lambda v: v - 4 * SIGMA, 3),
    "stuck": ("stuck", lambda v: np.full_like(v, v[0, 0]), 5),
    # noise: sigma x5 (independent noise of sqrt(24) sigma added to the readings)
    "noise": ("noise", lambda v: v + np.random.default_rng(9).normal(0, SIGMA * np.sqrt(24), v.shape), 8),
    "dropout_to_zero": ("dropout", np.zeros_like, 2),
    "out_of_range": ("out_of_range", lambda v: np.full_like(v, 130.0), 2),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_opens_one_episode_at_its_onset_and_closes_after_it(fault: str) -> None:
    expected, effect, within = FAULTS[fault]
    series = inject(readings(END + 200), ONSET, END, effect)
    alerts = run(Detector(CONFIG), list(series))
    opens = [(i, a) for i, a in alerts if isinstance(a, AnomalyOpen)]
    closes = [(i, a) for i, a in alerts if isinstance(a, AnomalyClose)]
    assert len(opens) == 1 and len(closes) == 1, alerts
    (i, opened), (j, closed) = opens[0], closes[0]
    assert opened.anomaly == expected and opened.sensor == "temperature" and opened.device == "d1"
    assert ONSET <= i < ONSET + within  # opened within its persistence after the onset
    assert opened.start == T0 + ONSET * 1000 or expected == "noise"  # noise: the averaged spread lags
    assert opened.episode == f"temperature/{opened.start}" == closed.episode
    # Closed once the sensor was normal for close_after windows after the fault's last window.
    assert END - 1 + CONFIG.close_after <= j <= END + 3 * CONFIG.close_after
    assert closed.reason == "normal" and closed.anomaly == expected and expected in closed.anomalies
    assert closed.end <= T0 + (END + 5) * 1000
    assert decode(encode(opened), AlertUnion, "x/v2/alerts/d1") == opened  # a valid sealed payload


def test_out_of_range_uses_the_chip_range_of_the_sensor_kind() -> None:
    low, high = CHIP_RANGES["humidity"]
    values = readings(300) - LEVEL + 50.0  # a humidity sensor around 50 %RH
    values[100:110] = high + 3.0  # 103 %RH: beyond the chip; out_of_range needs no warm-up
    alerts = run(Detector(CONFIG), list(values), sensor="humidity")
    (i, opened) = next((i, a) for i, a in alerts if isinstance(a, AnomalyOpen))
    assert opened.anomaly == "out_of_range" and i == 101
    assert (opened.evidence.low, opened.evidence.high) == (low, high)
    custom = Detector(CONFIG, {"humidity": (0.0, 200.0)})  # IOTPIPE_SENSOR_RANGES widens it
    assert [a for _i, a in run(custom, list(values[:115]), sensor="humidity") if isinstance(a, AnomalyOpen)] == []


def test_missing_readings_are_a_dropout() -> None:
    series = [values for values in readings(END + 100)]
    for i in range(ONSET, END):
        series[i] = series[i][:3]  # 3 readings of 10: a flaky bus
    opens = [(i, a) for i, a in run(Detector(CONFIG), series) if isinstance(a, AnomalyOpen)]
    assert [(i, a.anomaly) for i, a in opens] == [(ONSET + 1, "dropout")]
    assert opens[0][1].evidence.n == 3 and opens[0][1].evidence.normal_n == 10


def test_slow_drift_out_of_the_normal_range() -> None:
    # Warm-up: the drift envelope needs (min_blocks + lag_blocks) x block learnt windows (150 here).
    count = ONSET + 400
    ramp = np.clip((np.arange(count) - ONSET) / 300.0, 0, None)[:, None] * 3.0  # +3 degC over 5 min, 6x the wave
    series = readings(count) + ramp
    opens = [(i, a) for i, a in run(Detector(CONFIG), list(series)) if isinstance(a, AnomalyOpen)]
    assert [a.anomaly for _i, a in opens] == ["drift"]
    i, opened = opens[0]
    # The margin alone is 6 scales (6 x ~0.05 degC: 30 windows of ramp) and drift needs 10 windows in
    # a row, so not before ONSET + 40; the envelope holds at most the wave (1 degC wide) and its
    # margin a quarter of that more, so the ramp is out by ONSET + 150.
    assert ONSET + 40 <= i <= ONSET + 150
    assert opened.evidence.high is not None and opened.evidence.mean > opened.evidence.high


def test_hysteresis_a_flickering_fault_is_one_episode() -> None:
    series = readings(ONSET + 300)
    # 3 shifted windows, 2 normal ones, 12 times: never `close_after` normal windows in a row.
    for k in range(12):
        series[ONSET + 5 * k : ONSET + 5 * k + 3] += 4 * SIGMA
    last_shifted = ONSET + 5 * 11 + 2
    alerts = run(Detector(CONFIG), list(series))
    assert [type(a).__name__ for _i, a in alerts] == ["AnomalyOpen", "AnomalyClose"]
    j, closed = alerts[1]
    assert j == last_shifted + CONFIG.close_after
    assert closed.windows == 12 * 3 and closed.end == T0 + (last_shifted + 1) * 1000


def test_a_lasting_step_becomes_the_new_normal() -> None:
    config = Config(block=5, blocks=100, lag_blocks=20, min_blocks=10, adapt_after=200)
    series = readings(ONSET + 700)
    series[ONSET:] += 4 * SIGMA  # and it stays there
    alerts = run(Detector(config), list(series))
    assert [(type(a).__name__, getattr(a, "reason", None)) for _i, a in alerts] == [
        ("AnomalyOpen", None),
        ("AnomalyClose", "new_normal"),
    ]
    assert alerts[1][0] == ONSET + 2 + config.adapt_after


def test_a_physical_fault_during_a_relative_episode_is_reported_at_once() -> None:
    series = readings(ONSET + 300)
    series[ONSET : ONSET + 100] += 4 * SIGMA  # level shift ...
    series[ONSET + 50 : ONSET + 100] = 0.0  # ... and then the sensor reads 0
    alerts = run(Detector(CONFIG), list(series))
    kinds = [(i, type(a).__name__, getattr(a, "anomaly", None), getattr(a, "reason", None)) for i, a in alerts]
    assert kinds[:3] == [
        (ONSET + 2, "AnomalyOpen", "level_shift", None),
        (ONSET + 51, "AnomalyClose", "level_shift", "superseded"),
        (ONSET + 51, "AnomalyOpen", "dropout", None),
    ]


def test_several_windows_of_a_sensor_in_one_batch_are_taken_in_order() -> None:
    series = inject(readings(END + 100), ONSET, END, lambda v: v + 4 * SIGMA)
    one_by_one = [(type(a).__name__, a.episode) for _i, a in run(Detector(CONFIG), list(series))]  # type: ignore[union-attr]
    batched = Detector(CONFIG)
    alerts = []
    for k in range(0, len(series), 7):  # a backlog: 7 windows of the sensor per batch
        chunk = [window(i, series[i]) for i in range(k, min(k + 7, len(series)))]
        alerts += batched.observe(chunk, T0)
    assert [(type(a).__name__, a.episode) for a in alerts] == one_by_one  # type: ignore[union-attr]


class _Planted:
    """A pickle that creates a file when unpickled: what a pickled state file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_a_state_file_holds_numbers_never_code(tmp_path: Path) -> None:
    # State v1 was a pickle: whoever could write the monitor's state dir ran code in it at start.
    marker = tmp_path / "ran"
    planted = pickle.dumps({"version": 1, "payload": _Planted(marker)})
    with pytest.raises(ValueError):
        Detector(CONFIG).load(planted)
    assert not marker.exists()
    # Not even inside a well-formed .npz: its arrays are read with pickling off.
    crafted = io.BytesIO()
    np.savez(crafted, header=np.array([_Planted(marker)], dtype=object))
    with pytest.raises(ValueError):
        Detector(CONFIG).load(crafted.getvalue())
    assert not marker.exists()


def test_what_was_learnt_survives_a_restart() -> None:
    series = inject(readings(END + 100), ONSET, END, lambda v: v + 4 * SIGMA)
    before = Detector(CONFIG)
    run(before, list(series[:ONSET]))
    assert before.fitted == ["temperature"] and before.learnt(("d1", "temperature")) >= CONFIG.warm_up
    after = Detector(CONFIG)
    assert after.load(before.dump())
    assert after.fitted == ["temperature"] and after.learnt(("d1", "temperature")) == before.learnt(
        ("d1", "temperature")
    )
    # No warm-up again: the level shift right after the restart opens where it would have.
    opens = [(i, a.anomaly) for i, a in run(after, list(series[ONSET:]), first=ONSET) if isinstance(a, AnomalyOpen)]
    assert opens == [(ONSET + 2, "level_shift")]
    # A state written with other settings is refused (the sensors warm up again), not misread.
    assert not Detector(Config(warm_up=210)).load(before.dump())


def test_many_sensors_in_one_batch_each_get_their_own_normal() -> None:
    rng = np.random.default_rng(3)
    levels = rng.uniform(-20, 1000, 40)
    sigmas = rng.uniform(0.01, 5, 40)
    detector = Detector(CONFIG)
    faulty = 7
    opened: list[tuple[int, AnomalyOpen]] = []
    for i in range(ONSET + 40):
        batch = []
        for k in range(40):
            values = levels[k] + rng.normal(0, sigmas[k], HZ)
            if k == faulty and i >= ONSET:
                values += 5 * sigmas[k]
            batch.append(window(i, values, sensor="generic", device=f"d{k}"))
        opened += [(i, a) for a in detector.observe(batch, T0) if isinstance(a, AnomalyOpen)]
    assert [(i, a.device, a.anomaly) for i, a in opened] == [(ONSET + 2, f"d{faulty}", "level_shift")]
