"""Anomaly detection for many sensors, as episodes: pure (no MQTT, no clock), vectorised per batch.

`Detector.observe(windows, now)` takes a batch of processed windows and returns the episode alerts
it opens and closes (AnomalyOpen / AnomalyClose). Every (device, sensor) has a slot; its state lives
in fixed-size numpy arrays indexed by slot (grown by doubling), so a batch is a few dozen numpy calls
whatever its size. Checks, in priority order (the first that holds names the episode):

  out_of_range  a window's min or max outside the chip's range (a table keyed by sensor kind,
                `CHIP_RANGES`, plus IOTPIPE_SENSOR_RANGES); needs no history; 2 windows
  dropout       every reading exactly 0 where the sensor's normal level is far from 0, or fewer
                than half its usual readings per window; 2 windows
  stuck         zero spread (max == min) where the sensor normally varies; 5 windows
  level_shift   |robust z| of the window mean against its expected level > 6; 3 windows
  noise         robust z of the spread (mean log std of the last 5 windows but the highest) > 4.5
                and that spread over 2x usual; 3 windows
  drift         the mean outside the sensor's normal envelope (the range of its 30-window block
                means over the last 2 h, the newest 10 min left out) by more than a margin; 10 windows
  pattern       the sensor kind's IsolationForest (forest.py) flags the normalised window; 5 windows

Robust normalisation, per sensor, from the windows it learnt from (no check flagged them, their
level was within 3 scales, and no episode was open: a fault never becomes its own normal):
- expected level: the median of its last `recent` learnt means, and the slope between the medians
  of their older and newer halves, extrapolated to the window (at most `extrapolate` s), so a slow
  wave does not read as a shift;
- `scale`: 1.4826 x MAD of the residuals (mean - expected) of its last `history` learnt windows,
  and their median as a bias; the same for log(std); the median readings per window. These are
  recomputed every `refresh` learnt windows (a partition of `history` values, amortised). The
  level's scale widens with the sensor's current spread, so a noise burst is not also a shift.
Warm-up: a sensor is checked for dropout/stuck/level/noise/pattern after `warm_up` learnt windows
(default 120: 2 min at 1 s windows), for drift once it has an hour of envelope older than 10 min
(about 70 min), for out_of_range at once; `pattern` also waits for its kind's first fit.

Episodes: one per sensor at a time. It opens when a check has held for its windows in a row, and
closes after `close_after` windows in a row in which the kind it opened with (and any physical kind
seen since) is well inside its threshold (hysteresis: |z| < 3, spread z < 2, half the drift margin,
the physical condition gone; a level shift also once it stepped back by half its shift, which is
what counts once the frozen expected level is over a minute old). A relative episode (level_shift,
noise, drift, pattern) still open after `adapt_after` windows closes as "new_normal" and the sensor
warms up again from its current level: a lasting step (a heater switched on, a sensor moved) is the
new normal after that, not an episode forever. Physical ones stay open while the fault lasts, and
one that begins during a relative episode closes it ("superseded") and opens at once. There is no
cooldown: once an episode closed, the next fault opens a new one at once.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import operator
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, get_args

import numpy as np
from iotpipe import Alert, AnomalyClose, AnomalyKind, AnomalyOpen, EpisodeEnd, Evidence, Window

from .forest import Forests, KindData, KindModel

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (device, sensor)
KINDS: tuple[AnomalyKind, ...] = get_args(AnomalyKind)
OUT_OF_RANGE, DROPOUT, STUCK, LEVEL_SHIFT, NOISE, DRIFT, PATTERN = range(len(KINDS))
# Relative kinds are judged against the sensor's own past, which may itself have moved for good.
_RELATIVE = np.array([k in (LEVEL_SHIFT, NOISE, DRIFT, PATTERN) for k in range(len(KINDS))])

# The chip's range per sensor kind (= sensor id, as the drivers name them), the widest over the chips
# that report that kind (docs/hardware.md): BME280 -40..85 degC, SHT3x -40..125 degC; BME280 300..1100
# hPa; humidity 0..100 %RH; PMS5003 up to 1000 ug/m3. The drivers refuse readings beyond their own
# chip's range; a window beyond these is a reader that does not (simulated, SPI beyond its margin,
# another producer) or a fault. A table rather than a field of every window: the processed window's
# contract stays as it is for every consumer, the kind is already the key the models use, and
# deployments add their own kinds (SPI channels are calibrated per site) with IOTPIPE_SENSOR_RANGES.
CHIP_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (-40.0, 125.0),
    "pressure": (300.0, 1100.0),
    "humidity": (0.0, 100.0),
    "pm1_0": (0.0, 1000.0),
    "pm2_5": (0.0, 1000.0),
    "pm10": (0.0, 1000.0),
}

_FEATURES = 4  # pattern rows: z of level, z of log std, skew (mean - median), range / std
_Z_CAP = 50.0  # normalised features are clipped here: beyond, every window isolates alike
_STD_FLOOR = 1e-12
_STATE_VERSION = 2  # 2: an .npz of plain arrays (1 was a pickle)


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), so a stored config compares equal."""
    return json.loads(json.dumps(value))


