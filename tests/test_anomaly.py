"""The monitor's anomaly detector (monitor.anomaly): per-sensor normalisation in slot arrays, one
IsolationForest per sensor kind, fitted from a bounded reservoir and swapped in whole."""

from __future__ import annotations

import numpy as np
from iotpipe import Window
from monitor.anomaly import AnomalyDetector, features

READINGS = 10


def window(device: str, mean: float, low: float, high: float, sensor: str = "temperature", start: int = 0) -> Window:
    return Window(
        device=device,
        sensor=sensor,
        unit="u",
        start=start,
        end=start + 1000,
        n=READINGS,
        mean=mean,
        median=mean,
        min=low,
        max=high,
        std=(high - low) / 4,
    )


class Fleet:
    """Sensors of one kind, each with its own level and noise (so only normalisation makes them alike)."""

    def __init__(self, sensors: int, seed: int = 0, sensor: str = "temperature") -> None:
        self.rng = np.random.default_rng(seed)
        self.sensor = sensor
        self.devices = [f"dev-{i}" for i in range(sensors)]
        self.level = self.rng.uniform(-50, 1000, sensors)
        self.noise = self.rng.uniform(0.01, 5, sensors)
        self.second = 0

    def windows(self, shift: dict[int, float] | None = None, spread: dict[int, float] | None = None) -> list[Window]:
        """One window per sensor; `shift` moves a sensor's readings by that many of its noise sigmas,
        `spread` multiplies their deviations from its level."""
        x = self.rng.normal(size=(len(self.devices), READINGS))
        for i, factor in (spread or {}).items():
            x[i] *= factor
        for i, sigmas in (shift or {}).items():
            x[i] += sigmas
        x = x * self.noise[:, None] + self.level[:, None]
        start = self.second * 1000
        self.second += 1
        return [
            window(device, float(r.mean()), float(r.min()), float(r.max()), self.sensor, start)
            for device, r in zip(self.devices, x, strict=True)
        ]


def state(detector: AnomalyDetector, device: str, sensor: str = "temperature") -> tuple[int, np.ndarray, np.ndarray]:
    found = detector.state((device, sensor))
    assert found is not None
    return found


def refit(detector: AnomalyDetector) -> None:
    """What the service's refit loop does (fit in a worker thread there)."""
    detector.install(detector.fit(detector.snapshot()))


def test_a_sensor_is_scored_only_after_its_warm_up_and_a_fit() -> None:
    detector = AnomalyDetector(min_samples=30)
    fleet = Fleet(50)
    for _ in range(30):
        assert np.isnan(detector.observe(fleet.windows())).all()
    assert detector.snapshot() == {}  # nothing old enough to learn from yet
    for _ in range(10):
        assert np.isnan(detector.observe(fleet.windows())).all()  # observing never fits
    refit(detector)
    assert detector.fitted == ["temperature"]
    assert np.isfinite(detector.observe(fleet.windows())).all()
    newcomer = window("dev-new", 1.0, 0.5, 1.5)
    (decision,) = detector.observe([newcomer])
    assert np.isnan(decision)  # its kind has a model, but the sensor itself is still warming up


def test_level_shift_and_spread_change_on_a_normalised_sensor_are_flagged() -> None:
    detector = AnomalyDetector()
    fleet = Fleet(300)
    for _ in range(140):
        detector.observe(fleet.windows())
    refit(detector)
    quiet, loud = int(np.argmin(fleet.noise)), int(np.argmax(fleet.noise))
    assert fleet.noise[loud] > 100 * fleet.noise[quiet]  # scales that only normalisation reconciles

    # A level shift of 10 sigmas of the window mean, on the quietest and the noisiest sensor alike.
    sigmas = 10 / np.sqrt(READINGS)
    decisions = detector.observe(fleet.windows(shift={quiet: sigmas, loud: sigmas}))
    assert decisions[quiet] < 0 and decisions[loud] < 0

    # The spread of one sensor's readings grows five-fold: most of its windows stand out.
    spreading = 7
    flagged = [detector.observe(fleet.windows(spread={spreading: 5.0}))[spreading] < 0 for _ in range(5)]
    assert sum(flagged) >= 3


def test_normal_noise_from_many_sensors_is_not_flagged() -> None:
    # Two kinds, 600 sensors of wildly different levels and noise, through several refits (a threshold
    # calibrated only on unflagged rows would flag a little more at each refit).
    detector = AnomalyDetector(contamination=1e-5, reservoir=65_536)
    fleets = [Fleet(300, seed=1), Fleet(300, seed=2, sensor="pressure")]
    flagged = []
    for cycle in range(4):
        for _ in range(60 if cycle else 250):
            decisions = np.concatenate([detector.observe(fleet.windows()) for fleet in fleets])
            if cycle:
                flagged.append(int((decisions < 0).sum()))
        refit(detector)
    assert sorted(detector.fitted) == ["pressure", "temperature"]
    scored = [np.concatenate([detector.observe(fleet.windows()) for fleet in fleets]) for _ in range(2)]
    assert np.isfinite(np.concatenate(scored)).all()
    assert not (np.concatenate(scored) < 0).any()  # 1,200 windows of noise: no anomaly
    # Over 108,000 more windows the rate stays near the calibrated one (about 5e-5, a few per
    # 100,000 windows) and does not creep up from refit to refit.
    assert sum(flagged) <= 20
    assert max(sum(flagged[60 * i : 60 * i + 60]) for i in range(3)) <= 10


