"""The fleet dashboard's state: every device's latest health and recent scores, the open
alerts with their family attribution, fleet totals. The consumer updates it per
micro-batch; the HTTP thread reads a snapshot (`snapshot`) as JSON for the page."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from itap_stream.core.model import device_health
from itap_stream.core.rules import Alert

__all__ = ["FleetView"]

#: Scores kept per device for the sparkline.
SPARK = 60
#: Devices and alerts in one snapshot unless asked otherwise.
DEFAULT_LIMIT = 200
_CLOSED = {"resolved"}
_SEVERITY_RANK = {"CRITICAL": 0, "WARNING": 1, "INFO": 2}


class FleetView:
    """Thread-safe: `update` from the consumer loop, `snapshot` from the HTTP server.

    Examples
    --------
    >>> v = FleetView(threshold=1.0, typical=0.6)
    >>> v.update(["D1", "D1", "D2"], np.array([0.2, 0.8, 1.2]), np.array([False, False, True]), ["RUN"] * 3, [])
    >>> s = v.snapshot(limit=1); [d["device_id"] for d in s["devices"]], s["totals"]["devices"], s["page"]
    (['D2'], 2, {'limit': 1, 'offset': 0, 'devices_returned': 1, 'alerts_returned': 0, 'incidents_returned': 0})
    >>> s["devices"][0]["health"], v.snapshot(offset=1)["devices"][0]["health"]  # `core.model.device_health`
    (0.25, 0.75)
    """

    def __init__(self, threshold: float, typical: float = 0.0) -> None:
        self.threshold = threshold
        #: the score up to which a device is 100 % healthy (`core.model.typical_score`)
        self.typical = typical
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
        raw = np.asarray(scores, dtype=np.float64)
        rel = (raw / max(self.threshold, 1e-12)).round(4).tolist()
        health = device_health(raw, self.typical, self.threshold).round(4).tolist()
        flagged = np.asarray(flags, dtype=bool).tolist()
        with self._lock:
            self._windows += len(rel)
            self._anomalies += sum(flagged)
            devs = self._devices
            for dev, r, h, f, st in zip(device_ids, rel, health, flagged, states, strict=False):
                d = devs.get(dev)
                if d is None:
                    d = devs[dev] = {"spark": deque(maxlen=SPARK), "anomalies": 0}
                d["spark"].append(r)
                d["score"], d["health"], d["state"], d["anomalous"] = r, h, st, f
                d["anomalies"] += int(f)
            for a in alerts:
                if a.status in _CLOSED:
                    self._alerts.pop(a.id, None)
                elif a.status != "event":
                    was = self._alerts.get(a.id, {})
                    self._alerts[a.id] = {
                        "id": a.id, "device_id": a.device_id, "rule": a.rule, "severity": a.severity,
                        "status": a.status, "families": a.families, "likely_fault": a.likely_fault,
                        "note": a.note or was.get("note", ""), "fired_at": a.fired_at, "route": a.route,
                        "acknowledged": a.acknowledged or a.status == "acknowledged",
                        "incident": a.incident or a.id, "changed_at": a.changed_at,
                    }

    def forget(self, devices: set[str]) -> None:
        """Drop ``devices`` and their alerts from the view (another consumer owns them now)."""
        with self._lock:
            for dev in devices & self._devices.keys():
                del self._devices[dev]
            for aid in [k for k, a in self._alerts.items() if a["device_id"] in devices]:
                del self._alerts[aid]

    def snapshot(self, limit: int = DEFAULT_LIMIT, offset: int = 0) -> dict[str, Any]:
        """One page of the fleet: devices worst first, open alerts most severe first.

        Parameters
        ----------
        limit
            Devices and alerts returned at most (each list is paged on its own).
        offset
            Devices and alerts skipped first.

        Returns
        -------
        ``{"devices": [...], "alerts": [...], "totals": {...}, "page": {"limit", "offset",
        "devices_returned", "alerts_returned"}}``; ``totals`` count the whole fleet, not the page.
        """
        if limit < 0 or offset < 0:
            msg = f"FleetView.snapshot: limit and offset must be non-negative; got limit={limit}, offset={offset}"
            raise ValueError(msg)
        with self._lock:
            ranked = sorted(self._devices.items(), key=_worst_first)
            devices = [
                {
                    "device_id": dev, "state": d["state"], "score": d["score"],
                    "health": d["health"], "anomalous": d["anomalous"],
                    "anomalies": d["anomalies"], "spark": list(d["spark"]),
                }
                for dev, d in ranked[offset:offset + limit]
            ]
            alerts = sorted(self._alerts.values(), key=_most_severe_first)
            totals = {"devices": len(ranked), "windows": self._windows, "anomalies": self._anomalies,
                      "open_alerts": len(alerts), "unhealthy": sum(1 for _dev, d in ranked if d["anomalous"])}
        page_alerts = [dict(a) for a in alerts[offset:offset + limit]]
        incidents = _incidents(alerts)
        totals["incidents"] = len(incidents)
        page_incidents = incidents[offset:offset + limit]
        page = {"limit": limit, "offset": offset, "devices_returned": len(devices), "alerts_returned": len(page_alerts),
                "incidents_returned": len(page_incidents)}
        return {"devices": devices, "alerts": page_alerts, "incidents": page_incidents, "totals": totals, "page": page}


def _incidents(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Open alerts grouped by incident (one device, one likely fault; `core.rules`): one entry
    each with its members, the highest member's severity and why, most severe first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for a in alerts:
        groups.setdefault(str(a.get("incident") or a["id"]), []).append(a)
    out = []
    for inc, members in groups.items():
        members = sorted(members, key=lambda a: float(a.get("fired_at") or 0.0))
        top = min(members, key=lambda a: _SEVERITY_RANK.get(str(a["severity"]).upper(), len(_SEVERITY_RANK)))
        out.append({
            "id": inc, "device_id": members[0]["device_id"], "severity": top["severity"],
            "severity_reason": f"{top['severity']} from {top['rule']}" + (
                f" ({len(members)} alerts)" if len(members) > 1 else ""),
            "likely_fault": top["likely_fault"], "families": top["families"], "route": top.get("route", ""),
            "fired_at": members[0]["fired_at"], "status": top["status"],
            "acknowledged": all(m.get("acknowledged") for m in members), "members": [dict(m) for m in members],
        })
    return sorted(out, key=_most_severe_first)


def _worst_first(item: tuple[str, dict[str, Any]]) -> tuple[bool, float, str]:
    dev, d = item
    return (not d["anomalous"], -d["score"], dev)


def _most_severe_first(alert: dict[str, Any]) -> tuple[int, float, str]:
    rank = _SEVERITY_RANK.get(str(alert["severity"]).upper(), len(_SEVERITY_RANK))
    return (rank, -float(alert.get("fired_at") or 0.0), str(alert["id"]))
