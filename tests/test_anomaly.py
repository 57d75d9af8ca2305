from __future__ import annotations

import numpy as np
from iotpipe import Window
from monitor.anomaly import AnomalyDetector, features


def window(mean: float, std: float, low: float, high: float) -> Window:
    return Window(sensor="t", unit="degC", start=0, end=1000, n=10, mean=mean, median=mean, min=low, max=high, std=std)


def test_scores_only_after_a_fit_and_flags_an_outlier() -> None:
    detector = AnomalyDetector(min_samples=30, contamination=0.01)
    key = ("d1", "temperature")
    rng = np.random.default_rng(3)
    for mean in rng.normal(21.0, 0.2, size=300):
        detector.observe(key, features(window(mean, 0.1, mean - 0.2, mean + 0.2)))
    assert detector.score(key, [[21.0, 0.1, 0.4]]) is None  # observing never fits
    data = detector.snapshot()
    assert data[key].shape == (300, 3)
    detector.install(detector.fit(data))  # the service runs fit() in a worker thread
    normal, outlier = detector.score(key, [[21.0, 0.1, 0.4], [35.0, 4.0, 12.0]])
    assert normal > 0 > outlier


def test_sensors_below_min_samples_are_not_fitted() -> None:
    detector = AnomalyDetector(min_samples=30)
    for i in range(10):
        detector.observe(("d1", "x"), [float(i), 0.0, 0.0])
    assert detector.snapshot() == {}


def test_history_is_bounded() -> None:
    detector = AnomalyDetector(history=50, min_samples=2)
    for i in range(500):
        detector.observe(("d1", "x"), [float(i), 0.0, 0.0])
    assert detector.snapshot()[("d1", "x")].shape == (50, 3)