def test_several_windows_of_one_sensor_in_one_batch() -> None:
    detector = AnomalyDetector(min_samples=5)
    rng = np.random.default_rng(4)
    # A new sensor's backlog in one batch: its windows are learnt together, the first five (seen before
    # warm-up) are not kept for fitting, the rest are.
    means = rng.normal(20.0, 0.5, 40)
    backlog = [window("d1", m, m - 1.0, m + 1.0, start=i * 1000) for i, m in enumerate(means)]
    detector.observe(backlog)
    count, centre, scale = state(detector, "d1")
    x = features(backlog)
    assert count == 40
    np.testing.assert_allclose(centre, x.mean(axis=0))
    np.testing.assert_allclose(scale, np.abs(x - x.mean(axis=0)).mean(axis=0))
    assert len(detector.snapshot()["temperature"].rows) == 35

    # A warmed-up sensor's several windows in one batch: learnt as one step of the right weight
    # (k identical windows move the centre as k one-window batches would)...
    twin = AnomalyDetector(min_samples=5)
    twin.observe(backlog)
    probe = window("d1", 20.2, 19.2, 21.2)
    detector.observe([probe] * 4)
    for _ in range(4):
        twin.observe([probe])
    np.testing.assert_allclose(state(detector, "d1")[1], state(twin, "d1")[1])

    # ...and scored each on its own: with a model, the anomalous one among them alone is flagged.
    fleet = Fleet(100, seed=5)
    for _ in range(60):
        detector.observe(fleet.windows())
    refit(detector)
    sensor = 3
    batch = [fleet.windows()[sensor], fleet.windows(shift={sensor: 10.0})[sensor], fleet.windows()[sensor]]
    decisions = detector.observe(batch)
    assert decisions[0] >= 0 and decisions[1] < 0 and decisions[2] >= 0


def test_slot_arrays_grow_and_keep_every_sensor_state() -> None:
    detector = AnomalyDetector(min_samples=3, initial_slots=2)
    first = [window(f"d{i}", float(i), i - 0.5, i + 0.5) for i in range(3)]
    detector.observe(first)
    before = {i: state(detector, f"d{i}") for i in range(3)}
    for batch in range(10):  # 10 batches of 25 new sensors each
        detector.observe([window(f"n{batch}-{i}", 5.0, 4.0, 6.0) for i in range(25)])
    assert detector.sensors == 253
    for i in range(3):
        count, centre, scale = state(detector, f"d{i}")
        assert count == before[i][0] == 1
        np.testing.assert_array_equal(centre, before[i][1])
        np.testing.assert_array_equal(scale, before[i][2])
    detector.observe(first)
    assert state(detector, "d0")[0] == 2
    assert detector.state(("unknown", "temperature")) is None


def test_refit_swaps_models_whole_and_skips_unchanged_kinds() -> None:
    detector = AnomalyDetector(min_samples=10, reservoir=5_000)
    temperature, pressure = Fleet(40, seed=6), Fleet(40, seed=7, sensor="pressure")
    for _ in range(80):
        detector.observe(temperature.windows() + pressure.windows())
    refit(detector)
    old = detector.model("temperature")
    assert old is not None and old.fast  # sklearn's own decision_function agrees with the fast path
    assert detector.snapshot() == {}  # no new windows since the last snapshot: nothing to refit

    detector.observe(temperature.windows())
    data = detector.snapshot()
    assert list(data) == ["temperature"]  # pressure had no new windows: its model stays
    rows = data["temperature"].rows
    np.testing.assert_allclose(old.decision(rows), old.forest.decision_function(rows), rtol=0, atol=1e-9)

    # Fitting does not touch what is scored; install swaps the fitted kinds only.
    new_models = detector.fit(data)
    assert detector.model("temperature") is old
    kept = detector.model("pressure")
    detector.install(new_models)
    assert detector.model("temperature") is new_models["temperature"] is not old
    assert detector.model("pressure") is kept
    # The threshold leaves `contamination` of the reservoir below it, and never fewer than 3 rows
    # (2,840 rows here), more if needed to flag windows beyond every row in a fault's direction (up to
    # 0.1%, 3 rows here): a far level shift either way, a far wider spread.
    assert 3 <= int((new_models["temperature"].decision(rows) < 0).sum()) <= 6
    far = np.array([[1e6, 1e6, 1e6], [-1e6, -1e6, -1e6], [0.0, -1e6, 1e6]], dtype=np.float32)
    assert (new_models["temperature"].decision(far) < 0).all()

    # Rows of flagged windows stay in the reservoir (for the threshold) but are not trained on.
    detector.observe(temperature.windows(shift={i: 50.0 for i in range(5)}))
    data = detector.snapshot()
    flagged = data["temperature"].flagged
    assert flagged.sum() >= 5
    model = detector.fit(data)["temperature"]
    assert model.forest.max_samples_ == min(1024, len(flagged) - int(flagged.sum()))


def test_reservoir_is_bounded() -> None:
    detector = AnomalyDetector(min_samples=2, reservoir=100)
    fleet = Fleet(30)
    for _ in range(200):
        detector.observe(fleet.windows())
    data = detector.snapshot()["temperature"]
    assert data.rows.shape == (100, 3) and data.rows.dtype == np.float32
    assert data.flagged.shape == (100,)
