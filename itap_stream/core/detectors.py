"""The detectors behind one interface, and the factory that names them.

Every detector learns normal feature rows (`fit`), scores a batch (`score`, higher =
more anomalous), and sets its alarm threshold from *held-out* normal rows
(`calibrate`, returning the threshold on its own score scale). All of them pickle
into the same model artifact (`Artifact.detector`), so `itap run`, `itap score` and
`itap evaluate` never need to know which one was trained.

=================  ==========================================================
name               what it is
=================  ==========================================================
isolation_forest   scikit-learn's Isolation Forest, vectorised (`model.py`)
pca                multivariate control chart: Hotelling T² and Q (SPE) on a
                   principal-component model of the standardised features
hst                river's online Half-Space Trees
ensemble           the mean of the members' scores, each divided by its own
                   calibrated threshold
auto               isolation_forest; for a recording of one operating state
                   with fewer than 20 training windows per feature (up to
                   about 2 hours at 1 Hz) the mean-shift chart below
=================  ==========================================================

`MeanShiftDetector` (reported as ``meanshift``) is what ``auto`` trains on a short
recording, such as the 400 normal readings at the start of a test-bed run.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from itap_stream.core.model import Detector, IsolationForestDetector, quantile_threshold, rows_times
from itap_stream.errors import ConfigError

__all__ = [
    "DETECTORS",
    "BaselinePolicy",
    "BaselineShift",
    "ColumnsDetector",
    "EnsembleDetector",
    "HalfSpaceTreesDetector",
    "MeanShiftDetector",
    "PCADetector",
    "canonical_name",
    "constant_signals",
    "level_correlation",
    "level_standard_errors",
    "make_detector",
    "reading_steps",
    "robust_scale",
]

Array = npt.NDArray[np.float64]


def robust_scale(X: Array) -> tuple[Array, Array]:
    """Centre and scale of each feature column for standardising.

    The scale is the standard deviation, floored so that a feature which barely moved in
    training (a dropout count that was always 0, a quantised reading) does not turn a
    tiny change into a huge z-score: the floor is 1 % of the column's typical magnitude
    and 1e-6 absolute.

    Examples
    --------
    >>> c, s = robust_scale(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> c.tolist(), s.tolist()
    ([2.0, 5.0], [1.0, 0.05])
    """
    X = np.asarray(X, dtype=np.float64)
    centre = X.mean(axis=0)
    std = X.std(axis=0)
    magnitude = np.abs(X).mean(axis=0)
    return centre, np.maximum(std, np.maximum(0.01 * magnitude, 1e-6))


class PCADetector:
    """Multivariate control chart: Hotelling T² and Q (squared prediction error).

    The features are standardised and projected on the principal components that carry
    ``variance`` of the training variance. T² measures how far a row is *inside* the model
    plane (an unusual combination of the usual patterns); Q measures how far it is *off*
    the plane (a pattern never seen, such as two signals that always moved together
    parting). Each statistic is divided by its own control limit, and the score is the
    larger of the two, so the threshold is "either chart out of its limit".

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(400, 1))
    >>> X = np.hstack([z, 2 * z + 0.1 * rng.normal(size=(400, 1)), rng.normal(size=(400, 1))])
    >>> det = PCADetector()
    >>> det.fit(X[:300])
    >>> t = det.calibrate(X[300:], 0.99)
    >>> s = det.score(np.array([[1.0, 2.0, 0.0], [1.0, -2.0, 0.0]]))  # the 2nd breaks the correlation
    >>> bool(s[0] < t < s[1])
    True
    """

    name = "pca"

    def __init__(self, *, variance: float = 0.99, seed: int = 0) -> None:
        if not 0.0 < variance <= 1.0:
            msg = f"pca variance must be in (0, 1], got {variance}"
            raise ConfigError(msg)
        self.variance = variance
        self.seed = seed
        self.centre_: Array | None = None
        self.scale_: Array | None = None
        self.components_: Array | None = None  # (k, n_features)
        self.eigenvalues_: Array | None = None  # (k,)
        self.limits_ = np.ones(2)  # T², Q control limits

    def fit(self, X: Array) -> None:
        from sklearn.decomposition import PCA

        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 3:
            msg = f"need at least 3 training rows, got shape {X.shape}"
            raise ValueError(msg)
        self.centre_, self.scale_ = robust_scale(X)
        Z = (X - self.centre_) / self.scale_
        pca = PCA(n_components=min(Z.shape) - 1 or 1, svd_solver="full", random_state=self.seed).fit(Z)
        ratio = np.cumsum(pca.explained_variance_ratio_)
        k = int(np.searchsorted(ratio, self.variance - 1e-12) + 1)
        k = max(1, min(k, len(ratio)))
        self.components_ = np.asarray(pca.components_[:k], dtype=np.float64)
        self.eigenvalues_ = np.maximum(np.asarray(pca.explained_variance_[:k], dtype=np.float64), 1e-9)
        # provisional limits from the fitted rows; `calibrate` replaces them with held-out ones
        t2, q = self.statistics(X)
        self.limits_ = np.array([max(float(np.quantile(t2, 0.99)), 1e-9), max(float(np.quantile(q, 0.99)), 1e-9)])

    def statistics(self, X: Array) -> tuple[Array, Array]:
        """Hotelling T² and Q (SPE) of each row."""
        if self.components_ is None or self.centre_ is None or self.scale_ is None or self.eigenvalues_ is None:
            msg = "detector is not fitted"
            raise RuntimeError(msg)
        Z = (np.asarray(X, dtype=np.float64) - self.centre_) / self.scale_
        # fixed-order sums (`rows_times`): equal bits in a micro-batch, a table, a reloaded model
        T = rows_times(Z, self.components_.T)
        t2 = rows_times(T * T, 1.0 / self.eigenvalues_[:, None])[:, 0]
        R = Z - rows_times(T, self.components_)
        q = rows_times(R * R, np.ones((R.shape[1], 1)))[:, 0]
        return t2, q

    def score(self, X: Array) -> Array:
        t2, q = self.statistics(X)
        return np.maximum(t2 / self.limits_[0], q / self.limits_[1])

    def calibrate(self, X: Array, quantile: float) -> float:
        t2, q = self.statistics(X)
        self.limits_ = np.array(
            [max(quantile_threshold(t2, quantile), 1e-9), max(quantile_threshold(q, quantile), 1e-9)]
        )
        return 1.0


class HalfSpaceTreesDetector:
    """river's Half-Space Trees, fitted online on the normal rows, then frozen for scoring.

    Each tree cuts the feature box (the training range of every feature, padded) at random
    and counts how much normal mass falls in each cell; a row landing in sparse cells
    scores high. Scoring does not learn, so a saved model gives the same score for the same
    window every time, in the stream and in batch.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> det = HalfSpaceTreesDetector(n_trees=10, height=6, seed=0)
    >>> det.fit(rng.normal(size=(300, 2)))
    >>> s = det.score(np.array([[0.0, 0.0], [6.0, -6.0]]))
    >>> bool(s[1] > s[0])
    True
    """

    name = "hst"

    def __init__(
        self, *, n_trees: int = 25, height: int = 8, window_size: int = 512, components: int = 8, seed: int = 0
    ) -> None:
        self.n_trees = n_trees
        self.components = components
        self.projection_: PCADetector | None = None
        self.height = height
        self.window_size = window_size
        self.seed = seed
        self.model_: Any = None
        self.quantiles_: Array | None = None
        self.n_features_ = 0

    def fit(self, X: Array) -> None:
        from river.anomaly import HalfSpaceTrees

        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 2:
            msg = f"need at least 2 training rows, got shape {X.shape}"
            raise ValueError(msg)
        # a few axes instead of every feature: with 50+ features, a cut of 8 random levels
        # rarely falls on the one feature a fault moves; the principal components and the
        # residual off them (Q) carry every feature's deviation in a handful of axes
        proj = self.projection_ = PCADetector(variance=0.999, seed=self.seed)
        proj.fit(X)
        # fit() set both (mypy cannot see it)
        proj.components_ = cast(Array, proj.components_)[: self.components]
        proj.eigenvalues_ = cast(Array, proj.eigenvalues_)[: self.components]
        P = self._project(X)
        self.quantiles_ = np.quantile(P, np.linspace(0.0, 1.0, 65), axis=0)  # (65, axes)
        U = self._uniform(P)
        # river counts mass in windows of window_size rows and scores against the last full
        # one (it stops descending where a cell holds under a tenth of a window): that
        # reference is one window of training rows drawn at random
        size = min(self.window_size, len(X))
        limits: dict[Hashable, tuple[float, float]] = dict.fromkeys(range(U.shape[1]), (-1.0, 2.0))
        model = HalfSpaceTrees(
            n_trees=self.n_trees, height=self.height, window_size=size, limits=limits, seed=self.seed
        )
        order = np.random.default_rng(self.seed).permutation(len(X))[:size]
        for row in U[order].tolist():
            model.learn_one(dict(enumerate(row)))
        self.model_ = model
        self.n_features_ = X.shape[1]

    def _project(self, X: Array) -> Array:
        """Scores on the leading principal components, and the log residual off them."""
        proj = cast(PCADetector, self.projection_)  # set by fit(); score() checks that it ran
        centre, scale, components = cast(Array, proj.centre_), cast(Array, proj.scale_), cast(Array, proj.components_)
        Z = (np.asarray(X, dtype=np.float64) - centre) / scale
        T = rows_times(Z, components.T)
        q = rows_times(Z * Z, np.ones((Z.shape[1], 1)))[:, 0] - rows_times(T * T, np.ones((T.shape[1], 1)))[:, 0]
        return np.hstack([T, np.log1p(np.maximum(q, 0.0))[:, None]])

    def _uniform(self, X: Array) -> Array:
        """Each feature through its training quantiles: normal rows spread evenly over [0, 1],
        values beyond the training range continue linearly outside it (up to [-1, 2]), so
        heavy-tailed features do not crowd the normal mass into one corner of the box."""
        q = cast(Array, self.quantiles_)  # set by fit(); score() checks that it ran
        X = np.asarray(X, dtype=np.float64)
        levels = np.linspace(0.0, 1.0, len(q))
        lo, hi = q[0], q[-1]
        span = np.maximum(hi - lo, np.maximum(0.01 * np.abs(q).mean(axis=0), 1e-6))
        U = np.empty_like(X)
        for j in range(X.shape[1]):
            U[:, j] = np.interp(X[:, j], q[:, j], levels)
        U = np.where(hi < X, 1.0 + (X - hi) / span, U)
        U = np.where(lo > X, -(lo - X) / span, U)
        return np.clip(U, -1.0, 2.0)

    def score(self, X: Array) -> Array:
        if self.model_ is None:
            msg = "detector is not fitted"
            raise RuntimeError(msg)
        score_one = self.model_.score_one
        U = self._uniform(self._project(X))
        return np.fromiter((score_one(dict(enumerate(r))) for r in U.tolist()), dtype=np.float64, count=len(U))

    def calibrate(self, X: Array, quantile: float) -> float:
        return quantile_threshold(self.score(X), quantile)


class EnsembleDetector:
    """The mean of several detectors' scores, each divided by its own calibrated threshold.

    A member at its threshold contributes 1, so the ensemble score reads "how many
    thresholds over, on average"; its own threshold is calibrated on the held-out rows
    like any other detector's.

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> det = EnsembleDetector([PCADetector(), IsolationForestDetector(n_estimators=20)])
    >>> det.fit(rng.normal(size=(300, 3)))
    >>> t = det.calibrate(rng.normal(size=(100, 3)), 0.99)
    >>> bool(det.score(np.array([[9.0, 9.0, 9.0]]))[0] > t)
    True
    """

    name = "ensemble"

    def __init__(self, members: list[Any]) -> None:
        if not members:
            msg = "an ensemble needs at least one member"
            raise ConfigError(msg)
        self.members = members
        self.member_thresholds_ = np.ones(len(members))

    def fit(self, X: Array) -> None:
        for m in self.members:
            m.fit(X)

    def _normalised(self, X: Array) -> Array:
        return np.vstack([m.score(X) / t for m, t in zip(self.members, self.member_thresholds_, strict=True)])

    def score(self, X: Array) -> Array:
        return np.asarray(self._normalised(X).mean(axis=0))

    def calibrate(self, X: Array, quantile: float) -> float:
        self.member_thresholds_ = np.array([max(m.calibrate(X, quantile), 1e-12) for m in self.members])
        return quantile_threshold(self.score(X), quantile)


class ColumnsDetector:
    """A detector fitted on some feature columns only (the others are still computed and
    still explain anomalies).

    `itap train` uses it when the training windows are few for the number of features
    (a short recording: 400 readings give about 90 windows for 82 features): the detector
    then sees the per-signal level, spread and dropout count, which a few windows can
    estimate, instead of every statistic.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> det = ColumnsDetector(PCADetector(), [0, 2])
    >>> det.fit(rng.normal(size=(200, 4)))
    >>> t = det.calibrate(rng.normal(size=(100, 4)), 0.99)
    >>> s = det.score(np.array([[0.0, 50.0, 0.0, 50.0], [8.0, 0.0, 0.0, 0.0]]))
    >>> bool(s[0] < t < s[1]), det.name
    (True, 'pca')
    """

    def __init__(self, inner: Any, columns: list[int]) -> None:
        if not columns:
            msg = "a column subset needs at least one column"
            raise ConfigError(msg)
        self.inner = inner
        self.columns = np.asarray(columns, dtype=np.intp)

    @property
    def name(self) -> str:
        return str(self.inner.name)

    def fit(self, X: Array) -> None:
        self.inner.fit(np.asarray(X, dtype=np.float64)[:, self.columns])

    def score(self, X: Array) -> Array:
        return np.asarray(self.inner.score(np.asarray(X, dtype=np.float64)[:, self.columns]))

    def calibrate(self, X: Array, quantile: float) -> float:
        return float(self.inner.calibrate(np.asarray(X, dtype=np.float64)[:, self.columns], quantile))


def level_standard_errors(segments: list[Array], window: int) -> Array:
    """Standard error of a ``window``-reading mean, per signal, from normal readings.

    Readings of industrial signals are autocorrelated: a window mean varies more than
    ``std / sqrt(window)``. Under an AR(1) model with lag-1 autocorrelation ``phi`` the
    variance of the mean is ``std² (1 + phi) / ((1 - phi) window)``; ``phi`` is pooled
    over ``segments`` (one array of readings ``(n, signals)`` per device, in time order),
    clipped to [0, 0.95], and the result floored like `robust_scale`.

    A quantised signal (a pressure transmitter that reports in steps of 0.33 bar) can sit
    on one step for most of a short recording: its sample variance then says nothing about
    the noise the quantisation hides, and one reading a step off later would look like a
    huge deviation. Its variance is therefore at least that of the rounding,
    ``step² / 12``, with ``step`` the smallest difference between two of its readings.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> white = rng.normal(size=(4000, 1))
    >>> round(float(level_standard_errors([white], 16)[0]), 2)  # 1 / sqrt(16)
    0.25
    >>> steps = np.zeros((400, 1))
    >>> steps[[100, 300]] = 0.33  # two readings one step up in 400
    >>> round(float(level_standard_errors([steps], 16)[0]), 4)  # sqrt(0.33² / 12 / 16)
    0.0238
    """
    rows = [np.asarray(x, dtype=np.float64) for x in segments if len(x) > 1]
    if not rows:
        msg = "need at least two readings of one device to estimate the noise of its signals"
        raise ValueError(msg)
    d = rows[0].shape[1]
    centred = [x - np.nanmean(x, axis=0) for x in rows]
    var = np.nanmean(np.concatenate([c * c for c in centred]), axis=0)
    lag = np.nanmean(np.concatenate([c[1:] * c[:-1] for c in centred]), axis=0)
    var = np.nan_to_num(var, nan=0.0)
    phi = np.clip(np.nan_to_num(lag / np.where(var > 0, var, 1.0), nan=0.0), 0.0, 0.95)
    var = np.maximum(var, reading_steps(rows) ** 2 / 12.0)
    se = np.sqrt(var * (1 + phi) / ((1 - phi) * window))
    magnitude = np.nan_to_num(np.nanmean(np.abs(np.concatenate(rows)), axis=0), nan=0.0)
    return np.maximum(se, np.maximum(0.01 * magnitude / np.sqrt(window), 1e-6)).reshape(d)


def window_mean_spread(segments: list[Array], window: int) -> Array:
    """Per signal, the standard deviation of ``window``-reading means across the training
    readings (non-overlapping windows, each segment centred on its own mean): how far the
    level of a window wanders in normal operation, beyond the noise inside one window.
    0 where fewer than 4 windows of a signal exist.

    An AR(1) model of the readings (`level_standard_errors`) sees only how each reading
    follows the one before; a process that wanders slowly (a loop's flow following its
    demand over minutes) moves window means much further than that predicts.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> slow = np.repeat(rng.normal(size=50), 32)[:, None] + 0.1 * rng.normal(size=(1600, 1))
    >>> round(float(window_mean_spread([slow], 32)[0]), 1)  # each window sits at its own level
    1.0
    """
    means = []
    for x in segments:
        x = np.asarray(x, dtype=np.float64)
        k = len(x) // window
        if k < 1:
            continue
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m = np.nanmean(x[: k * window].reshape(k, window, -1), axis=1)
            means.append(m - np.nanmean(m, axis=0))
    if not means:
        return np.zeros(np.asarray(segments[0]).shape[1]) if segments else np.zeros(0)
    rows = np.concatenate(means)
    n = np.sum(~np.isnan(rows), axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.sqrt(np.nansum(rows * rows, axis=0) / np.maximum(n - len(means), 1))
    return np.where(n >= 4, np.nan_to_num(sd, nan=0.0), 0.0)


def log_variance_spread(segments: list[Array], window: int) -> Array:
    """Per signal, the standard deviation of the log of a ``window``-reading variance expected
    from the readings' own noise: ``(2 + excess kurtosis) (1 + phi²) / ((1 - phi²) window)``
    under an AR(1) model (``phi`` and the kurtosis pooled over ``segments`` like
    `level_standard_errors`). A floor for the spread test: a few hundred readings give few
    windows to measure how much their variance varies.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> round(float(log_variance_spread([rng.normal(size=(4000, 1))], 32)[0]), 2)  # sqrt(2 / 32)
    0.25
    """
    rows = [np.asarray(x, dtype=np.float64) for x in segments if len(x) > 1]
    if not rows:
        msg = "need at least two readings of one device to estimate the noise of its signals"
        raise ValueError(msg)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # each non-overlapping window centred on its own mean: slow wander of the level (which a
        # window's variance does not see) would pass for autocorrelated noise
        centred = []
        for x in rows:
            k = max(1, len(x) // window)
            w = x[: k * window] if len(x) >= window else x
            w = w.reshape(k, -1, x.shape[1])
            centred.extend(list(w - np.nanmean(w, axis=1, keepdims=True)))
        var = np.nanmean(np.concatenate([c * c for c in centred]), axis=0)
        lag = np.nanmean(np.concatenate([c[1:] * c[:-1] for c in centred]), axis=0)
        kurt = np.nanmean(np.concatenate([c**4 for c in centred]), axis=0) / (var * var) - 3.0
        phi = np.clip(np.nan_to_num(lag / var, nan=0.0), 0.0, 0.95)
    kurt = np.clip(np.nan_to_num(kurt, nan=0.0), 0.0, 6.0)
    return np.asarray(np.sqrt((2.0 + kurt) * (1 + phi**2) / ((1 - phi**2) * window)), dtype=np.float64)


def reading_steps(segments: list[Array]) -> Array:
    """Per signal, the smallest positive difference between two of its readings (0 for a
    signal with fewer than two distinct values): its resolution when it is quantised.

    Examples
    --------
    >>> reading_steps([np.array([[0.05, 1.0, 7.0], [0.38, 1.5, 7.0], [0.05, 1.25, 7.0]])]).tolist()
    [0.33, 0.25, 0.0]
    """
    rows = np.concatenate([np.asarray(x, dtype=np.float64) for x in segments])
    out = np.zeros(rows.shape[1])
    for j in range(rows.shape[1]):
        values = np.unique(rows[:, j][np.isfinite(rows[:, j])])
        if len(values) > 1:
            out[j] = float(np.round(np.diff(values).min(), 12))
    return out


def constant_signals(segments: list[Array]) -> npt.NDArray[np.bool_]:
    """Per signal, whether it never changed in ``segments`` (or had no reading at all):
    such a signal has no measurable noise, so no deviation of it can be judged against it.

    Examples
    --------
    >>> constant_signals([np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([[1.5, np.nan]])]).tolist()
    [False, True]
    """
    rows = np.concatenate([np.asarray(x, dtype=np.float64) for x in segments])
    present = ~np.isnan(rows)
    lo = np.where(present, rows, np.inf).min(axis=0)
    hi = np.where(present, rows, -np.inf).max(axis=0)
    return ~(hi > lo)


def level_correlation(segments: list[Array], shrink: float = 0.2) -> Array:
    """Correlation of the signals' readings (pooled over ``segments``, each centred on its
    own mean), shrunk ``shrink`` of the way to the identity so that a few hundred readings
    give a well-conditioned matrix. Signals that never varied are uncorrelated.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> a = rng.normal(size=2000)
    >>> r = level_correlation([np.column_stack([a, a + 0.1 * rng.normal(size=2000), np.zeros(2000)])], shrink=0.0)
    >>> np.round(r, 2).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    rows = np.concatenate([np.asarray(x, dtype=np.float64) - np.nanmean(np.asarray(x, dtype=np.float64), axis=0)
                           for x in segments if len(x) > 1])
    rows = rows[~np.isnan(rows).any(axis=1)]
    d = rows.shape[1]
    if len(rows) < d + 2:
        return np.eye(d)
    sd = rows.std(axis=0)
    live = sd > 0
    r = np.eye(d)
    if live.sum() > 1:
        z = rows[:, live] / sd[live]
        r[np.ix_(live, live)] = (z.T @ z) / len(z)
    np.fill_diagonal(r, 1.0)
    return (1.0 - shrink) * r + shrink * np.eye(d)