_LAST = 5  # the noise check averages log(std) over this many windows (one window's is too noisy)
_PHYSICAL = [OUT_OF_RANGE, DROPOUT, STUCK]
_PHYSICAL_BITS = 1 << OUT_OF_RANGE | 1 << DROPOUT | 1 << STUCK
# What an episode's end forgets: the recent means behind the expected level, frozen through the
# episode. The level is checked again once `recent` new windows are learnt (a slope from fewer is
# too noisy to extrapolate); until then the old expected level still serves where only its size
# matters (is the sensor far from 0, does it normally vary).
_REBASED = ("recent_v", "recent_t", "recent_n", "ep_delta")
_LEVEL_TRUSTED = 60  # windows an episode's frozen expected level is trusted to say "back to normal"


@dataclass(frozen=True)
class Config:
    """Detection settings; the defaults are what the benchmark measured (docs/operations.md)."""

    history: int = 300  # learnt windows behind each sensor's robust scales
    recent: int = 30  # learnt windows behind its expected level and slope
    refresh: int = 30  # scales recomputed every this many learnt windows (they move slowly)
    warm_up: int = 120  # learnt windows before the relative checks (a multiple of `refresh`)
    extrapolate: float = 120.0  # s at most that the expected level follows its slope past the data
    level_z: float = 6.0
    noise_z: float = 4.5  # of the mean log(std) of the last 5 windows
    noise_ratio: float = 2.0
    close_z: float = 3.0  # hysteresis: |level z| back under this (noise z under 2) to count as normal
    missing_ratio: float = 0.5  # fewer readings than this fraction of usual: dropout
    block: int = 30  # learnt windows per block of the drift envelope
    blocks: int = 240  # blocks in the envelope (2 h of 1 s windows)
    lag_blocks: int = 20  # newest blocks left out of it (10 min), so a drift cannot widen it as it goes
    min_blocks: int = 120  # blocks (older than the lag) before drift is checked: 1 h, a whole cycle
    drift_margin: float = 0.25  # of the envelope's width, beyond it
    drift_noise: float = 6.0  # plus this many `scale`s
    persist: tuple[int, ...] = (2, 2, 5, 3, 3, 10, 5)  # windows in a row per kind, in KINDS order
    close_after: int = 10
    adapt_after: int = 900
    contamination: float = 1e-3  # of the pattern forests, per window (5 in a row needed)
    fit_rows: int = 32_768  # reservoir rows per kind

    def __post_init__(self) -> None:
        if self.warm_up % self.refresh or self.warm_up < self.recent + self.refresh:
            # the scales need residuals, and residuals need an expected level (`recent` windows)
            raise ValueError("warm_up must be a multiple of refresh, and at least recent + refresh")
        if len(self.persist) != len(KINDS):
            raise ValueError(f"persist needs {len(KINDS)} values")


_FIELDS = operator.attrgetter("mean", "median", "min", "max", "std", "n", "start", "end")
_KEY = operator.attrgetter("device", "sensor")


def features(windows: Sequence[Window]) -> np.ndarray:
    """(n, 8) float64: mean, median, min, max, std, n, start, end of each window."""
    return np.array(list(map(_FIELDS, windows)), dtype=np.float64).reshape(len(windows), 8)


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def _evidence(
    x: np.ndarray,
    windows: int,
    context: Mapping[str, np.floating[Any]],
    bounds: tuple[np.ndarray, np.ndarray] | None,
    i: int,
) -> Evidence:
    """What an AnomalyOpen shows of the window that opened it and of the sensor's normal."""
    mean, _median, low, high, std, n = (float(v) for v in x[:6])
    low_bound, high_bound = (None, None) if bounds is None else (_finite(float(b[i])) for b in bounds)
    return Evidence(
        mean=mean,
        min=low,
        max=high,
        std=std,
        n=int(n),
        windows=max(windows, 1),
        **{name: _finite(float(value)) for name, value in context.items()},
        low=low_bound,
        high=high_bound,
    )


