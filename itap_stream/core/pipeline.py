"""The single entry point of the processing core, for the consumer and the batch path.

`Processor.process` takes a micro-batch of decoded readings and returns everything
that follows from them: which readings were accepted or dropped (and why), the windows
that closed, their features, scores, explanations and the alert transitions. It does
no I/O; the caller stores and publishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from itap_stream.core.explain import Explanation, explain
from itap_stream.core.features import extract, feature_families, feature_names
from itap_stream.core.model import Artifact, confidence
from itap_stream.core.readings import Reading
from itap_stream.core.rules import Alert, RuleEngine, ScoredWindow
from itap_stream.core.schema import SensorSchema
from itap_stream.core.smoothing import smooth
from itap_stream.core.window import DUPLICATE, FleetWindows, WindowBatch
from itap_stream.errors import SchemaMismatch

__all__ = ["BatchResult", "Processor", "check_compatible"]

#: Windows whose last reading is in one of these states are scored but never anomalous.
QUIET_STATES = frozenset({"MAINT"})


@dataclass
class BatchResult:
    """What one micro-batch produced."""

    accepted: list[Reading] = field(default_factory=list)
    dropped: list[tuple[Reading, str]] = field(default_factory=list)  # (reading, "duplicate" | "out_of_order")
    windows: WindowBatch | None = None  # is_anomaly below is after k-of-n smoothing
    features: npt.NDArray[np.float64] | None = None
    scores: npt.NDArray[np.float64] | None = None
    is_anomaly: npt.NDArray[np.bool_] | None = None
    confidence: npt.NDArray[np.float64] | None = None
    explanations: dict[int, Explanation] = field(default_factory=dict)  # window index -> explanation
    alerts: list[Alert] = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return 0 if self.windows is None else len(self.windows)


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
    ) -> None:
        check_compatible(artifact, schema, window, hop)
        self.schema = schema
        self.artifact = artifact
        self.engine = engine
        self.windows = FleetWindows(len(schema.signals), window, hop)
        self._names = feature_names(schema)
        self._families = feature_families(schema)
        self.alarm_k, self.alarm_n = alarm_k, alarm_n
        self._alarm_state: dict[str, int] = {}

    def process(self, readings: Sequence[Reading]) -> BatchResult:
        """Run one micro-batch of readings (arrival order) through the core."""
        result = BatchResult()
        push = self.windows.push
        accepted = result.accepted
        for r in readings:
            status = push(r)
            if status >= 0:
                accepted.append(r)
            else:
                result.dropped.append((r, "duplicate" if status == DUPLICATE else "out_of_order"))
        batch = self.windows.take_due()
        result.windows = batch
        if not len(batch):
            return result
        art = self.artifact
        X = extract(batch.values, batch.states)
        scores = art.detector.score(X)
        states = batch.last_states
        quiet = np.fromiter((s in QUIET_STATES for s in states), dtype=bool, count=len(states))
        raw = (scores >= art.threshold) & ~quiet
        flags = smooth(batch.device_ids, raw, self._alarm_state, k=self.alarm_k, n=self.alarm_n)
        conf = confidence(scores, art.stats.calibration_scores)
        result.features, result.scores, result.is_anomaly, result.confidence = X, scores, flags, conf
        idx = np.flatnonzero(flags)
        if len(idx):
            exps = explain(X[idx], art.stats.mean, art.stats.std, self._names, self._families)
            result.explanations = dict(zip(idx.tolist(), exps))
        scored = [
            ScoredWindow(
                device_id=batch.device_ids[i],
                start_ts=float(batch.start_ts[i]),
                end_ts=float(batch.end_ts[i]),
                state=states[i],
                score=float(scores[i]),
                is_anomaly=bool(flags[i]),
                confidence=float(conf[i]),
                explanation=result.explanations.get(i),
                tags=batch.tags[i],
            )
            for i in range(len(batch))
        ]
        result.alerts = self.engine.evaluate(scored)
        return result
