"""Per-device and fleet summaries of scored windows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["summarize"]


def summarize(
    device_ids: npt.ArrayLike,
    scores: npt.ArrayLike,
    is_anomaly: npt.ArrayLike,
    anomaly_devices: Sequence[str] = (),
    anomaly_families: Sequence[str] = (),
) -> dict[str, Any]:
    """Anomalies, average and p95 score and dominant families per device, plus a fleet line.

    Examples
    --------
    >>> s = summarize(["A", "A", "B"], [0.2, 0.8, 0.3], [False, True, False], ["A"], ["Voltage"])
    >>> s["devices"]["A"]["anomalies"], s["devices"]["A"]["dominant_families"], s["fleet"]["devices"]
    (1, {'Voltage': 1}, 2)
    """
    dev = np.asarray(device_ids, dtype=object)
    sc = np.asarray(scores, dtype=np.float64)
    an = np.asarray(is_anomaly, dtype=bool)
    fams: dict[str, Counter[str]] = {}
    for d, f in zip(anomaly_devices, anomaly_families, strict=True):
        fams.setdefault(d, Counter())[f] += 1
    devices: dict[str, Any] = {}
    if len(sc):
        g = pd.DataFrame({"device": dev, "score": sc, "anomaly": an}).groupby("device", sort=True)
        per = g.agg(windows=("score", "size"), anomalies=("anomaly", "sum"), avg=("score", "mean"))
        p95 = g["score"].quantile(0.95)
        row: Any  # a named tuple of the aggregated columns
        for d, row in zip(per.index.tolist(), per.itertuples(index=False), strict=True):
            devices[d] = {
                "windows": int(row.windows),
                "anomalies": int(row.anomalies),
                "avg_score": round(float(row.avg), 4),
                "p95_score": round(float(p95[d]), 4),
                "dominant_families": dict(fams.get(d, Counter()).most_common()),
            }
    fleet_fams: Counter[str] = Counter(anomaly_families)
    fleet = {
        "devices": len(devices),
        "windows": int(len(sc)),
        "anomalies": int(an.sum()),
        "devices_with_anomalies": sum(1 for v in devices.values() if v["anomalies"]),
        "avg_score": round(float(sc.mean()), 4) if len(sc) else 0.0,
        "p95_score": round(float(np.quantile(sc, 0.95)), 4) if len(sc) else 0.0,
        "dominant_families": dict(fleet_fams.most_common()),
    }
    return {"devices": devices, "fleet": fleet}
