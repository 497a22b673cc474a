"""Window features, one formula for batch and stream.

`extract` turns a stack of windows into feature rows, vectorised over windows: the
consumer calls it with the windows of every device whose hop completed in a
micro-batch, the batch commands with every window of a CSV at once. Nothing else in
the code base computes a feature.

Per signal (schema order): ``mean``, ``std`` (population), ``min``, ``max``,
``slope`` (least squares per reading), ``delta`` (last minus mean), ``zlast``
(z-score of the last value within the window), ``fft_energy`` (energy of the
mean-removed window, DC excluded, divided by the window length), ``fft_freq``
(dominant frequency in cycles per reading) and ``missing`` (dropouts in the window).
Per device: ``missing_streak`` (trailing readings with any dropout) and
``state_transitions`` (state changes inside the window).

Dropouts (NaN) are replaced by the mean of the signal's present values in that window
before the statistics are taken (0 when the whole window is missing), so a dropout
shows up in ``missing`` rather than as a fake level change.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import numpy.typing as npt

from itap_stream.core.schema import SensorSchema

__all__ = [
    "DATA_QUALITY_FAMILY",
    "DEVICE_FEATURES",
    "SIGNAL_STATS",
    "extract",
    "feature_families",
    "feature_names",
    "OPERATION_FAMILY",
    "window_ends",
]

SIGNAL_STATS: tuple[str, ...] = (
    "mean",
    "std",
    "min",
    "max",
    "slope",
    "delta",
    "zlast",
    "fft_energy",
    "fft_freq",
    "missing",
)
DEVICE_FEATURES: tuple[str, ...] = ("missing_streak", "state_transitions")
#: Family of the dropout features (``*_missing``, ``missing_streak``) in explanations:
#: a dead sensor is a data-quality problem, not a change of the quantity it measures.
DATA_QUALITY_FAMILY = "Data quality"
#: Family of ``state_transitions``.
OPERATION_FAMILY = "Operation"

_EPS = 1e-12


def feature_names(schema: SensorSchema) -> tuple[str, ...]:
    """Names of the feature columns `extract` returns, in order.

    Examples
    --------
    >>> from itap_stream.core.schema import SensorSchema
    >>> s = SensorSchema.from_dict({"signals": [{"name": "rpm", "family": "RPM"}]})
    >>> feature_names(s)[:3], feature_names(s)[-2:]
    (('rpm_mean', 'rpm_std', 'rpm_min'), ('missing_streak', 'state_transitions'))
    """
    return tuple(f"{n}_{stat}" for n in schema.names for stat in SIGNAL_STATS) + DEVICE_FEATURES


def feature_families(schema: SensorSchema) -> tuple[str, ...]:
    """The family each feature column is attributed to (same order as `feature_names`)."""
    per_signal = tuple(
        DATA_QUALITY_FAMILY if stat == "missing" else s.family for s in schema.signals for stat in SIGNAL_STATS
    )
    return per_signal + (DATA_QUALITY_FAMILY, OPERATION_FAMILY)


def window_ends(n_readings: int, window: int, hop: int) -> npt.NDArray[np.int64]:
    """0-based indices of the readings that close a window.

    The first window closes at the ``window``-th reading, then one every ``hop``.

    Examples
    --------
    >>> window_ends(10, 4, 2).tolist()
    [3, 5, 7, 9]
    >>> window_ends(3, 4, 2).tolist()
    []
    """
    if n_readings < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(window - 1, n_readings, hop, dtype=np.int64)


def extract(values: npt.NDArray[np.float64], states: npt.NDArray[np.integer]) -> npt.NDArray[np.float64]:
    """Feature rows for a stack of windows.

    Parameters
    ----------
    values
        Shape ``(n_windows, window, n_signals)``, oldest reading first; NaN = dropout.
    states
        Shape ``(n_windows, window)``, integer state codes.

    Returns
    -------
    Array of shape ``(n_windows, n_signals * len(SIGNAL_STATS) + len(DEVICE_FEATURES))``.

    Examples
    --------
    >>> v = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
    >>> row = extract(v, np.zeros((1, 4), dtype=np.int8))[0]
    >>> dict(zip(SIGNAL_STATS, row.round(3).tolist()))["slope"]
    1.0
    """
    values = np.asarray(values, dtype=np.float64)
    n, w, s = values.shape
    n_stats = len(SIGNAL_STATS)
    # (n, s, w): every statistic reduces along the contiguous axis, twice as fast as (n, w, s)
    v = np.ascontiguousarray(values.transpose(0, 2, 1))
    missing = np.isnan(v)
    n_missing = missing.sum(axis=2)
    if n_missing.any():
        n_present = w - n_missing
        sums = np.where(missing, 0.0, v).sum(axis=2)
        fill = np.divide(sums, n_present, out=np.zeros_like(sums), where=n_present > 0)
        x = np.where(missing, fill[:, :, None], v)
    else:
        x = v

    mean = x.mean(axis=2)
    centred = x - mean[:, :, None]
    std = np.sqrt(np.einsum("nsw,nsw->ns", centred, centred) / w)
    tc = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    denom = float(tc @ tc) if w > 1 else 1.0
    delta = x[:, :, -1] - mean
    out = np.empty((n, s * n_stats + len(DEVICE_FEATURES)))
    per = out[:, : s * n_stats].reshape(n, s, n_stats)
    per[:, :, 0] = mean
    per[:, :, 1] = std
    per[:, :, 2] = x.min(axis=2)
    per[:, :, 3] = x.max(axis=2)
    per[:, :, 4] = (x @ tc) / denom
    per[:, :, 5] = delta
    per[:, :, 6] = np.divide(delta, std, out=np.zeros_like(delta), where=std > _EPS)
    spec = np.fft.rfft(centred, axis=2)[:, :, 1:]  # drop DC
    if spec.shape[2]:
        power = spec.real * spec.real + spec.imag * spec.imag
        energy = power.sum(axis=2) / w
        per[:, :, 7] = energy
        per[:, :, 8] = np.where(energy > _EPS, (power.argmax(axis=2) + 1) / w, 0.0)
    else:
        per[:, :, 7] = 0.0
        per[:, :, 8] = 0.0
    per[:, :, 9] = n_missing

    any_missing = cast(npt.NDArray[np.bool_], missing.any(axis=1))  # (n, w); an array, whatever the stubs say
    out[:, -2] = np.cumprod(any_missing[:, ::-1], axis=1).sum(axis=1)
    st = np.asarray(states)
    out[:, -1] = (st[:, 1:] != st[:, :-1]).sum(axis=1) if w > 1 else 0.0
    return out
