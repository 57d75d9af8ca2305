"""One IsolationForest per sensor kind on per-sensor normalised window features: the monitor's
"pattern" check (detect.py), for oddities no single explicit check names.

The explicit checks in detect.py each look at one statistic against its own threshold; a window
whose level, spread and count are each a little off, together, passes all of them. That is what an
IsolationForest is good at: rows isolated in few cuts, whatever the combination. It is poor at what
the explicit checks do (it cannot extrapolate: a point beyond all training rows lands in the same
leaves as the most extreme one, so a huge level shift scores like a modest one), which is why it is
not alone any more (issue 13: 28% recall on stuck-at, 30 false alarms per sensor-hour alone).

- Rows are normalised per sensor (detect.py), so the windows of every sensor of one kind (the
  sensor id: "temperature", "humidity"...) share one distribution and one forest serves them all:
  a few models instead of one per sensor, fitted every `fit_interval` off the message path.
- Each kind keeps a bounded reservoir of rows, each marked flagged (by any check) or not; a fit
  trains on the unflagged ones, and sets the threshold at the `contamination` quantile of all of
  them (calibrating on the unflagged only would flag another `contamination` at every refit).
- Scoring skips sklearn's per-call dispatch (~60 µs per tree per call, whatever the number of rows):
  the same per-tree `Tree.apply` and depth formula from public fitted attributes, checked against
  `decision_function` after every fit (falling back to it on any difference).
- 25 trees of 256-row subsamples (the paper's subsample; sklearn's default has 100 trees): on the
  2-core dev machine 1.7 µs per row against 3.4 µs for 50 trees of 1,024, and the forest only has to
  find what the explicit checks miss, at a 1e-3 threshold held 5 windows in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest

log = logging.getLogger(__name__)

_MIN_TAIL_ROWS = 3  # the threshold leaves at least this many reservoir rows below it
_CHECK_ROWS = 256  # rows on which the fast scorer is compared with sklearn's decision_function


def _average_path_length(n_samples: np.ndarray) -> np.ndarray:
    """c(n) of the IsolationForest paper, as sklearn computes it (ensemble/_iforest.py)."""
    n = np.asarray(n_samples, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class KindModel:
    """A fitted forest and its threshold. Built in the worker thread; after `install`, only read."""

    def __init__(self, forest: IsolationForest, check_rows: np.ndarray) -> None:
        self.forest = forest
        self._trees: list[Any] = [estimator.tree_ for estimator in forest.estimators_]
        # What sklearn adds per tree for a row ending in each node: its depth (root = 1) plus c(n)
        # of the training rows left there, minus one. Precomputed once instead of per call.
        self._leaf_values = [
            tree.compute_node_depths() + _average_path_length(tree.n_node_samples) - 1.0 for tree in self._trees
        ]
        self._denominator = float(len(self._trees) * _average_path_length(np.array([forest.max_samples_]))[0])
        all_features = all(np.array_equal(f, np.arange(forest.n_features_in_)) for f in forest.estimators_features_)
        self.fast = all_features and self._denominator > 0
        if self.fast and len(check_rows):
            reference = forest.decision_function(check_rows)
            if not np.allclose(self._fast_decision(check_rows), reference, rtol=0, atol=1e-9):
                log.warning("fast IsolationForest scoring differs from sklearn's; using decision_function")
                self.fast = False

    def _fast_decision(self, rows: np.ndarray) -> np.ndarray:
        depths = np.zeros(len(rows))
        for tree, values in zip(self._trees, self._leaf_values, strict=True):
            depths += values[tree.apply(rows)]
        scores: np.ndarray = -np.exp2(-depths / self._denominator)  # score_samples
        return scores - float(self.forest.offset_)

    def decision(self, rows: np.ndarray) -> np.ndarray:
        """Decision values of float32 normalised rows: negative = anomalous."""
        if self.fast:
            return self._fast_decision(rows)
        result: np.ndarray = self.forest.decision_function(rows)
        return result


class Reservoir:
    """A bounded sample of one kind's rows, each marked flagged or not.

    Algorithm R, except that the count of rows seen stops growing at `horizon`: past it, each new
    row replaces a random one with probability capacity/horizon, so the sample stays about the last
    `horizon` rows of the kind instead of freezing on the first hours."""

    def __init__(self, capacity: int, horizon: int, n_features: int) -> None:
        self.capacity = capacity
        self.horizon = horizon
        self.rows = np.empty((min(capacity, 1024), n_features), dtype=np.float32)  # grows to capacity
        self.flagged = np.zeros(len(self.rows), dtype=bool)
        self.size = 0
        self.seen = 0

    def add(self, rows: np.ndarray, flagged: np.ndarray, rng: np.random.Generator) -> None:
        k = len(rows)
        position = np.minimum(self.seen + np.arange(k), self.horizon)
        target = np.where(position < self.capacity, position, rng.integers(0, position + 1))
        keep = target < self.capacity
        target, rows, flagged = target[keep], rows[keep], flagged[keep]
        end = int(target.max(initial=-1)) + 1
        if end > len(self.rows):
            grown = min(self.capacity, max(end, 2 * len(self.rows)))
            self.rows = np.resize(self.rows, (grown, self.rows.shape[1]))
            self.flagged = np.resize(self.flagged, grown)
        self.rows[target] = rows
        self.flagged[target] = flagged
        self.size = max(self.size, end)
        self.seen += k


@dataclass(frozen=True)
class KindData:
    """A copy of one kind's reservoir, taken on the event loop and fitted in a worker thread."""

    rows: np.ndarray  # (n, features) float32, normalised
    flagged: np.ndarray  # (n,) bool
    seed: int


