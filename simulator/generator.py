"""A seeded fleet simulator for the default five-signal schema.

Each device runs a RUN / IDLE / MAINT state machine. In RUN a slowly wandering load
drives the physics: rpm follows the load with a short lag, current follows load and
rpm, temperature follows load with a long lag, vibration rises with rpm, voltage sags
a little under current; every signal has its own sensor noise.

Faults, each with an onset, a duration and a rate (intensity):

``bearing_wear``
    vibration grows gradually and a periodic component appears (a spectral change).
``overheat``
    temperature drifts upwards (``rate`` °C per minute on top of the physics).
``power_instability``
    voltage and current spikes and sags (``rate`` = share of readings hit).
``sensor_dropout``
    one sensor reports nothing (``rate`` = share of readings missing).

While a fault is active the device stays in RUN and every reading carries the fault's
name as its ground-truth ``label`` (None when healthy). Same seed, same output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

__all__ = [
    "FAULT_KINDS", "MAX_READINGS", "SIGNALS", "Fault", "FleetSimulation", "check_size", "default_faults", "device_name",
    "simulate",
]

FAULT_KINDS: tuple[str, ...] = ("bearing_wear", "overheat", "power_instability", "sensor_dropout")
SIGNALS: tuple[str, ...] = ("rpm", "temp_c", "voltage_v", "current_a", "vibration_mm_s")
_STATES = ("RUN", "IDLE", "MAINT")
#: 2026-01-01T00:00:00Z
DEFAULT_START_TS = 1767225600.0
_DEFAULT_RATE = {"bearing_wear": 1.0, "overheat": 6.0, "power_instability": 0.35, "sensor_dropout": 0.6}
#: The most readings one simulation holds in memory: it is generated whole (about 200 bytes a
#: reading at the peak, so some 4 GB), then published or written. Refused up front beyond this.
MAX_READINGS = 20_000_000


def check_size(n_devices: int, duration_s: float, interval_s: float = 1.0) -> int:
    """The number of readings of a simulation; `ValueError` unless it is finite, at least
    one and at most `MAX_READINGS`.

    Examples
    --------
    >>> check_size(10, 600)
    6000
    >>> try:
    ...     check_size(10, 1e9)
    ... except ValueError as exc:
    ...     print(str(exc).split(", more")[0])
    10 devices for 1,000,000,000 s at one reading per 1 s is 10,000,000,000 readings
    """
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        msg = f"need at least one device, got {n_devices!r}"
        raise ValueError(msg)
    try:
        duration_s, interval_s = float(duration_s), float(interval_s)
    except (TypeError, ValueError, OverflowError):
        msg = "duration and interval must be numbers of seconds within the range of a float"
        raise ValueError(msg) from None
    if not (math.isfinite(duration_s) and duration_s > 0):
        msg = f"duration must be a positive, finite number of seconds, got {duration_s!r}"
        raise ValueError(msg)
    if not (math.isfinite(interval_s) and interval_s > 0):
        msg = f"interval must be a positive, finite number of seconds, got {interval_s!r}"
        raise ValueError(msg)
    steps = int(duration_s // interval_s)
    if steps < 1:
        msg = f"duration {duration_s}s is shorter than one interval ({interval_s}s)"
        raise ValueError(msg)
    readings = steps * int(n_devices)
    if readings > MAX_READINGS:
        msg = (
            f"{n_devices:,} devices for {duration_s:,.0f} s at one reading per {interval_s:g} s is {readings:,} "
            f"readings, more than the {MAX_READINGS:,} a simulation may hold in memory; simulate fewer devices "
            "or a shorter duration"
        )
        raise ValueError(msg)
    return readings


def device_name(i: int) -> str:
    """Device id of the i-th simulated device (1-based), e.g. ``DEV-0001``."""
    return f"DEV-{i:04d}"


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Parameters
    ----------
    kind
        One of `FAULT_KINDS`.
    device
        Device id, e.g. ``DEV-0003``.
    onset_s, duration_s
        Seconds after the start of the simulation; the fault is active in ``[onset, onset + duration)``.
    rate
        Intensity (see module docstring); None = the kind's default.
    signal
        For ``sensor_dropout``: which sensor goes silent (default ``temp_c``).
    """

    kind: str
    device: str
    onset_s: float
    duration_s: float
    rate: float | None = None
    signal: str = "temp_c"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            msg = f"unknown fault kind {self.kind!r}; known: {', '.join(FAULT_KINDS)}"
            raise ValueError(msg)
        finite = math.isfinite(self.onset_s) and math.isfinite(self.duration_s)
        if not finite or self.onset_s < 0 or self.duration_s <= 0:
            msg = (
                f"fault {self.kind} on {self.device}: onset must be >= 0 and duration > 0 seconds, both finite; "
                f"got {self.onset_s} and {self.duration_s}"
            )
            raise ValueError(msg)
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate >= 0):
            msg = f"fault {self.kind} on {self.device}: rate must be a finite number >= 0, got {self.rate}"
            raise ValueError(msg)
        if self.signal not in SIGNALS:
            msg = f"fault {self.kind} on {self.device}: unknown signal {self.signal!r}"
            raise ValueError(msg)

    @property
    def intensity(self) -> float:
        return _DEFAULT_RATE[self.kind] if self.rate is None else float(self.rate)


