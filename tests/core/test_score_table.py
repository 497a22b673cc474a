"""The batch path decides exactly as the stream: scores, smoothed flags, explanations, alerts."""

from __future__ import annotations

import numpy as np
import pandas as pd

from itap_stream.app.offline import score_frame, windows_of_frame
from itap_stream.core.model import IsolationForestDetector
from itap_stream.core.pipeline import REPLAY_READINGS, Processor
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine
from simulator import default_faults, simulate


def _readings(frame, names):
    out = []
    for d in frame.to_dict("records"):
        vals = tuple(float("nan") if d[n] != d[n] else float(d[n]) for n in names)
        label = d["label"] if isinstance(d["label"], str) else None
        tag = d["tag"] if isinstance(d["tag"], str) else None
        out.append(Reading(d["device_id"], float(d["ts"]), d["state"], vals, int(d["seq"]), tag, label))
    return out


def _run_through(proc, part, step=37):
    """Stream ``part`` through ``proc`` in micro-batches: window end -> (score, smoothed flag)."""
    out = {}
    for i in range(0, len(part), step):
        res = proc.process(part[i : i + step])
        if res.n_windows:
            scored = zip(res.scores.tolist(), res.is_anomaly.tolist(), strict=True)
            out.update(zip(res.windows.end_ts.tolist(), scored, strict=True))
    return out


def test_batch_scoring_equals_stream_scoring(schema, trained, default_rules):
    rules, resolve_after = default_rules
    sim = simulate(5, 1800, seed=21, faults=default_faults(5, 1800))
    frame = sim.to_frame()
    frame["tag"] = None
    # a device reports a fault code for a while: the tag_route rule must fire in both paths
    hit = (frame["device_id"] == "DEV-0001") & frame["ts"].between(frame["ts"].min() + 900, frame["ts"].min() + 960)
    frame.loc[hit, "tag"] = "E_POWER"

    proc = Processor(schema, trained, RuleEngine(rules, resolve_after_s=resolve_after), window=32, hop=4)
    readings = _readings(frame, list(schema.names))
    stream_scores, stream_flags, stream_keys, stream_alerts = [], [], [], []
    for i in range(0, len(readings), 53):
        res = proc.process(readings[i : i + 53])
        if res.n_windows:
            stream_scores += res.scores.tolist()
            stream_flags += res.is_anomaly.tolist()
            stream_keys += list(zip(res.windows.device_ids, res.windows.end_ts.tolist(), strict=True))
        stream_alerts += [a.to_dict() for a in res.alerts]

    table = score_frame(
        frame, schema, trained, RuleEngine(rules, resolve_after_s=resolve_after),
        window=32, hop=4, alarm_k=3, alarm_n=4, workers=2,
    )
    a = table.assessment
    batch = dict(
        zip(
            zip(table.windows.device_ids.tolist(), table.windows.end_ts.tolist(), strict=True),
            zip(a.scores.tolist(), a.flags.tolist(), strict=True),
            strict=True,
        )
    )
    stream = dict(zip(stream_keys, zip(stream_scores, stream_flags, strict=True), strict=True))
    assert batch == stream
    assert sum(stream_flags) > 10

    def key(al):
        return (al["device_id"], al["rule"], al["status"], al["window_end"])

    batch_alerts = [al.to_dict() for al in table.alerts]
    assert sorted(batch_alerts, key=key) == sorted(stream_alerts, key=key)
    assert {"device_fault_code"} <= {al["rule"] for al in batch_alerts}
    assert len({al["device_id"] for al in batch_alerts if al["status"] == "firing"}) >= 3


def test_window_tags_follow_the_readings(schema):
    frame = simulate(1, 120, seed=2).to_frame()
    frame["tag"] = None
    frame.loc[40, "tag"] = "E1"
    frame.loc[41, "tag"] = "E1"
    frame.loc[50, "tag"] = "E7"
    bw = windows_of_frame(frame, schema, window=32, hop=4)
    for k in range(len(bw)):
        lo = bw.end_row[k] - 31
        want = tuple(dict.fromkeys(t for t in frame["tag"].iloc[lo : bw.end_row[k] + 1] if t is not None))
        assert bw.tags[k] == want
    assert ("E1", "E7") in bw.tags


