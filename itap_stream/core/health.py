"""Broken sensors and silent devices, as alerts: ``signal_missing``, ``signal_stuck``,
``device_stale``, ``device_offline``.

``signal_missing``: one signal reported nothing for the last ``missing_readings`` readings
of a window while some other signal did. ``signal_stuck``: one signal reported exactly the
same value for the last ``stuck_readings`` readings (a flat-lined transmitter). Both are
judged on every window that closes (so they resolve at the first window with a good value
again, ``hop`` readings later at most) and never in MAINT. ``device_stale``: no reading for
``stale_after_s`` by the *service's* clock, which the caller passes in (tests inject it);
it resolves on the device's next reading. ``device_offline``: the device said it is gone
(a Sparkplug death certificate), raised at once and resolved by its next reading. Devices
listed as decommissioned raise nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from itap_stream.core.rules import Alert

__all__ = ["HealthSettings", "SensorHealth"]


@dataclass(frozen=True)
class HealthSettings:
    missing_readings: int = 16
    stuck_readings: int = 32
    stale_after_s: float = 300.0
    decommissioned: frozenset[str] = frozenset()


def _alert(device: str, rule: str, severity: str, cause: str, route: str, at: float, start: float, note: str) -> Alert:
    return Alert(
        id=hashlib.sha1(f"{device}|{rule}|{at!r}".encode(), usedforsecurity=False).hexdigest()[:16],
        rule=rule, severity=severity, device_id=device, state="", window_start=start, window_end=at, score=0.0,
        confidence=1.0, root_cause=cause, families={}, top_features=[], route=route, status="firing", fired_at=at,
        likely_fault="sensor_dropout" if rule.startswith("signal_") else "unknown", likely_fault_confidence=1.0,
        changed_at=at, note=note,
    )


def _resolve(a: Alert, at: float) -> Alert:
    return Alert(**{**a.__dict__, "status": "resolved", "resolved_at": at, "changed_at": at})


class SensorHealth:
    """Open ``signal_missing`` / ``signal_stuck`` / ``device_stale`` alerts, per device.

    Examples
    --------
    >>> h = SensorHealth(("rpm", "temp_c"), HealthSettings(missing_readings=3, stuck_readings=3, stale_after_s=60))
    >>> v = np.array([[[1.0, 20.0], [2.0, np.nan], [3.0, np.nan], [4.0, np.nan]]])  # temp_c missing x3
    >>> [(a.rule, a.status) for a in h.windows(["D1"], v, ["RUN"], [0.0], [3.0])]
    [('signal_missing:temp_c', 'firing')]
    >>> h.seen(["D1"], now=100.0), [(a.rule, a.status) for a in h.check_stale(now=159.0)]
    ([], [])
    >>> [(a.rule, a.status) for a in h.check_stale(now=160.0)]
    [('device_stale', 'firing')]
    """

    def __init__(self, signals: Sequence[str], settings: HealthSettings | None = None) -> None:
        self.signals = tuple(signals)
        self.settings = settings or HealthSettings()
        self._open: dict[tuple[str, str], Alert] = {}  # (device, rule) -> open alert
        self._open_devices: dict[str, int] = {}  # device -> open signal alerts
        self._last_seen: dict[str, float] = {}
        self._stale: dict[str, Alert] = {}
        self._offline: dict[str, Alert] = {}

    def windows(
        self,
        device_ids: Sequence[str],
        values: npt.NDArray[np.float64],
        states: Sequence[str],
        start_ts: Iterable[float],
        end_ts: Iterable[float],
    ) -> list[Alert]:
        """Check the windows that just closed (values ``(n, window, signals)``)."""
        st = self.settings
        n, w, _s = values.shape
        if n == 0:
            return []
        k_miss, k_stuck = min(st.missing_readings, w), min(st.stuck_readings, w)
        tail = values[:, -k_miss:, :]
        # (numpy's stubs type a reduction along an axis as "scalar or array")
        gone = cast(npt.NDArray[np.bool_], np.isnan(tail).all(axis=1))  # (n, s)
        missing = gone & ~gone.all(axis=1, keepdims=True)  # the others still report
        tail = values[:, -k_stuck:, :]
        present = ~cast(npt.NDArray[np.bool_], np.isnan(tail).any(axis=1))
        stuck = present & (tail.max(axis=1) == tail.min(axis=1)) if k_stuck > 1 else np.zeros_like(gone)
        out: list[Alert] = []
        starts, ends = list(start_ts), list(end_ts)
        # only windows with a bad signal, or of a device with an open alert, need a look
        look = set(np.flatnonzero(missing.any(axis=1) | stuck.any(axis=1)).tolist())
        if self._open_devices:
            look.update(i for i, d in enumerate(device_ids) if d in self._open_devices)
        for i in sorted(look):
            dev = device_ids[i]
            if dev in st.decommissioned or states[i] == "MAINT":
                continue
            for j, sig in enumerate(self.signals):
                for kind, bad, k in (("signal_missing", missing[i, j], k_miss), ("signal_stuck", stuck[i, j], k_stuck)):
                    key = (dev, f"{kind}:{sig}")
                    alert = self._open.get(key)
                    if bad and alert is None:
                        what = "reported nothing" if kind == "signal_missing" else f"repeated {tail[i, -1, j]:g}"
                        a = _alert(dev, key[1], "WARNING", f"Signal {sig} {what.split(' ')[0]} for {k} readings",
                                   "instrumentation", ends[i], starts[i], f"{sig} {what} for the last {k} readings")
                        self._open[key] = a
                        self._open_devices[dev] = self._open_devices.get(dev, 0) + 1
                        out.append(a)
                    elif not bad and alert is not None:
                        del self._open[key]
                        self._open_devices[dev] -= 1
                        if not self._open_devices[dev]:
                            del self._open_devices[dev]
                        out.append(_resolve(alert, ends[i]))
        return out

    def restore(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Take over open ``signal_*`` and ``device_stale`` alerts after a restart (they resolve
        when the signal or the device comes back); returns the others."""
        rest = []
        for a in alerts:
            if a.rule.startswith(("signal_missing:", "signal_stuck:")):
                key = (a.device_id, a.rule)
                if key not in self._open:
                    self._open[key] = a
                    self._open_devices[a.device_id] = self._open_devices.get(a.device_id, 0) + 1
            elif a.rule == "device_stale":
                self._stale[a.device_id] = a
                self._last_seen.setdefault(a.device_id, a.window_start)
            elif a.rule == "device_offline":
                self._offline[a.device_id] = a
            else:
                rest.append(a)
        return rest

    def devices(self) -> set[str]:
        """Devices with health state (last seen, open alerts)."""
        return set(self._last_seen) | {d for d, _r in self._open}

    def forget(self, devices: set[str]) -> None:
        """Drop the open alerts and last-seen times of ``devices`` (their partition moved away)."""
        for key in [k for k in self._open if k[0] in devices]:
            del self._open[key]
        for d in (self._open_devices, self._last_seen, self._stale, self._offline):
            for device in devices & d.keys():
                del d[device]

    def open_ids(self) -> set[str]:
        """Ids of the open signal and stale alerts."""
        return ({a.id for a in self._open.values()} | {a.id for a in self._stale.values()}
                | {a.id for a in self._offline.values()})

    def seen(self, device_ids: Iterable[str], now: float) -> list[Alert]:
        """Devices that just reported (service clock ``now``); resolves their stale alerts."""
        out = []
        last = self._last_seen
        for dev in device_ids:
            last[dev] = now
            if self._stale and dev in self._stale:
                out.append(_resolve(self._stale.pop(dev), now))
            if self._offline and dev in self._offline:
                out.append(_resolve(self._offline.pop(dev), now))
        return out

    def offline(self, device: str, now: float, why: str) -> Alert | None:
        """``device_offline`` for a device that said it is gone (once, until it reports again)."""
        if device in self._offline or device in self.settings.decommissioned:
            return None
        start = self._last_seen.get(device, now)
        a = _alert(device, "device_offline", "WARNING", "Device offline", "operations", now, start,
                   f"{why}; offline until it reports again")
        self._offline[device] = a
        return a

    def check_stale(self, now: float) -> list[Alert]:
        """``device_stale`` for every device silent for ``stale_after_s`` (once per silence)."""
        st = self.settings
        out = []
        limit = now - st.stale_after_s
        for dev, t in self._last_seen.items():
            if t <= limit and dev not in self._stale and dev not in self._offline and dev not in st.decommissioned:
                a = _alert(dev, "device_stale", "WARNING", "Device silent", "operations", now, t,
                           f"no reading for {now - t:.0f} s (stale after {st.stale_after_s:g} s)")
                self._stale[dev] = a
                out.append(a)
        return out
