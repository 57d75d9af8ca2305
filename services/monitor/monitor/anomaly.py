"""Anomaly scoring for many sensors: per-sensor robust normalisation, one IsolationForest per sensor kind.

Why this shape (issue 9, "Throughput"): one forest per (device, sensor) cost ~3 ms of CPU per scored
window (sklearn's per-call overhead, below) and a refit of every model per minute, so 20,000 sensors
could not be served. Here:

- Each (device, sensor) gets a slot number; its state lives in numpy arrays indexed by slot (grown by
  doubling): how many windows it has seen and an exponentially weighted centre and scale of each
  feature. The whole batch is normalised and the state updated with a handful of vectorised calls.
- Features are (mean, min, max) of the window, each as (x - centre) / scale of that sensor. Normalised,
  the windows of every sensor of one kind (the sensor id: "temperature", "vibration"...; devices share
  sensor ids) share one distribution, so one forest per kind serves all of them.
  Not (mean, std, max - min): an IsolationForest cannot extrapolate (a point outside the training data
  ends in the same leaves as the most extreme training point), so a shift of the level alone, seen in
  one feature of three, scored no worse than ordinary noise (measured: 0-2% of 8-50 sigma level
  shifts flagged at a 1e-4 false-alarm rate). With (mean, min, max) a level shift moves all three
  features together, into a corner that noise almost never reaches (96-100% of 8 sigma shifts
  flagged); a change of spread moves min and max apart (a 3x spread: ~40-70% of windows flagged).
- A batch is learnt first (each sensor's windows folded into its state at once; several windows of
  one sensor in a batch are handled per sensor, see `_learn`), then scored. A window is scored if its
  sensor had seen `min_samples` windows before it (its normalisation has settled) and its kind has a
  model.
- Each kind keeps a bounded reservoir of normalised rows of the windows old enough to be scored,
  each marked flagged or not. A refit (every `fit_interval`, in a worker thread, models swapped in
  atomically) trains on the rows not flagged anomalous, and sets the threshold (`offset_`) at the `contamination`
  quantile of the scores of *all* rows: calibrating on the unflagged rows only would flag another
  `contamination` beyond the last threshold at every refit (the false-alarm rate would creep up).
  So `contamination` is what sklearn says it is: the expected fraction of windows flagged, here of
  every sensor of the kind (1e-4: about 2 anomalous windows per second over 20,000 sensors at 1 Hz,
  before the per-sensor alert cooldown). The threshold is then raised, if need be and within bounds,
  so that any window beyond all normal rows in a fault's direction is flagged (see `_calibrate`).
  Measured on synthetic fleets: 1-4e-4 of normal windows flagged, no sensor more often than others.

Cost of scoring (sklearn 1.9 source, sklearn/ensemble/_iforest.py): `decision_function` walks every
tree (`Tree.apply`, a compiled loop of at most max_depth = ceil(log2(max_samples)) comparisons per
row) and averages the depths. Per row that is ~40-55 ns per tree (max_samples 256-1024: depth 8-10,
the tree still fits in cache). But each call also dispatches every tree through joblib and sklearn's
config/warnings wrapper: ~60 µs per tree, ~3 ms per call for 50 trees, whatever the number of rows.
So rows are scored in few, large calls (one per kind and batch), and `_KindModel` skips that
dispatch: the same per-tree `Tree.apply` and the same depth formula from public fitted attributes
(`estimators_`, `Tree.compute_node_depths`, `Tree.n_node_samples`, `max_samples_`, `offset_`),
~3 µs per tree per call, checked against `decision_function` after every fit (falling back to it on
any difference). Measured at 50 trees: 2.1 µs per row at max_samples=256, 2.7 µs at 1024.
- n_estimators=50: the paper's path lengths converge well before 100 trees; 100 doubles the cost per
  row and per call for detection that was measured alike (8+ sigma level shifts).
- max_samples=1024 rather than the paper's (and sklearn's) 256: only the far tail matters here, and a
  larger subsample isolates it more finely. Measured over 24 fits: the far-fault probes of
  `_calibrate` ranked at most 8 (median 0.5) of 32,768 rows at 1024, up to 68 (median 5.5) at 256,
  so the threshold rarely needs raising; fitting costs the same (~0.1 s per kind), the nodes ~1.3 MB
  per kind, the extra depth +0.6 µs per row. 128 lost much of the detection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from iotpipe import Window
from sklearn.ensemble import IsolationForest

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (device, sensor)
N_FEATURES = 3  # mean, min, max
_FEATURE_CAP = 1e6  # beyond this many scales from normal every window isolates the same; keeps float32 finite
_CLIP_SCALES = 3.0  # a warmed-up window moves its sensor's centre and scale by at most this many scales
# Scale floor: a constant signal still gets a finite scale. Relative to |centre| and far below any
# real sensor's noise (a pressure sensor: ~1e-5 of its level), so that it never blunts a quiet sensor.
_RELATIVE_FLOOR = 1e-7
_ABSOLUTE_FLOOR = 1e-12
_MIN_TAIL_ROWS = 3  # the threshold leaves at least this many reservoir rows below it (see _calibrate)
# Windows beyond every normal row in the directions faults take: level up, level down, wider spread.
_PROBES = np.array([[_FEATURE_CAP] * 3, [-_FEATURE_CAP] * 3, [0.0, -_FEATURE_CAP, _FEATURE_CAP]], dtype=np.float32)
_PROBE_MAX_FRACTION = 1e-3  # flagging them may not flag more than this fraction of normal rows
_CHECK_ROWS = 256  # rows on which the fast scorer is compared with sklearn's decision_function


def features(windows: Sequence[Window]) -> np.ndarray:
    """(n, 3) float64: what a window looks like to the model before normalisation."""
    n = len(windows)
    flat = np.fromiter((v for w in windows for v in (w.mean, w.min, w.max)), dtype=np.float64, count=3 * n)
    return flat.reshape(n, N_FEATURES)


def _average_path_length(n_samples: np.ndarray) -> np.ndarray:
    """c(n) of the IsolationForest paper, as sklearn computes it (ensemble/_iforest.py)."""
    n = np.asarray(n_samples, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class _KindModel:
    """A fitted forest and its threshold, scoring without sklearn's per-tree dispatch.

    Built in the worker thread; after `install` it is only read. `decision` equals
    `forest.decision_function` (checked at build time on real rows, else that is used instead)."""

    def __init__(self, forest: IsolationForest, check_rows: np.ndarray) -> None:
        self.forest = forest
        self._trees: list[Any] = [estimator.tree_ for estimator in forest.estimators_]
        # What sklearn adds per tree for a row ending in each node: its depth (root = 1) plus c(n) of
        # the training rows left there, minus one. Precomputed once instead of per call.
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


class _Reservoir:
    """A bounded sample of one kind's normalised rows, each marked flagged (anomalous) or not.

    Algorithm R, except that the count of rows seen stops growing at `horizon`: once past it, each new
    row replaces a random one with probability capacity/horizon, so the sample stays about the last
    `horizon` rows of the kind instead of freezing on the first hours."""

    def __init__(self, capacity: int, horizon: int) -> None:
        self.capacity = capacity
        self.horizon = horizon
        self.rows = np.empty((min(capacity, 1024), N_FEATURES), dtype=np.float32)  # grows to capacity
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
            self.rows = np.resize(self.rows, (grown, N_FEATURES))
            self.flagged = np.resize(self.flagged, grown)
        self.rows[target] = rows
        self.flagged[target] = flagged
        self.size = max(self.size, end)
        self.seen += k


@dataclass(frozen=True)
class KindData:
    """A copy of one kind's reservoir, taken on the event loop and fitted in a worker thread."""

    rows: np.ndarray  # (n, 3) float32, normalised
    flagged: np.ndarray  # (n,) bool
    seed: int