def spread_quantile(p: float, signals: int, rise: bool = False) -> float:
    """The ``p`` quantile of a sum of ``signals`` squared standard normals, each kept only
    when negative (``rise``: all kept, the chi-square): the one-sided spread test's limit.

    Examples
    --------
    >>> round(spread_quantile(0.95, 1), 3)  # P(z < 0 and z² > x) = 0.05: z < -1.645
    2.706
    >>> round(spread_quantile(0.95, 2, rise=True), 3)  # chi-square, two degrees of freedom
    5.991
    """
    from scipy.optimize import brentq
    from scipy.stats import binom, chi2

    if rise:
        return float(chi2.ppf(p, signals))
    weights = binom.pmf(np.arange(1, signals + 1), signals, 0.5)

    def tail(x: float) -> float:
        return float(np.sum(weights * chi2.sf(x, np.arange(1, signals + 1)))) - (1.0 - p)

    return float(brentq(tail, 1e-9, float(chi2.ppf(p, signals)) + 10.0))


def _nanmean(rows: list[Array]) -> Array:
    """Mean of same-shape rows ignoring NaN; NaN (quietly) where every row is NaN."""
    stack = np.stack(rows)
    present = ~np.isnan(stack)
    n = present.sum(axis=0)
    total = np.where(present, stack, 0.0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


@dataclass(frozen=True)
class BaselinePolicy:
    """When the mean-shift chart takes a deviation that has stopped changing as a device's new
    baseline (a ``baseline_shift`` event), instead of alarming on it for ever.

    A deviation is *settled* when every window of a span (all of them inside the alarm)
    scores under the chart's limit against their common mean, and none of them is out on
    spread. Its size is counted in training standard deviations: per signal, the settled
    level's distance from the level the alarm is judged against, divided by the std of
    that signal's training readings; the largest over the signals counts.

    * **Settled after an event**: the readings came back at least half-way from the
      alarm's largest deviation, or every signal but the drifting ones (temperatures) is
      back within the chart's limit (the fault ended; the motor stays a little warmer),
      and they stayed settled for ``after_s``: the new baseline when no signal moved more than
      ``max_shift`` training std, or a drifting signal (a temperature, judged against its
      recent level because it moves anyway) ``max_settled``.
    * **A step that never came back**, settled for ``hold_s``: the new baseline when no
      signal moved more than ``max_shift`` training std (not an emergency for ever, but
      an hour of alarm first).

    Anything larger (an overheat that plateaus far out; a value beyond a signal's physical
    range is refused at intake and never gets here) stays alarmed until an operator accepts
    it (`MeanShiftDetector.rebaseline`).
    """

    after_s: float = 300.0
    hold_s: float = 3600.0
    max_shift: float = 3.0
    max_settled: float = 20.0

    def __post_init__(self) -> None:
        if not (0 < self.after_s <= self.hold_s) or not (self.max_shift > 0 and self.max_settled > 0):
            msg = ("baseline policy needs 0 < rebaseline_after <= rebaseline_hold and positive rebaseline_max_shift "
                   f"and rebaseline_max_settled, got {self.after_s}, {self.hold_s}, {self.max_shift}, "
                   f"{self.max_settled}")
            raise ConfigError(msg)


@dataclass(frozen=True)
class BaselineShift:
    """A device's chart baseline moved: ``how`` is ``settled`` (came back part-way and
    stopped changing), ``held`` (a small step that persisted ``hold_s``) or ``operator``.
    ``index`` is the window (row of the scored batch) it happened at, -1 for an operator's."""

    index: int
    device_id: str
    how: str
    columns: tuple[int, ...]  # the chart's feature columns (window means), in order
    before: tuple[float, ...]  # the level the alarm was judged against
    after: tuple[float, ...]  # the new baseline
    shift_sd: tuple[float, ...]  # (after - before) in training std; NaN where unknown
    settled_s: float = 0.0  # how long it had not changed


@dataclass
class _Levels:
    """One device's recent window means (drifting signals) and the chart's own alarm state."""

    means: deque[tuple[Array, bool]]  # (means of the drifting signals, usable as their level)
    over: int = 0  # bit mask of the last ``alarm_n`` windows over the limit
    alarm: bool = False
    held: Array | None = None  # the level held while in alarm
    good: Array | None = None  # the latest level made of windows outside an alarm
    spreads: deque[Array] | None = None  # recent windows' log variances (the spread test)
    base: Array | None = None  # this device's own baseline of every chart signal (after a baseline shift)
    spread_base: Array | None = None  # its own spread centre (after an operator's rebaseline)
    last: deque[Array] | None = None  # the latest windows' levels (what an operator's rebaseline takes)
    reference: Array | None = None  # the level the current alarm is judged against (None: not known)
    peak: float = 0.0  # the largest level score of the current alarm
    episode: deque[tuple[float, Array, bool]] | None = None  # (time, levels, out on spread) in the alarm
    episode_start: float = 0.0


class MeanShiftDetector:
    """A multivariate Shewhart chart on the window means, for short recordings.

    A few hundred readings give too few windows to learn the shape of normal operation,
    but enough to know each signal's level, noise and how the signals move together. With
    ``z = (window mean - level) / standard error`` per signal (standard error from
    `level_standard_errors`, autocorrelation included) and ``R`` the signals' correlation
    (`level_correlation`; the identity when not given), the score is Hotelling's
    ``sqrt(z' R⁻¹ z / signals)``: a load swing that moves flow, pressure and current
    together counts less than the same deviations breaking that pattern. Under normal
    operation ``signals * score²`` follows a chi-square distribution with one degree of
    freedom per signal. The limit comes from that distribution, not from a
    handful of held-out windows: the chi-square quantile at a tail ten times thinner than
    the configured quantile's (the level itself is estimated from the same few hundred
    readings). A signal that reported nothing in a whole window (``missing_columns``) counts
    as at its level there, and stays out of any recent level.

    **Drifting signals** (``recent``; by default the Temperature family): a motor and its
    coolant keep warming long after a short recording ends, so their level is the mean of
    the device's ``back`` non-overlapping windows just before the one scored (the readings
    ``window`` to ``(back + 1) * window`` ago), not the training level, and their standard
    error adds that level's own (``recent_errors``: the error of the difference). Windows scored while the chart is in
    alarm are not part of that level, and while in alarm (``alarm_k`` of the last
    ``alarm_n`` windows over the limit, until one is under it) the level before the alarm
    is held: a fault does not become the new normal, and a thermal step still stands out.
    A device with no history yet starts from the level the training readings ended at
    (`fit_start_level`). An alarm raised before the device has any history holds nothing: the level then
    follows the windows as they come, so a warm-up already under way at the start ends it.
    That needs each device's windows in order: `score_sequence`, which the stream and the
    batch path both call. `score` has no history: every signal against its training level.

    **Spread** (``std_columns``; charts trained before have none): per signal, the log of the
    readings' variance about each window's trend, averaged over the window scored and the
    ``spread_back`` non-overlapping ones before it, against its training mean, in units of its
    training spread (at least `log_variance_spread`, plus the error of that mean). Only a drop
    counts (a rise is normal on a real pump: its accelerometer noise grows 1.7x); the squared
    drops summed over signals get their own limit (`spread_quantile`, the same tail), and the
    score is the larger of the level score and this one rescaled so both limits coincide.

    Examples
    --------
    >>> det = MeanShiftDetector([0, 1], np.array([0.5, 2.0]))
    >>> det.fit(np.array([[10.0, 100.0, 7.0], [10.0, 100.0, 9.0]]))
    >>> det.score(np.array([[10.0, 100.0, 0.0], [11.0, 100.0, 0.0], [10.0, np.nan, 0.0]])).tolist()
    [0.0, 1.4142135623730951, 0.0]
    >>> tied = MeanShiftDetector([0, 1], np.array([1.0, 1.0]), np.array([[1.0, 0.9], [0.9, 1.0]]))
    >>> tied.fit(np.zeros((1, 2)))
    >>> np.round(tied.score(np.array([[2.0, 2.0], [2.0, -2.0]])), 2).tolist()  # with the pattern, against it
    [1.45, 6.32]
    >>> round(det.calibrate(np.zeros((1, 3)), 0.999), 3)  # sqrt(chi2(0.9999, 2) / 2)
    3.035

    A drifting signal against its recent level: one window apart (``spacing=1``), the
    level is the mean of the two windows before.

    >>> warm = MeanShiftDetector([0], np.array([1.0]), recent=[True], recent_errors=np.array([np.sqrt(2)]),
    ...                          spacing=1, back=2)
    >>> warm.fit(np.array([[50.0]]))
    >>> warm.calibrate(np.zeros((1, 1)), 0.999) > 0
    True
    >>> X = np.array([[60.0], [61.0], [62.0], [70.0]])  # warmed up by 10, creeping, then a step
    >>> np.round(warm.score_sequence(X, ["rig"] * 4, {}), 2).tolist()  # no history yet: the training level
    [7.07, 0.71, 0.71, 6.01]

    (The first window was over the limit, so it is no part of the third one's level.)
    """

    name = "meanshift"

    def __init__(
        self,
        columns: list[int],
        standard_errors: Array,
        correlation: Array | None = None,
        *,
        recent: Array | list[bool] | None = None,
        recent_errors: Array | None = None,
        spacing: int = 8,
        back: int = 4,
        alarm_k: int = 3,
        alarm_n: int = 4,
        missing_columns: list[int] | None = None,
        window: int | None = None,
        std_columns: list[int] | None = None,
        variance_floors: Array | None = None,
        spread_floors: Array | None = None,
        slope_columns: list[int] | None = None,
        spread_back: int = 4,
        spread_rise: bool = False,
        level_scale: Array | None = None,
    ) -> None:
        self.columns = np.asarray(columns, dtype=np.intp)
        self.se = np.asarray(standard_errors, dtype=np.float64)
        d = len(self.columns)
        if len(self.se) != d or not d:
            msg = "the mean-shift chart needs one standard error per level column"
            raise ConfigError(msg)
        corr = np.eye(d) if correlation is None else np.asarray(correlation, dtype=np.float64)
        if corr.shape != (d, d):
            msg = "the mean-shift chart's correlation matrix must be signals x signals"
            raise ConfigError(msg)
        self.centre = np.zeros(d)
        self.recent = np.zeros(d, dtype=bool) if recent is None else np.asarray(recent, dtype=bool)
        if len(self.recent) != d:
            msg = "the mean-shift chart needs one drifting flag per level column"
            raise ConfigError(msg)
        if self.recent.any():
            # a drifting signal is judged against its recent level, the others against the
            # training level: their correlation in training (mostly a warm-up they shared)
            # does not hold between those two kinds of deviation. Measured on a real pump
            # recording: kept, it turns the accelerometers' normal wander into alarms on 78 %
            # of the next 1.6 hours; without it, 0.8 %
            corr = corr.copy()
            corr[np.ix_(self.recent, ~self.recent)] = 0.0
            corr[np.ix_(~self.recent, self.recent)] = 0.0
        self.precision = np.linalg.inv(corr)
        if self.recent.any():
            if recent_errors is None or len(recent_errors) != d:
                msg = (
                    "a chart with drifting signals needs the standard error of a window mean "
                    "against their recent level"
                )
                raise ConfigError(msg)
            self.se = np.where(self.recent, np.asarray(recent_errors, dtype=np.float64), self.se)
        if spacing < 1 or back < 1 or not 1 <= alarm_k <= alarm_n:
            msg = "the mean-shift chart needs spacing >= 1, back >= 1 and 1 <= alarm_k <= alarm_n"
            raise ConfigError(msg)
        self.spacing, self.back, self.alarm_k, self.alarm_n = int(spacing), int(back), int(alarm_k), int(alarm_n)
        self.limit: float | None = None
        #: per level column, the feature counting its dropouts in the window (of ``window``)
        self.missing_columns = None if missing_columns is None else np.asarray(missing_columns, dtype=np.intp)
        self.window = window
        if self.missing_columns is not None and len(self.missing_columns) != d:
            msg = "the mean-shift chart needs one dropout column per level column"
            raise ConfigError(msg)
        #: the drifting signals' level for a device with no history yet: where training ended
        self.start_level: Array | None = None
        #: the spread test: per level column, its window std feature and the smallest
        #: variance a reading can show (quantisation); None: no spread test (older charts)
        self.std_columns = None if std_columns is None else np.asarray(std_columns, dtype=np.intp)
        if self.std_columns is not None and len(self.std_columns) != d:
            msg = "the mean-shift chart needs one std column per level column"
            raise ConfigError(msg)
        self.variance_floors = (np.zeros(d) if variance_floors is None
                                else np.asarray(variance_floors, dtype=np.float64))
        if spread_back < 0:
            msg = "the mean-shift chart needs spread_back >= 0"
            raise ConfigError(msg)
        self.spread_back = int(spread_back)
        self.slope_columns = None if slope_columns is None else np.asarray(slope_columns, dtype=np.intp)
        self.spread_floors = None if spread_floors is None else np.asarray(spread_floors, dtype=np.float64)
        self.spread_rise = bool(spread_rise)
        self.spread_centre: Array | None = None  # learnt: mean log window variance per signal
        self.spread_sd: Array | None = None  # learnt: its standard deviation (0: left out)
        self.spread_limit: float | None = None
        self.spread_windows = 1.0  # learnt: the training windows behind spread_centre (non-overlapping)
        #: per signal, the std of its training readings: the unit of a baseline shift's size
        #: (`BaselinePolicy.max_shift`); None (charts trained before): no automatic baseline shift
        self.level_scale = None if level_scale is None else np.asarray(level_scale, dtype=np.float64)
        if self.level_scale is not None and len(self.level_scale) != d:
            msg = "the mean-shift chart needs one training std per level column"
            raise ConfigError(msg)

    def fit(self, X: Array) -> None:
        levels = np.asarray(X, dtype=np.float64)[:, self.columns]
        with np.errstate(invalid="ignore"):
            self.centre = np.nan_to_num(np.nanmean(levels, axis=0), nan=0.0)
        if self.std_columns is not None:
            lv = self._log_variances(X)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self.spread_centre = np.nan_to_num(np.nanmean(lv, axis=0), nan=0.0)
                sd = np.nan_to_num(np.nanstd(lv, axis=0), nan=0.0)
            # a signal whose window variance never moved (stuck on its quantisation floor) says nothing
            floor = getattr(self, "spread_floors", None)
            self.spread_sd = np.where(sd > 1e-6, sd if floor is None else np.maximum(sd, floor), 0.0)
            # the training mean's own error: its windows overlap, ``spacing`` of them per window length
            self.spread_windows = max(1.0, len(lv) / self.spacing)

    def fit_start_level(self, means: list[Array]) -> None:
        """The drifting signals' level where the training readings ended: per device (one
        array of window means per device, in time order), the mean of its last ``back``
        non-overlapping windows; averaged over devices."""
        recent = self.recent
        ends = []
        for m in means:
            m = np.asarray(m, dtype=np.float64)[:, recent]
            if len(m):
                ends.append(_nanmean(list(m[::-1][:: self.spacing][: self.back])))
        if ends:
            level = _nanmean(ends)
            self.start_level = np.where(np.isnan(level), self.centre[recent], level)

    def _levels(self, X: Array) -> Array:
        """The window means of the chart's signals; NaN where a signal reported nothing in the
        whole window (the features fill that mean with 0, which is no level)."""
        X = np.asarray(X, dtype=np.float64)
        levels = X[:, self.columns].copy()
        missing, window = getattr(self, "missing_columns", None), getattr(self, "window", None)
        if missing is not None and window:
            levels[X[:, missing] >= window] = np.nan
        return levels

    def _log_variances(self, X: Array) -> Array:
        """Per window and signal, the log of the readings' variance in the window (a window with
        dropouts corrected for the filled-in readings); NaN where the signal reported nothing."""
        X = np.asarray(X, dtype=np.float64)
        assert self.std_columns is not None
        var = X[:, self.std_columns] ** 2
        missing, window = getattr(self, "missing_columns", None), getattr(self, "window", None)
        slopes = getattr(self, "slope_columns", None)
        if slopes is not None and window:  # about the window's own trend: a warm-up is no noise
            var = np.maximum(var - X[:, slopes] ** 2 * (window * window - 1) / 12.0, 0.0)
        if missing is not None and window:
            present = window - X[:, missing]
            var = np.where(present > 1, var * window / np.maximum(present - 1, 1), np.nan)
        return np.log(np.maximum(var, np.maximum(self.variance_floors, 1e-300)))

    def _spread_scores(self, lv: Array, k: Array, centre: Array | None = None) -> Array:
        """The spread score of mean log variances ``lv`` over ``k`` non-overlapping windows,
        in units of the level chart's limit (one limit for both); against ``centre`` (a
        device's own, after an operator's rebaseline) or the training one."""
        assert self.spread_centre is not None and self.spread_sd is not None
        live = self.spread_sd > 0
        if not live.any() or self.limit is None or not self.spread_limit:
            return np.zeros(len(lv))
        err = np.sqrt(1.0 / k[:, None] + 1.0 / self.spread_windows)
        c = self.spread_centre if centre is None else centre
        u = (lv[:, live] - c[live]) / (self.spread_sd[live] * err)
        u = np.nan_to_num(u, nan=0.0)
        if not self.spread_rise:
            u = np.minimum(u, 0.0)
        s = np.sqrt(np.einsum("ij,ij->i", u, u) / live.sum())
        return s * (self.limit / self.spread_limit)

    def _scores(self, levels: Array, centre: Array) -> Array:
        z = np.nan_to_num((levels - centre) / self.se, nan=0.0)  # a dropped-out signal counts as at its level
        t2 = np.einsum("ij,jk,ik->i", z, self.precision, z)
        return np.sqrt(np.maximum(t2, 0.0) / len(self.columns))

    def score(self, X: Array) -> Array:
        out = self._scores(self._levels(X), self.centre)
        if getattr(self, "std_columns", None) is not None and self.spread_centre is not None:
            out = np.maximum(out, self._spread_scores(self._log_variances(X), np.ones(len(out))))
        return out

    def score_sequence(
        self,
        X: Array,
        device_ids: Sequence[str],
        state: dict[str, Any],
        *,
        times: Sequence[float] | Array | None = None,
        policy: BaselinePolicy | None = None,
        events: list[BaselineShift] | None = None,
    ) -> Array:
        """Scores of windows given in event order per device, drifting signals against their
        recent level; ``state`` (a dict the caller owns) carries each device's history over.

        With ``times`` (each window's end, seconds) and a ``policy``, a deviation that has
        stopped changing becomes the device's new baseline as `BaselinePolicy` says; each
        such `BaselineShift` is appended to ``events``."""
        recent = getattr(self, "recent", None)
        spread = getattr(self, "std_columns", None) is not None and getattr(self, "spread_centre", None) is not None
        if recent is None or not (recent.any() or spread) or self.limit is None:
            return self.score(X)
        levels = self._levels(X)
        lvs = self._log_variances(X) if spread else None
        sb = getattr(self, "spread_back", 0)
        scale: Array | None = getattr(self, "level_scale", None)
        shifting = policy is not None and times is not None and scale is not None
        t_end = np.asarray(times, dtype=np.float64) if times is not None else None
        out = np.empty(len(levels))
        spacing, back, mask, k = self.spacing, self.back, (1 << self.alarm_n) - 1, self.alarm_k
        limit = self.limit
        for i, dev in enumerate(device_ids):
            st = state.get(dev)
            if st is None:
                st = state[dev] = _Levels(deque(maxlen=spacing * back))
            m = levels[i]
            if st.last is None:
                st.last = deque(maxlen=spacing * back)
            st.last.append(m)
            spread_score = 0.0
            if lvs is not None:
                # the spread over this window and the SPREAD_BACK non-overlapping ones before it
                if st.spreads is None:
                    st.spreads = deque(maxlen=max(spacing * sb, 1))
                rows = [lvs[i]] + [st.spreads[-spacing * j] for j in range(1, sb + 1) if len(st.spreads) >= spacing * j]
                mean_lv = _nanmean(rows)
                spread_score = float(self._spread_scores(mean_lv[None, :], np.array([float(len(rows))]),
                                                         getattr(st, "spread_base", None))[0])
                st.spreads.append(lvs[i])
            level, known = self._recent_level(st)
            centre = (self.centre if st.base is None else st.base).copy()
            centre[recent] = level
            level_score = float(self._scores(m[None, :], centre)[0])
            s = max(level_score, spread_score)
            out[i] = s
            over = s >= limit
            st.over = ((st.over << 1) | over) & mask
            if not st.alarm and st.over.bit_count() >= k:
                st.alarm, st.held = True, (level if known else None)
                st.reference, st.peak, st.episode = (centre if known else None), 0.0, None
            elif st.alarm and not over:
                st.alarm, st.held, st.reference, st.episode = False, None, None, None
            if st.alarm and shifting and st.reference is not None:
                assert t_end is not None and policy is not None and scale is not None
                shift = self._settled(st, float(t_end[i]), m, level_score, spread_score >= limit, policy, scale)
                if shift is not None:
                    new, how, settled_s = shift
                    ev = self._shift(st, dev, i, how, new, scale, settled_s)
                    if events is not None:
                        events.append(ev)
                    out[i] = max(float(self._scores(m[None, :], new)[0]), spread_score)
                    continue
            # a window joins the recent level only when it was itself under the limit and no
            # alarm is on: a fault's first windows (before k of n have fired) stay out of it
            st.means.append((m[recent], not (st.alarm or over)))
        return out

    def _recent_level(self, st: _Levels) -> tuple[Array, bool]:
        """The drifting signals' level for the next window of a device, and whether it comes
        from windows scored outside an alarm."""
        recent = self.recent
        if st.alarm and st.held is not None:
            return st.held, True
        earlier = [st.means[-self.spacing * j] for j in range(1, self.back + 1) if len(st.means) >= self.spacing * j]
        past = [mj for mj, usable in earlier if usable]
        known = bool(past)
        start: Array | None = getattr(self, "start_level", None)
        level = start if start is not None else self.centre[recent]
        if not past and st.good is not None:  # just out of a long alarm: the last level outside one
            return st.good, True
        # no window outside an alarm yet (one raised before any history): follow them all
        past = past or [mj for mj, _ in earlier]
        if past:
            mean = _nanmean(past)
            level = np.where(np.isnan(mean), level, mean)
        if known:
            st.good = level
        return level, known

    def _settled(
        self, st: _Levels, t: float, m: Array, level_score: float, out_on_spread: bool, policy: BaselinePolicy,
        scale: Array,
    ) -> tuple[Array, str, float] | None:
        """The new baseline when the device's alarm has settled as ``policy`` says, else None."""
        assert st.reference is not None
        if st.episode is None:
            st.episode, st.episode_start = deque(), t
        st.episode.append((t, m, out_on_spread))
        st.peak = max(st.peak, level_score)
        while st.episode and st.episode[0][0] < t - policy.hold_s:
            st.episode.popleft()
        assert self.limit is not None
        for how, span in (("settled", policy.after_s), ("held", policy.hold_s)):
            if t - st.episode_start < span:
                return None
            rows = [(lv, spr) for ts, lv, spr in st.episode if ts >= t - span]
            if any(spr for _, spr in rows):
                return None
            stack = np.stack([lv for lv, _ in rows])
            mean = _nanmean(list(stack))
            candidate = np.where(np.isnan(mean), st.reference, mean)
            if float(self._scores(stack, candidate).max()) >= self.limit:
                continue  # still moving over this span (a longer one cannot be steadier)
            if how == "settled" and not self._event_over(candidate, st):
                continue  # never came back: only after hold_s
            with np.errstate(invalid="ignore", divide="ignore"):
                size = np.where(scale > 0, np.abs(candidate - st.reference) / scale, 0.0)
            bound = np.where(self.recent, policy.max_settled, policy.max_shift) if how == "settled" \
                else policy.max_shift
            if (np.nan_to_num(size) > bound).any():
                return None  # far out: an operator decides
            return candidate, how, span
        return None

    def _event_over(self, candidate: Array, st: _Levels) -> bool:
        """Whether the settled level ``candidate`` says the event behind the alarm is over: it
        came back at least half-way from the alarm's largest deviation, or only drifting
        signals (temperatures) are still off their level."""
        assert st.reference is not None and self.limit is not None
        if float(self._scores(candidate[None, :], st.reference)[0]) <= 0.5 * st.peak:
            return True
        others = np.where(self.recent, st.reference, candidate)
        return bool(self.recent.any()) and float(self._scores(others[None, :], st.reference)[0]) < self.limit

    def _shift(self, st: _Levels, dev: str, index: int, how: str, new: Array, scale: Array | None,
               settled_s: float) -> BaselineShift:
        """Make ``new`` the device's baseline, end its alarm, and describe the change."""
        recent = self.recent
        if st.reference is not None:
            before = st.reference
        else:
            before = (self.centre if st.base is None else st.base).copy()
            before[recent] = st.held if st.held is not None else (
                st.good if st.good is not None else self._recent_level(st)[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = (new - before) / scale if scale is not None else np.full(len(new), np.nan)
        st.base = new.copy()
        st.good = new[recent].copy()
        st.means.clear()
        st.alarm, st.held, st.reference, st.episode, st.over, st.peak = False, None, None, None, 0, 0.0
        return BaselineShift(index, dev, how, tuple(int(c) for c in self.columns), tuple(before.tolist()),
                             tuple(new.tolist()), tuple(np.where(np.isfinite(shift), shift, np.nan).tolist()),
                             settled_s)

    def rebaseline(self, state: dict[str, Any], device_id: str) -> BaselineShift | None:
        """An operator accepts a device's current state as its normal: the mean of its
        latest ``back`` non-overlapping windows becomes its baseline (level and spread), and
        any alarm the chart holds ends. None when the device has no scored window yet."""
        st = state.get(device_id)
        if st is None or not st.last:
            return None
        rows = [st.last[-1 - self.spacing * j] for j in range(self.back) if len(st.last) > self.spacing * j]
        mean = _nanmean(rows)
        current = (self.centre if st.base is None else st.base).copy()
        current[self.recent] = st.held if st.held is not None else self._recent_level(st)[0]
        new = np.where(np.isnan(mean), current, mean)
        if st.spreads and getattr(self, "spread_centre", None) is not None:
            sb = max(getattr(self, "spread_back", 0), 0)
            lv_rows = [st.spreads[-1 - self.spacing * j] for j in range(sb + 1) if len(st.spreads) > self.spacing * j]
            lv = _nanmean(lv_rows)
            base = self.spread_centre if st.spread_base is None else st.spread_base
            assert base is not None
            st.spread_base = np.where(np.isnan(lv), base, np.minimum(lv, base) if not self.spread_rise else lv)
        if st.reference is None:
            st.reference = current
        return self._shift(st, device_id, -1, "operator", new, getattr(self, "level_scale", None), 0.0)

    def calibrate(self, X: Array, quantile: float) -> float:
        from scipy.stats import chi2

        d = len(self.columns)
        tail = (1.0 - quantile) / 10.0
        self.limit = float(np.sqrt(chi2.ppf(1.0 - tail, d) / d))
        sd = getattr(self, "spread_sd", None)
        if getattr(self, "std_columns", None) is not None and sd is not None and (sd > 0).any():
            live = int((sd > 0).sum())
            self.spread_limit = float(np.sqrt(spread_quantile(1.0 - tail, live, self.spread_rise) / live))
        return self.limit


#: Detector names accepted in config (``detector:``) and by ``itap train --detector``.
DETECTORS = ("auto", "isolation_forest", "pca", "hst", "ensemble")
_ALIASES = {"iforest": "isolation_forest", "if": "isolation_forest", "half_space_trees": "hst",
            "pca_t2_spe": "pca", "t2": "pca"}


def canonical_name(name: str) -> str:
    """The detector's name as `DETECTORS` spells it; `ConfigError` for an unknown one.

    Examples
    --------
    >>> canonical_name("IForest"), canonical_name("half_space_trees")
    ('isolation_forest', 'hst')
    """
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DETECTORS:
        msg = f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}"
        raise ConfigError(msg)
    return key


def make_detector(name: str, *, seed: int = 0) -> Detector:
    """A fresh, unfitted detector by name.

    Examples
    --------
    >>> make_detector("pca").name, make_detector("iforest").name, make_detector("auto").name
    ('pca', 'isolation_forest', 'isolation_forest')
    >>> make_detector("svm")
    Traceback (most recent call last):
    ...
    itap_stream.errors.ConfigError: unknown detector 'svm'; choose one of auto, isolation_forest, pca, hst, ensemble
    """
    key = canonical_name(name)
    if key in ("isolation_forest", "auto"):  # `train_from_frame` decides what auto means for its data
        return IsolationForestDetector(seed=seed)
    if key == "pca":
        return PCADetector(seed=seed)
    if key == "hst":
        return HalfSpaceTreesDetector(seed=seed)
    return EnsembleDetector([IsolationForestDetector(seed=seed), PCADetector(seed=seed),
                             HalfSpaceTreesDetector(seed=seed)])
