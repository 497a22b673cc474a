"""`itap rules test`: stored anomalies replayed through the current and a candidate rules file."""

from __future__ import annotations

import json

import yaml

from itap_stream.adapters.store import Store, StoreBatch, anomaly_row
from itap_stream.cli import main
from itap_stream.config import PACKAGE_CONFIGS, load_yaml
from itap_stream.core.explain import Explanation
from itap_stream.core.schema import SensorSchema

CURRENT = {"resolve_after": "60s", "rules": [
    {"name": "burst", "type": "burst", "count": 3, "within": "60s", "severity": "WARNING", "cause": "Repeated"},
    {"name": "volts", "type": "dominant_family", "families": ["Voltage"], "min_share": 50, "severity": "CRITICAL"},
]}
CANDIDATE = {"resolve_after": "60s", "rules": [
    {"name": "burst", "type": "burst", "count": 2, "within": "60s", "severity": "WARNING", "cause": "Repeated"},
    {"name": "volts", "type": "dominant_family", "families": ["Voltage"], "min_share": 80, "severity": "CRITICAL"},
]}


def _store(url):
    """Two devices, windows every 10 s from t=1000:
    A: anomalies at 1010, 1020 (Voltage 60 %), 1030 (Voltage 90 %), all inside a labelled fault;
       then quiet to 1200, anomalies at 1200 and 1210 (Voltage 60 %), unlabelled.
    B: one anomaly at 1050 (Voltage 85 %), unlabelled."""
    store = Store(url, SensorSchema.from_dict(load_yaml(PACKAGE_CONFIGS / "sensors.yaml")))
    batch = StoreBatch()
    anomalous = {("A", 1010): 60.0, ("A", 1020): 60.0, ("A", 1030): 90.0, ("A", 1200): 60.0, ("A", 1210): 60.0,
                 ("B", 1050): 85.0}
    for dev in ("A", "B"):
        for t in range(1000, 1300, 10):
            volt = anomalous.get((dev, t))
            label = "power_instability" if dev == "A" and 1010 <= t <= 1030 else None
            batch.windows.append((dev, t - 4.0, float(t), "RUN", 0.9 if volt else 0.2, volt is not None, label))
            if volt:
                exp = Explanation({"Voltage": volt, "RPM": 100.0 - volt}, [("voltage_v_std", volt)])
                batch.anomalies.append(anomaly_row(dev, t - 4.0, float(t), "RUN", 0.9, 0.99, exp, (), label))
    store.write(batch)
    store.dispose()


def test_dry_run_counts_match_a_hand_computed_case(tmp_path, capsys, db_url):
    url = db_url
    _store(url)
    cur, cand = tmp_path / "current.yaml", tmp_path / "candidate.yaml"
    cur.write_text(yaml.safe_dump(CURRENT))
    cand.write_text(yaml.safe_dump(CANDIDATE))
    cfg = tmp_path / "itap.yaml"
    cfg.write_text(f"rules_file: {cur}\nsensors_file: {PACKAGE_CONFIGS / 'sensors.yaml'}\ndb_url: {url}\n")
    out = tmp_path / "dry.json"
    assert main(["rules", "test", "--config", str(cfg), "--rules", str(cand), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    # current burst (3 in 60 s): A at 1030, but current volts has been open on A since 1010 (the
    # same anomalies, reported already: a burst does not tell them again); the 1200/1210 pair is
    # only 2 -> 0 alerts
    # candidate burst (2 in 60 s): A at 1020 (true; candidate volts fires on A only at 1030),
    # A again at 1210 (the first resolved at 1090; no candidate volts open on A then) -> 2
    # current volts (>= 50 %): A at 1010 (true), resolves at 1090, A again at 1200; B at 1050 -> 3
    # candidate volts (>= 80 %): A at 1030 (true), B at 1050 -> 2
    assert r["by_rule"]["burst"] == {"current": 0, "current_true": 0, "candidate": 2, "candidate_true": 1}
    assert r["by_rule"]["volts"] == {"current": 3, "current_true": 1, "candidate": 2, "candidate_true": 1}
    assert r["by_device"] == {"A": {"current": 2, "candidate": 3}, "B": {"current": 1, "candidate": 1}}
    assert (r["faults"], r["caught"]) == (1, {"current": 1, "candidate": 1})
    text = capsys.readouterr().out
    assert "nothing published" in text and "faults caught: current 1 of 1, candidate 1 of 1" in text


def test_a_bad_candidate_file_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: x, type: nope}\n")
    assert main(["rules", "test", "--rules", str(bad), "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "type 'nope'" in capsys.readouterr().err
