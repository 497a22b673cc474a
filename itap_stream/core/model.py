"""Detectors and the model artifact (the file format lives in adapters/artifacts.py).

The default detector is StandardScaler + IsolationForest from scikit-learn. For
scoring, the fitted forest is flattened into numpy arrays and every tree is walked for
a whole micro-batch at once; the scores are the same numbers scikit-learn's
``-score_samples`` gives (a test compares them), without its per-call overhead, which
dominates at the batch sizes a live consumer sees.

Score convention: higher means more anomalous; for the Isolation Forest it is
``2 ** (-mean path length / c(max_samples))`` in ``(0, 1]``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest
    from sklearn.preprocessing import StandardScaler

__all__ = [
    "Artifact",
    "Detector",
    "IsolationForestDetector",
    "TrainStats",
    "confidence",
    "quantile_threshold",
    "rows_times",
]

Array = npt.NDArray[np.float64]


class Detector(Protocol):
    """What every detector offers (see `core.detectors` for the others).

    ``fit`` learns normal feature rows; ``score`` scores a batch (higher = worse);
    ``calibrate`` sets the alarm threshold from held-out normal rows and returns it on the
    score scale. A detector is pickled whole into the model artifact.

    A detector whose scores depend on each device's earlier windows may also offer
    ``score_sequence(X, device_ids, state)``: windows in event order per device, history
    carried in ``state`` (a dict the caller owns). The stream and the batch path then both
    score through it (`core.pipeline.score_in_order`); the mean-shift chart does, for its
    drifting signals.
    """

    name: str

    def fit(self, X: Array) -> None: ...

    def score(self, X: Array) -> Array: ...

    def calibrate(self, X: Array, quantile: float) -> float: ...


#: Rows scored per walk of the flattened forest.
_SCORE_BLOCK = 2048


class IsolationForestDetector:
    """StandardScaler + IsolationForest with batch-vectorised scoring.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> det = IsolationForestDetector(n_estimators=50, seed=0)
    >>> det.fit(rng.normal(size=(500, 3)))
    >>> s = det.score(np.array([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0]]))
    >>> bool(s[1] > s[0])
    True
    """

    name = "isolation_forest"

    def __init__(
        self, *, n_estimators: int = 100, max_samples: int = 256, seed: int = 0, rotate: float | None = 0.999
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.seed = seed
        self.rotate = rotate
        self.rotation_: Array | None = None
        self._scaler_mean_: Array | None = None  # plain copies: the envelope needs no scikit-learn
        self._scaler_scale_: Array | None = None
        self._scaler: StandardScaler | None = None
        self._forest: IsolationForest | None = None
        self._sklearn_blob: bytes | None = None
        self.env_mean_: Array | None = None
        self.env_scale_: Array | None = None
        self.forest_threshold_: float | None = None
        self.envelope_threshold_: float | None = None
        self._flat: dict[str, Any] | None = None

    # scikit-learn objects are unpickled only when asked for: scoring runs on the
    # flattened arrays, and importing scikit-learn costs about two seconds per start
    @property
    def forest_(self) -> IsolationForest | None:
        self._load_sklearn()
        return self._forest

    @forest_.setter
    def forest_(self, value: IsolationForest | None) -> None:
        self._forest = value

    @property
    def scaler_(self) -> StandardScaler | None:
        self._load_sklearn()
        return self._scaler

    @scaler_.setter
    def scaler_(self, value: StandardScaler | None) -> None:
        self._scaler = value

    def _load_sklearn(self) -> None:
        if self._sklearn_blob is not None:
            blob, self._sklearn_blob = self._sklearn_blob, None
            self._forest, self._scaler = pickle.loads(blob)  # noqa: S301 - inside the verified artifact

    def __getstate__(self) -> dict[str, Any]:
        if self._flat is None and self.forest_ is not None:
            self._flatten()
        state = self.__dict__.copy()
        self._load_sklearn()
        state["_sklearn_blob"] = pickle.dumps((self._forest, self._scaler)) if self._forest is not None else None
        state["_forest"] = state["_scaler"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # artifacts written before the nested pickle keep scikit-learn objects at top level
        if "forest_" in state:
            state["_forest"] = state.pop("forest_")
            state["_scaler"] = state.pop("scaler_", None)
            state.setdefault("_sklearn_blob", None)
        state.setdefault("rotate", None)
        state.setdefault("rotation_", None)
        state.setdefault("_scaler_mean_", None)
        state.setdefault("_scaler_scale_", None)
        self.__dict__.update(state)

    def fit(self, X: Array) -> None:
        from sklearn.ensemble import IsolationForest
        from sklearn.preprocessing import StandardScaler

        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 2:
            msg = f"need at least 2 training rows, got shape {X.shape}"
            raise ValueError(msg)
        self.scaler_ = StandardScaler().fit(X)
        forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, len(X)),
            random_state=self.seed,
        )
        Z = self.scaler_.transform(X)
        self.rotation_ = None
        if self.rotate is not None:
            from sklearn.decomposition import PCA

            # whitened principal components: a forest cuts one axis at a time, so a fault
            # that breaks a relation between features (temperature no longer following load)
            # is invisible on the raw axes and stands out on the rotated ones
            # (on features scaled with a floor, as the PCA chart does: a feature that barely
            # moved in training must not become a principal direction of noise)
            floor = np.maximum(X.std(axis=0), np.maximum(0.01 * np.abs(X).mean(axis=0), 1e-6))
            pca = PCA(svd_solver="full").fit(Z * (self.scaler_.scale_ / floor))
            k = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), self.rotate - 1e-12) + 1)
            k = max(1, min(k, len(pca.explained_variance_)))
            keep = pca.explained_variance_[:k] > 1e-12
            whiten = (pca.components_[:k][keep] / np.sqrt(pca.explained_variance_[:k][keep])[:, None]).T
            self.rotation_ = np.ascontiguousarray((self.scaler_.scale_ / floor)[:, None] * whiten)
            self._scaler_mean_, self._scaler_scale_ = self.scaler_.mean_.copy(), self.scaler_.scale_.copy()
            Z = rows_times(Z, self.rotation_)
        forest.fit(Z.astype(np.float32))
        self.forest_ = forest
        self.env_mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        # a feature that never varied in training (e.g. dropout counts) gets a unit-ish scale
        self.env_scale_ = np.where(std > 1e-9, std, np.maximum(0.5, 0.05 * np.abs(self.env_mean_)))
        self.forest_threshold_ = None
        self.envelope_threshold_ = None
        self._flat = None

    def rotated(self, X: Array) -> Array | None:
        """Standardised rows on the whitened principal components (None when not rotated).

        Through `rows_times`, not a BLAS product, whose summation order depends on the batch:
        a window scores the same in a micro-batch of 3, in a table of a million and after
        the model was reloaded.
        """
        if self.rotation_ is None or self._scaler_mean_ is None or self._scaler_scale_ is None:
            return None
        return rows_times((np.asarray(X, dtype=np.float64) - self._scaler_mean_) / self._scaler_scale_, self.rotation_)

    def envelope(self, X: Array, rotated: Array | None = None) -> Array:
        """Largest deviation from the training windows: per feature ``|x - mean| / std`` and,
        when rotated, per whitened principal component (unit variance in training)."""
        if self.env_mean_ is None or self.env_scale_ is None:
            msg = "detector is not fitted"
            raise RuntimeError(msg)
        X = np.asarray(X, dtype=np.float64)
        dev = (np.abs(X - self.env_mean_) / self.env_scale_).max(axis=1)
        z = self.rotated(X) if rotated is None else rotated
        if z is not None and z.shape[1]:
            dev = np.maximum(dev, np.abs(z).max(axis=1))
        return np.asarray(dev)

    def calibrate(self, X: Array, quantile: float) -> float:
        """Set thresholds from held-out normal windows; returns the threshold on the score scale."""
        self.forest_threshold_ = quantile_threshold(self.forest_score(X), quantile)
        self.envelope_threshold_ = quantile_threshold(self.envelope(X), quantile)
        return self.forest_threshold_

    def score(self, X: Array) -> Array:
        """Anomaly score: the forest's, raised where a feature leaves the training envelope.

        An Isolation Forest cannot rank a point beyond the range of the training data
        above the most extreme training point, and it never splits on a feature that
        was constant in training (a sensor that never dropped out). So, once calibrated,
        the score is ``max(forest, e)`` where ``e = t_f * r`` for ``r = envelope / t_e <= 1``
        and ``t_f * (1 + ln r)`` above: it crosses the forest threshold ``t_f`` exactly
        when the forest score does or when the largest feature deviation crosses its own
        calibrated threshold ``t_e``, and grows only logarithmically beyond.
        """
        z = self.rotated(X)
        forest = self.forest_score(X, z)
        if self.forest_threshold_ is None or not self.envelope_threshold_:
            return forest
        r = self.envelope(X, z) / self.envelope_threshold_
        env = self.forest_threshold_ * np.where(r <= 1.0, r, 1.0 + np.log(np.maximum(r, 1.0)))
        return np.maximum(forest, env)

    def _flatten(self) -> dict[str, Any]:
        """Lay every tree out in one array set, children of a node side by side.

        ``left[i]`` is the left child of node ``i`` and ``left[i] + 1`` its right child,
        so one step of the walk is ``node = left[node] + (x > threshold[node])``.
        A leaf points to itself with an infinite threshold, so extra steps are harmless.
        """
        from sklearn.ensemble._iforest import _average_path_length

        if self.forest_ is None or self.scaler_ is None:
            msg = "detector is not fitted"
            raise RuntimeError(msg)
        forest = self.forest_
        if forest._max_features != forest.n_features_in_:  # noqa: SLF001 - we always fit with all features
            msg = "feature subsampling is not supported by the vectorised scorer"
            raise RuntimeError(msg)
        feats, thr, child, leafval, roots = [], [], [], [], []
        offset = 0
        max_depth = 0
        for est in forest.estimators_:
            t = est.tree_
            cl, cr = t.children_left, t.children_right
            value = t.compute_node_depths() + _average_path_length(t.n_node_samples) - 1.0
            new_id = np.empty(t.node_count, dtype=np.intp)
            order = [0]
            new_id[0] = 0
            i = 0
            while i < len(order):  # breadth first, placing each node's two children together
                old = order[i]
                if cl[old] != -1:
                    new_id[cl[old]] = len(order)
                    new_id[cr[old]] = len(order) + 1
                    order.extend((cl[old], cr[old]))
                i += 1
            old_ids = np.asarray(order, dtype=np.intp)
            leaf = cl[old_ids] == -1
            feats.append(np.where(leaf, 0, t.feature[old_ids]))
            thr.append(np.where(leaf, np.inf, t.threshold[old_ids]))
            child.append(np.where(leaf, np.arange(t.node_count), new_id[np.maximum(cl[old_ids], 0)]) + offset)
            leafval.append(np.where(leaf, value[old_ids], 0.0))
            roots.append(offset)
            offset += t.node_count
            max_depth = max(max_depth, int(t.max_depth))
        self._flat = {
            "feature": np.concatenate(feats).astype(np.intp),
            "threshold": np.concatenate(thr),
            "child": np.concatenate(child).astype(np.intp),
            "value": np.concatenate(leafval),
            "roots": np.asarray(roots, dtype=np.intp),
            "depth": max_depth,
            "denominator": len(forest.estimators_)
            * float(_average_path_length(np.array([forest._max_samples]))[0]),  # noqa: SLF001
            "mean": self.scaler_.mean_,
            "scale": self.scaler_.scale_,
            "rotation": self.rotation_,
        }
        return self._flat

    def forest_score(self, X: Array, rotated: Array | None = None) -> Array:
        """The Isolation Forest score alone (equal to scikit-learn's ``-score_samples``)."""
        X = np.asarray(X, dtype=np.float64)
        flat = self._flat or self._flatten()
        if rotated is None and flat.get("rotation") is not None:
            rotated = self.rotated(X)
        if len(X) > _SCORE_BLOCK:
            # blocks keep the (trees, rows) walk arrays in cache: 4x faster on large tables
            return np.concatenate([
                self.forest_score(X[i : i + _SCORE_BLOCK], None if rotated is None else rotated[i : i + _SCORE_BLOCK])
                for i in range(0, len(X), _SCORE_BLOCK)
            ])
        n = X.shape[0]
        if n == 0:
            return np.zeros(0)
        # scikit-learn compares float32 inputs against float64 thresholds: do the same
        z = (X - flat["mean"]) / flat["scale"] if rotated is None else rotated
        n_features = z.shape[1]
        xs = z.astype(np.float32).astype(np.float64).ravel()
        feature, threshold, child = flat["feature"], flat["threshold"], flat["child"]
        row_offset = (np.arange(n, dtype=np.intp) * n_features)[None, :]
        nodes = np.repeat(flat["roots"][:, None], n, axis=1)  # (trees, n)
        for _ in range(flat["depth"]):
            x = xs.take(row_offset + feature.take(nodes))
            nodes = child.take(nodes) + (x > threshold.take(nodes))
        # axis-0 reduction adds tree after tree, the order scikit-learn accumulates in
        depths = np.add.reduce(flat["value"].take(nodes), axis=0)
        den = flat["denominator"]
        if den == 0:
            return np.ones(n)
        return np.asarray(2.0 ** (-depths / den))

    def score_sklearn(self, X: Array) -> Array:
        """Reference scores through scikit-learn itself (slow per call; used by tests)."""
        if self.forest_ is None or self.scaler_ is None:
            msg = "detector is not fitted"
            raise RuntimeError(msg)
        Z = self.scaler_.transform(np.asarray(X, dtype=np.float64))
        # rotated() is not None once fitted with a rotation
        Xs = (Z if self.rotation_ is None else cast(Array, self.rotated(X))).astype(np.float32)
        return np.asarray(-self.forest_.score_samples(Xs))


#: Rows per product in `rows_times`: every row goes through a product of this one shape.
_ROWS_BLOCK = 256


def rows_times(Z: Array, M: Array) -> Array:
    """``Z @ M`` with the same bits for a row whatever batch it comes in.

    A BLAS product picks its kernels and blocking by the matrix shape, so the same window
    could score a few ulps apart in a micro-batch of 3, in a table of a million or after
    the model was reloaded. Here every row goes through a product of one fixed shape
    (blocks of `_ROWS_BLOCK` rows, the last one zero-padded): the kernel, and so each
    row's summation order, never changes. (Tests compare stream, batch and reloaded
    scores bit for bit.)

    Examples
    --------
    >>> Z, M = np.arange(6.0).reshape(2, 3), np.arange(6.0).reshape(3, 2)
    >>> bool((rows_times(Z, M) == Z @ M).all())
    True
    """
    Z = np.asarray(Z, dtype=np.float64)
    M = np.ascontiguousarray(M, dtype=np.float64)
    n = Z.shape[0]
    out = np.empty((n, M.shape[1]))
    buf = np.zeros((_ROWS_BLOCK, Z.shape[1]))
    for i in range(0, n, _ROWS_BLOCK):
        m = min(_ROWS_BLOCK, n - i)
        buf[:m] = Z[i : i + m]
        if m < _ROWS_BLOCK:
            buf[m:] = 0.0
        out[i : i + m] = (buf @ M)[:m]
    return out


@dataclass(frozen=True)
class TrainStats:
    """Per-feature training mean/std (for explanations) and calibration scores (for confidence)."""

    mean: Array
    std: Array
    calibration_scores: Array  # sorted scores of held-out normal windows


def quantile_threshold(scores: Array, q: float = 0.995) -> float:
    """Threshold as a quantile of normal scores.

    With fewer scores than ``1 / (1 - q)`` the empirical quantile cannot reach ``q`` (it is
    about the largest score, the ``n / (n + 1)`` quantile): a short recording would get a
    threshold any normal stretch crosses. Then the threshold is at least the normal-tail
    estimate ``mean + z_q * std`` of the scores.

    Examples
    --------
    >>> quantile_threshold(np.arange(101, dtype=float), 0.9)
    90.0
    >>> s = np.array([1.0, 2.0, 3.0, 2.0, 1.0, 3.0, 2.0, 2.0])
    >>> round(quantile_threshold(s, 0.999), 2)  # 8 scores: 2.0 + 3.09 * 0.71
    4.19
    """
    if not 0.0 < q <= 1.0:
        msg = f"quantile must be in (0, 1], got {q}"
        raise ValueError(msg)
    s = np.asarray(scores, dtype=np.float64)
    t = float(np.quantile(s, q))
    if 1 < len(s) < 1.0 / max(1.0 - q, 1e-12):
        from statistics import NormalDist

        t = max(t, float(s.mean() + NormalDist().inv_cdf(min(q, 1 - 1e-9)) * s.std()))
    return t


def confidence(scores: Array, calibration_scores: Array) -> Array:
    """Share of held-out normal windows that scored below each score (an empirical CDF).

    Examples
    --------
    >>> confidence(np.array([0.5, 10.0]), np.array([1.0, 2.0, 3.0, 4.0])).tolist()
    [0.0, 1.0]
    """
    cal = np.asarray(calibration_scores, dtype=np.float64)
    if len(cal) == 0:
        return np.zeros(len(scores))
    return np.searchsorted(cal, np.asarray(scores, dtype=np.float64), side="left") / len(cal)


#: The share of held-out normal windows whose score counts as fully healthy (`device_health`).
HEALTHY_QUANTILE = 0.95


def typical_score(calibration_scores: Array, threshold: float) -> float:
    """The score under which a window is as healthy as normal operation: the
    `HEALTHY_QUANTILE` of the held-out normal scores (kept below the threshold)."""
    cal = np.asarray(calibration_scores, dtype=np.float64)
    q = float(np.quantile(cal, HEALTHY_QUANTILE)) if len(cal) else 0.0
    return min(q, threshold * 0.999) if threshold > 0 else q


def device_health(scores: Array, typical: float, threshold: float) -> Array:
    """Health from 1.0 to 0.0 on the calibrated score scale.

    1.0 up to ``typical`` (as healthy as 95 % of the normal windows held out in training),
    falling linearly to 0.5 at the threshold (the line where a window counts as
    anomalous), and on to 0.0 when the score is as far above the threshold as the
    threshold is above ``typical``.

    Examples
    --------
    >>> device_health(np.array([0.1, 0.6, 0.8, 1.0, 1.2, 1.4, 9.0]), typical=0.6, threshold=1.0).round(3).tolist()
    [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    s = np.asarray(scores, dtype=np.float64)
    gap = max(threshold - typical, 1e-12)
    below = 1.0 - 0.5 * (s - typical) / gap
    above = 0.5 * (1.0 - (s - threshold) / gap)
    return np.clip(np.where(s <= threshold, np.minimum(below, 1.0), above), 0.0, 1.0)


@dataclass
class Artifact:
    """Everything the consumer needs to score: written by `itap train`, read by `itap run`."""

    detector: Any
    feature_names: tuple[str, ...]
    schema: dict[str, Any]
    window: int
    hop: int
    threshold: float
    stats: TrainStats
    trained_at: str
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = 1
    #: the threshold of windows with a state change inside (start-ups, stops), from the
    #: scores of such training windows; None (none in training, or an older model): such
    #: windows are never anomalous (`core.pipeline.raw_anomalies`)
    settling_threshold: float | None = None
