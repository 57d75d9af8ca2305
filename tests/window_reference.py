"""Window aggregates as docs/contract.md defines them, computed independently of the preprocessor in
plain Python: a median filter (width 5) whose edges mirror about the edge sample (`c b | a b c`: the
position before index 0 reads index 1, the one after the last reads the second to last, repeating
for series shorter than the kernel), then n, mean, median, min, max and the population standard
deviation, each rounded to 6 decimal places."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

DECIMALS = 6
FIELDS = ("mean", "median", "min", "max", "std")


def mirrored(index: int, length: int) -> int:
    """Where a position outside [0, length) reads from, reflecting about the edge samples
    (`c b | a b c | b a`), repeatedly for series shorter than the kernel."""
    if length == 1:
        return 0
    period = 2 * (length - 1)
    index %= period
    return period - index if index >= length else index


def unrounded(values: Sequence[float], kernel: int = 5) -> dict[str, float]:
    half = kernel // 2
    filtered = [
        statistics.median(values[mirrored(j, len(values))] for j in range(i - half, i + half + 1))
        for i in range(len(values))
    ]
    mean = math.fsum(filtered) / len(filtered)
    return {
        "mean": mean,
        "median": statistics.median(filtered),
        "min": min(filtered),
        "max": max(filtered),
        "std": math.sqrt(math.fsum((x - mean) ** 2 for x in filtered) / len(filtered)),
    }


def expected(values: Sequence[float], kernel: int = 5) -> dict[str, float | int]:
    """The aggregates the contract promises for one window of `values`."""
    return {"n": len(values), **{k: round(v, DECIMALS) for k, v in unrounded(values, kernel).items()}}


def near_rounding_tie(value: float) -> bool:
    """True when `value` is within 1e-9 of halfway between two 6-decimal numbers. The preprocessor
    computes with numpy (pairwise sums), this module with exact sums, so their unrounded means and
    stds may differ in the last bits (~1e-15 relative); only next to such a tie can that flip the
    6th decimal. Everywhere else the rounded values are the same double, so they compare exactly."""
    scaled = abs(value) * 10**DECIMALS
    return abs(scaled - math.floor(scaled) - 0.5) < 1e-9 * 10**DECIMALS


def mismatches(got: Mapping[str, object], values: Sequence[float], kernel: int = 5) -> list[str]:
    """How a published window's aggregates differ from the contract's, field by field ([] if equal):
    exact equality, except a field whose true value sits on a rounding tie may be either neighbour."""
    want = expected(values, kernel)
    raw = unrounded(values, kernel)
    problems = []
    if got.get("n") != want["n"]:
        problems.append(f"n={got.get('n')!r}, want {want['n']}")
    for field in FIELDS:
        value = got.get(field)
        if value == want[field]:
            continue
        if (
            isinstance(value, float)
            and near_rounding_tie(raw[field])
            and abs(value - raw[field]) <= 0.5 * 10**-DECIMALS + 1e-9
            and value == round(value, DECIMALS)
        ):
            continue
        problems.append(f"{field}={value!r}, want {want[field]!r} (unrounded {raw[field]!r})")
    return problems
