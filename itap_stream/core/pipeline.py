"""The single entry point of the processing core, for the consumer and the batch path.

`Processor.process` takes a micro-batch of decoded readings and returns everything
that follows from them: which readings were accepted or dropped (and why), the windows
that closed, their features, scores, explanations and the alert transitions. It does
no I/O; the caller stores and publishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from itap_stream.core.batch import BatchWindows
from itap_stream.core.detectors import BaselinePolicy, BaselineShift
from itap_stream.core.drift import DriftMonitor, drift_alert
from itap_stream.core.explain import Explanation, explain
from itap_stream.core.features import extract, feature_families, feature_names
from itap_stream.core.health import SensorHealth
from itap_stream.core.model import Artifact, confidence
from itap_stream.core.ordering import Reorderer
from itap_stream.core.readings import Block, Reading
from itap_stream.core.rules import Alert, RuleEngine, ScoredWindow, event_alert, iso
from itap_stream.core.schema import STATES, SensorSchema
from itap_stream.core.smoothing import smooth
from itap_stream.core.window import DROP_REASONS, FleetWindows, Gap, WindowBatch
from itap_stream.errors import SchemaMismatch

__all__ = [
    "Assessment", "BatchResult", "Processor", "TableResult", "assess", "baseline_alert", "check_compatible",
    "gap_alert", "quiet_windows", "raw_anomalies", "score_table", "settling_windows",
]

#: Windows whose last reading is in one of these states are scored but never anomalous.
QUIET_STATES = frozenset({"MAINT"})
#: Windows with a state change inside (a start-up, a stop: their readings mix two operating
#: states while rpm, current and temperature move between levels) are judged against their
#: own threshold, `Artifact.settling_threshold`, and are not fed to the drift monitor; this
#: feature counts the changes. On simulated healthy fleets such windows are about 4 % of all
#: and 12 % of them scored over the common threshold, against under 0.01 % of the rest: every
#: false alert on a healthy device was at a start-up or a stop.
SETTLING_FEATURE = "state_transitions"


@dataclass
class BatchResult:
    """What one micro-batch produced."""

    accepted: list[Reading] = field(default_factory=list)  # readings taken one by one
    accepted_blocks: list[Block] = field(default_factory=list)  # `Block`s taken whole (not in ``accepted``)
    # (reading, reason): "duplicate", "late", "out_of_order" (stored, not featured) or
    # "future" (beyond the clock-skew bound: neither stored nor featured)
    dropped: list[tuple[Reading, str]] = field(default_factory=list)
    windows: WindowBatch | None = None  # is_anomaly below is after k-of-n smoothing
    states: list[str] = field(default_factory=list)  # state of each window's last reading
    features: npt.NDArray[np.float64] | None = None
    scores: npt.NDArray[np.float64] | None = None
    is_anomaly: npt.NDArray[np.bool_] | None = None
    confidence: npt.NDArray[np.float64] | None = None
    explanations: dict[int, Explanation] = field(default_factory=dict)  # window index -> explanation
    alerts: list[Alert] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)  # jumps in devices' seq: readings lost on the way

    @property
    def n_windows(self) -> int:
        return 0 if self.windows is None else len(self.windows)

    @property
    def n_accepted(self) -> int:
        """Readings that went into windows, one by one or in blocks."""
        return len(self.accepted) + sum(len(b) for b in self.accepted_blocks)


def check_compatible(artifact: Artifact, schema: SensorSchema, window: int, hop: int) -> None:
    """Refuse a model trained for another schema or feature set, naming the difference."""
    trained = SensorSchema.from_dict(artifact.schema)
    if trained.names != schema.names:
        msg = (
            f"model was trained on signals {list(trained.names)} but the configured sensor schema has "
            f"{list(schema.names)}; retrain with `itap train` or point --model at a matching artifact"
        )
        raise SchemaMismatch(msg)
    if [s.family for s in trained.signals] != [s.family for s in schema.signals]:
        msg = "model was trained with other signal families than the configured sensor schema; retrain"
        raise SchemaMismatch(msg)
    expected = feature_names(schema)
    if tuple(artifact.feature_names) != expected:
        missing = sorted(set(expected) - set(artifact.feature_names))
        extra = sorted(set(artifact.feature_names) - set(expected))
        msg = f"model feature set differs from this version's features (missing {missing}, unexpected {extra})"
        raise SchemaMismatch(msg)
    if artifact.window != window:
        msg = f"model was trained with window={artifact.window} readings but the config says window={window}"
        raise SchemaMismatch(msg)
    recent = getattr(artifact.detector, "recent", None)
    if recent is not None and recent.any() and artifact.hop != hop:
        # its drifting signals' recent level counts windows back, so a window is hop readings
        msg = (f"model was trained with hop={artifact.hop} readings and its mean-shift chart counts windows at that "
               f"hop, but the config says hop={hop}; retrain with this hop")
        raise SchemaMismatch(msg)


#: Extra stored readings per device a restart replays for a detector with a per-device
#: history, so that an alarm it holds (the mean-shift chart's drifting signals) survives a
#: restart when it began at most this many readings earlier (half an hour at 1 Hz).
REPLAY_READINGS = 1800


class Processor:
    """Windows, features, scores, explanations and rules for a whole fleet.

    Parameters
    ----------
    schema
        The configured sensor schema.
    artifact
        The trained model (must match ``schema``; see `check_compatible`).
    engine
        The alert rule engine (state per device lives inside it).
    window, hop
        Readings per window and readings between windows.
    """

    def __init__(
        self,
        schema: SensorSchema,
        artifact: Artifact,
        engine: RuleEngine,
        *,
        window: int = 32,
        hop: int = 4,
        alarm_k: int = 3,
        alarm_n: int = 4,
        drift: DriftMonitor | None = None,
        health: SensorHealth | None = None,
        reorder_tolerance_s: float = 0.0,
        max_clock_skew_s: float | None = None,
        baseline: BaselinePolicy | None = None,
        gap_event_readings: int = 0,
    ) -> None:
        check_compatible(artifact, schema, window, hop)
        #: a jump in a device's seq of at least this many readings is a ``data_gap`` event (0: none)
        self.gap_event_readings = gap_event_readings
        #: when the mean-shift chart takes a settled deviation as a device's new baseline (None: never)
        self.baseline = baseline
        self.reorder = Reorderer(reorder_tolerance_s)
        self.max_clock_skew_s = max_clock_skew_s
        self.drift = drift
        self.health = health
        self.schema = schema
        self.artifact = artifact
        self.engine = engine
        self.windows = FleetWindows(len(schema.signals), window, hop)
        self._names = feature_names(schema)
        self._families = feature_families(schema)
        self.alarm_k, self.alarm_n = alarm_k, alarm_n
        self._alarm_state: dict[str, int] = {}
        self._detector_state: dict[str, Any] = {}  # per device, for detectors that score in sequence
        self._last_end: dict[str, float] = {}  # per device, the end of its latest window (event time)

    @property
    def artifact(self) -> Artifact:
        return self._artifact

    @artifact.setter
    def artifact(self, artifact: Artifact) -> None:
        """A new model (hot reload) starts its per-device history afresh."""
        self._artifact = artifact
        self._detector_state = {}

    def restore_depth(self) -> int:
        """Stored readings per device `restore` needs: the window, or for a detector with a
        per-device history (the mean-shift chart's drifting signals and its spread average)
        enough to replay it."""
        det = self.artifact.detector
        recent = getattr(det, "recent", None)
        history = (recent is not None and recent.any()) or getattr(det, "std_columns", None) is not None
        # the alarm smoothing (alarm_k of the last alarm_n windows) needs the last alarm_n windows
        smoothing = self.windows.window + (self.alarm_n - 1) * self.windows.hop
        if getattr(det, "score_sequence", None) is None or not history:
            return smoothing
        # the recent level needs window + spacing * back * hop readings; an alarm held longer
        # than that needs the readings since it began: replay up to REPLAY_READINGS more
        return max(smoothing, self.windows.window + det.spacing * det.back * self.windows.hop + REPLAY_READINGS)

    def restore(
        self, recent: dict[str, tuple[list[Reading], int]], rebaselines: dict[str, list[float]] | None = None
    ) -> int:
        """Refill the device windows from stored readings after a restart (see
        `FleetWindows.restore`); returns the devices restored. Windows then close where
        they would have without the restart, and readings delivered again count as duplicates.

        Given more readings than a window (`restore_depth`), the windows they closed are
        scored again, silently, to rebuild the detector's per-device history and the alarm
        smoothing, so the next windows score as in an uninterrupted run (unless an alarm the
        detector holds began before the replayed readings). ``rebaselines`` (per device, the
        event times of operators' rebaselines, from the stored ``baseline_shift`` events) are
        applied again where they fall in the replay, or after its first window when they are
        older. Called for a device already running (a model reload), it only replays."""
        window, hop = self.windows.window, self.windows.hop
        for device_id, (readings, count) in recent.items():
            self.windows.restore(device_id, readings[-window:], count)
            if len(readings) <= window:
                continue
            first = count - len(readings) + 1  # the 1-based count of readings[0]
            ends = [i for i in range(window - 1, len(readings))
                    if first + i >= window and (first + i - window) % hop == 0]
            if not ends:
                continue
            times = [readings[i].ts for i in ends]
            cuts = sorted({max(1, int(np.searchsorted(times, t, side="right")))
                           for t in (rebaselines or {}).get(device_id, [])})
            start = 0
            for cut in cuts:  # replay up to each rebaseline, apply it, go on
                self._replay(device_id, readings, ends[start:cut])
                self._last_end[device_id] = times[cut - 1]
                self.rebaseline(device_id, times[cut - 1])
                start = cut
            if start < len(ends):
                self._replay(device_id, readings, ends[start:])
            self._last_end[device_id] = times[-1]
        return len(recent)

    def known_devices(self) -> set[str]:
        """Every device some per-device state is held for."""
        out = set(self.windows.devices) | self.engine.devices()
        if self.health is not None:
            out |= self.health.devices()
        return out

    def forget(self, devices: set[str]) -> int:
        """Drop every per-device state of ``devices`` (windows, reorder buffer, alarm
        smoothing, detector history, open alerts, sensor health, drift): with ``source: nats``
        their partition moved to another consumer, which `restore`s them from the shared
        store. Returns the devices that were held."""
        n = self.windows.forget(devices)
        self.reorder.forget(devices)
        for d in (self._alarm_state, self._detector_state, self._last_end):
            for device in devices & d.keys():
                del d[device]
        self.engine.forget(devices)
        if self.health is not None:
            self.health.forget(devices)
        if self.drift is not None:
            self.drift.forget(devices)
        return n

    def _replay(self, device_id: str, readings: list[Reading], ends: list[int]) -> None:
        """Score the windows ending at readings ``ends`` again, silently (`restore`)."""
        if not ends:
            return
        window = self.windows.window
        values = np.array([[r.values for r in readings[i - window + 1 : i + 1]] for i in ends], dtype=np.float64)
        states = np.array([[STATES.index(r.state) for r in readings[i - window + 1 : i + 1]] for i in ends],
                          dtype=np.int8)
        last_states = [readings[i].state for i in ends]
        # baseline shifts replay too (their events were published the first time)
        assess(self.artifact, extract(values, states), [device_id] * len(ends), last_states, self._alarm_state,
               self.alarm_k, self.alarm_n, self._names, self._families, detector_state=self._detector_state,
               times=[readings[i].ts for i in ends], baseline=self.baseline)

    def rebaseline(self, device_id: str, at: float) -> Alert | str:
        """An operator accepts a device's current state as its normal (`MeanShiftDetector.rebaseline`):
        the ``baseline_shift`` event, or why it cannot be done."""
        det = self.artifact.detector
        if not hasattr(det, "rebaseline"):
            return (f"the model's detector ({getattr(det, 'name', type(det).__name__)}) keeps no per-device baseline; "
                    "retrain with `itap train` on data of the new normal instead")
        ev = det.rebaseline(self._detector_state, device_id)
        if ev is None:
            return f"no scored window of device {device_id} since the model was loaded: nothing to take as its normal"
        self._alarm_state[device_id] = 0  # the smoothing forgets the alarm too
        end = self._last_end.get(device_id, at)  # event time: where in the device's readings it happened
        return baseline_alert(ev, self.schema, end, end, "", 0.0)

    def _push_mixed(self, items: Sequence[Reading | Block], result: BatchResult) -> None:
        """Push readings and blocks in arrival order; a block that cannot go in whole is
        pushed one reading at a time."""
        push, push_block = self.windows.push, self.windows.push_block
        accepted = result.accepted
        for r in items:
            if isinstance(r, Block):
                if push_block(r) is not None:
                    result.accepted_blocks.append(r)
                    continue
                ones: list[Reading] = r.readings()
            else:
                ones = [r]
            for one in ones:
                status = push(one)
                if status >= 0:
                    accepted.append(one)
                else:
                    result.dropped.append((one, DROP_REASONS[status]))

    @staticmethod
    def _unblock(items: Sequence[Reading | Block], limit: float | None, reordering: bool) -> list[Reading | Block]:
        """``items`` with the blocks that cannot go in whole (a reading beyond ``limit``, or a
        reorder buffer in front of the windows) taken apart into readings, in place."""
        out: list[Reading | Block] = []
        for r in items:
            if isinstance(r, Block) and (reordering or (limit is not None and r.ts[-1] > limit)):
                out.extend(r.readings())
            else:
                out.append(r)
        return out

    @property
    def held(self) -> int:
        """Readings waiting in the reorder buffer."""
        return len(self.reorder)

    def process(self, readings: Sequence[Reading | Block], now: float | None = None, *, flush: bool = False
                ) -> BatchResult:
        """Run one micro-batch of readings (arrival order) through the core; ``now`` is the
        service clock at arrival (for stale devices, the clock-skew bound and the reorder
        buffer; the core never reads a clock). ``flush`` releases every held reading.

        A `Block` (an array payload decoded column-wise) goes into its device's ring as one
        slice; one that cannot (a reading beyond the clock-skew bound, the reorder buffer
        on, a reading not later than the device's last) is taken one reading at a time,
        so the result is the same either way."""
        result = BatchResult()
        health = self.health
        skew = self.max_clock_skew_s
        reorder = self.reorder
        mixed = any(type(r) is Block for r in readings)
        if mixed:
            limit = now + skew if skew is not None and now is not None else None
            readings = self._unblock(readings, limit, reorder.tolerance_s > 0)
            mixed = any(type(r) is Block for r in readings)
        if skew is not None and now is not None and readings:
            limit = now + skew
            # (a block left here holds no reading beyond the limit: _unblock took those apart)
            if any(r.ts > limit for r in readings if type(r) is not Block):
                result.dropped.extend((r, "future") for r in readings if isinstance(r, Reading) and r.ts > limit)
                readings = [r for r in readings if type(r) is Block or r.ts <= limit]
        if health is not None and now is not None and readings:
            result.alerts.extend(health.seen({r.device_id for r in readings}, now))
        if reorder.tolerance_s > 0:
            # (no blocks are left with a reorder buffer: _unblock took them apart)
            readings = reorder.add([r for r in readings if not isinstance(r, Block)], now)
            if flush:
                readings.extend(reorder.flush())
            elif now is not None and reorder.held:
                readings.extend(reorder.expire(now))
        push = self.windows.push
        accepted = result.accepted
        if mixed:
            self._push_mixed(readings, result)
        else:  # single readings only: the plain loop
            for r in readings:
                status = push(r)  # type: ignore[arg-type]  # no Block here
                if status >= 0:
                    accepted.append(r)  # type: ignore[arg-type]
                else:
                    result.dropped.append((r, DROP_REASONS[status]))  # type: ignore[arg-type]
        if self.windows.gaps:
            result.gaps = self.windows.gaps
            self.windows.gaps = []
            least = self.gap_event_readings
            if least > 0:
                result.alerts.extend(gap_alert(g) for g in result.gaps if g.missing >= least)
        batch = self.windows.take_due()
        result.windows = batch
        if not len(batch):
            return result
        self._last_end.update(zip(batch.device_ids, batch.end_ts.tolist(), strict=True))
        states = result.states = batch.last_states
        if health is not None:
            result.alerts.extend(health.windows(batch.device_ids, batch.values, states, batch.start_ts.tolist(),
                                                batch.end_ts.tolist()))
        X = extract(batch.values, batch.states)
        a = assess(self.artifact, X, batch.device_ids, states, self._alarm_state, self.alarm_k, self.alarm_n,
                   self._names, self._families, detector_state=self._detector_state, times=batch.end_ts,
                   baseline=self.baseline)
        result.features, result.scores, result.is_anomaly, result.confidence = X, a.scores, a.flags, a.confidence
        result.explanations = a.explanations
        scored = scored_windows(batch.device_ids, batch.start_ts, batch.end_ts, states, a, batch.tags)
        alerts = self.engine.evaluate(scored)
        for ev in a.baseline_events:
            i = ev.index
            alerts.append(baseline_alert(ev, self.schema, float(batch.start_ts[i]), float(batch.end_ts[i]), states[i],
                                         float(a.scores[i])))
        if health is not None and health.settings.decommissioned:
            gone = health.settings.decommissioned
            alerts = [al for al in alerts if al.device_id not in gone]
        result.alerts.extend(alerts)
        if self.drift is not None:
            quiet = quiet_windows(X, states, self._names)
            events = self.drift.update(batch.device_ids, a.scores, a.flags, batch.end_ts,
                                       threshold=self.artifact.threshold, quiet=quiet)
            result.alerts.extend(drift_alert(e) for e in events)
        return result


@dataclass
class Assessment:
    """Scores, smoothed anomaly flags, confidences and explanations of some windows."""

    scores: npt.NDArray[np.float64]
    flags: npt.NDArray[np.bool_]
    confidence: npt.NDArray[np.float64]
    explanations: dict[int, Explanation]
    baseline_events: list[BaselineShift] = field(default_factory=list)


def quiet_windows(
    X: npt.NDArray[np.float64], last_states: Sequence[str], names: Sequence[str]
) -> npt.NDArray[np.bool_]:
    """Windows not fed to the drift monitor: those ending in a `QUIET_STATES` state and
    those with a state change inside (`settling_windows`).

    Examples
    --------
    >>> X = np.array([[0.0], [1.0], [0.0]])
    >>> quiet_windows(X, ["RUN", "RUN", "MAINT"], ["state_transitions"]).tolist()
    [False, True, True]
    """
    quiet = np.fromiter((s in QUIET_STATES for s in last_states), dtype=bool, count=len(last_states))
    return quiet | settling_windows(X, names)


def settling_windows(X: npt.NDArray[np.float64], names: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Windows with a state change inside (`SETTLING_FEATURE` over 0).

    Examples
    --------
    >>> settling_windows(np.array([[0.0], [2.0]]), ["state_transitions"]).tolist()
    [False, True]
    """
    if SETTLING_FEATURE not in names:
        return np.zeros(len(X), dtype=bool)
    return np.asarray(X[:, list(names).index(SETTLING_FEATURE)] > 0)


def raw_anomalies(
    artifact: Artifact,
    scores: npt.NDArray[np.float64],
    X: npt.NDArray[np.float64],
    last_states: Sequence[str],
    names: Sequence[str],
) -> npt.NDArray[np.bool_]:
    """Windows over their threshold, before smoothing: `Artifact.threshold`, or for a window
    with a state change inside `Artifact.settling_threshold` (never, without one); a window
    ending in a `QUIET_STATES` state never is."""
    settling = settling_windows(X, names)
    limit = np.where(settling, np.inf if artifact.settling_threshold is None else artifact.settling_threshold,
                     artifact.threshold)
    quiet = np.fromiter((s in QUIET_STATES for s in last_states), dtype=bool, count=len(last_states))
    return np.asarray(scores >= limit) & ~quiet


def score_in_order(
    detector: Any,
    X: npt.NDArray[np.float64],
    device_ids: Sequence[str],
    state: dict[str, Any],
    *,
    times: npt.ArrayLike | None = None,
    baseline: BaselinePolicy | None = None,
    events: list[BaselineShift] | None = None,
) -> npt.NDArray[np.float64]:
    """Scores of windows in event order per device: a detector with a per-device history
    (``score_sequence``, the mean-shift chart's drifting signals) carries it in ``state``,
    and with ``times`` and a ``baseline`` policy moves a device's baseline (into ``events``)."""
    seq = getattr(detector, "score_sequence", None)
    if seq is None:
        return detector.score(X)
    if baseline is None or times is None:
        return seq(X, device_ids, state)
    return seq(X, device_ids, state, times=np.asarray(times, dtype=np.float64), policy=baseline, events=events)


def assess(
    artifact: Artifact,
    X: npt.NDArray[np.float64],
    device_ids: Sequence[str],
    last_states: Sequence[str],
    alarm_state: dict[str, int],
    alarm_k: int,
    alarm_n: int,
    names: Sequence[str],
    families: Sequence[str],
    scores: npt.NDArray[np.float64] | None = None,
    *,
    detector_state: dict[str, Any] | None = None,
    times: npt.ArrayLike | None = None,
    baseline: BaselinePolicy | None = None,
    events: list[BaselineShift] | None = None,
) -> Assessment:
    """Score feature rows, smooth per device (windows in event order per device), explain the anomalies.

    The stream (`Processor`) and the batch path (`score_table`) both decide through here;
    ``times`` (window ends) and ``baseline`` let the chart move a device's baseline
    (`Assessment.baseline_events`; given ``scores``, the caller passes the ``events`` it got).
    """
    events = [] if events is None else events
    if scores is None:
        scores = score_in_order(artifact.detector, X, device_ids, {} if detector_state is None else detector_state,
                                times=times, baseline=baseline, events=events)
    raw = raw_anomalies(artifact, scores, X, last_states, names)
    flags = smooth(device_ids, raw, alarm_state, k=alarm_k, n=alarm_n)
    conf = confidence(scores, artifact.stats.calibration_scores)
    explanations: dict[int, Explanation] = {}
    idx = np.flatnonzero(flags)
    if len(idx):
        exps = explain(X[idx], artifact.stats.mean, artifact.stats.std, names, families)
        explanations = dict(zip(idx.tolist(), exps, strict=True))
    return Assessment(scores, flags, conf, explanations, events)


def gap_alert(gap: Gap) -> Alert:
    """The ``data_gap`` event of a jump in a device's ``seq`` (status ``event``)."""
    return event_alert(
        f"{gap.device_id}|data_gap|{gap.seq_after}|{gap.ts_after!r}", "data_gap", "WARNING", gap.device_id,
        gap.ts_before, gap.ts_after, score=float(gap.missing), confidence=1.0, route="operations",
        anomalies=gap.missing,
        root_cause=(
            f"{gap.missing:,} reading(s) of {gap.device_id} never arrived (seq {gap.seq_before + 1} to "
            f"{gap.seq_after - 1}, between {iso(gap.ts_before)} and {iso(gap.ts_after)}): check the device's link "
            "and the broker's queue for this consumer (mosquitto drops messages beyond max_queued_messages)"
        ),
    )


def baseline_alert(
    ev: BaselineShift, schema: SensorSchema, start: float, end: float, state: str, score: float
) -> Alert:
    """The ``baseline_shift`` event as an alert record (status ``event``: it neither fires nor
    resolves): which signals moved, by how many training std, from what to what."""
    names = feature_names(schema)
    family = {s.name: s.family for s in schema.signals}
    unit = {s.name: s.unit for s in schema.signals}
    moved = []
    for col, b, a, z in zip(ev.columns, ev.before, ev.after, ev.shift_sd, strict=True):
        sig = names[col].removesuffix("_mean")
        moved.append((sig, b, a, z))
    moved.sort(key=lambda x: -abs(x[3]) if np.isfinite(x[3]) else 0.0)
    # the signals that moved (half a training std or more), at least the one that moved most
    shown_sigs = [x for x in moved if not np.isfinite(x[3]) or abs(x[3]) >= 0.5] or moved[:1]
    shown = ", ".join(
        f"{sig} {b:.4g} -> {a:.4g}{(' ' + unit[sig]) if unit.get(sig) else ''}"
        + (f" ({z:+.1f} std)" if np.isfinite(z) else "")
        for sig, b, a, z in shown_sigs[:4]
    )
    why = {
        "settled": (f"after the alarm the readings came back part of the way and have not changed for "
                    f"{ev.settled_s / 60:.0f} min: the settled state is taken as the device's new normal"),
        "held": (f"a small shift that has not changed for {ev.settled_s / 60:.0f} min is taken as the device's new "
                 "normal"),
        "operator": "an operator accepted the device's current state as its new normal",
    }[ev.how]
    weights = {sig: abs(z) for sig, _b, _a, z in moved if np.isfinite(z)}
    total = sum(weights.values())
    families: dict[str, float] = {}
    for sig, w in weights.items():
        families[family[sig]] = families.get(family[sig], 0.0) + (w / total if total else 0.0)
    return event_alert(
        f"{ev.device_id}|baseline_shift|{end!r}|{ev.how}", "baseline_shift", "INFO", ev.device_id, start, end,
        state=state, score=score, route="engineering", note=ev.how,
        root_cause=f"baseline shift ({ev.how}): {why}; {shown}. Retrain with `itap train` if this is not normal",
        families={k: round(v, 4) for k, v in families.items()},
        top_features=[(f"{sig}_mean", round(float(z), 3)) for sig, _b, _a, z in moved if np.isfinite(z)][:5],
    )


def scored_windows(
    device_ids: Sequence[str],
    start_ts: npt.ArrayLike,
    end_ts: npt.ArrayLike,
    states: Sequence[str],
    a: Assessment,
    tags: Sequence[tuple[str, ...]] | None = None,
    order: Sequence[int] | None = None,
) -> list[ScoredWindow]:
    """`ScoredWindow` objects for the rule engine (in ``order`` when given)."""
    starts = np.asarray(start_ts, dtype=np.float64).tolist()
    ends = np.asarray(end_ts, dtype=np.float64).tolist()
    scores, flags, conf = a.scores.tolist(), a.flags.tolist(), a.confidence.tolist()
    get = a.explanations.get
    no_tags = [()] * len(ends) if tags is None else tags
    return [
        ScoredWindow(device_ids[i], starts[i], ends[i], states[i], scores[i], flags[i], conf[i], get(i), no_tags[i])
        for i in (range(len(ends)) if order is None else order)
    ]


@dataclass
class TableResult:
    """Every window of a table, scored and explained, and the alerts a live run would have raised."""

    windows: BatchWindows
    assessment: Assessment
    alerts: list[Alert]


def score_table(
    windows: BatchWindows,
    artifact: Artifact,
    engine: RuleEngine,
    schema: SensorSchema,
    *,
    alarm_k: int = 3,
    alarm_n: int = 4,
    map_fn: Callable[..., Iterable[Any]] = map,
    block: int = 2048,
    drift: DriftMonitor | None = None,
    baseline: BaselinePolicy | None = None,
) -> TableResult:
    """The batch path: the same scoring, smoothing, explanations and rules as `Processor`,
    applied to all windows of a recording at once (windows are smoothed per device in
    time order, and fed to the rules, and to ``drift`` when given, in event-time order)."""
    n = len(windows)
    states = [STATES[c] for c in windows.last_state.tolist()]
    dev = windows.device_ids.tolist()
    # smoothing and rules are causal per device: walk windows by device, then time
    order = np.lexsort((windows.end_ts, pd.factorize(windows.device_ids)[0])) if n else np.zeros(0, dtype=np.intp)
    X = windows.features[order]
    dev_sorted = [dev[i] for i in order.tolist()]
    events: list[BaselineShift] = []
    if hasattr(artifact.detector, "score_sequence"):  # a per-device history: one pass in order
        scores = score_in_order(artifact.detector, X, dev_sorted, {}, times=windows.end_ts[order], baseline=baseline,
                                events=events)
    else:
        blocks = list(map_fn(artifact.detector.score, [X[i : i + block] for i in range(0, n, block)]))
        scores = np.concatenate(blocks) if blocks else np.zeros(0)
    a_sorted = assess(
        artifact, X, dev_sorted, [states[i] for i in order.tolist()], {},
        alarm_k, alarm_n, feature_names(schema), feature_families(schema), scores=scores, events=events,
    )
    # back to the input order of the windows
    inv = np.empty(n, dtype=np.intp)
    inv[order] = np.arange(n)
    a = Assessment(
        scores=a_sorted.scores[inv],
        flags=a_sorted.flags[inv],
        confidence=a_sorted.confidence[inv],
        explanations={int(order[i]): e for i, e in a_sorted.explanations.items()},
    )
    # the rules need a device's windows only from its first anomaly (or tag) on: before
    # that nothing can fire and nothing is open to resolve
    codes = pd.factorize(windows.device_ids)[0] if n else np.zeros(0, dtype=np.intp)
    eventful = a.flags | np.fromiter((bool(t) for t in windows.tags), dtype=bool, count=n) if n else a.flags
    first = np.full(codes.max() + 1 if n else 0, np.inf)
    np.minimum.at(first, codes[eventful], windows.end_ts[eventful])
    relevant = windows.end_ts >= first[codes]
    by_time = [i for i in np.argsort(windows.end_ts, kind="stable").tolist() if relevant[i]]
    alerts = engine.evaluate(scored_windows(dev, windows.start_ts, windows.end_ts, states, a, windows.tags, by_time))
    if events:
        for ev in events:
            j = int(order[ev.index])
            alerts.append(baseline_alert(ev, schema, float(windows.start_ts[j]), float(windows.end_ts[j]), states[j],
                                         float(a.scores[j])))
        alerts.sort(key=lambda al: al.window_end)
    if drift is not None and n:
        t_order = np.argsort(windows.end_ts, kind="stable")
        quiet = quiet_windows(windows.features, states, feature_names(schema))[t_order]
        drifts = drift.update([dev[i] for i in t_order.tolist()], a.scores[t_order], a.flags[t_order],
                              windows.end_ts[t_order], threshold=artifact.threshold, quiet=quiet)
        if drifts:
            alerts = sorted([*alerts, *(drift_alert(e) for e in drifts)], key=lambda al: al.window_end)
    return TableResult(windows, a, alerts)
