"""`itap demo` runs to completion with both brokers; CLI commands and errors behave."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from itap_stream.cli import main
from itap_stream.config import load
from itap_stream.errors import ConfigError
from simulator import simulate


def _demo(tmp_path, *extra):
    work = tmp_path / "demo"
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "itap_stream.cli", "demo", "--duration", "6", "--devices", "5", "--speed", "120",
         "--workdir", str(work), *extra],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, work


@pytest.mark.network
@pytest.mark.skipif(
    shutil.which("mosquitto") is None and not __import__("pathlib").Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto not installed",
)
def test_demo_with_mosquitto(tmp_path):
    out, work = _demo(tmp_path)
    assert "started mosquitto broker" in out
    _check_demo(out, work)


@pytest.mark.network
def test_demo_with_embedded_broker(tmp_path):
    out, work = _demo(tmp_path, "--embedded-broker")
    assert "started embedded broker" in out
    _check_demo(out, work)


def _check_demo(out, work):
    assert "training on 2 h of simulated normal operation" in out
    assert "[demo] dashboard: http://127.0.0.1:" in out and "/metrics" in out  # issue 16, point 6
    assert "fleet:" in out and "database:" in out and "model:" in out
    summary = json.loads((work / "summary.json").read_text())
    assert summary["readings_stored"] == summary["readings_published"] > 0
    assert summary["alerts"] >= 1
    faulty = {f["device"] for f in summary["faults"]}
    alerted = {d for d, s in summary["devices"].items() if s["anomalies"]}
    assert alerted and alerted <= faulty
    assert "Root cause:" in out and "Families:" in out
    db = sqlite3.connect(work / "itap.db")
    assert db.execute("select count(*) from alerts").fetchone()[0] == summary["alerts"]
    db.close()


def test_env_overrides_yaml_and_options_override_env(tmp_path):
    env = {"ITAP_DB_URL": "sqlite:///env.db", "ITAP_QOS": "0", "ITAP_BROKER_URL": "mqtt://10.0.0.9:1884"}
    s = load(None, env)
    assert (s.db_url, s.qos, s.broker_url) == ("sqlite:///env.db", 0, "mqtt://10.0.0.9:1884")
    assert load(None, env, db_url="sqlite:///cli.db").db_url == "sqlite:///cli.db"
    with pytest.raises(ConfigError, match="ITAP_QOS"):
        load(None, {"ITAP_QOS": "high"})


def test_drifting_families_is_a_yaml_list_or_a_comma_separated_env_value(tmp_path):
    assert load(None, {}).drifting_family_list() == ["Temperature"]  # the shipped default
    cfg = tmp_path / "itap.yaml"
    cfg.write_text("drifting_families: [Temperature, Pressure]\n")
    assert load(cfg, {}).drifting_family_list() == ["Temperature", "Pressure"]
    cfg.write_text("drifting_families: []\n")
    assert load(cfg, {}).drifting_family_list() == []
    assert load(cfg, {"ITAP_DRIFTING_FAMILIES": "Temperature, Flow"}).drifting_family_list() == ["Temperature", "Flow"]


def test_bad_yaml_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "itap.yaml"
    bad.write_text("window: [unclosed\n")
    assert main(["train", "--config", str(bad), "--csv", "x.csv"]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err


def test_train_from_csv_then_schema_mismatch_is_named(tmp_path, capsys):
    csv = tmp_path / "normal.csv"
    simulate(3, 1800, seed=4, maint=False).to_frame().to_csv(csv, index=False)
    model = tmp_path / "m.joblib"
    assert main(["train", "--csv", str(csv), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "trained on 3 device(s)" in out and "threshold" in out and model.exists()

    schema = tmp_path / "s.yaml"
    schema.write_text("signals:\n  - {name: rpm, family: RPM}\n  - {name: pressure_bar, family: Pressure}\n")
    cfg = tmp_path / "itap.yaml"
    cfg.write_text(
        f"sensors_file: {schema}\nmodel_path: {model}\ndb_url: sqlite:///{tmp_path / 'x.db'}\nhttp_addr: ''\n"
    )
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "pressure_bar" in err and "Traceback" not in err


def test_simulate_to_csv_is_deterministic_and_labelled(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for p in (a, b):
        argv = ["simulate", "--devices", "3", "--duration", "10m", "--seed", "9", "--faults", "overheat",
                "--out", str(p)]
        assert main(argv) == 0
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert "overheat" in text and text.splitlines()[0].startswith("ts,device_id,state")


def test_unreachable_broker_is_one_clear_error(tmp_path, capsys, model_file):
    from itap_stream.adapters.broker import free_port

    cfg = tmp_path / "itap.yaml"
    cfg.write_text(f"model_path: {model_file}\ndb_url: sqlite:///{tmp_path / 'x.db'}\nhttp_addr: ''\n")
    assert main(["run", "--config", str(cfg), "--broker", f"mqtt://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach MQTT broker" in err and "Traceback" not in err


def test_fault_onset_duration_and_rate_are_configurable(tmp_path):
    import pandas as pd

    out = tmp_path / "f.csv"
    spec = "sensor_dropout:onset=100:duration=200:rate=1.0:signal=rpm"
    assert main(["simulate", "--devices", "2", "--duration", "400", "--faults", spec, "--out", str(out)]) == 0
    df = pd.read_csv(out)
    dev = df[df.device_id == "DEV-0002"].reset_index(drop=True)
    t = dev.ts - dev.ts.iloc[0]
    active = (t >= 100) & (t < 300)
    assert (dev.label[active] == "sensor_dropout").all() and dev.label[~active].isna().all()
    assert dev.rpm[active].isna().all() and dev.rpm[~active].notna().all()
    assert main(["simulate", "--faults", "meltdown", "--out", str(out)]) == 2


def test_train_from_the_store_with_a_time_range(tmp_path, capsys, schema):
    from itap_stream.adapters.store import Store, StoreBatch

    frame = simulate(3, 1800, seed=12, maint=False).to_frame()
    db = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(db, schema)
    rows = frame.drop(columns=["seq"]).astype(object).where(frame.drop(columns=["seq"]).notna(), None)
    store.write(StoreBatch(readings=rows.to_dict("records")))
    store.dispose()
    model = tmp_path / "m.joblib"
    since = float(frame.ts.min()) + 600
    assert main(["train", "--db", db, "--since", str(since), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert f"{(frame.ts >= since).sum():,} rows" in out and "2026-01-01T00:10:00.000Z" in out
    assert main(["train", "--db", db, "--since", "2030-01-01T00:00:00Z", "--model", str(model)]) == 2
    assert "holds no readings" in capsys.readouterr().err


def test_score_a_csv_writes_alerts_and_summaries(tmp_path, capsys, model_file):
    csv = tmp_path / "fleet.csv"
    assert main(["simulate", "--devices", "4", "--duration", "40m", "--seed", "8", "--faults",
                 "power_instability,bearing_wear", "--out", str(csv)]) == 0
    out_dir = tmp_path / "artifacts"
    windows = tmp_path / "windows.csv"
    capsys.readouterr()
    assert main(["score", "--csv", str(csv), "--model", str(model_file), "--out-dir", str(out_dir),
                 "--windows-out", str(windows)]) == 0
    out = capsys.readouterr().out
    assert "scored 9,600 readings of 4 device(s)" in out
    alerts = json.loads((out_dir / "alerts.json").read_text())
    fired = {(a["device_id"], a["rule"]) for a in alerts if a["status"] == "firing"}
    assert ("DEV-0004", "power_instability") in fired
    assert ("DEV-0003", "bearing_wear") in fired
    assert not {d for d, _ in fired} & {"DEV-0001", "DEV-0002"}
    summary = json.loads((out_dir / "aggregate_summaries.json").read_text())
    assert summary["fleet"]["devices"] == 4
    assert summary["devices"]["DEV-0004"]["dominant_families"]
    import pandas as pd

    metrics = json.loads((out_dir / "metrics.json").read_text())  # the simulator labels its faults
    assert set(metrics["recall_by_fault"]) == {"power_instability", "bearing_wear"}
    assert metrics["roc_auc"] > 0.8 and metrics["false_alerts_on_healthy_devices"] == 0
    top = json.loads((out_dir / "explanations_top.json").read_text())
    assert top["fleet"]["anomalies"] == sum(d["anomalies"] for d in top["devices"].values()) > 0
    assert "quality at the model threshold" in out and "recall by fault" in out
    w = pd.read_csv(windows)
    assert len(w) == summary["fleet"]["windows"] and set(w["is_anomaly"]) <= {0, 1}
    assert w.loc[w["is_anomaly"] == 1, "dominant_family"].notna().all()


def test_score_bad_csv_is_one_clear_error(tmp_path, capsys, model_file):
    csv = tmp_path / "bad.csv"
    csv.write_text("device_id,ts,rpm\nD1,0,1\n")
    assert main(["score", "--csv", str(csv), "--model", str(model_file), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lacks required column" in err and "Traceback" not in err


@pytest.mark.network
def test_demo_as_a_sparkplug_edge_node(tmp_path, model_file):
    out, work = _demo(tmp_path, "--format", "sparkplug", "--model", str(model_file))
    assert "Sparkplug B edge node itap/simulator" in out
    summary = json.loads((work / "summary.json").read_text())
    assert summary["readings_stored"] == summary["readings_published"] > 0
    faulty = {f["device"] for f in summary["faults"]}
    alerted = {d for d, s in summary["devices"].items() if s["anomalies"]}
    assert alerted and alerted <= faulty  # device ids as in the JSON demo
    with sqlite3.connect(work / "itap.db") as db:
        offline = db.execute("SELECT count(DISTINCT device_id) FROM alerts WHERE rule = 'device_offline'").fetchone()
        assert offline[0] == 5  # the simulator's clean exit sends its NDEATH: every device offline at once
