"""Explanations: shares sum to 100 and name the family that moved."""

from __future__ import annotations

import numpy as np

from itap_stream.core.explain import explain
from itap_stream.core.features import feature_families, feature_names
from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine


def test_shares_sum_to_100(trained, schema):
    rng = np.random.default_rng(2)
    X = trained.stats.mean + rng.normal(size=(20, len(trained.feature_names))) * trained.stats.std * 3
    for e in explain(X, trained.stats.mean, trained.stats.std, feature_names(schema), feature_families(schema)):
        assert abs(sum(e.families.values()) - 100.0) < 0.05
        assert all(v >= 0 for v in e.families.values())
        assert len(e.top_features) == 5


def test_a_fault_that_moves_only_voltage_is_explained_by_voltage(trained, schema):
    """Healthy readings, then voltage alone swings; the anomaly's top family is Voltage."""
    from simulator import simulate

    sim = simulate(1, 400, seed=5, maint=False)
    frame = sim.to_frame()
    names = list(schema.names)
    vi = names.index("voltage_v")
    rng = np.random.default_rng(0)
    readings = []
    for i, row in enumerate(frame.itertuples(index=False)):
        vals = [float(getattr(row, n)) for n in names]
        if i >= 300:
            vals[vi] += rng.choice([-30.0, 30.0])
        readings.append(Reading(row.device_id, float(row.ts), row.state, tuple(vals)))
    proc = Processor(schema, trained, RuleEngine([]), window=32, hop=4, alarm_k=1, alarm_n=1)
    res = proc.process(readings)
    swing_start = float(frame["ts"].iloc[300])
    during = {i: e for i, e in res.explanations.items() if res.windows.end_ts[i] >= swing_start}
    assert len(during) >= 20, "every window with the voltage swing should be anomalous"
    for exp in during.values():
        assert exp.dominant_family == "Voltage"
        assert exp.top_features[0][0].startswith("voltage_v_")
