"""Training data checked before it is trusted: a fault inside it is refused (or accepted on
request and recorded), a clean stand-in and a fleet of several states train, a warm-up is
reported in std per hour."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.testbed import EFFECTS, SETS, make_run, schema_yaml
from itap_stream.app.offline import train_from_frame
from itap_stream.core.schema import SensorSchema
from itap_stream.core.trainingcheck import check_training
from itap_stream.errors import DataError
from simulator import simulate


def _pump(seed: int, fault: str) -> tuple[pd.DataFrame, pd.DataFrame, SensorSchema]:
    """A pump8 stand-in run (harsh profile): its clean 400-reading training prefix, and the
    same prefix with 75 readings of the run's own fault spliced into readings 25-99 (the
    fault's signals, offset by their level just before the fault)."""
    frame, _truth, info = make_run(np.random.default_rng(seed), "pump8", fault, "harsh")
    spec = SETS["pump8"]
    x = frame[[v[0] for v in spec.values()]].to_numpy(float)
    pre = x[:400].copy()
    f0 = info["fault_start"]
    o = info["ramp_s"] + 10
    faulty = pre.copy()
    for role in EFFECTS[fault]:
        j = list(spec).index(role)
        faulty[25:100, j] = x[f0 + o:f0 + o + 75, j] - x[f0 - 100:f0, j].mean() + pre[25:100, j].mean()
    schema = SensorSchema.from_dict(yaml.safe_load(schema_yaml("pump8")))

    def table(v: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"device_id": "rig", "ts": 1.6e9 + np.arange(400.0), "state": "RUN",
                             **{name: v[:, j] for j, name in enumerate(schema.names)}})

    return table(pre), table(faulty), schema


def test_a_fault_in_the_first_quarter_is_refused_naming_signals_and_where():
    _, faulty, schema = _pump(6, "valve")
    with pytest.raises(DataError, match="--accept-training-anomalies") as err:
        train_from_frame(faulty, schema, window=32, hop=4)
    text = str(err.value)
    assert "volume_flow_rate_rms" in text  # the valve cuts the flow
    assert "rig RUN: readings " in text and "spreads of the block means" in text
    first = int(text.split("rig RUN: readings ")[1].split("-")[0])
    assert first < 100  # in the first quarter
    # a second fault kind: a rotor imbalance shows on the vibration
    _, imbalance, _ = _pump(2, "imbalance")
    with pytest.raises(DataError, match="accelerometer1_rms"):
        train_from_frame(imbalance, schema, window=32, hop=4)


def test_accepted_it_trains_and_the_findings_are_in_the_report_and_the_manifest():
    _, faulty, schema = _pump(6, "valve")
    art, rep = train_from_frame(faulty, schema, window=32, hop=4, accept_training_anomalies=True)
    found = rep.training_check
    assert found["accepted"] and found["anomalies"]
    names = {s for a in found["anomalies"] for s, _z in a["signals"]}
    assert "volume_flow_rate_rms" in names
    assert art.training["training_check"]["anomalies"] == found["anomalies"]


def test_a_clean_stand_in_trains_without_refusal():
    clean, _, schema = _pump(6, "valve")
    _, rep = train_from_frame(clean, schema, window=32, hop=4)
    assert rep.training_check["anomalies"] == [] and rep.training_check["segments_checked"] == 1


def test_a_warm_up_is_reported_in_std_per_hour(caplog):
    rng = np.random.default_rng(12)
    t = np.arange(400, dtype=float)
    motor = 60.0 + 8.0 * (1 - np.exp(-t / 900.0)) + 0.05 * rng.normal(size=400)  # ~0.5 °C per minute
    frame = pd.DataFrame({"device_id": "rig", "ts": 1.6e9 + t, "state": "RUN", "motor_temp": motor,
                          "pressure": 2.0 + 0.02 * rng.normal(size=400)})
    schema = SensorSchema.from_dict({"signals": [{"name": "motor_temp", "family": "Temperature"},
                                                 {"name": "pressure", "family": "Pressure"}]})
    with caplog.at_level(logging.WARNING, logger="itap_stream.app.offline"):
        _, rep = train_from_frame(frame, schema, window=32, hop=4)
    (trend,) = rep.training_check["trends"]
    assert trend["signal"] == "motor_temp"
    # 8 °C / 900 s at the start, less later (~26 °C/h on average): ~500 noise std (0.05 °C) per hour
    assert 350 < trend["std_per_hour"] < 700 and trend["drift_std"] > 30
    assert "motor_temp (rig RUN): +" in caplog.text and "std/h" in caplog.text
    assert rep.training_check["anomalies"] == []


def test_several_operating_states_are_checked_apart_and_not_refused(schema):
    """RUN, IDLE and MAINT: each device's RUN and IDLE readings are checked apart; their
    state-change transients stand out, so they are reported, not refused."""
    df = simulate(4, 3600.0, seed=4).to_frame()
    assert {"RUN", "IDLE"} <= set(df["state"])
    _, rep = train_from_frame(df, schema, window=32, hop=4)
    found = rep.training_check
    assert found["segments_checked"] == 8 and not found["refuses_outliers"]
    assert found["anomalies"]  # seen, and in the report
    segments = {a["segment"] for a in found["anomalies"]}
    assert all(s.split()[1] in ("RUN", "IDLE") for s in segments)


def test_the_check_alone_finds_a_block_and_ignores_a_state_change():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 1))
    x[60:110] += 6.0
    found = check_training([x[:400], x[400:] + 50.0], ["a"], [np.arange(400.0), np.arange(400.0, 800.0)],
                           window=32, labels=["d RUN", "d IDLE"])
    assert [(b.segment, b.first_row) for b in found.anomalies] == [("d RUN", 50)]


def test_on_the_command_line_it_refuses_then_trains_with_the_flag(tmp_path):
    import contextlib
    import io
    import json

    from itap_stream.cli import main

    _, faulty, _schema = _pump(6, "valve")
    csv = tmp_path / "train.csv"
    faulty.to_csv(csv, index=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"signals": [{"name": g.name, "family": g.family} for g in _schema.signals]}),
                                     encoding="utf-8")
    args = ["train", "--csv", str(csv), "--schema", str(tmp_path / "s.yaml"), "--model", str(tmp_path / "m.joblib")]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(args) == 2
    assert "outlying stretch" in err.getvalue() and "--accept-training-anomalies" in err.getvalue()
    assert not (tmp_path / "m.joblib").exists()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "--accept-training-anomalies"]) == 0
    manifests = [json.loads(p.read_text(encoding="utf-8")) for p in tmp_path.glob("*.json")]
    assert any(m["training"]["training_check"]["anomalies"] for m in manifests)