class Forests:
    """The per-kind models, their reservoirs, and the snapshot -> fit (thread) -> install cycle."""

    def __init__(
        self,
        *,
        n_features: int,
        contamination: float,
        reservoir: int,
        min_rows: int,
        n_estimators: int = 25,
        max_samples: int = 256,
        seed: int = 0,
    ) -> None:
        self.n_features = n_features
        self.contamination = contamination
        self.reservoir_size = reservoir
        self.min_rows = min_rows
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self._rng = np.random.default_rng(seed)
        self.reservoirs: dict[str, Reservoir] = {}
        self._fitted_seen: dict[str, int] = {}  # reservoir.seen at the last snapshot of each kind
        self.models: dict[str, KindModel] = {}

    def score(self, kind: str, rows: np.ndarray) -> np.ndarray | None:
        """Decision values (negative = anomalous), or None while the kind has no model."""
        model = self.models.get(kind)
        return None if model is None else model.decision(rows)

    def add(self, kind: str, rows: np.ndarray, flagged: np.ndarray) -> None:
        reservoir = self.reservoirs.get(kind)
        if reservoir is None:
            size = self.reservoir_size
            reservoir = self.reservoirs[kind] = Reservoir(size, 4 * size, self.n_features)
        reservoir.add(rows, flagged, self._rng)

    def snapshot(self) -> dict[str, KindData]:
        """Copies of the reservoirs worth (re)fitting: enough unflagged rows, and new rows since the
        last snapshot (a kind whose sensors went quiet keeps its model)."""
        data = {}
        for kind, reservoir in self.reservoirs.items():
            if reservoir.seen == self._fitted_seen.get(kind):
                continue
            flagged = reservoir.flagged[: reservoir.size].copy()
            if reservoir.size - int(flagged.sum()) < self.min_rows:
                continue
            self._fitted_seen[kind] = reservoir.seen
            seed = int(self._rng.integers(2**31))
            data[kind] = KindData(reservoir.rows[: reservoir.size].copy(), flagged, seed)
        return data

    def fit(self, data: Mapping[str, KindData]) -> dict[str, KindModel]:
        """CPU-heavy (~0.1 s per kind with a full reservoir): run in a worker thread."""
        return {kind: self._fit_kind(d) for kind, d in data.items()}

    def _fit_kind(self, data: KindData) -> KindModel:
        train = data.rows[~data.flagged]
        # contamination="auto" skips sklearn's scoring of the training rows; the offset is set
        # below from all rows instead.
        forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, len(train)),
            contamination="auto",
            random_state=data.seed,
        )
        forest.fit(train)
        model = KindModel(forest, data.rows[:_CHECK_ROWS])
        scores = model.decision(data.rows) + forest.offset_  # score_samples of every row
        q = min(max(self.contamination, _MIN_TAIL_ROWS / max(len(scores) - 1, 1)), 0.5)
        forest.offset_ = float(np.quantile(scores, q))  # sklearn's relation: decision = score - offset_
        return model

    def install(self, models: Mapping[str, KindModel]) -> None:
        self.models = {**self.models, **models}  # one assignment: scoring sees old or new, never half

    # -- persistence: the reservoirs (numbers only), refitted at load ----------------------------------
    def dump(self) -> dict[str, np.ndarray]:
        """Each kind's reservoir as plain arrays (`<kind>.rows`, `<kind>.flagged`, `<kind>.seen`): no
        fitted model is stored, so loading runs no code from the file (a pickle would)."""
        out: dict[str, np.ndarray] = {}
        for kind, reservoir in self.reservoirs.items():
            out[f"{kind}.rows"] = reservoir.rows[: reservoir.size].copy()
            out[f"{kind}.flagged"] = reservoir.flagged[: reservoir.size].copy()
            out[f"{kind}.seen"] = np.array(reservoir.seen, dtype=np.int64)
        return out

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore the reservoirs `dump` wrote and fit their forests now (about 0.1 s a kind: at
        start-up, before any window is scored). A reservoir of another shape is dropped (refilled)."""
        for key in arrays:
            if not key.endswith(".rows"):
                continue
            kind = key.removesuffix(".rows")
            rows, flagged = arrays[key], arrays.get(f"{kind}.flagged")
            seen = arrays.get(f"{kind}.seen")
            if (
                rows.ndim != 2
                or rows.shape[1] != self.n_features
                or flagged is None
                or flagged.shape != (len(rows),)
                or seen is None
                or len(rows) > self.reservoir_size
            ):
                log.warning("stored %s reservoir has another shape; it refills instead", kind)
                continue
            reservoir = self.reservoirs[kind] = Reservoir(self.reservoir_size, 4 * self.reservoir_size, self.n_features)
            reservoir.rows = np.resize(rows.astype(np.float32), (max(len(rows), 1), self.n_features))
            reservoir.flagged = np.resize(flagged.astype(bool), max(len(rows), 1))
            reservoir.size, reservoir.seen = len(rows), int(seen)
        self.install(self.fit(self.snapshot()))
