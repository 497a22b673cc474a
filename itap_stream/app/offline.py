"""Offline commands on the shared core: train (from the store or a CSV)."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itap_stream.adapters import artifacts
from itap_stream.core.aggregate import summarize
from itap_stream.core.batch import BatchWindows, batch_windows, frame_to_arrays
from itap_stream.core.detectors import (
    ColumnsDetector,
    MeanShiftDetector,
    canonical_name,
    constant_signals,
    level_correlation,
    level_standard_errors,
    make_detector,
    window_mean_spread,
)
from itap_stream.core.drift import DriftMonitor
from itap_stream.core.features import feature_names
from itap_stream.core.model import Artifact, TrainStats, quantile_threshold
from itap_stream.core.pipeline import TableResult, check_compatible, score_in_order, score_table, settling_windows
from itap_stream.core.quality import choose_threshold
from itap_stream.core.rules import RuleEngine, iso
from itap_stream.core.schema import STATES, SensorSchema
from itap_stream.core.trainingcheck import check_training, segments_of
from itap_stream.errors import DataError

__all__ = [
    "ScoreReport",
    "TrainReport",
    "row_decisions",
    "score_frame",
    "train_from_frame",
    "windows_of_frame",
    "write_score_outputs",
]

log = logging.getLogger(__name__)

#: Below this many fit windows per feature, the detector is fitted on the compact features.
SAMPLES_PER_FEATURE = 10
#: `auto` on a recording of one operating state: below this many fit windows per feature it
#: fits the mean-shift chart. On a real pump test bed's normal operation, trained on its first
#: 6,000 readings (about 13 windows per feature), the chart flags 0.4 % of the rest where the
#: Isolation Forest flags 6.2 % (bench/realnormal.py).
CHART_SAMPLES_PER_FEATURE = 20
#: The compact features: per signal level, spread and dropouts.
COMPACT_SUFFIXES = ("_mean", "_std", "_missing")
#: Non-overlapping windows before the scored one that make a drifting signal's recent level
RECENT_WINDOWS = 4


@dataclass
class TrainReport:
    devices: int
    rows: int
    windows: int
    train_windows: int
    calibration_windows: int
    start: str
    end: str
    threshold: float
    labelled_windows: int = 0
    features_used: int = 0
    features: int = 0
    threshold_by: str = ""
    sweep: list[dict[str, float]] = field(default_factory=list)
    #: signals the mean-shift chart leaves out: they never changed in the training readings
    constant_signals: list[str] = field(default_factory=list)
    #: signals the mean-shift chart judges against their recent level (a drifting family)
    drifting_signals: list[str] = field(default_factory=list)
    #: what the training data check found (`core.trainingcheck`): trends, outlying blocks
    training_check: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def windows_of_frame(
    df: pd.DataFrame, schema: SensorSchema, window: int, hop: int, map_fn: Callable[..., Iterable[Any]] = map
) -> BatchWindows:
    a = frame_to_arrays(df, schema)
    return batch_windows(
        a["device_ids"], a["ts"], a["states"], a["values"], window=window, hop=hop, labels=a["labels"],
        tags=a["tags"], map_fn=map_fn,
    )


def _normal_segments(df: pd.DataFrame, schema: SensorSchema) -> list[Any]:
    """Each device's normal readings (RUN/IDLE, no label) in time order, as ``(n, signals)`` arrays."""
    a = frame_to_arrays(df, schema)
    labels = a["labels"]
    normal = np.asarray(a["states"]) != STATES.index("MAINT")
    if labels is not None:
        normal &= np.array([not (isinstance(x, str) and x) for x in labels], dtype=bool)
    out = []
    dev = np.asarray(a["device_ids"], dtype=object)
    ts = np.asarray(a["ts"], dtype=np.float64)
    for d in pd.unique(dev[normal]):
        rows = np.flatnonzero(normal & (dev == d))
        out.append(np.asarray(a["values"], dtype=np.float64)[rows[np.argsort(ts[rows], kind="stable")]])
    return out


