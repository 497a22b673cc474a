"""Offline commands on the shared core: train (from the store or a CSV)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from itap_stream.adapters import artifacts
from itap_stream.adapters.store import frame_to_arrays
from itap_stream.core.batch import BatchWindows, batch_windows
from itap_stream.core.features import feature_names
from itap_stream.core.model import Artifact, IsolationForestDetector, TrainStats
from itap_stream.core.rules import iso
from itap_stream.core.schema import SensorSchema
from itap_stream.errors import DataError

__all__ = ["TrainReport", "train_from_frame", "windows_of_frame"]

log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def windows_of_frame(df: pd.DataFrame, schema: SensorSchema, window: int, hop: int) -> BatchWindows:
    a = frame_to_arrays(df, schema)
    return batch_windows(
        a["device_ids"], a["ts"], a["states"], a["values"], window=window, hop=hop, labels=a["labels"]
    )


def train_from_frame(
    df: pd.DataFrame,
    schema: SensorSchema,
    *,
    window: int = 32,
    hop: int = 4,
    quantile: float = 0.999,
    calibration_frac: float = 0.2,
    seed: int = 0,
) -> tuple[Artifact, TrainReport]:
    """Fit on the normal windows (RUN/IDLE, no label) of a readings table.

    The last ``calibration_frac`` of each device's normal windows (in time) is held out:
    the threshold and the confidence scale come from those, not from the rows the forest
    was fitted on.
    """
    if df.empty:
        msg = "no readings to train on"
        raise DataError(msg)
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
    det = IsolationForestDetector(seed=seed)
    det.fit(X_fit)
    threshold = det.calibrate(bw.features[cal_idx], quantile)
    cal_scores = np.sort(det.score(bw.features[cal_idx]))
    stats = TrainStats(mean=X_fit.mean(axis=0), std=X_fit.std(axis=0), calibration_scores=cal_scores)
    report = TrainReport(
        devices=int(pd.unique(bw.device_ids[idx]).size),
        rows=len(df),
        windows=len(idx),
        train_windows=len(fit_idx),
        calibration_windows=len(cal_idx),
        start=iso(float(df["ts"].min())),
        end=iso(float(df["ts"].max())),
        threshold=threshold,
    )
    artifact = Artifact(
        detector=det,
        feature_names=feature_names(schema),
        schema=schema.to_dict(),
        window=window,
        hop=hop,
        threshold=threshold,
        stats=stats,
        trained_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        training=report.to_dict() | {"quantile": quantile, "seed": seed},
        versions=artifacts.library_versions(),
    )
    return artifact, report
