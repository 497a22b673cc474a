"""The quality benchmarks keep working at tiny size, and `itap train --detector` end to end."""

from __future__ import annotations

import json

import pytest

from bench import quality, testbed
from itap_stream.adapters import artifacts
from itap_stream.cli import main


def test_quality_bench_tables_every_detector_asked_for(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert quality.main(["--devices", "5", "--hours", "0.75", "--seeds", "9001", "--detectors", "isolation_forest,pca",
                         "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"isolation_forest (default)", "pca"}
    for res in report["results"].values():
        m = res["median"]
        assert set(m["recall_by_fault"]) == {"bearing_wear", "overheat", "power_instability", "sensor_dropout"}
        assert 0.0 <= m["f1"] <= 1.0 and set(res["met"]) == {"f1", "recall_each_fault", "delay_windows",
                                                              "false_alerts_per_device_day"}
    table = capsys.readouterr().out
    assert "| isolation_forest (default) |" in table and "| pca |" in table


def test_testbed_protocol_runs_train_and_score_per_run(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert testbed.main(["--runs", "2", "--detectors", "pca", "--out", str(out), "--keep", str(tmp_path / "runs")]) == 0
    report = json.loads(out.read_text())
    pooled = report["results"]["pca"]["pooled"]
    assert pooled["runs"] == 2 and pooled["errors"] == 0
    # every test reading was judged: the pooled counts cover the scored part of both runs
    scored = sum(g["n"] - testbed.N_TRAIN for g in report["generated"])
    assert pooled["tp"] + pooled["fp"] + pooled["fn"] + pooled["tn"] == scored
    assert (tmp_path / "runs").is_dir() and "| pca" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["pca", "ensemble"])
def test_train_detector_option_writes_that_detector(tmp_path, capsys, name):
    data, model = tmp_path / "fleet.csv", tmp_path / "m.joblib"
    assert main(["simulate", "--devices", "3", "--duration", "40m", "--out", str(data), "--seed", "5"]) == 0
    assert "writing 7,200 readings" in capsys.readouterr().err  # long work shows where it is
    assert main(["train", "--csv", str(data), "--model", str(model), "--detector", name]) == 0
    out = capsys.readouterr()
    assert f"detector {name}" in out.out
    assert "windowing and featuring 7,200 readings" in out.err and f"fitting {name} on" in out.err
    assert artifacts.read_manifest(model)["detector"] == name
    assert artifacts.load(model).detector.name == name
    assert main(["score", "--csv", str(data), "--model", str(model), "--out-dir", str(tmp_path / "o")]) == 0


def test_unknown_detector_is_one_clear_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--csv", str(tmp_path / "x.csv"), "--model", str(tmp_path / "m.joblib"),
                 "--detector", "svm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "itap train: error: unknown detector 'svm'; choose one of auto, isolation_forest, pca, hst, ensemble"
    ]


def test_the_published_leaderboard_is_recomputed_and_put_in_the_judges_terms():
    """The leaderboard's F1 follows from its FAR and MAR over whole files (37 401 readings,
    13 067 anomalous); over the readings after each file's first 400 the same false alarms
    are a larger share of fewer normal readings."""
    rows = {r["method"]: r for r in testbed.published_on_test_parts()}
    assert set(rows) == set(testbed.LEADERBOARD)
    for row in rows.values():
        assert abs(row["f1_recomputed"] - row["f1"]) <= 0.006, row
        normal = testbed.CORPUS["readings"] - testbed.CORPUS["anomalous"]
        scored_normal = normal - testbed.CORPUS["files"] * testbed.N_TRAIN
        assert row["far_test_parts"] == pytest.approx(row["far"] * normal / scored_normal, abs=0.001)
    assert rows["Conv-AE"]["far_test_parts"] > 0.2  # the best published F1 comes with more false alarms than the target


def test_testbed_reports_the_published_point_wise_t2_as_a_reference(tmp_path):
    out = tmp_path / "t.json"
    assert testbed.main(["--runs", "2", "--detectors", "pca", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    t2 = report["results"]["point-wise T²"]["pooled"]
    assert t2["runs"] == 2 and "point-wise T²" not in report["targets_met"]
    assert [r["method"] for r in report["published_on_test_parts"]][0] == "Conv-AE"