def default_faults(
    n_devices: int, duration_s: float, kinds: Sequence[str] = FAULT_KINDS, *, onset_frac: float = 0.4
) -> list[Fault]:
    """Spread ``kinds`` over the fleet: fault k hits device ``n - k`` (so DEV-0001 stays healthy).

    Examples
    --------
    >>> [(f.kind, f.device) for f in default_faults(10, 600)][:2]
    [('bearing_wear', 'DEV-0010'), ('overheat', 'DEV-0009')]
    """
    faults = []
    onset = duration_s * onset_frac
    for k, kind in enumerate(kinds):
        dev = n_devices - k
        if dev < 2:
            break
        faults.append(Fault(kind=kind, device=device_name(dev), onset_s=onset, duration_s=duration_s - onset))
    return faults


@dataclass
class FleetSimulation:
    """Simulated telemetry: ``values`` is ``(steps, devices, 5)`` with NaN for dropouts."""

    device_ids: list[str]
    ts: npt.NDArray[np.float64]
    states: npt.NDArray[np.int8]  # (steps, devices), codes into ("RUN", "IDLE", "MAINT")
    values: npt.NDArray[np.float64]
    labels: npt.NDArray[np.object_]  # (steps, devices)
    faults: list[Fault]

    @property
    def n_readings(self) -> int:
        return self.values.shape[0] * self.values.shape[1]

    def step_readings(self, step: int) -> list[dict[str, object]]:
        """All devices' readings at one time step, as JSON-ready reading objects."""
        out = []
        vals = self.values[step]
        for d, dev in enumerate(self.device_ids):
            r: dict[str, object] = {
                "device_id": dev,
                "ts": float(self.ts[step]),
                "state": _STATES[int(self.states[step, d])],
                "seq": step,
            }
            for s, name in enumerate(SIGNALS):
                v = vals[d, s]
                r[name] = None if np.isnan(v) else round(float(v), 4)
            r["label"] = self.labels[step, d]
            out.append(r)
        return out

    def iter_readings(self) -> Iterator[dict[str, object]]:
        for step in range(len(self.ts)):
            yield from self.step_readings(step)

    def to_frame(self):  # type: ignore[no-untyped-def]  # pandas is imported lazily
        """Long table, one row per reading, ordered by time then device."""
        import pandas as pd

        steps, n_dev = self.states.shape
        frame = pd.DataFrame(
            {
                "ts": np.repeat(self.ts, n_dev),
                "device_id": np.tile(np.asarray(self.device_ids, dtype=object), steps),
                "state": np.asarray(_STATES, dtype=object)[self.states.ravel()],
                "seq": np.repeat(np.arange(steps), n_dev),
            }
        )
        flat = self.values.reshape(steps * n_dev, len(SIGNALS)).round(4)
        for s, name in enumerate(SIGNALS):
            frame[name] = flat[:, s]
        frame["label"] = self.labels.ravel()
        return frame


