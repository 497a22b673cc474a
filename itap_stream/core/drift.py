"""Model drift: river's ADWIN watches the scores of normal-looking windows.

A model describes the plant as it was when it was trained. When the plant changes
(a new product, a replaced pump, a sensor recalibrated, the seasons), the scores of
windows that raise no anomaly creep up towards the threshold: the model is ageing,
and retraining is due. One ADWIN per device and one for the whole fleet watch those
scores (divided by the threshold, so 1.0 is the alarm line). When one finds a change,
the mean of the part of its window it dropped is the reference; if the next ``confirm``
windows average above it by at least ``min_shift`` of the gap between it and the threshold
(a sustained rise towards the alarm line, not a blip), a
``model_drift`` event is raised for that device (or ``*`` for the fleet), at most once
per ``cooldown`` windows of that scope.

Anomalous windows (smoothed flags) and MAINT windows are not fed: a fault is the rule
engine's business, not drift. The stream feeds windows in arrival order and the batch
path in event-time order; per device both are time order, so device events agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from itap_stream.core.rules import Alert, event_alert

__all__ = ["FLEET", "DriftEvent", "DriftMonitor", "drift_alert"]

#: ``device_id`` of fleet-wide drift events.
FLEET = "*"


@dataclass(frozen=True)
class DriftEvent:
    """A sustained rise of the normal scores of one device (or the fleet)."""

    device_id: str
    ts: float
    mean_before: float
    mean_after: float
    windows: int  # normal windows this scope had seen when the shift was found

    @property
    def scope(self) -> str:
        return "fleet" if self.device_id == FLEET else "device"


class DriftMonitor:
    """ADWIN per device and for the fleet over threshold-relative scores of normal windows.

    Examples
    --------
    >>> mon = DriftMonitor(min_windows=50)
    >>> rng = np.random.default_rng(0)
    >>> s = np.concatenate([rng.normal(0.3, 0.05, 400), rng.normal(0.8, 0.05, 400)])
    >>> events = mon.update(["A"] * 800, s, np.zeros(800, bool), np.arange(800.0), threshold=1.0)
    >>> sorted({e.device_id for e in events}), 400 < events[0].ts < 800
    (['*', 'A'], True)
    >>> events[0].mean_after - events[0].mean_before >= 0.15
    True
    """

    def __init__(
        self,
        *,
        delta: float = 0.002,
        min_shift: float = 0.25,
        min_windows: int = 100,
        cooldown: int = 2000,
        confirm: int = 250,
        fleet: bool = True,
    ) -> None:
        self.delta = delta
        self.min_shift = min_shift
        self.min_windows = min_windows
        self.cooldown = cooldown
        self.confirm = confirm
        self.fleet = fleet
        self._pending: dict[str, tuple[float, int, float]] = {}
        self._adwin: dict[str, Any] = {}
        self._seen: dict[str, int] = {}
        self._last_event: dict[str, int] = {}
        self.events = 0
        # imported here, when the service starts, not when the first window is fed: river's
        # import takes about half a second, which would stall the first scored batch
        from river.drift import ADWIN

        self._make_adwin = ADWIN

    def forget(self, devices: set[str]) -> None:
        """Drop the per-device detectors of ``devices`` (their partition moved away)."""
        for d in (self._pending, self._adwin, self._seen, self._last_event):
            for key in devices & d.keys():
                del d[key]

    def _feed(self, key: str, x: float, ts: float) -> DriftEvent | None:
        adwin = self._adwin.get(key)
        if adwin is None:
            adwin = self._adwin[key] = self._make_adwin(delta=self.delta)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        pending = self._pending.get(key)
        if pending is not None:
            # a change was found: is the new level sustained over the next `confirm` windows?
            ref, n, total = pending
            n, total = n + 1, total + x
            if n < self.confirm:
                self._pending[key] = (ref, n, total)
            else:
                del self._pending[key]
                after = total / n
                due = seen - self._last_event.get(key, -self.cooldown) >= self.cooldown
                # the rise must close min_shift of the gap between the old level and the
                # threshold: detectors whose normal windows sit at 0.1 of it and those at 0.7
                # are judged alike
                if after - ref >= self.min_shift * max(1.0 - ref, 0.05) and due:
                    self._last_event[key] = seen
                    self.events += 1
                    adwin.update(x)
                    return DriftEvent(key, ts, ref, after, seen)
        width, mean = adwin.width, adwin.estimation
        adwin.update(x)
        if adwin.drift_detected and seen >= self.min_windows and key not in self._pending:
            # ADWIN dropped the older part of its window: that part's mean is the reference
            dropped = width + 1 - adwin.width
            if dropped > 0:
                ref = (mean * width + x - adwin.estimation * adwin.width) / dropped
                self._pending[key] = (ref, 0, 0.0)
        return None

    def update(
        self,
        device_ids: Sequence[str],
        scores: npt.ArrayLike,
        flags: npt.ArrayLike,
        end_ts: npt.ArrayLike,
        *,
        threshold: float,
        quiet: npt.ArrayLike | None = None,
    ) -> list[DriftEvent]:
        """Feed scored windows (in event order per device); returns the drift events found."""
        rel = np.clip(np.asarray(scores, dtype=np.float64) / max(threshold, 1e-12), 0.0, 2.0)
        skip = np.asarray(flags, dtype=bool)
        if quiet is not None:
            skip = skip | np.asarray(quiet, dtype=bool)
        ts = np.asarray(end_ts, dtype=np.float64)
        out: list[DriftEvent] = []
        feed = self._feed
        for i in np.flatnonzero(~skip).tolist():
            x, t = float(rel[i]), float(ts[i])
            ev = feed(device_ids[i], x, t)
            if ev is not None:
                out.append(ev)
            if self.fleet:
                ev = feed(FLEET, x, t)
                if ev is not None:
                    out.append(ev)
        return out


def drift_alert(event: DriftEvent) -> Alert:
    """The ``model_drift`` event as an alert record (status ``event``: it neither fires nor resolves)."""
    what = "the fleet's" if event.scope == "fleet" else f"{event.device_id}'s"
    return event_alert(
        f"{event.device_id}|model_drift|{event.ts!r}", "model_drift", "INFO", event.device_id, event.ts, event.ts,
        score=event.mean_after, route="engineering",
        root_cause=(
            f"model drift: {what} normal windows now score {event.mean_after:.2f} of the threshold "
            f"(was {event.mean_before:.2f}); the plant has moved away from the training data, retrain with `itap train`"
        ),
    )
