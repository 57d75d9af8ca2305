from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from preprocessor.windows import aggregate


def reference(values: list[float], kernel: int) -> dict[str, float]:
    """Straightforward median filter with edge replication, then the aggregates, in plain Python."""
    half = kernel // 2
    padded = [values[0]] * half + values + [values[-1]] * half
    filtered = [statistics.median(padded[i : i + kernel]) for i in range(len(values))]
    mean = sum(filtered) / len(filtered)
    return {
        "n": len(values),
        "mean": mean,
        "median": statistics.median(filtered),
        "min": min(filtered),
        "max": max(filtered),
        "std": math.sqrt(sum((x - mean) ** 2 for x in filtered) / len(filtered)),
    }


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_matches_reference_for_mixed_lengths(kernel: int) -> None:
    rng = np.random.default_rng(7)
    series = [rng.normal(20, 2, size=n) for n in (1, 2, 5, 10, 10, 37, 100)]
    series[3][4] = 500.0  # a spike
    results = aggregate(series, kernel)
    for values, got in zip(series, results, strict=True):
        want = reference([float(v) for v in values], kernel if kernel > 1 else 1)
        assert got["n"] == want["n"]
        for field in ("mean", "median", "min", "max", "std"):
            assert got[field] == pytest.approx(want[field], rel=1e-12, abs=1e-12), field


def test_median_filter_removes_a_single_spike() -> None:
    values = np.array([20.0, 20.1, 19.9, 95.0, 20.0, 20.2, 19.8])
    (got,) = aggregate([values], 5)
    assert got["max"] < 21
    (unfiltered,) = aggregate([values], 1)
    assert unfiltered["max"] == 95.0