class AnomalyDetector:
    def __init__(
        self,
        *,
        min_samples: int = 30,
        contamination: float = 1e-4,
        reservoir: int = 32_768,
        half_life: float = 300.0,
        n_estimators: int = 50,
        max_samples: int = 1024,
        initial_slots: int = 1024,
        seed: int = 0,
    ) -> None:
        """`min_samples`: windows a sensor must have seen before it is scored (and rows a kind needs
        before it is fitted). `reservoir`: normalised rows kept per kind (bounded refit input; also what
        `contamination` is calibrated on, so it wants several times 1/contamination rows).
        `half_life`: windows after which a sensor's past weighs half in its normal level and spread."""
        self.min_samples = min_samples
        self.contamination = contamination
        self.reservoir_size = reservoir
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        # Per-window weight of the newest window once warmed up (before, a plain running mean: 1/n).
        self._alpha = 1.0 - 0.5 ** (1.0 / half_life)
        self._rng = np.random.default_rng(seed)
        self._slot: dict[Key, int] = {}
        self._kind_id: dict[str, int] = {}
        self._kinds: list[str] = []
        capacity = max(1, initial_slots)
        self._count = np.zeros(capacity, dtype=np.int64)  # windows seen per slot
        self._kind = np.zeros(capacity, dtype=np.int32)  # kind id per slot
        self._centre = np.zeros((capacity, N_FEATURES))
        self._scale = np.zeros((capacity, N_FEATURES))
        self._reservoirs: dict[str, _Reservoir] = {}
        self._fitted_seen: dict[str, int] = {}  # reservoir.seen at the last snapshot of each kind
        self._models: dict[str, _KindModel] = {}

    # -- the message path -------------------------------------------------------------------------
    def observe(self, windows: Sequence[Window]) -> np.ndarray:
        """Learn from a batch, then score it. Returns one decision value per window (negative =
        anomalous), NaN where its sensor had seen fewer than `min_samples` windows before it or its
        kind has no model yet."""
        n = len(windows)
        decisions = np.full(n, np.nan)
        if n == 0:
            return decisions
        x = features(windows)
        slots = self._slots(windows)
        count = self._count[slots]
        unique, first, inverse, m = np.unique(slots, return_index=True, return_inverse=True, return_counts=True)
        self._learn(slots, x, count, unique, first, inverse, m)
        # Learning first costs nothing in accuracy (once warmed up, a window moves its sensor's centre by
        # at most `_CLIP_SCALES` x the weight of one window, ~0.7% of a scale) and lets a batch that
        # holds a sensor's whole backlog warm it up and be scored in one go.
        seen_before = count if len(unique) == n else count + self._ranks(inverse, m)
        z = np.clip((x - self._centre[slots]) / self._floored_scale(slots), -_FEATURE_CAP, _FEATURE_CAP)
        z = z.astype(np.float32)

        eligible = np.flatnonzero(seen_before >= self.min_samples)
        if len(eligible):
            kinds = self._kind[slots[eligible]]
            order = np.argsort(kinds, kind="stable")
            eligible, kinds = eligible[order], kinds[order]
            for group in np.split(eligible, np.flatnonzero(np.diff(kinds)) + 1):
                kind = self._kinds[int(self._kind[slots[group[0]]])]
                rows = np.ascontiguousarray(z[group])
                model = self._models.get(kind)
                if model is not None:
                    decisions[group] = model.decision(rows)  # one call per kind and batch
                reservoir = self._reservoirs.get(kind)
                if reservoir is None:
                    horizon = 4 * self.reservoir_size
                    reservoir = self._reservoirs[kind] = _Reservoir(self.reservoir_size, horizon)
                reservoir.add(rows, decisions[group] < 0, self._rng)
        return decisions

    @staticmethod
    def _ranks(inverse: np.ndarray, m: np.ndarray) -> np.ndarray:
        """How many earlier windows of the same sensor each window has in the batch (0, 1, 2...)."""
        order = np.argsort(inverse, kind="stable")
        starts = np.cumsum(m) - m
        ranks = np.empty(len(inverse), dtype=np.int64)
        ranks[order] = np.arange(len(inverse)) - np.repeat(starts, m)
        return ranks

    def _slots(self, windows: Sequence[Window]) -> np.ndarray:
        slot_of = self._slot
        slots = np.fromiter((slot_of.get((w.device, w.sensor), -1) for w in windows), dtype=np.intp, count=len(windows))
        for i in np.flatnonzero(slots < 0):  # new sensors (rare after the first batches)
            w = windows[int(i)]
            slots[i] = self._new_slot((w.device, w.sensor))
        return slots

    def _new_slot(self, key: Key) -> int:
        slot = self._slot.get(key)  # a sensor new in this batch may appear in it more than once
        if slot is not None:
            return slot
        slot = len(self._slot)
        if slot == len(self._count):  # grow every per-slot array by doubling
            grown = 2 * slot
            self._count = np.resize(self._count, grown)
            self._kind = np.resize(self._kind, grown)
            self._centre = np.resize(self._centre, (grown, N_FEATURES))
            self._scale = np.resize(self._scale, (grown, N_FEATURES))
        kind = self._kind_id.get(key[1])
        if kind is None:
            kind = self._kind_id[key[1]] = len(self._kinds)
            self._kinds.append(key[1])
        self._slot[key] = slot
        self._count[slot] = 0
        self._kind[slot] = kind
        self._centre[slot] = 0.0
        self._scale[slot] = 0.0
        return slot

    def _floored_scale(self, slots: np.ndarray) -> np.ndarray:
        # A sensor that has been perfectly constant has scale 0; the floor keeps z finite, and its first
        # move stands out (which it should).
        floor = np.maximum(_RELATIVE_FLOOR * np.abs(self._centre[slots]), _ABSOLUTE_FLOOR)
        scale: np.ndarray = np.maximum(self._scale[slots], floor)
        return scale

    def _learn(
        self,
        slots: np.ndarray,
        x: np.ndarray,
        count: np.ndarray,
        unique: np.ndarray,
        first: np.ndarray,
        inverse: np.ndarray,
        m: np.ndarray,
    ) -> None:
        """Update each sensor's centre and scale with its windows of the batch, all at once.

        Per sensor: residuals against the pre-batch centre are averaged over its m windows and applied
        with weight 1 - (1 - a)^m (what m sequential steps of weight a give a constant residual) or
        m / (count + m) (the running mean: what it is over a sensor's first ~1/a windows), whichever
        is larger. Once warmed up, residuals are clipped to `_CLIP_SCALES` scales, so an anomaly
        cannot drag its own normal along; a lasting change is still followed, because the clipped
        residuals also grow the scale meanwhile."""
        scale = self._floored_scale(slots)
        new = count[first] == 0
        if new.any():  # a new sensor's first centre: the mean of its windows in this batch
            for j in range(N_FEATURES):
                self._centre[unique[new], j] = (np.bincount(inverse, weights=x[:, j]) / m)[new]
        residual = x - self._centre[slots]
        bound = np.where((count >= self.min_samples)[:, None], _CLIP_SCALES * scale, np.inf)
        residual = np.clip(residual, -bound, bound)
        sums = np.empty((len(unique), 2 * N_FEATURES))
        for j in range(N_FEATURES):
            sums[:, j] = np.bincount(inverse, weights=residual[:, j], minlength=len(unique))
            sums[:, N_FEATURES + j] = np.bincount(inverse, weights=np.abs(residual[:, j]), minlength=len(unique))
        sums /= m[:, None]
        seen = self._count[unique]
        weight = np.maximum(m / (seen + m), 1.0 - (1.0 - self._alpha) ** m)[:, None]
        self._centre[unique] += weight * sums[:, :N_FEATURES]
        self._scale[unique] += weight * (sums[:, N_FEATURES:] - self._scale[unique])
        self._count[unique] = seen + m

    # -- refitting (snapshot on the loop, fit in a worker thread, install on the loop) -----------
    def snapshot(self) -> dict[str, KindData]:
        """Copies of the reservoirs worth (re)fitting: enough unflagged rows, and new rows since the
        last snapshot (a kind whose sensors went quiet keeps its model)."""
        data = {}
        for kind, reservoir in self._reservoirs.items():
            if reservoir.seen == self._fitted_seen.get(kind):
                continue
            flagged = reservoir.flagged[: reservoir.size].copy()
            if reservoir.size - int(flagged.sum()) < self.min_samples:
                continue
            self._fitted_seen[kind] = reservoir.seen
            seed = int(self._rng.integers(2**31))
            data[kind] = KindData(reservoir.rows[: reservoir.size].copy(), flagged, seed)
        return data

    def fit(self, data: Mapping[str, KindData]) -> dict[str, _KindModel]:
        """CPU-heavy (~0.1 s per kind with a full reservoir): run in a worker thread."""
        return {kind: self._fit_kind(kind, d) for kind, d in data.items()}

    def _fit_kind(self, kind: str, data: KindData) -> _KindModel:
        # contamination="auto" skips sklearn's scoring of the training rows; the offset is set below
        # from all rows instead (see the module docstring).
        train = data.rows[~data.flagged]
        forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, len(train)),
            contamination="auto",
            random_state=data.seed,
        )
        forest.fit(train)
        model = _KindModel(forest, data.rows[:_CHECK_ROWS])
        # score_samples (decision + offset) of every row and of the probes
        scores, probes = (model.decision(rows) + forest.offset_ for rows in (data.rows, _PROBES))
        forest.offset_ = self._calibrate(kind, scores, probes)  # sklearn's relation: decision = score - offset_
        return model

    def _calibrate(self, kind: str, scores: np.ndarray, probes: np.ndarray) -> float:
        """The offset: the `contamination` quantile of the scores of every reservoir row, raised if
        needed (up to the _PROBE_MAX_FRACTION quantile) until the probes are flagged.

        An IsolationForest scores a point beyond all its training rows exactly like the most extreme
        row that way (same leaves), however far out it is. So a threshold at the contamination
        quantile alone flags a huge level shift only if that row happens to be among the few lowest
        scores (measured with 256-row subsamples: in 5 fits of 8 it was; the others missed 20-sigma
        shifts every time). The fault directions' extreme rows score among the lowest ~0-8 of 32,768
        (1024-row subsamples); a single feature's, among the hundreds to thousands (those are left to
        the contamination quantile: raising the threshold that far would flag too much). For the same
        reason the threshold always leaves _MIN_TAIL_ROWS rows below it, which matters while the
        reservoir holds fewer than ~1/contamination rows (it then flags more than `contamination`)."""
        q = min(max(self.contamination, _MIN_TAIL_ROWS / max(len(scores) - 1, 1)), 0.5)
        threshold = float(np.quantile(scores, q))
        needed = float(np.nextafter(probes.max(), np.inf))
        if needed > threshold:
            cap = float(np.quantile(scores, min(max(q, _PROBE_MAX_FRACTION), 0.5)))
            if needed <= cap:
                threshold = needed
            else:
                log.warning("the %s model would not flag every far level shift or spread; refitting may", kind)
        return threshold

    def install(self, models: Mapping[str, _KindModel]) -> None:
        self._models = {**self._models, **models}  # one assignment: scoring sees old or new, never half

    # -- introspection ----------------------------------------------------------------------------
    @property
    def fitted(self) -> list[str]:
        return list(self._models)

    def model(self, kind: str) -> _KindModel | None:
        return self._models.get(kind)

    @property
    def sensors(self) -> int:
        return len(self._slot)

    def state(self, key: Key) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(windows seen, centre, scale) of one sensor, or None if never seen."""
        slot = self._slot.get(key)
        if slot is None:
            return None
        return int(self._count[slot]), self._centre[slot].copy(), self._scale[slot].copy()