def _training_std(segments: list[Any]) -> Any:
    """Per signal, the std of its training readings (each device's own, pooled)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.nanmean(np.stack([np.nanvar(x, axis=0) for x in segments if len(x)]), axis=0)
    return np.sqrt(np.nan_to_num(var, nan=0.0))


def _check_training_data(df: pd.DataFrame, schema: SensorSchema, window: int, accept: bool) -> dict[str, Any]:
    """`check_training` on the normal readings, per device and state: trends logged,
    outlying blocks refused (one operating state, unless ``accept``) or logged."""
    a = frame_to_arrays(df, schema)
    keep = np.asarray(a["states"]) != STATES.index("MAINT")
    if a["labels"] is not None:
        keep &= np.array([not (isinstance(x, str) and x) for x in a["labels"]], dtype=bool)
    state_names = np.asarray(STATES, dtype=object)[np.asarray(a["states"])]
    segs, times, labels, rows = segments_of(a["device_ids"], state_names, a["ts"], a["values"], keep=keep)
    found = check_training(segs, schema.names, times, window=window, labels=labels, rows=rows)
    if found.trends:
        shown = "; ".join(t.describe() for t in found.trends[:8])
        more = f"; and {len(found.trends) - 8} more" if len(found.trends) > 8 else ""
        log.warning("training data too short for its trends (the model learns where they passed by): %s%s",
                    shown, more)
    states = set(state_names[keep].tolist())
    if found.anomalies:
        where = "; ".join(b.describe() for b in found.anomalies[:5]) + (
            f"; and {len(found.anomalies) - 5} more" if len(found.anomalies) > 5 else "")
        if len(states) == 1 and not accept:
            msg = (f"the training data holds {len(found.anomalies)} outlying stretch(es) (a fault or a change "
                   f"point inside it?): {where}. A model trained on it would learn them as normal: cut them out "
                   f"(--since/--until) or train on another recording, or pass --accept-training-anomalies to train "
                   f"on it anyway")
            raise DataError(msg)
        log.warning("training data has outlying stretches (%s): %s",
                    "accepted" if len(states) == 1 else "several operating states: reported only", where)
    return found.to_dict() | {"accepted": bool(found.anomalies) and len(states) == 1,
                              "refuses_outliers": len(states) == 1}


def train_from_frame(
    df: pd.DataFrame,
    schema: SensorSchema,
    *,
    window: int = 32,
    hop: int = 4,
    quantile: float = 0.999,
    calibration_frac: float = 0.2,
    seed: int = 0,
    detector: str = "auto",
    alarm_k: int = 3,
    alarm_n: int = 4,
    recall_target: float | None = None,
    drifting_families: Sequence[str] = ("Temperature",),
    step: Callable[[str], None] | None = None,
    accept_training_anomalies: bool = False,
) -> tuple[Artifact, TrainReport]:
    """Fit on the normal windows (RUN/IDLE, no label) of a readings table.

    The last ``calibration_frac`` of each device's normal windows (in time) is held out:
    the threshold and the confidence scale come from those, not from the rows the model
    was fitted on. When the table also holds labelled (fault) windows, the threshold is
    then chosen by a precision/recall sweep over the held-out normal and the labelled
    windows, smoothed ``alarm_k`` of ``alarm_n`` as the consumer will: best F1, or the
    best precision at ``recall_target``.

    The normal readings are checked first (`core.trainingcheck.check_training`): trends the
    recording is too short for are logged; outlying blocks (a fault inside the training
    data) in a recording of one operating state raise `DataError` unless
    ``accept_training_anomalies``; either way the findings are in the report.
    """
    if df.empty:
        msg = "no readings to train on"
        raise DataError(msg)
    say = step or (lambda _text: None)
    found = _check_training_data(df, schema, window, accept_training_anomalies)
    say(f"windowing and featuring {len(df):,} readings ...")
    bw = windows_of_frame(df, schema, window, hop)
    normal = ~bw.any_label & ~bw.any_maint
    idx = np.flatnonzero(normal)
    if len(idx) < 20:
        msg = (
            f"only {len(idx)} normal windows (RUN/IDLE, unlabelled) of {window} readings in {len(df)} rows; "
            f"need at least 20 — give more data or a smaller window"
        )
        raise DataError(msg)
    # hold out the latest windows of each device for calibration
    dev = bw.device_ids[idx]
    rank = pd.Series(bw.end_ts[idx]).groupby(dev).rank(pct=True).to_numpy()
    cal_mask = rank > 1.0 - calibration_frac
    fit_idx, cal_idx = idx[~cal_mask], idx[cal_mask]
    if len(cal_idx) < 5:
        fit_idx, cal_idx = idx, idx
    X_fit = bw.features[fit_idx]
    names = feature_names(schema)
    det: Any = make_detector(detector, seed=seed)
    features_used = len(names)
    constant: list[str] = []
    drifting: list[str] = []
    by_device: list[Any] = []  # the mean-shift chart's training window means, per device in time order
    states = set(df["state"][df["state"] != "MAINT"].astype(str)) if "state" in df else {"RUN"}
    chart = (canonical_name(detector) == "auto" and len(states) == 1
             and len(fit_idx) < CHART_SAMPLES_PER_FEATURE * len(names))
    if chart or len(fit_idx) < SAMPLES_PER_FEATURE * len(names):
        # few windows for many features (a short recording): fit on what they can estimate
        if chart:
            # one operating state (a test rig at its working point): the level of each signal
            # and its noise, from the readings themselves; with several states (RUN and IDLE
            # levels differ) a few hundred readings cannot say where each state sits
            segments = _normal_segments(df, schema)
            still = constant_signals(segments)
            if still.all():
                msg = (f"every signal ({', '.join(schema.names)}) kept one value throughout the {len(df)} training "
                       f"rows: there is no noise to judge deviations against; train on a recording where they vary")
                raise DataError(msg)
            constant = [sig for sig, c in zip(schema.names, still, strict=True) if c]
            kept = [sig for sig, c in zip(schema.names, still, strict=True) if not c]
            cols = [names.index(f"{sig}_mean") for sig in kept]
            segments = [x[:, ~still] for x in segments]
            # signals of a drifting family (temperatures warm up long after a short recording)
            # are judged against their recent level: the BACK windows before the one scored
            slow = {f.casefold() for f in drifting_families}
            family = {s.name: s.family for s in schema.signals}
            recent = np.array([family[sig].casefold() in slow for sig in kept], dtype=bool)
            drifting = [sig for sig, r in zip(kept, recent, strict=True) if r]
            se = level_standard_errors(segments, window)
            # the other signals are judged against the training level: no tighter than the
            # window means themselves wandered in training (slow normal variation between
            # windows, not only the noise inside one)
            spread = np.where(recent, 0.0, window_mean_spread(segments, window))
            level_se = np.maximum(se, spread)
            # each device's training windows in time order: where their drifting signals ended
            order = np.lexsort((bw.end_ts[idx], pd.factorize(bw.device_ids[idx])[0]))
            by_device = [bw.features[idx[order][bw.device_ids[idx[order]] == d]][:, cols]
                         for d in pd.unique(bw.device_ids[idx])]
            from itap_stream.core.detectors import log_variance_spread, reading_steps
            det = MeanShiftDetector(
                cols, level_se, level_correlation(segments),
                # a window mean against a recent level: the error of both, from the training noise
                # (a warm-up during training makes that noise, and so the chart, coarser for them)
                recent=recent, recent_errors=np.hypot(se, level_standard_errors(segments, window * RECENT_WINDOWS)),
                spacing=max(1, math.ceil(window / hop)), back=RECENT_WINDOWS, alarm_k=alarm_k, alarm_n=alarm_n,
                missing_columns=[names.index(f"{sig}_missing") for sig in kept], window=window,
                # spread: the variance of the last RECENT_WINDOWS + 1 windows against training's; only a
                # drop is flagged (noise rises 1.7x in normal operation of the real test bed)
                std_columns=[names.index(f"{sig}_std") for sig in kept],
                slope_columns=[names.index(f"{sig}_slope") for sig in kept],
                variance_floors=reading_steps(segments) ** 2 / 12.0,
                spread_floors=log_variance_spread(segments, window), spread_back=RECENT_WINDOWS,
                # the unit of a baseline shift's size: each signal's std over its training readings
                level_scale=_training_std(segments),
            )
        else:
            cols = [i for i, n in enumerate(names) if n.endswith(COMPACT_SUFFIXES)]
            det = ColumnsDetector(det, cols)
        features_used = len(cols)
    if isinstance(det, MeanShiftDetector):
        # its limit comes from the chi-square distribution, not from held-out windows: the
        # level is best estimated from every normal window
        fit_idx = idx
        X_fit = bw.features[fit_idx]
    say(f"fitting {det.name} on {len(fit_idx):,} windows ({features_used} features) ...")
    det.fit(X_fit)
    if isinstance(det, MeanShiftDetector) and det.recent.any():
        det.fit_start_level(by_device)
    if isinstance(det, MeanShiftDetector):
        say("setting the chart's chi-square limit ...")
    else:
        say(f"calibrating the threshold on {len(cal_idx):,} held-out windows ...")
    threshold = det.calibrate(bw.features[cal_idx], quantile)
    in_order: Any = None
    if hasattr(det, "score_sequence"):
        # scored as the stream scores them: every window of each device in time order
        # (the mean-shift chart's drifting signals carry a per-device history)
        every = np.lexsort((bw.end_ts, pd.factorize(bw.device_ids)[0]))
        in_order = np.empty(len(bw))
        in_order[every] = score_in_order(det, bw.features[every], bw.device_ids[every].tolist(), {})
    cal_scores = np.sort(det.score(bw.features[cal_idx]) if in_order is None else in_order[cal_idx])
    threshold_by = (f"chi-square limit of the mean-shift chart (tail {(1 - quantile) / 10:g})"
                    if isinstance(det, MeanShiftDetector) else f"quantile {quantile} of held-out normal scores")
    sweep: list[dict[str, float]] = []
    faulty = np.flatnonzero(bw.any_label & ~bw.any_maint)
    if len(faulty):
        pick = np.concatenate([cal_idx, faulty])
        pick = pick[np.lexsort((bw.end_ts[pick], pd.factorize(bw.device_ids[pick])[0]))]
        pick_scores = det.score(bw.features[pick]) if in_order is None else in_order[pick]
        threshold, sweep = choose_threshold(
            pick_scores, np.array([isinstance(x, str) and bool(x) for x in bw.label[pick].tolist()]),
            bw.device_ids[pick].tolist(),
            alarm_k=alarm_k, alarm_n=alarm_n, recall_target=recall_target,
            # a few held-out normal minutes must not outvote a day of normal operation: never
            # a threshold that flags more than 1 % of held-out normal windows (before smoothing)
            min_threshold=float(np.quantile(cal_scores, 0.99)),
        )
        threshold_by = (
            f"sweep over {len(cal_idx):,} held-out normal and {len(faulty):,} labelled windows: "
            + (f"best precision at recall >= {recall_target}" if recall_target is not None else "best F1")
        )
    stats = TrainStats(mean=X_fit.mean(axis=0), std=X_fit.std(axis=0), calibration_scores=cal_scores)
    # windows with a state change inside (start-ups, stops) are judged against their own kind:
    # the same quantile of every normal such window, never below the common threshold
    settling = idx[settling_windows(bw.features[idx], names)]
    settling_threshold = None
    if len(settling):
        s_scores = det.score(bw.features[settling]) if in_order is None else in_order[settling]
        settling_threshold = max(threshold, quantile_threshold(s_scores, quantile))
    report = TrainReport(
        devices=int(pd.unique(bw.device_ids[idx]).size),
        rows=len(df),
        windows=len(idx),
        train_windows=len(fit_idx),
        calibration_windows=len(cal_idx),
        labelled_windows=len(faulty),
        features_used=features_used,
        features=len(names),
        threshold_by=threshold_by,
        start=iso(float(df["ts"].min())),
        end=iso(float(df["ts"].max())),
        threshold=threshold,
        sweep=sweep,
        constant_signals=constant,
        drifting_signals=drifting,
        training_check=found,
    )
    artifact = Artifact(
        detector=det,
        feature_names=feature_names(schema),
        schema=schema.to_dict(),
        window=window,
        hop=hop,
        threshold=threshold,
        stats=stats,
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training={k: v for k, v in report.to_dict().items() if k != "sweep"}
        | {"quantile": quantile, "seed": seed, "detector": det.name},
        versions=artifacts.library_versions(),
        settling_threshold=settling_threshold,
    )
    return artifact, report


@dataclass
class ScoreReport:
    rows: int
    devices: int
    windows: int
    anomalies: int
    alerts: int
    duplicates: int
    out_of_order: int
    files: dict[str, str]
    drift_events: int = 0


def score_frame(
    df: pd.DataFrame,
    schema: SensorSchema,
    artifact: Artifact,
    engine: RuleEngine,
    *,
    window: int,
    hop: int,
    alarm_k: int,
    alarm_n: int,
    workers: int | None = None,
    drift_delta: float = 0.002,
    baseline: Any = None,
) -> TableResult:
    """Batch scoring of a readings table on the shared core (`core.pipeline.score_table`).

    The numeric work runs in chunks on a pool of ``workers`` threads (numpy releases
    the GIL), so a two-core machine scores nearly twice as fast.
    """
    check_compatible(artifact, schema, window, hop)
    with ThreadPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        bw = windows_of_frame(df, schema, window, hop, map_fn=pool.map)
        drift = DriftMonitor(delta=drift_delta) if drift_delta > 0 else None
        return score_table(bw, artifact, engine, schema, alarm_k=alarm_k, alarm_n=alarm_n, map_fn=pool.map, drift=drift,
                           baseline=baseline)


def _top_explanations(device_ids: Any, explanations: dict[int, Any], top: int = 5) -> dict[str, Any]:
    """Which families dominate and which features explain the anomalies, per device and fleet."""
    def block(items: list[Any]) -> dict[str, Any]:
        fams: dict[str, int] = {}
        feats: dict[str, list[float]] = {}
        for e in items:
            fams[e.dominant_family] = fams.get(e.dominant_family, 0) + 1
            for name, share in e.top_features:
                feats.setdefault(name, []).append(share)
        ranked = sorted(feats.items(), key=lambda kv: (-len(kv[1]), -float(np.mean(kv[1]))))[:top]
        return {
            "anomalies": len(items),
            "dominant_families": dict(sorted(fams.items(), key=lambda kv: -kv[1])),
            "top_features": [
                {"feature": n, "anomalies": len(v), "mean_share": round(float(np.mean(v)), 2)} for n, v in ranked
            ],
        }

    per_dev: dict[str, list[Any]] = {}
    for i, e in sorted(explanations.items()):
        per_dev.setdefault(str(device_ids[i]), []).append(e)
    return {
        "fleet": block([e for _i, e in sorted(explanations.items())]),
        "devices": {d: block(v) for d, v in sorted(per_dev.items())},
    }


def write_score_outputs(
    df: pd.DataFrame,
    result: TableResult,
    out_dir: str | Path,
    *,
    windows_out: str | Path | None = None,
    threshold: float = float("nan"),
) -> ScoreReport:
    """``alerts.json`` and ``aggregate_summaries.json`` in ``out_dir``; every scored window
    to ``windows_out`` (CSV) when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bw, a = result.windows, result.assessment
    files = {"alerts": str(out / "alerts.json"), "summaries": str(out / "aggregate_summaries.json")}
    if windows_out is not None:
        from itap_stream.core.schema import STATES

        dominant = np.full(len(bw), None, dtype=object)
        for i, e in a.explanations.items():
            dominant[i] = e.dominant_family
        frame = pd.DataFrame(
            {
                "device_id": bw.device_ids,
                "window_start": bw.start_ts,
                "window_end": bw.end_ts,
                "state": np.asarray(STATES, dtype=object)[bw.last_state],
                "score": a.scores.round(6),
                "is_anomaly": a.flags.astype(np.int8),
                "confidence": a.confidence.round(4),
                "dominant_family": dominant,
                "label": bw.label,
            }
        )
        Path(windows_out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(windows_out, index=False)
        files["windows"] = str(windows_out)
    Path(files["alerts"]).write_text(
        json.dumps([al.to_dict() for al in result.alerts], indent=1) + "\n", encoding="utf-8"
    )
    alert_dicts = [al.to_dict() for al in result.alerts]
    if any(isinstance(x, str) and x for x in bw.label.tolist()):
        from itap_stream.core.quality import quality_report

        metrics = quality_report(
            bw.device_ids.tolist(), bw.end_ts, bw.label.tolist(), a.scores, a.flags, threshold, alert_dicts
        )
        files["metrics"] = str(out / "metrics.json")
        Path(files["metrics"]).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    files["explanations"] = str(out / "explanations_top.json")
    Path(files["explanations"]).write_text(
        json.dumps(_top_explanations(bw.device_ids, a.explanations), indent=1) + "\n", encoding="utf-8"
    )
    idx = sorted(a.explanations)
    summary = summarize(
        bw.device_ids,
        a.scores,
        a.flags,
        [bw.device_ids[i] for i in idx],
        [a.explanations[i].dominant_family for i in idx],
    )
    Path(files["summaries"]).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return ScoreReport(
        rows=len(df),
        devices=int(pd.unique(df["device_id"]).size) if len(df) else 0,
        windows=len(bw),
        anomalies=int(a.flags.sum()),
        alerts=sum(1 for al in result.alerts if al.status == "firing"),
        drift_events=sum(1 for al in result.alerts if al.rule == "model_drift"),
        duplicates=int(bw.duplicate.sum()),
        out_of_order=int((~bw.accepted & ~bw.duplicate).sum()),
        files=files,
    )


def row_decisions(df: pd.DataFrame, result: TableResult) -> pd.DataFrame:
    """One row per input reading, in input order: the decision a live consumer would have
    held at that reading (causal).

    A reading gets the score and the smoothed flag of the latest window of its device that
    closed at or before it. Readings before the device's first full window are
    ``warmup`` (score empty, anomaly 0): there is nothing yet to judge them by. Readings the
    ordering rule drops (a repeated or older time) are marked ``dropped`` and carry the
    decision in force.
    """
    bw, a = result.windows, result.assessment
    n = len(df)
    codes, uniques = pd.factorize(df["device_id"].to_numpy(dtype=object))
    win_codes = pd.Index(uniques).get_indexer(bw.device_ids) if len(bw) else np.zeros(0, dtype=np.intp)
    stride = n + 1
    win_keys = win_codes.astype(np.int64) * stride + bw.end_row
    order = np.argsort(win_keys, kind="stable")
    sorted_keys = win_keys[order]
    row_keys = codes.astype(np.int64) * stride + np.arange(n)
    j = np.searchsorted(sorted_keys, row_keys, side="right") - 1
    has = j >= 0
    has[has] = (sorted_keys[j[has]] // stride) == codes[has]
    win = np.where(has, order[np.maximum(j, 0)], -1)
    score = np.full(n, np.nan)
    score[has] = a.scores[win[has]]
    anomaly = np.zeros(n, dtype=np.int8)
    anomaly[has] = a.flags[win[has]]
    return pd.DataFrame(
        {
            "row": np.arange(n),
            "device_id": df["device_id"].to_numpy(),
            "ts": df["ts"].to_numpy(dtype=np.float64),
            "score": np.round(score, 6),
            "anomaly": anomaly,
            "warmup": (~has).astype(np.int8),
            "dropped": (~bw.accepted).astype(np.int8),
        }
    )
