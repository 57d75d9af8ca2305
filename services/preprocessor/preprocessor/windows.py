"""Window maths: median filter, then per-window aggregates, vectorised across a whole batch.

Series of equal length are stacked into one 2-D array so scipy and numpy run once per length
rather than once per sensor. `std` is the population standard deviation (ddof=0).

Edges: the filter reflects the window about its edge sample (`mode="mirror"`: `c b | a b c`), so
the sample at an edge is judged among its real neighbours. Replicating it (`mode="nearest"`) would
count a spike on the first sample three times in a width-5 kernel and let it through, and
zero-padding (`scipy.signal.medfilt`) would drag edges towards a value no sensor reported.

Every aggregate of finite readings is finite (mean and median lie in [min, max], std is at most
max |x|), but computing them naively is not: a sum of five readings of 1.7e308, the median's
average of two of them, the square of a deviation past 1.3e154 overflow to inf, which the contract
cannot carry (and squares of deviations below 1e-154 underflow to 0, so such a series' std came out
0). A series whose largest magnitude is that far from 1 is scaled by a power of two to below 1 for
the sums and back after; a power of two scales exactly, so the results are the same bits as the
naive ones wherever those were right.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import median_filter

FIELDS = ("mean", "median", "min", "max", "std")
# Rows whose largest magnitude is 2**SAFE_EXPONENT or more, or below 2**-SAFE_EXPONENT, are scaled:
# in between, squared deviations (< 4 * 2**1000) summed over the longest series (2**20 readings)
# stay far below 2**1024, and squares of 2**-500 (2**-1000) are still normal doubles.
SAFE_EXPONENT = 500
# From 2**52 up a double has no fractional part, so rounding it is a no-op (np.round would scale it
# by 10**decimals first, which overflows near the top of the range).
WHOLE = 2.0**52


def aggregate_array(series: Sequence[np.ndarray], kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, stats) of each series after a median filter of width `kernel` (odd), in input order:
    `n` its length, `stats` one row of FIELDS per series. Arrays, not per-series dicts: at 20,000
    windows a second building a dict per window was the preprocessor's largest cost."""
    counts = np.fromiter((len(values) for values in series), dtype=np.int64, count=len(series))
    stats = np.empty((len(series), len(FIELDS)), dtype=np.float64)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(counts.tolist()):
        by_length[length].append(index)
    for length, indices in by_length.items():
        block = np.stack([series[i] for i in indices]).astype(np.float64, copy=False)
        if kernel > 1 and length > 1:
            block = median_filter(block, size=(1, kernel), mode="mirror")
        rows = np.asarray(indices)
        low, high = block.min(axis=1), block.max(axis=1)
        # |x| < 2**exponent for every x of the row (0 for a row of zeros); extreme rows go to |x| < 1.
        exponent = np.frexp(np.maximum(high, -low))[1]
        shift = np.where(np.abs(exponent) > SAFE_EXPONENT, exponent, 0)
        if shift.any():
            block = np.ldexp(block, -shift[:, None])
        low_s, high_s = np.ldexp(low, -shift), np.ldexp(high, -shift)
        # Clipped: rounding can put a mean a bit outside [min, max] (five equal readings near the
        # top of the range would then scale back to inf), which the true mean never is.
        stats[rows, 0] = np.ldexp(np.clip(block.mean(axis=1), low_s, high_s), shift)
        stats[rows, 1] = np.ldexp(np.median(block, axis=1), shift)
        stats[rows, 2] = low
        stats[rows, 3] = high
        stats[rows, 4] = np.ldexp(np.minimum(block.std(axis=1), np.maximum(high_s, -low_s)), shift)
    return counts, stats


def round_aggregates(stats: np.ndarray, decimals: int) -> np.ndarray:
    """`stats` rounded to `decimals` places, finite wherever `stats` is."""
    with np.errstate(over="ignore", invalid="ignore"):  # the values np.where discards
        return np.where(np.abs(stats) < WHOLE, np.round(stats, decimals), stats)


def aggregate(series: Sequence[np.ndarray], kernel: int) -> list[dict[str, float | int]]:
    """Aggregates of each series after a median filter of width `kernel` (odd), in input order."""
    counts, stats = aggregate_array(series, kernel)
    return [
        {"n": n, **dict(zip(FIELDS, row, strict=True))} for n, row in zip(counts.tolist(), stats.tolist(), strict=True)
    ]