def test_forest_scores_match_scikit_learn_across_blocks():
    rng = np.random.default_rng(5)
    det = IsolationForestDetector(n_estimators=30, seed=1)
    det.fit(rng.normal(size=(1000, 6)))
    X = rng.normal(size=(4100, 6)) * 1.5  # more than one 2048-row block
    np.testing.assert_array_equal(det.forest_score(X), det.score_sklearn(X))
    np.testing.assert_array_equal(det.forest_score(X[:3000])[-952:], det.forest_score(X[2048:3000]))


def test_loading_a_model_does_not_import_scikit_learn(model_file, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from itap_stream.adapters import artifacts\n"
        f"a = artifacts.load({str(model_file)!r})\n"
        "s = a.detector.score(np.zeros((3, len(a.feature_names))))\n"
        "print('sklearn' in sys.modules, s.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False (3,)"


def test_summaries_per_device_and_fleet():
    from itap_stream.core.aggregate import summarize

    s = summarize(
        ["B", "A", "A", "A"], [0.5, 0.1, 0.3, 0.9], [True, False, False, True], ["B", "A"], ["Voltage", "Vibration"]
    )
    assert list(s["devices"]) == ["A", "B"]
    assert s["devices"]["A"] == {
        "windows": 3, "anomalies": 1, "avg_score": round((0.1 + 0.3 + 0.9) / 3, 4),
        "p95_score": round(float(np.quantile([0.1, 0.3, 0.9], 0.95)), 4), "dominant_families": {"Vibration": 1},
    }
    assert s["fleet"]["devices_with_anomalies"] == 2
    assert pd.isna(s["fleet"].get("missing"))


def test_the_mean_shift_chart_with_drifting_signals_scores_alike_in_stream_and_batch(tmp_path):
    """Temperatures are judged against each device's recent level, a history the stream
    carries across micro-batches and the batch path builds in one pass: same scores."""
    import yaml

    from bench.testbed import make_run, schema_yaml
    from itap_stream.adapters.csvio import read_readings
    from itap_stream.app.offline import train_from_frame
    from itap_stream.core.detectors import MeanShiftDetector
    from itap_stream.core.schema import SensorSchema

    schema = SensorSchema.from_dict(yaml.safe_load(schema_yaml("pump8")))
    frames = []
    for i, fault in enumerate(("friction", "fluid")):
        run, _truth, _ = make_run(np.random.default_rng([77, i]), "pump8", fault, "harsh")
        run.insert(0, "device_id", f"RIG-{i + 1}")
        frames.append(run)
    path = tmp_path / "rigs.csv"
    pd.concat(frames).to_csv(path, sep=";", index=False)
    df = read_readings(path, schema)
    train = df.groupby("device_id", group_keys=False).head(400)
    test = df.drop(train.index).sort_values("ts", kind="stable").reset_index(drop=True)
    art, rep = train_from_frame(train, schema, window=32, hop=4)
    assert isinstance(art.detector, MeanShiftDetector) and rep.drifting_signals == ["temperature", "thermocouple"]

    proc = Processor(schema, art, RuleEngine([]), window=32, hop=4)
    test["seq"], test["tag"] = np.arange(len(test)), None
    readings = _readings(test, list(schema.names))
    stream = {}
    for i in range(0, len(readings), 53):
        res = proc.process(readings[i : i + 53])
        if res.n_windows:
            stream.update(zip(zip(res.windows.device_ids, res.windows.end_ts.tolist(), strict=True),
                              zip(res.scores.tolist(), res.is_anomaly.tolist(), strict=True), strict=True))
    table = score_frame(test, schema, art, RuleEngine([]), window=32, hop=4, alarm_k=3, alarm_n=4, workers=2)
    a = table.assessment
    keys = list(zip(table.windows.device_ids.tolist(), table.windows.end_ts.tolist(), strict=True))
    assert dict(zip(keys, zip(a.scores.tolist(), a.flags.tolist(), strict=True), strict=True)) == stream
    # the history mattered: against the training level alone the temperatures score otherwise
    assert not np.allclose(a.scores, art.detector.score(table.windows.features))


def test_a_restart_replays_the_stored_readings_so_drifting_signals_score_as_without_it(tmp_path):
    """After a restart the consumer refills each device from the store: with the mean-shift
    chart's drifting signals it takes enough readings (`restore_depth`) to replay their
    recent level and the alarm smoothing, so the next windows score as if it never stopped."""
    import yaml

    from bench.testbed import make_run, schema_yaml
    from itap_stream.adapters.csvio import read_readings
    from itap_stream.app.offline import train_from_frame
    from itap_stream.core.schema import SensorSchema

    schema = SensorSchema.from_dict(yaml.safe_load(schema_yaml("pump8")))
    run, _truth, _ = make_run(np.random.default_rng(78), "pump8", "friction", "harsh")
    run.insert(0, "device_id", "RIG-1")
    path = tmp_path / "rig.csv"
    run.to_csv(path, sep=";", index=False)
    df = read_readings(path, schema)
    art, _ = train_from_frame(df.iloc[:400], schema, window=32, hop=4)
    test = df.iloc[400:].reset_index(drop=True)
    test["seq"], test["tag"] = np.arange(len(test)), None
    readings = _readings(test, list(schema.names))

    whole = _run_through(Processor(schema, art, RuleEngine([]), window=32, hop=4), readings)
    cut = 333  # the consumer stops here
    first = Processor(schema, art, RuleEngine([]), window=32, hop=4)
    _run_through(first, readings[:cut])
    again = Processor(schema, art, RuleEngine([]), window=32, hop=4)
    depth = again.restore_depth()
    # a window, the 4 non-overlapping windows before it, and half an hour for a held alarm
    assert depth == 32 + 8 * 4 * 4 + REPLAY_READINGS
    again.restore({"RIG-1": (readings[max(0, cut - depth) : cut], cut)})
    after = _run_through(again, readings[cut:])
    assert after and after == {ts: v for ts, v in whole.items() if ts in after}
    # refilled with one window only (the history lost), the first windows after the cut differ
    bare = Processor(schema, art, RuleEngine([]), window=32, hop=4)
    bare.restore({"RIG-1": (readings[cut - 32 : cut], cut)})
    assert _run_through(bare, readings[cut:]) != after


def test_a_restart_or_a_model_reload_during_a_held_temperature_alarm_keeps_it():
    """A +5 °C fault from reading 1000 to 1999: restarting the consumer at 1400, or reloading
    the model there, replays the stored readings, so the held pre-fault level survives and
    the fault stays an alarm to its end, then ends, as without the interruption."""
    from itap_stream.app.offline import train_from_frame
    from itap_stream.core.schema import SensorSchema

    rng = np.random.default_rng(17)
    n = 3000
    t = np.arange(n, dtype=float)
    frame = pd.DataFrame({"device_id": "rig", "ts": 1.6e9 + t, "state": "RUN", "label": None, "tag": None,
                          "seq": np.arange(n), "motor_temp": 60.0 + 0.05 * rng.normal(size=n),
                          "pressure": 2.0 + 0.02 * rng.normal(size=n)})
    frame.loc[1000:1999, "motor_temp"] += 5.0
    schema = SensorSchema.from_dict({"signals": [{"name": "motor_temp", "family": "Temperature"},
                                                 {"name": "pressure", "family": "Pressure"}]})
    art, _ = train_from_frame(frame.iloc[:400], schema, window=32, hop=4)
    readings = _readings(frame.iloc[400:], list(schema.names))

    whole = _run_through(Processor(schema, art, RuleEngine([]), window=32, hop=4), readings)
    cut = 1000  # reading 1400
    first = Processor(schema, art, RuleEngine([]), window=32, hop=4)
    _run_through(first, readings[:cut])
    restarted = Processor(schema, art, RuleEngine([]), window=32, hop=4)
    depth = restarted.restore_depth()
    restarted.restore({"rig": (readings[max(0, cut - depth) : cut], cut)})
    after = _run_through(restarted, readings[cut:])
    assert after == {ts: v for ts, v in whole.items() if ts in after}
    assert all(f for ts, (_s, f) in after.items() if ts - 1.6e9 < 2000) and not any(
        f for ts, (_s, f) in after.items() if ts - 1.6e9 >= 2100)
    # a model reload on the running processor: the history starts afresh and is replayed
    first.artifact = art
    first.restore({"rig": (readings[max(0, cut - depth) : cut], cut)})
    assert _run_through(first, readings[cut:]) == after
