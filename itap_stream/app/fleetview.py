"""The fleet dashboard's state: every device's latest health and recent scores, the open
alerts with their family attribution, fleet totals. The consumer updates it per
micro-batch; the HTTP thread reads a snapshot (`snapshot`) as JSON for the page."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from itap_stream.core.rules import Alert

__all__ = ["FleetView"]

#: Scores kept per device for the sparkline.
SPARK = 60
_CLOSED = {"resolved"}


class FleetView:
    """Thread-safe: `update` from the consumer loop, `snapshot` from the HTTP server.

    Examples
    --------
    >>> v = FleetView(threshold=1.0)
    >>> v.update(["D1", "D1"], np.array([0.2, 0.4]), np.array([False, False]), ["RUN", "RUN"], [])
    >>> s = v.snapshot(); s["devices"][0]["device_id"], s["devices"][0]["health"], s["totals"]["devices"]
    ('D1', 0.6, 1)
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._lock = threading.Lock()
        self._devices: dict[str, dict[str, Any]] = {}
        self._alerts: dict[str, dict[str, Any]] = {}
        self._windows = 0
        self._anomalies = 0

    def update(
        self,
        device_ids: Sequence[str],
        scores: np.ndarray,
        flags: np.ndarray,
        states: Sequence[str],
        alerts: Sequence[Alert],
    ) -> None:
        rel = (np.asarray(scores, dtype=np.float64) / max(self.threshold, 1e-12)).round(4).tolist()
        flagged = np.asarray(flags, dtype=bool).tolist()
        with self._lock:
            self._windows += len(rel)
            self._anomalies += sum(flagged)
            devs = self._devices
            for dev, r, f, st in zip(device_ids, rel, flagged, states):
                d = devs.get(dev)
                if d is None:
                    d = devs[dev] = {"spark": deque(maxlen=SPARK), "anomalies": 0}
                d["spark"].append(r)
                d["score"], d["state"], d["anomalous"] = r, st, f
                d["anomalies"] += int(f)
            for a in alerts:
                if a.status in _CLOSED:
                    self._alerts.pop(a.id, None)
                elif a.status != "event":
                    self._alerts[a.id] = {
                        "id": a.id, "device_id": a.device_id, "rule": a.rule, "severity": a.severity,
                        "status": a.status, "families": a.families, "likely_fault": a.likely_fault,
                        "note": a.note,
                    }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            devices = [
                {
                    "device_id": dev, "state": d["state"], "score": d["score"],
                    "health": round(max(0.0, 1.0 - min(d["score"], 1.0)), 4), "anomalous": d["anomalous"],
                    "anomalies": d["anomalies"], "spark": list(d["spark"]),
                }
                for dev, d in sorted(self._devices.items())
            ]
            alerts = list(self._alerts.values())
            totals = {"devices": len(devices), "windows": self._windows, "anomalies": self._anomalies,
                      "open_alerts": len(alerts), "unhealthy": sum(1 for d in devices if d["anomalous"])}
        return {"devices": devices, "alerts": alerts, "totals": totals}
