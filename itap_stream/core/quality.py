"""Detection quality of scored windows against ground-truth labels (simulator or replay).

A window is *positive* when the reading that closed it carries a fault label. Every number
here is computed from arrays the batch path already has; nothing is fitted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["choose_threshold", "quality_report", "roc_auc", "threshold_sweep"]

DAY_S = 86_400.0


def roc_auc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half).

    Examples
    --------
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> roc_auc([1, 2], [1, 1]) is None
    True
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _prf(pred: npt.NDArray[np.bool_], y: npt.NDArray[np.bool_]) -> dict[str, float]:
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn
    }


def threshold_sweep(scores: npt.ArrayLike, positive: npt.ArrayLike, points: int = 25) -> list[dict[str, float]]:
    """Precision, recall and F1 of the raw (unsmoothed) decision ``score >= t`` for thresholds
    at evenly spaced quantiles of the scores."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if not len(s):
        return []
    qs = np.unique(np.quantile(s, np.linspace(0.5, 0.999, points)))
    return [{"threshold": round(float(t), 6), **_prf(s >= t, y)} for t in qs]


def quality_report(
    device_ids: Sequence[str],
    end_ts: npt.ArrayLike,
    labels: Sequence[str | None],
    scores: npt.ArrayLike,
    flags: npt.ArrayLike,
    threshold: float,
    alerts: Sequence[dict[str, Any]] = (),
    *,
    hop_s: float | None = None,
) -> dict[str, Any]:
    """Window-level quality: precision/recall/F1 of the smoothed flags, ROC AUC of the scores,
    recall per fault label, detection delay after each fault's onset, false alerts per
    healthy device-day, and a threshold sweep."""
    dev = np.asarray(device_ids, dtype=object)
    ts = np.asarray(end_ts, dtype=np.float64)
    lab = np.asarray([x if isinstance(x, str) and x else None for x in labels], dtype=object)
    y = lab != None  # noqa: E711 - elementwise
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(flags, dtype=bool)
    out: dict[str, Any] = {"threshold": threshold, "windows": int(len(s)), "positive_windows": int(y.sum())}
    out.update(_prf(f, y))
    out["roc_auc"] = roc_auc(s, y)
    out["recall_by_fault"] = {
        str(k): round(float(f[lab == k].mean()), 4) for k in sorted({x for x in lab.tolist() if x is not None})
    }
    # detection delay: per device and fault label, from the first labelled window to the first flag
    delays_w: list[int] = []
    delays_s: list[float] = []
    missed = 0
    frame = pd.DataFrame({"dev": dev, "ts": ts, "lab": lab, "flag": f}).sort_values(["dev", "ts"], kind="stable")
    for (_d, _l), g in frame[frame["lab"].notna()].groupby(["dev", "lab"], sort=True):
        onset = float(g["ts"].iloc[0])
        dev_rows = frame[(frame["dev"] == _d) & (frame["ts"] >= onset)]
        hit = np.flatnonzero(dev_rows["flag"].to_numpy())
        if len(hit):
            delays_w.append(int(hit[0]))
            delays_s.append(float(dev_rows["ts"].iloc[hit[0]] - onset))
        else:
            missed += 1
    out["detection_delay_windows_median"] = float(np.median(delays_w)) if delays_w else None
    out["detection_delay_s_median"] = float(np.median(delays_s)) if delays_s else None
    out["faults_detected"] = len(delays_w)
    out["faults_missed"] = missed
    # false alerts: firing alerts on devices that never carry a label
    healthy = sorted(set(dev[~pd.Series(dev).isin(set(dev[y])).to_numpy()].tolist())) if len(dev) else []
    span_days = 0.0
    for d in healthy:
        t = ts[dev == d]
        span_days += (float(t.max() - t.min()) + (hop_s or 0.0)) / DAY_S
    fired = Counter(a["device_id"] for a in alerts if a.get("status") == "firing")
    false_alerts = sum(fired[d] for d in healthy)
    out["healthy_devices"] = len(healthy)
    out["false_alerts_on_healthy_devices"] = false_alerts
    out["false_alerts_per_healthy_device_day"] = round(false_alerts / span_days, 4) if span_days > 0 else None
    drift = [a for a in alerts if a.get("rule") == "model_drift"]
    out["model_drift_events"] = len(drift)
    out["model_drift"] = [
        {"device_id": a["device_id"], "at": a.get("window_end"), "detail": a.get("root_cause", "")} for a in drift[:50]
    ]
    out["sweep"] = threshold_sweep(s, y)
    best = max(out["sweep"], key=lambda r: r["f1"], default=None)
    out["best_f1_threshold"] = best
    return out


def choose_threshold(
    scores: npt.ArrayLike,
    positive: npt.ArrayLike,
    device_ids: Sequence[str],
    *,
    alarm_k: int = 1,
    alarm_n: int = 1,
    recall_target: float | None = None,
    points: int = 60,
    min_threshold: float = float("-inf"),
) -> tuple[float, list[dict[str, float]]]:
    """Pick the alarm threshold from labelled windows by a precision/recall sweep.

    Windows must be in event order per device: each candidate threshold is judged on the
    *smoothed* decisions (k of the last n windows, as the live consumer decides). Without
    ``recall_target`` the threshold with the best F1 wins; with it, the highest threshold
    whose recall reaches the target (the best precision at that recall), or the best
    recall when none does. Only thresholds at or above ``min_threshold`` are candidates.
    Returns the threshold and the sweep (one row per candidate).

    Examples
    --------
    >>> t, sweep = choose_threshold([0.1, 0.2, 0.9, 0.8, 0.3], [0, 0, 1, 1, 0], ["A"] * 5)
    >>> t, sweep[-1]["f1"] >= 0.0
    (0.8, True)
    """
    from itap_stream.core.smoothing import smooth

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if not len(s) or not y.any():
        msg = "a threshold sweep needs labelled (positive) windows"
        raise ValueError(msg)
    cands = np.unique(np.quantile(s, np.linspace(0.0, 1.0, points), method="inverted_cdf"))  # actual scores
    cands = np.unique(np.concatenate([cands, s[y]])) if y.sum() <= points else cands
    cands = cands[cands >= min_threshold]
    if not len(cands):
        cands = np.array([min_threshold])
    sweep = []
    for t in cands.tolist():
        flags = smooth(device_ids, s >= t, {}, k=alarm_k, n=alarm_n)
        sweep.append({"threshold": float(t), **_prf(flags, y)})
    if recall_target is None:
        best = max(sweep, key=lambda r: (r["f1"], r["threshold"]))
    else:
        ok = [r for r in sweep if r["recall"] >= recall_target]
        best = max(ok, key=lambda r: r["threshold"]) if ok else max(sweep, key=lambda r: (r["recall"], r["threshold"]))
    return float(best["threshold"]), sweep
