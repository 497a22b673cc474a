"""Any sensor set from a schema YAML, no code change: train on a run's normal start, score the
rest reading by reading, causally."""

from __future__ import annotations

import numpy as np
import pandas as pd

from itap_stream.cli import main

SCHEMA = """\
timestamp_column: timestamp
signals:
  - {name: p1_bar, column: "Pressure P1", family: Pressure, unit: bar, min: 0, max: 50}
  - {name: flow_lpm, family: Flow, unit: l/min, min: 0, max: 500}
  - {name: pump_vib, column: "Pump vibration", family: Vibration, unit: mm/s, min: 0, max: 100}
  - {name: motor_a, family: Current, unit: A, min: 0, max: 100}
"""


def _run(n_normal=400, n_fault=300, seed=0):
    """One test-bed style run: a normal start, then a leak (pressure falls, flow rises)."""
    rng = np.random.default_rng(seed)
    n = n_normal + n_fault
    t = np.arange(n)
    load = 0.5 + 0.1 * np.sin(t / 60.0)
    p1 = 8.0 + 2.0 * load + rng.normal(0, 0.05, n)
    flow = 120.0 + 40.0 * load + rng.normal(0, 1.0, n)
    vib = 2.0 + 0.5 * load + rng.normal(0, 0.05, n)
    amps = 20.0 + 10.0 * load + rng.normal(0, 0.3, n)
    leak = t >= n_normal
    p1[leak] -= np.minimum(3.0, 0.05 * (t[leak] - n_normal + 1))
    flow[leak] += np.minimum(60.0, 1.0 * (t[leak] - n_normal + 1))
    ts = pd.Timestamp("2026-03-01T08:00:00Z") + pd.to_timedelta(t, unit="s")
    return pd.DataFrame({
        "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "Pressure P1": p1.round(3), "flow_lpm": flow.round(2),
        "Pump vibration": vib.round(3), "motor_a": amps.round(2),
    }), leak


def test_train_on_normal_start_and_score_rows_causally(tmp_path, capsys):
    schema = tmp_path / "testbed.yaml"
    schema.write_text(SCHEMA)
    frame, leak = _run()
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    frame.iloc[:400].to_csv(train, index=False)
    frame.iloc[400 - 60 :].to_csv(test, index=False)  # the scored file starts with a minute of normal
    model = tmp_path / "m.joblib"
    assert main(["train", "--csv", str(train), "--schema", str(schema), "--model", str(model)]) == 0
    rows_out = tmp_path / "rows.csv"
    assert main(["score", "--csv", str(test), "--model", str(model), "--rows-out", str(rows_out),
                 "--out-dir", str(tmp_path / "o")]) == 0
    rows = pd.read_csv(rows_out)
    truth = leak[400 - 60 :]
    assert len(rows) == len(test.read_text().splitlines()) - 1
    assert rows["row"].tolist() == list(range(len(rows)))  # input order
    assert (rows["warmup"].iloc[:31] == 1).all() and (rows["warmup"].iloc[31:] == 0).all()
    assert (rows.loc[rows["warmup"] == 1, "anomaly"] == 0).all() and rows.loc[rows["warmup"] == 1, "score"].isna().all()
    pred = rows["anomaly"].to_numpy().astype(bool)
    tp = (pred & truth).sum()
    recall, precision = tp / truth.sum(), tp / max(pred.sum(), 1)
    assert recall > 0.8 and precision > 0.9, (recall, precision)
    capsys.readouterr()

    # causal: scoring only the first 200 rows gives the same decisions for them
    short = tmp_path / "short.csv"
    frame.iloc[400 - 60 :].iloc[:200].to_csv(short, index=False)
    rows_short = tmp_path / "rows_short.csv"
    assert main(["score", "--csv", str(short), "--model", str(model), "--rows-out", str(rows_short),
                 "--out-dir", str(tmp_path / "o2")]) == 0
    a = pd.read_csv(rows_short)
    assert (a["device_id"] == "short").all() and (rows["device_id"] == "test").all()  # one device per file
    cols = ["row", "ts", "score", "anomaly", "warmup", "dropped"]
    pd.testing.assert_frame_equal(a[cols], rows.iloc[:200][cols].reset_index(drop=True))


def test_a_column_the_schema_names_must_be_there(tmp_path, capsys):
    schema = tmp_path / "testbed.yaml"
    schema.write_text(SCHEMA)
    frame, _ = _run(100, 0)
    csv = tmp_path / "run.csv"
    frame.drop(columns=["Pump vibration"]).to_csv(csv, index=False)
    assert main(["train", "--csv", str(csv), "--schema", str(schema), "--model", str(tmp_path / "m.joblib")]) == 2
    err = capsys.readouterr().err
    assert "pump_vib" in err and "Traceback" not in err
