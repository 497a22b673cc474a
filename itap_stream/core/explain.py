"""Explanations: why a window scored high, by feature and by sensor family.

Each feature's deviation is ``|x - mean| / std`` against the training statistics
(``std`` floored, the deviation capped at `Z_CAP` so one never-seen-before feature does
not make every other share 0). Deviations are turned into percentages that sum to 100,
then summed per family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Z_CAP", "Explanation", "explain"]

Z_CAP = 100.0
_STD_FLOOR = 1e-6


@dataclass(frozen=True)
class Explanation:
    """Family shares and top features of one window, percentages summing to 100."""

    families: dict[str, float]
    top_features: list[tuple[str, float]]

    @property
    def dominant_family(self) -> str:
        return max(self.families.items(), key=lambda kv: kv[1])[0]


def explain(
    X: npt.NDArray[np.float64],
    mean: npt.NDArray[np.float64],
    std: npt.NDArray[np.float64],
    feature_names: Sequence[str],
    feature_families: Sequence[str],
    *,
    top_k: int = 5,
) -> list[Explanation]:
    """Explain each row of ``X`` (one per anomalous window).

    Examples
    --------
    >>> names = ("v_mean", "v_std", "t_mean")
    >>> fams = ("Voltage", "Voltage", "Temperature")
    >>> e = explain(np.array([[3.0, 1.0, 0.0]]), np.zeros(3), np.ones(3), names, fams)[0]
    >>> e.families
    {'Voltage': 100.0, 'Temperature': 0.0}
    >>> e.top_features[0]
    ('v_mean', 75.0)
    """
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if len(X) == 0:
        return []
    z = np.minimum(np.abs(X - mean) / np.maximum(std, _STD_FLOOR), Z_CAP)
    total = z.sum(axis=1, keepdims=True)
    n_feat = z.shape[1]
    shares = np.divide(z * 100.0, total, out=np.full_like(z, 100.0 / n_feat), where=total > 0)
    families = list(dict.fromkeys(feature_families))
    fam_index = np.array([families.index(f) for f in feature_families])
    fam_shares = np.zeros((len(X), len(families)))
    np.add.at(fam_shares.T, fam_index, shares.T)
    k = min(top_k, n_feat)
    top = np.argsort(-shares, axis=1, kind="stable")[:, :k]
    out = []
    for i in range(len(X)):
        out.append(
            Explanation(
                families={f: round(float(v), 2) for f, v in zip(families, fam_shares[i], strict=True)},
                top_features=[(feature_names[j], round(float(shares[i, j]), 2)) for j in top[i]],
            )
        )
    return out