def simulate(
    n_devices: int = 10,
    duration_s: float = 3600.0,
    *,
    seed: int = 0,
    faults: Sequence[Fault] = (),
    interval_s: float = 1.0,
    start_ts: float = DEFAULT_START_TS,
    maint: bool = True,
) -> FleetSimulation:
    """Simulate a fleet for ``duration_s`` seconds of event time.

    Examples
    --------
    >>> sim = simulate(3, 60, seed=1)
    >>> sim.values.shape
    (60, 3, 5)
    >>> bool((simulate(3, 60, seed=1).values == sim.values).all())
    True
    """
    steps = check_size(n_devices, duration_s, interval_s) // n_devices
    rng = np.random.default_rng(seed)
    ids = [device_name(i + 1) for i in range(n_devices)]
    t = cast(npt.NDArray[np.float64], np.arange(steps) * interval_s)
    D = n_devices

    active = np.zeros((steps, D), dtype=bool)
    labels = np.full((steps, D), None, dtype=object)
    for f in faults:
        if f.device not in ids:
            msg = f"fault {f.kind} names device {f.device!r}, which is not in the simulated fleet"
            raise ValueError(msg)
        d = ids.index(f.device)
        on = (t >= f.onset_s) & (t < f.onset_s + f.duration_s)
        active[on, d] = True
        labels[on, d] = f.kind

    # state machine, vectorised over devices, step by step (cheap: a few ops per step)
    p_leave = {0: interval_s / 1200.0, 1: interval_s / 300.0, 2: interval_s / 600.0}
    states = np.zeros((steps, D), dtype=np.int8)
    cur = np.zeros(D, dtype=np.int8)
    u = rng.random((steps, D))
    nxt = rng.random((steps, D))
    for i in range(steps):
        leave = u[i] < np.select([cur == 0, cur == 1], [p_leave[0], p_leave[1]], p_leave[2])
        # RUN -> IDLE (or MAINT 5% of the time); IDLE -> RUN; MAINT -> IDLE
        target = np.where(cur == 0, np.where(nxt[i] < 0.05 if maint else False, 2, 1), np.where(cur == 1, 0, 1))
        cur = np.where(leave, target, cur).astype(np.int8)
        cur[active[i]] = 0
        states[i] = cur

    # load: AR(1) wander in RUN, low at IDLE, zero in MAINT
    wander = np.empty((steps, D))
    level = rng.uniform(0.6, 0.9, D)
    shocks = rng.normal(0, 0.01, (steps, D))
    for i in range(steps):
        level = np.clip(level + 0.02 * (0.75 - level) + shocks[i], 0.45, 1.0)
        wander[i] = level
    load = np.where(states == 0, wander, np.where(states == 1, 0.08, 0.0))

    nominal_rpm = rng.uniform(1400, 1600, D)
    rpm_target = nominal_rpm * load
    rpm = _lag(rpm_target, tau_steps=5.0 / interval_s, start=rpm_target[0])
    temp_target = 25.0 + 40.0 * load
    temp = _lag(temp_target, tau_steps=120.0 / interval_s, start=temp_target[0])
    current = 1.0 + 18.0 * load * (rpm / np.maximum(nominal_rpm, 1.0)) * (states < 2)
    voltage = 230.0 - 0.05 * current + np.zeros((steps, D))
    vibration = 0.4 + 2.5 * rpm / 1500.0

    noise = rng.normal(size=(5, steps, D))
    rpm = rpm + 4.0 * noise[0]
    temp = temp + 0.15 * noise[1]
    voltage = voltage + 0.8 * noise[2]
    current = current + 0.25 * noise[3]
    vibration = vibration + 0.08 * noise[4]

    values = np.stack([rpm, temp, voltage, current, vibration], axis=2)
    for f in faults:
        _inject(values, f, ids.index(f.device), t, rng)
    # physical floor: no negative speeds, currents or vibration
    for s in (0, 3, 4):
        values[:, :, s] = np.where(np.isnan(values[:, :, s]), np.nan, np.maximum(values[:, :, s], 0.0))
    return FleetSimulation(ids, start_ts + t, states, values, labels, list(faults))


def _lag(target: npt.NDArray[np.float64], tau_steps: float, start: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """First-order lag (exponential smoothing) along time."""
    alpha = 1.0 / max(tau_steps, 1.0)
    out = np.empty_like(target)
    cur = np.array(start, dtype=np.float64)
    for i in range(len(target)):
        cur = cur + alpha * (target[i] - cur)
        out[i] = cur
    return out


def _inject(
    values: npt.NDArray[np.float64], f: Fault, d: int, t: npt.NDArray[np.float64], rng: np.random.Generator
) -> None:
    on = np.flatnonzero((t >= f.onset_s) & (t < f.onset_s + f.duration_s))
    if not len(on):
        return
    k = f.intensity
    elapsed = t[on] - f.onset_s
    progress = np.clip(elapsed / max(f.duration_s, 1.0), 0.0, 1.0)
    if f.kind == "bearing_wear":
        growth = k * (0.8 + 2.5 * progress)
        values[on, d, 4] += growth * (1.0 + 0.9 * np.sin(2 * np.pi * elapsed / 4.0))
    elif f.kind == "overheat":
        values[on, d, 1] += 4.0 + k * elapsed / 60.0
    elif f.kind == "power_instability":
        hit = rng.random(len(on)) < k
        sign = np.where(rng.random(len(on)) < 0.5, -1.0, 1.0)
        volt = sign * rng.uniform(12.0, 35.0, len(on))
        values[on, d, 2] += np.where(hit, volt, 0.0)
        values[on, d, 3] += np.where(hit, -sign * rng.uniform(2.0, 6.0, len(on)), 0.0)
    elif f.kind == "sensor_dropout":
        s = SIGNALS.index(f.signal)
        miss = rng.random(len(on)) < k
        values[on[miss], d, s] = np.nan
