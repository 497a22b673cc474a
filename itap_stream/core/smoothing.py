"""Causal alarm smoothing: a window is anomalous when k of its device's last n windows are.

One function serves stream and batch: it walks windows in order and keeps, per device,
a bit mask of the last ``n`` raw decisions in ``state`` (a dict the caller owns).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["smooth"]


def smooth(
    device_ids: Sequence[str],
    raw: npt.NDArray[np.bool_],
    state: dict[str, int],
    *,
    k: int = 2,
    n: int = 3,
) -> npt.NDArray[np.bool_]:
    """Apply k-of-n smoothing to raw window decisions (in event order).

    Examples
    --------
    >>> st = {}
    >>> smooth(["A"] * 5, np.array([1, 0, 1, 1, 0], dtype=bool), st, k=2, n=3).tolist()
    [False, False, True, True, True]
    >>> smooth(["A"], np.array([0], dtype=bool), st, k=2, n=3).tolist()
    [False]
    """
    if not 1 <= k <= n:
        msg = f"alarm smoothing needs 1 <= k <= n, got k={k}, n={n}"
        raise ValueError(msg)
    if k == 1:
        return np.asarray(raw, dtype=bool).copy()
    mask = (1 << n) - 1
    out = np.zeros(len(raw), dtype=bool)
    get = state.get
    for i, (dev, flag) in enumerate(zip(device_ids, raw.tolist(), strict=True)):
        bits = ((get(dev, 0) << 1) | flag) & mask
        state[dev] = bits
        out[i] = bits.bit_count() >= k
    return out
