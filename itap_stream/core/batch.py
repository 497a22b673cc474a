"""Whole-table windowing: every window of a recording at once, for train/score/evaluate.

It applies the stream's ordering rule (per device, a reading counts only when it is
later than every reading before it, in arrival order) and the stream's window
schedule, then calls the one `features.extract`. A test proves that its feature rows
equal those the live `Processor` produces reading by reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from itap_stream.core.features import extract

__all__ = ["BatchWindows", "batch_windows"]


@dataclass
class BatchWindows:
    """All windows of a table. Row indices refer to the input arrays."""

    device_ids: npt.NDArray[np.object_]
    start_ts: npt.NDArray[np.float64]
    end_ts: npt.NDArray[np.float64]
    end_row: npt.NDArray[np.int64]  # input row of the reading that closed the window
    last_state: npt.NDArray[np.int8]
    features: npt.NDArray[np.float64]
    any_label: npt.NDArray[np.bool_]  # some reading in the window carries a label
    any_maint: npt.NDArray[np.bool_]
    label: npt.NDArray[np.object_]  # label of the closing reading
    accepted: npt.NDArray[np.bool_]  # per input row: used for features
    duplicate: npt.NDArray[np.bool_]  # per input row: same ts as an earlier reading

    def __len__(self) -> int:
        return len(self.end_row)


def batch_windows(
    device_ids: npt.ArrayLike,
    ts: npt.ArrayLike,
    states: npt.ArrayLike,
    values: npt.ArrayLike,
    *,
    window: int,
    hop: int,
    labels: npt.ArrayLike | None = None,
    maint_code: int = 2,
    chunk: int = 65_536,
) -> BatchWindows:
    """Cut every window out of a table of readings (rows in arrival order).

    Examples
    --------
    >>> bw = batch_windows(["A"] * 5, [0, 1, 1, 2, 3], [0] * 5, [[1.0], [2.0], [9.0], [3.0], [4.0]],
    ...                    window=3, hop=1)
    >>> bw.end_row.tolist(), bw.duplicate.tolist()
    ([3, 4], [False, False, True, False, False])
    """
    dev = np.asarray(device_ids, dtype=object)
    ts_arr = np.asarray(ts, dtype=np.float64)
    st = np.asarray(states, dtype=np.int8)
    vals = np.asarray(values, dtype=np.float64)
    n = len(ts_arr)
    lab = np.full(n, None, dtype=object) if labels is None else np.asarray(labels, dtype=object)
    codes, _ = pd.factorize(dev)
    order = np.argsort(codes, kind="stable")  # grouped by device, arrival order kept
    c_s, ts_s = codes[order], ts_arr[order]
    prev_max = pd.Series(ts_s).groupby(c_s).cummax().groupby(c_s).shift(1).to_numpy(dtype=np.float64, na_value=-np.inf)
    acc_s = ts_s > prev_max
    dup_s = ts_s == prev_max
    accepted = np.zeros(n, dtype=bool)
    accepted[order] = acc_s
    duplicate = np.zeros(n, dtype=bool)
    duplicate[order] = dup_s

    rows = order[acc_s]  # accepted input rows, grouped by device, in time order
    c_a = codes[rows]
    pos = pd.Series(c_a).groupby(c_a).cumcount().to_numpy() + 1  # readings so far, per device
    is_end = (pos >= window) & ((pos - window) % hop == 0)
    ends = np.flatnonzero(is_end)  # positions in `rows`
    offsets = np.arange(-window + 1, 1)
    feats = []
    any_label = np.zeros(len(ends), dtype=bool)
    any_maint = np.zeros(len(ends), dtype=bool)
    has_label = np.array([x is not None and x == x for x in lab], dtype=bool) if n else np.zeros(0, bool)
    for lo in range(0, len(ends), chunk):
        idx = rows[ends[lo : lo + chunk, None] + offsets]  # (k, window) input rows
        feats.append(extract(vals[idx], st[idx]))
        any_label[lo : lo + chunk] = has_label[idx].any(axis=1)
        any_maint[lo : lo + chunk] = (st[idx] == maint_code).any(axis=1)
    n_feat = feats[0].shape[1] if feats else extract(np.zeros((0, window, vals.shape[1])), np.zeros((0, window))).shape[1]
    end_rows = rows[ends]
    start_rows = rows[ends - window + 1] if len(ends) else np.zeros(0, dtype=np.int64)
    return BatchWindows(
        device_ids=dev[end_rows],
        start_ts=ts_arr[start_rows],
        end_ts=ts_arr[end_rows],
        end_row=end_rows.astype(np.int64),
        last_state=st[end_rows],
        features=np.concatenate(feats) if feats else np.zeros((0, n_feat)),
        any_label=any_label,
        any_maint=any_maint,
        label=lab[end_rows],
        accepted=accepted,
        duplicate=duplicate,
    )
