from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from preprocessor.windows import aggregate


def mirrored(index: int, length: int) -> int:
    """Where a position outside [0, length) reads from, reflecting about the edge samples
    (`c b | a b c | b a`), repeatedly for series shorter than the kernel."""
    if length == 1:
        return 0
    period = 2 * (length - 1)
    index %= period
    return period - index if index >= length else index


def reference(values: list[float], kernel: int) -> dict[str, float]:
    """Straightforward median filter with mirrored edges, then the aggregates, in plain Python."""
    half = kernel // 2
    filtered = [
        statistics.median(values[mirrored(j, len(values))] for j in range(i - half, i + half + 1))
        for i in range(len(values))
    ]
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


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_spikes_at_both_edges_are_removed(kernel: int) -> None:
    """About one spike in five lands on a window's first or last sample: the filter must remove
    those too, without inventing a value no sensor reported."""
    values = [100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -50.0]
    (got,) = aggregate([np.array(values)], kernel)
    want = reference(values, kernel)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got["mean"] == 1.0 and got["min"] == 1.0 and got["max"] == 1.0


def test_edges_are_not_zero_padded_or_replicated() -> None:
    """Ramps show the difference: zero-padding drags the edges to 0, replication keeps a lone edge
    spike; mirroring keeps real neighbouring values."""
    (got,) = aggregate([np.array([5.0, 6.0, 7.0, 8.0, 9.0])], 5)
    assert got["min"] == 6.0 and got["max"] == 8.0
