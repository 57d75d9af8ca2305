"""Anomaly scoring with IsolationForest, one model per (device, sensor).

Models are refitted periodically on a bounded history of window features, in a worker thread, and
swapped in atomically: the message path only scores, it never fits.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

import numpy as np
from iotpipe import Window
from sklearn.ensemble import IsolationForest

Key = tuple[str, str]  # (device, sensor)


def features(window: Window) -> list[float]:
    """What a window looks like to the model: level, spread, and range."""
    return [window.mean, window.std, window.max - window.min]


class AnomalyDetector:
    def __init__(
        self,
        history: int = 2000,
        min_samples: int = 30,
        contamination: float = 0.01,
        n_estimators: int = 50,
        seed: int = 0,
    ) -> None:
        self.history = history
        self.min_samples = min_samples
        self.contamination = contamination
        self.n_estimators = n_estimators
        self.seed = seed
        self._buffers: dict[Key, collections.deque[list[float]]] = {}
        self._models: dict[Key, IsolationForest] = {}

    def observe(self, key: Key, row: list[float]) -> None:
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = collections.deque(maxlen=self.history)
        buf.append(row)

    def score(self, key: Key, rows: list[list[float]]) -> np.ndarray | None:
        """Decision values (negative = anomalous) or None while no model is fitted for `key`."""
        model = self._models.get(key)
        if model is None:
            return None
        scores: np.ndarray = model.decision_function(np.asarray(rows, dtype=np.float64))
        return scores

    def snapshot(self) -> dict[Key, np.ndarray]:
        """Copies of the buffers worth fitting (taken on the event loop, fitted elsewhere)."""
        return {k: np.asarray(b, dtype=np.float64) for k, b in self._buffers.items() if len(b) >= self.min_samples}

    def fit(self, data: Mapping[Key, np.ndarray]) -> dict[Key, IsolationForest]:
        """CPU-heavy: run in a worker thread."""
        models = {}
        for key, rows in data.items():
            model = IsolationForest(
                n_estimators=self.n_estimators, contamination=self.contamination, random_state=self.seed
            )
            model.fit(rows)
            models[key] = model
        return models

    def install(self, models: Mapping[Key, IsolationForest]) -> None:
        self._models.update(models)

    @property
    def fitted(self) -> Iterable[Key]:
        return self._models.keys()