class Detector:
    def __init__(self, config: Config | None = None, ranges: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.config = c = config or Config()
        self.ranges = {**CHIP_RANGES, **(ranges or {})}
        self.forests = Forests(
            n_features=_FEATURES, contamination=c.contamination, reservoir=c.fit_rows, min_rows=c.warm_up
        )
        self._slot: dict[Key, int] = {}
        self._keys: list[Key] = []
        self._kind_id: dict[str, int] = {}
        self._kinds: list[str] = []
        self._persist = np.array(c.persist)
        self._allocate(1024)

    # -- per-slot state ---------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        c = self.config
        shapes = {
            "kind": ((), np.int32, 0),
            "lo": ((), np.float64, -np.inf),
            "hi": ((), np.float64, np.inf),
            "learnt": ((), np.int64, 0),  # windows learnt from since the last warm-up
            "seen": ((), np.int64, 0),
            "last": ((_LAST, 2), np.float64, np.nan),  # mean, log std of its last windows, learnt or not
            "hist": ((3, c.history), np.float32, np.nan),  # residual, log std, n (medians along the last axis)
            "hist_n": ((), np.int64, 0),
            "recent_n": ((), np.int64, 0),  # learnt since the level was last rebased
            "stats": ((5,), np.float64, np.nan),  # residual centre, scale, log-std centre, scale, n
            "recent_v": ((c.recent,), np.float64, np.nan),
            "recent_t": ((c.recent,), np.float64, np.nan),
            "ref": ((3,), np.float64, np.nan),  # level, slope per s, time (s) it is the level at
            "block": ((2,), np.float64, 0.0),  # sum, count
            "env": ((c.blocks,), np.float32, np.nan),
            "env_count": ((), np.int64, 0),
            "envelope": ((2,), np.float64, np.nan),  # low, high
            "streak": ((len(KINDS),), np.int32, 0),
            "streak_start": ((len(KINDS),), np.int64, 0),
            "open": ((), bool, False),
            "ep": ((6,), np.int64, 0),  # kind, start, anomalous windows, kinds bitmask, quiet run, age
            "ep_end": ((), np.int64, 0),  # end of the last anomalous window
            "ep_peak": ((), np.float64, 0.0),
            "ep_delta": ((), np.float64, 0.0),  # signed deviation from the expected level at the open
            "ep_returned": ((), bool, False),  # a level_shift episode's level stepped back
        }
        old = getattr(self, "_state", None)
        self._shapes = shapes
        self._state: dict[str, np.ndarray] = {}
        for name, (shape, dtype, fill) in shapes.items():
            array = np.full((capacity, *shape), fill, dtype=dtype)
            if old is not None:
                array[: len(old[name])] = old[name]
            self._state[name] = array

    def _reset(self, slots: np.ndarray, names: Sequence[str]) -> None:
        for name in names:
            _shape, _dtype, fill = self._shapes[name]
            self._state[name][slots] = fill

    def _slots(self, windows: Sequence[Window]) -> np.ndarray:
        keys = list(map(_KEY, windows))
        slots = np.array(list(map(self._slot.get, keys, itertools.repeat(-1))), dtype=np.intp)
        for i in np.flatnonzero(slots < 0):  # new sensors (rare after the first batches)
            slots[i] = self._new_slot(keys[int(i)])
        return slots

    def _new_slot(self, key: Key) -> int:
        slot = self._slot.get(key)  # a sensor new in this batch may appear in it more than once
        if slot is not None:
            return slot
        slot = len(self._keys)
        if slot == len(self._state["kind"]):
            self._allocate(2 * slot)
        kind = self._kind_id.get(key[1])
        if kind is None:
            kind = self._kind_id[key[1]] = len(self._kinds)
            self._kinds.append(key[1])
        self._slot[key] = slot
        self._keys.append(key)
        s = self._state
        s["kind"][slot] = kind
        s["lo"][slot], s["hi"][slot] = self.ranges.get(key[1], (-np.inf, np.inf))
        return slot

    # -- the message path -------------------------------------------------------------------------
    def observe(self, windows: Sequence[Window], now: int) -> list[Alert]:
        """Check a batch, learn from its normal windows, and return the episode alerts it opens and
        closes (dated `now`, unix ms). Several windows of one sensor in a batch are taken in their
        order, each round vectorised over the sensors."""
        if not windows:
            return []
        x = features(windows)
        slots = self._slots(windows)
        out: list[Alert] = []
        unique, inverse = np.unique(slots, return_inverse=True)
        if len(unique) == len(slots):
            self._step(slots, x, now, out)
            return out
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        rank = np.empty(len(slots), dtype=np.int64)
        rank[order] = np.arange(len(slots)) - np.repeat(np.cumsum(counts) - counts, counts)
        for r in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank == r)
            self._step(slots[rows], x[rows], now, out)
        return out

    def _step(self, s: np.ndarray, x: np.ndarray, now: int, out: list[Alert]) -> None:
        c, st = self.config, self._state
        mean, median, low, high, std, n, start, _end = x.T
        t = start / 1000.0
        learnt = st["learnt"][s]
        warmed = learnt >= c.warm_up
        stats = st["stats"][s]
        c_r, s_r, c_ls, s_ls, n_med = stats.T
        ref = st["ref"][s]
        expected = ref[:, 0] + ref[:, 1] * np.clip(t - ref[:, 2], 0.0, c.extrapolate)
        log_std = np.log(np.maximum(std, _STD_FLOOR))
        last = st["last"][s]
        seen = st["seen"][s]
        # The level just before this window: the median mean of the 3 previous windows (NaN at first).
        previous = (seen[:, None] - np.arange(1, 4)[None, :]) % _LAST
        before = np.median(last[np.arange(len(s))[:, None], previous, 0], axis=1)
        last[np.arange(len(s)), seen % _LAST] = np.stack((mean, log_std), axis=1)
        st["last"][s] = last
        st["seen"][s] = seen + 1
        level_ready = warmed & (st["recent_n"][s] >= c.recent)
        with np.errstate(invalid="ignore", divide="ignore"):
            deviation = mean - expected - c_r
            # The mean log(std) of the last windows but the highest: one window with a spike pair
            # that passed the median filter is not a noise burst; a burst raises them all.
            spread = (last[:, :, 1].sum(axis=1) - last[:, :, 1].max(axis=1)) / (_LAST - 1)
            z_noise = np.where(warmed, (spread - c_ls) / (s_ls / np.sqrt(_LAST - 1)), 0.0)
            usual_std = np.exp(c_ls)
            noisier = np.exp(spread - c_ls)
            # A window mean is as uncertain as its readings are noisy: in a noise burst the level's
            # scale grows with it, so the burst is not also read as a level shift. (The averaged
            # spread, not this window's alone: one window's std varies by +-60% by chance.)
            z_level = np.where(level_ready, deviation / (s_r * np.maximum(noisier, 1.0)), 0.0)
            # Normally varies: its usual std is far above what rounding leaves of a constant signal.
            varies = warmed & (usual_std > 1e-6 * (np.abs(expected) + 1e-3))
            flat = (high - low) <= 1e-9 * np.maximum(np.abs(mean), 1.0)
            zeros = (high == 0.0) & (low == 0.0)
            far_from_zero = warmed & (np.abs(st["ref"][s, 0]) > 5.0 * np.maximum(s_r, usual_std))
            env = st["envelope"][s]
            env_ok = np.isfinite(env[:, 0])
            margin = c.drift_margin * (env[:, 1] - env[:, 0]) + c.drift_noise * s_r
            excess = np.where(env_ok, np.maximum(mean - env[:, 1], env[:, 0] - mean), -np.inf)
            lo, hi = st["lo"][s], st["hi"][s]
            beyond = np.maximum(lo - low, high - hi)
            n_ratio = np.where(warmed, n / n_med, 1.0)

        flags = np.zeros((len(s), len(KINDS)), dtype=bool)
        flags[:, OUT_OF_RANGE] = beyond > 0
        flags[:, DROPOUT] = (zeros & far_from_zero) | (n_ratio < c.missing_ratio)
        flags[:, STUCK] = varies & flat & ~zeros
        flags[:, LEVEL_SHIFT] = np.abs(z_level) > c.level_z
        flags[:, NOISE] = (z_noise > c.noise_z) & (noisier > c.noise_ratio)
        flags[:, DRIFT] = excess > margin
        scores = np.zeros((len(s), len(KINDS)))
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[:, OUT_OF_RANGE] = np.where(flags[:, OUT_OF_RANGE], beyond / np.maximum(hi - lo, 1e-12), 0.0)
            scores[:, DROPOUT] = np.where(flags[:, DROPOUT], 1.0 - np.where(zeros, 0.0, n_ratio), 0.0)
            scores[:, LEVEL_SHIFT] = np.abs(z_level)
            scores[:, NOISE] = z_noise
            scores[:, DRIFT] = np.where(env_ok, excess / margin, 0.0)
        pattern_rows = np.flatnonzero(level_ready)
        if len(pattern_rows):
            self._pattern(s, pattern_rows, z_level, z_noise, mean, median, low, high, std, usual_std, flags, scores)
        scores[:, STUCK] = st["streak"][s, STUCK] + flags[:, STUCK]

        # Hysteresis: what each check needs to see to call the sensor normal again.
        quiet = np.empty_like(flags)
        quiet[:, OUT_OF_RANGE] = ~flags[:, OUT_OF_RANGE]
        quiet[:, DROPOUT] = ~(zeros & far_from_zero) & (n_ratio >= 0.8)
        quiet[:, STUCK] = ~(varies & flat)
        quiet[:, LEVEL_SHIFT] = np.abs(z_level) < c.close_z
        quiet[:, NOISE] = z_noise < 2.0
        quiet[:, DRIFT] = ~(excess > margin / 2)
        quiet[:, PATTERN] = ~flags[:, PATTERN]
        with np.errstate(invalid="ignore"):
            # +1: the level stepped again the way the episode's shift went; -1: back by half of it.
            step = (mean - before) * np.sign(st["ep_delta"][s])
            half = 0.5 * np.abs(st["ep_delta"][s])
            stepped = np.where(step < -half, -1, np.where(step > half, 1, 0))
        context = {"normal": expected, "scale": s_r, "normal_std": usual_std, "normal_n": n_med}
        bounds = {
            OUT_OF_RANGE: (lo, hi),
            DRIFT: (env[:, 0] - margin, env[:, 1] + margin),
        }
        self._episodes(s, x, now, flags, scores, quiet, stepped, deviation, out, context, bounds)
        # Learn only from windows that are normal (no flag, the level within close_z) and outside any
        # episode: a fault flickering around its threshold must not teach the sensor its level.
        learn = ~flags.any(axis=1) & ~st["open"][s] & quiet[:, LEVEL_SHIFT]
        if learn.any():
            self._learn(s[learn], mean[learn], t[learn], expected[learn], log_std[learn], n[learn])

    def _pattern(
        self,
        s: np.ndarray,
        rows: np.ndarray,
        z_level: np.ndarray,
        z_noise: np.ndarray,
        mean: np.ndarray,
        median: np.ndarray,
        low: np.ndarray,
        high: np.ndarray,
        std: np.ndarray,
        usual_std: np.ndarray,
        flags: np.ndarray,
        scores: np.ndarray,
    ) -> None:
        """Score the warmed-up windows with their kind's forest, one call per kind; feed the reservoirs."""
        z = np.empty((len(rows), _FEATURES), dtype=np.float32)
        z[:, 0] = z_level[rows]
        z[:, 1] = z_noise[rows]
        z[:, 2] = (mean[rows] - median[rows]) / np.maximum(usual_std[rows], _STD_FLOOR)
        z[:, 3] = (high[rows] - low[rows]) / np.maximum(std[rows], _STD_FLOOR)
        np.clip(np.nan_to_num(z, nan=0.0), -_Z_CAP, _Z_CAP, out=z)
        kinds = self._state["kind"][s[rows]]
        flagged = flags[rows].any(axis=1) | self._state["open"][s[rows]]
        order = np.argsort(kinds, kind="stable")
        rows, kinds, z, flagged = rows[order], kinds[order], z[order], flagged[order]
        bounds = np.flatnonzero(np.diff(kinds)) + 1
        for group, zg, fg in zip(np.split(rows, bounds), np.split(z, bounds), np.split(flagged, bounds), strict=True):
            kind = self._kinds[int(self._state["kind"][s[group[0]]])]
            decision = self.forests.score(kind, zg)
            if decision is not None:
                flags[group, PATTERN] = decision < 0
                scores[group, PATTERN] = -decision
                fg = fg | (decision < 0)
            self.forests.add(kind, zg, fg)

    def _episodes(
        self,
        s: np.ndarray,
        x: np.ndarray,
        now: int,
        flags: np.ndarray,
        scores: np.ndarray,
        quiet: np.ndarray,
        stepped: np.ndarray,
        deviation: np.ndarray,
        out: list[Alert],
        context: dict[str, np.ndarray],
        bounds: dict[int, tuple[np.ndarray, np.ndarray]],
    ) -> None:
        c, st = self.config, self._state
        start, end = x[:, 6].astype(np.int64), x[:, 7].astype(np.int64)
        streak = st["streak"][s]
        began = flags & (streak == 0)
        streak = np.where(flags, streak + 1, 0)
        st["streak"][s] = streak
        streak_start = np.where(began, start[:, None], st["streak_start"][s])
        st["streak_start"][s] = streak_start
        held = streak >= self._persist
        is_open = st["open"][s]
        # A physical fault during a relative episode is news, not more of the same: the relative
        # episode ends ("superseded") and the physical one opens now.
        superseded = is_open & _RELATIVE[st["ep"][s, 0]] & held[:, _PHYSICAL].any(axis=1)
        for i in np.flatnonzero(superseded):
            self._close(int(s[i]), "superseded", now, out)
        if superseded.any():
            self._reset(s[superseded], _REBASED)
            is_open = is_open & ~superseded
        ep = st["ep"][s]

        # Open: the first kind (priority order) that has held for its windows in a row.
        opening = ~is_open & held.any(axis=1)
        for i in np.flatnonzero(opening):
            kind = int(np.argmax(held[i]))
            slot, first = int(s[i]), int(streak_start[i, kind])
            device, sensor = self._keys[slot]
            score = float(scores[i, kind])
            at = {name: values[i] for name, values in context.items()}
            evidence = _evidence(x[i], int(streak[i, kind]), at, bounds.get(kind), int(i))
            out.append(
                AnomalyOpen(
                    device=device,
                    sensor=sensor,
                    episode=f"{sensor}/{first}",
                    anomaly=KINDS[kind],
                    start=first,
                    end=int(end[i]),
                    score=round(score, 4),
                    evidence=evidence,
                    ts=now,
                )
            )
            st["open"][slot] = True
            st["ep"][slot] = (kind, first, int(streak[i, kind]), 1 << kind, 0, 0)
            st["ep_end"][slot] = end[i]
            st["ep_peak"][slot] = score
            st["ep_delta"][slot] = deviation[i] if np.isfinite(deviation[i]) else 0.0
            st["ep_returned"][slot] = False

        # Update and close the episodes that were open before this window.
        going = np.flatnonzero(is_open)
        if not len(going):
            return
        gs = s[going]
        ep = ep[going]
        bits = (held[going] * (1 << np.arange(len(KINDS)))).sum(axis=1)
        ep[:, 3] |= bits
        in_episode = (ep[:, 3][:, None] >> np.arange(len(KINDS))[None, :]) & 1 == 1
        # Windows count as the episode's (its count, its end) when one of its own kinds flags them:
        # not when only a check with memory (the averaged spread) still echoes the fault.
        anomalous = (flags[going] & in_episode).any(axis=1)
        ep[:, 2] += anomalous
        # A level_shift episode is over once its level stepped back by half its shift or more (and
        # not forward again since): its expected level, frozen since the open, may have drifted away
        # from the sensor's normal by then, so |z| alone could keep it open.
        level_episode = (ep[:, 3] >> LEVEL_SHIFT & 1).astype(bool)
        returned = np.where(stepped[going] == 0, st["ep_returned"][gs], stepped[going] < 0) & level_episode
        st["ep_returned"][gs] = returned
        checks = quiet[going]
        # |z| back under close_z counts only while the frozen expected level can be trusted (its slope
        # extrapolated over a minute or so); after that only the step back does.
        checks[:, LEVEL_SHIFT] = (checks[:, LEVEL_SHIFT] & (ep[:, 5] < _LEVEL_TRUSTED)) | returned
        # Judged on the kind it opened with and any physical kind seen since: the relative kinds a
        # fault also trips on its way (a sensor reading 0 is far out of its drift envelope and its
        # expected level too) are not the fault, and may stay near their thresholds after it.
        judged = ep[:, 3] & _PHYSICAL_BITS | (1 << ep[:, 0])
        judge = (judged[:, None] >> np.arange(len(KINDS))[None, :]) & 1 == 1
        normal = (checks | ~judge).all(axis=1) & ~flags[going][:, _PHYSICAL].any(axis=1)
        ep[:, 4] = np.where(normal, ep[:, 4] + 1, 0)
        ep[:, 5] += 1
        st["ep_end"][gs] = np.where(anomalous, end[going], st["ep_end"][gs])
        own = scores[going, ep[:, 0]]
        st["ep_peak"][gs] = np.maximum(st["ep_peak"][gs], np.where(flags[going, ep[:, 0]], own, 0.0))
        st["ep"][gs] = ep
        closing = ep[:, 4] >= c.close_after
        adapting = ~closing & _RELATIVE[ep[:, 0]] & (ep[:, 5] >= c.adapt_after)
        for j in np.flatnonzero(closing | adapting):
            self._close(int(gs[j]), "new_normal" if adapting[j] else "normal", now, out)
        # The expected level was frozen through the episode: it is learnt afresh from the windows
        # after it.
        self._reset(gs[closing | adapting], _REBASED)
        relearn = gs[adapting]
        if len(relearn):
            # The sensor's level moved for good: it warms up again from where it is now.
            self._reset(relearn, ("learnt", "hist", "hist_n", "stats", "block", "env", "env_count", "envelope"))

    def _close(self, slot: int, reason: EpisodeEnd, now: int, out: list[Alert]) -> None:
        st = self._state
        device, sensor = self._keys[slot]
        kind, first, count, mask = (int(v) for v in st["ep"][slot, :4])
        out.append(
            AnomalyClose(
                device=device,
                sensor=sensor,
                episode=f"{sensor}/{first}",
                anomaly=KINDS[kind],
                start=first,
                end=int(st["ep_end"][slot]),
                windows=max(count, 1),
                peak=round(float(st["ep_peak"][slot]), 4),
                anomalies=[k for i, k in enumerate(KINDS) if mask >> i & 1],
                reason=reason,
                ts=now,
            )
        )
        st["open"][slot] = False
        st["streak"][slot] = 0

    # -- learning ---------------------------------------------------------------------------------
    def _learn(
        self, s: np.ndarray, mean: np.ndarray, t: np.ndarray, expected: np.ndarray, log_std: np.ndarray, n: np.ndarray
    ) -> None:
        c, st = self.config, self._state
        # Residuals against the level expected before each window: only where it was a settled one
        # (not in the first `recent` windows of a warm-up or after an episode).
        has = np.isfinite(expected) & (st["recent_n"][s] >= c.recent)
        hs, hist_n = s[has], st["hist_n"][s[has]]
        h = hist_n % c.history
        st["hist"][hs, 0, h] = mean[has] - expected[has]
        st["hist"][hs, 1, h] = log_std[has]
        st["hist"][hs, 2, h] = n[has]
        st["hist_n"][hs] = hist_n + 1
        recent_n = st["recent_n"][s]
        r = recent_n % c.recent
        st["recent_v"][s, r] = mean
        st["recent_t"][s, r] = t
        st["recent_n"][s] = recent_n + 1
        learnt = st["learnt"][s] + 1
        st["learnt"][s] = learnt

        # Expected level: median of the recent means, at their mean time, and their LSQ slope.
        full = recent_n + 1 >= c.recent
        values, times = st["recent_v"][s], st["recent_t"][s]
        ref = np.empty((len(s), 3))
        if full.all():
            # Robust: median level, and the slope between the medians of the older and newer half
            # (a window learnt during the warm-up may be an outlier; least squares would follow it).
            ref[:, 0] = np.median(values, axis=1)
            tm = np.median(times, axis=1)
            half = c.recent // 2
            oldest = (recent_n + 1)[:, None] + np.arange(c.recent)[None, :]  # ring positions, oldest first
            order = oldest % c.recent
            rows = np.arange(len(s))[:, None]
            old_v, new_v = (
                np.median(values[rows, order[:, :half]], axis=1),
                np.median(values[rows, order[:, -half:]], axis=1),
            )
            old_t, new_t = (
                np.median(times[rows, order[:, :half]], axis=1),
                np.median(times[rows, order[:, -half:]], axis=1),
            )
            ref[:, 1] = np.where(new_t > old_t, (new_v - old_v) / np.maximum(new_t - old_t, 1e-9), 0.0)
        else:
            with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan():
                ref[:, 0] = np.nanmedian(values, axis=1)
                tm = np.nanmean(times, axis=1)
                dt = times - tm[:, None]
                vm = np.nanmean(values, axis=1)
                var = np.nansum(dt * dt, axis=1)
                slope = np.nansum(dt * (values - vm[:, None]), axis=1) / var
                ref[:, 1] = np.where((var > 0) & (recent_n + 1 >= c.recent // 3), slope, 0.0)
        ref[:, 2] = tm
        st["ref"][s] = ref

        due = (learnt % c.refresh == 0) & (learnt >= c.warm_up)
        if due.any():
            self._refresh(s[due], st["hist_n"][s[due]])

        # Drift envelope: block means of learnt windows.
        block = st["block"][s]
        block[:, 0] += mean
        block[:, 1] += 1
        done = block[:, 1] >= c.block
        st["block"][s] = np.where(done[:, None], 0.0, block)
        if done.any():
            self._push_block(s[done], block[done, 0] / block[done, 1])

    def _refresh(self, s: np.ndarray, hist_n: np.ndarray) -> None:
        st = self._state
        hist = st["hist"][s]  # (k, 3, history) float32: each median is along contiguous memory
        full = hist_n >= self.config.history
        centre = np.empty((len(s), 3))
        mad = np.empty((len(s), 3))
        if full.any():
            h = hist[full]
            centre[full] = np.median(h, axis=2)
            mad[full] = np.median(np.abs(h - centre[full][:, :, None].astype(np.float32)), axis=2)
        if (~full).any():
            with _quiet_nan():
                h = hist[~full]
                centre[~full] = np.nanmedian(h, axis=2)
                mad[~full] = np.nanmedian(np.abs(h - centre[~full][:, :, None].astype(np.float32)), axis=2)
        centre = np.nan_to_num(centre, nan=0.0)
        mad = np.nan_to_num(mad, nan=0.0)
        level = st["ref"][s, 0]
        stats = np.empty((len(s), 5))
        stats[:, 0] = centre[:, 0]
        # Floors: a quantised or constant sensor still gets a finite scale, far below any real noise.
        stats[:, 1] = np.maximum(1.4826 * mad[:, 0], 1e-9 * (np.abs(level) + 1e-3))
        stats[:, 2] = centre[:, 1]
        stats[:, 3] = np.maximum(1.4826 * mad[:, 1], 0.05)
        stats[:, 4] = np.maximum(centre[:, 2], 1.0)
        st["stats"][s] = stats

    def _push_block(self, s: np.ndarray, values: np.ndarray) -> None:
        c, st = self.config, self._state
        count = st["env_count"][s]
        st["env"][s, count % c.blocks] = values
        count = count + 1
        st["env_count"][s] = count
        usable = count - c.lag_blocks >= c.min_blocks
        if not usable.any():
            return
        s, count = s[usable], count[usable]
        ring = st["env"][s]
        # Age of each ring entry in blocks (0 = newest); the envelope is the entries lag..count-1 old.
        age = ((count - 1)[:, None] - np.arange(c.blocks)[None, :]) % c.blocks
        valid = (age >= c.lag_blocks) & (age < count[:, None])
        st["envelope"][s, 0] = np.where(valid, ring, np.inf).min(axis=1)
        st["envelope"][s, 1] = np.where(valid, ring, -np.inf).max(axis=1)

    # -- refitting the pattern forests (snapshot on the loop, fit in a worker thread, install) -----
    def snapshot(self) -> dict[str, KindData]:
        return self.forests.snapshot()

    def fit(self, data: Mapping[str, KindData]) -> dict[str, KindModel]:
        return self.forests.fit(data)

    def install(self, models: Mapping[str, KindModel]) -> None:
        self.forests.install(models)

    # -- persistence ------------------------------------------------------------------------------
    def dump(self) -> bytes:
        """Everything learnt, for `load` after a restart (taken on the loop, written by the caller):
        an .npz of plain arrays and a JSON header, read back with pickling off, so a state file can
        hold numbers only, never code."""
        n = len(self._keys)
        header = {
            "version": _STATE_VERSION,
            "config": _plain(asdict(self.config)),
            "keys": [list(k) for k in self._keys],
        }
        arrays = {f"state.{name}": array[:n].copy() for name, array in self._state.items()}
        arrays |= {f"forest.{key}": array for key, array in self.forests.dump().items()}
        out = io.BytesIO()
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        savez: Any = np.savez  # its stubs type **arrays as its own keyword options
        savez(out, **arrays)
        return out.getvalue()

    def load(self, data: bytes) -> bool:
        """Restore what `dump` wrote; False (and nothing restored) if it was written with other
        settings or another format, so the sensors warm up again. ValueError (or OSError) for a file
        that is not one of ours: the caller logs it and starts afresh."""
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        header = json.loads(arrays.pop("header").tobytes())
        if header.get("version") != _STATE_VERSION or header.get("config") != _plain(asdict(self.config)):
            return False
        keys = [(str(k[0]), str(k[1])) for k in header["keys"]]
        state = {name.removeprefix("state."): a for name, a in arrays.items() if name.startswith("state.")}
        if set(state) != set(self._state) or any(len(a) != len(keys) for a in state.values()):
            raise ValueError("the stored arrays do not match its sensors")
        self._slot, self._keys, self._kind_id, self._kinds = {}, [], {}, []
        self._allocate(max(1024, 2 * len(keys)))
        for key in keys:
            self._new_slot(key)
        n = len(keys)
        for name, array in state.items():
            if name not in ("kind", "lo", "hi"):  # those follow this process's kinds and ranges
                self._state[name][:n] = array
        self.forests.load({k.removeprefix("forest."): a for k, a in arrays.items() if k.startswith("forest.")})
        return True

    # -- introspection ----------------------------------------------------------------------------
    @property
    def sensors(self) -> int:
        return len(self._keys)

    @property
    def open_episodes(self) -> int:
        return int(self._state["open"][: len(self._keys)].sum())

    @property
    def fitted(self) -> list[str]:
        return list(self.forests.models)

    def learnt(self, key: Key) -> int:
        slot = self._slot.get(key)
        return 0 if slot is None else int(self._state["learnt"][slot])


@contextlib.contextmanager
def _quiet_nan() -> Iterator[None]:
    """nanmedian/nanmean warn on all-NaN rows (a sensor with nothing learnt yet): expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
