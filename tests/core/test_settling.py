"""Start-ups and stops of healthy devices raise nothing: a window with a state change inside
is judged against the scores of such windows in training (`Artifact.settling_threshold`).

The model is the one `itap demo` trains (ten simulated devices for two hours, its seed).
Judged against the common threshold, each healthy fleet below raised false alerts at
IDLE -> RUN start-ups (the demo's DEV-0006 an `anomaly_burst`, the training CSV itself a
CRITICAL `power_instability`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from itap_stream.app.offline import score_frame, train_from_frame
from itap_stream.core.features import feature_families, feature_names
from itap_stream.core.pipeline import SETTLING_FEATURE, Processor, assess
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine
from simulator import default_faults, simulate

DEMO_SEED = 7


@pytest.fixture(scope="module")
def demo_model(schema):
    normal = simulate(10, 7200.0, seed=DEMO_SEED + 1000).to_frame()
    art, _ = train_from_frame(normal, schema, window=32, hop=4, quantile=0.999, seed=DEMO_SEED)
    return art, normal


def _engine(default_rules):
    rules, resolve_after = default_rules
    return RuleEngine(rules, resolve_after_s=resolve_after)


def _healthy_alerts(result, frame):
    faulty = set(frame.loc[frame["label"].notna(), "device_id"])
    return [(a.device_id, a.rule, a.window_end) for a in result.alerts if a.device_id not in faulty]


def test_a_window_straddling_a_state_change_is_judged_against_the_settling_threshold(schema, demo_model):
    art, _ = demo_model
    assert art.settling_threshold is not None and art.settling_threshold > art.threshold
    names, families = feature_names(schema), feature_families(schema)
    X = np.tile(art.stats.mean, (12, 1))
    X[:, names.index(SETTLING_FEATURE)] = [0] * 4 + [1] * 8
    between = (art.threshold + art.settling_threshold) / 2
    scores = np.array([between] * 8 + [art.settling_threshold] * 4)
    devices = ["D1"] * 4 + ["D2"] * 4 + ["D3"] * 4

    def flags(artifact):
        return assess(artifact, X, devices, ["RUN"] * 12, {}, 3, 4, names, families, scores=scores).flags.tolist()

    # a steady window over the common threshold counts; a start-up window only over its own
    assert flags(art) == [False, False, True, True] + [False] * 4 + [False, False, True, True]
    # a model without a settling threshold (none in its training data, or an older one): never
    assert flags(dataclasses.replace(art, settling_threshold=None)) == [False, False, True, True] + [False] * 8


@pytest.mark.parametrize("fleet", ["training CSV", "healthy seed", "demo fleet"])
def test_healthy_simulated_fleets_raise_no_alert_at_start_ups(schema, default_rules, demo_model, fleet):
    art, normal = demo_model
    frame = {
        "training CSV": lambda: normal,
        "healthy seed": lambda: simulate(10, 7200.0, seed=DEMO_SEED + 2000).to_frame(),
        "demo fleet": lambda: simulate(10, 2700.0, seed=DEMO_SEED, faults=default_faults(10, 2700.0)).to_frame(),
    }[fleet]()
    states = frame.sort_values(["device_id", "ts"])
    starts = ((states["state"] == "RUN") & (states.groupby("device_id")["state"].shift() == "IDLE")).sum()
    assert starts >= 5  # start-ups included
    result = score_frame(frame, schema, art, _engine(default_rules), window=32, hop=4, alarm_k=3, alarm_n=4)
    assert _healthy_alerts(result, frame) == []
    if fleet == "demo fleet":  # the injected faults are still found
        firing = {a.device_id for a in result.alerts if a.status == "firing"}
        assert {f.device for f in default_faults(10, 2700.0)} <= firing


def test_the_stream_agrees_on_the_demo_fleet(schema, default_rules, demo_model):
    art, _ = demo_model
    frame = simulate(10, 2700.0, seed=DEMO_SEED, faults=default_faults(10, 2700.0)).to_frame()
    batch = score_frame(frame, schema, art, _engine(default_rules), window=32, hop=4, alarm_k=3, alarm_n=4,
                        drift_delta=0.0)
    proc = Processor(schema, art, _engine(default_rules), window=32, hop=4)
    readings = [
        Reading(d["device_id"], float(d["ts"]), d["state"],
                tuple(float("nan") if d[n] != d[n] else float(d[n]) for n in schema.names), int(d["seq"]),
                None, d["label"] if isinstance(d["label"], str) else None)
        for d in frame.to_dict("records")
    ]
    stream = [a for i in range(0, len(readings), 211) for a in proc.process(readings[i : i + 211]).alerts]

    def key(a):
        return (a.device_id, a.rule, a.status, a.window_end)

    assert sorted(map(key, stream)) == sorted(map(key, batch.alerts))
    assert _healthy_alerts(batch, frame) == []
    assert len({a.device_id for a in stream if a.status == "firing"}) == 4
