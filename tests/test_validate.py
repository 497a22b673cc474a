"""`itap validate`: every quality problem is counted, unusable data exits non-zero with the reason."""

from __future__ import annotations

import json

import pandas as pd

from itap_stream.cli import main
from simulator import simulate


def _broken_csv(tmp_path):
    f = simulate(2, 300, seed=3, maint=False).to_frame()
    f = f.astype({"ts": object, "rpm": object})
    f.loc[5, "rpm"] = "fast"  # non-numeric
    f.loc[6, "temp_c"] = 999.0  # above 250
    f.loc[7, "voltage_v"] = -3.0  # below 0
    f.loc[8, "ts"] = "yesterday"  # unreadable time
    f.loc[9, "state"] = "BROKEN"
    f.loc[10:19, "current_a"] = None  # 10 missing
    dev2 = f.index[f["device_id"] == "DEV-0002"]
    f = f.drop(index=dev2[100:160])  # a 60 s hole in DEV-0002
    f = pd.concat([f, f.iloc[[20]], f.iloc[[30]].assign(ts=float(f.iloc[30]["ts"]) - 0.5)], ignore_index=True)
    path = tmp_path / "broken.csv"
    f.to_csv(path, index=False)
    return path, len(f)


def test_report_counts_each_problem(tmp_path, capsys):
    path, rows = _broken_csv(tmp_path)
    out = tmp_path / "report.json"
    assert main(["validate", str(path), "--out", str(out)]) == 0  # flawed but usable
    r = json.loads(out.read_text())
    assert r["usable"] and r["rows"] == rows and r["devices"] == 2
    assert r["signals"]["rpm"]["non_numeric"] == 1
    assert r["signals"]["temp_c"]["above_max"] == 1
    assert r["signals"]["voltage_v"]["below_min"] == 1
    assert r["signals"]["current_a"]["missing"] == 10
    assert r["unreadable_ts"] == 1
    assert r["unknown_states"] == {"BROKEN": 1}
    assert r["duplicates"] == 1 and r["reversals"] == 2  # the re-sent row and the late one, both after newer rows
    assert r["per_device"]["DEV-0002"]["gaps"] == 1 and r["per_device"]["DEV-0002"]["largest_gap_s"] == 61.0
    assert r["per_device"]["DEV-0001"]["gaps"] == 0
    text = capsys.readouterr().out
    assert "usable" in text and "warning: rpm: 1 value(s) not usable" in text


def test_unusable_data_exits_non_zero_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("device_id,ts,rpm\nD1,0,1\n")
    assert main(["validate", str(bad)]) == 1
    text = capsys.readouterr().out
    assert "UNUSABLE" in text and "required column(s)" in text and "temp_c" in text

    no_time = tmp_path / "no_time.csv"
    f = simulate(1, 40, seed=1).to_frame()
    f["ts"] = "not a time"
    f.to_csv(no_time, index=False)
    assert main(["validate", str(no_time)]) == 1
    assert "no row has both a device_id and a readable ts" in capsys.readouterr().out


def test_missing_file_is_one_clear_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.csv")]) == 2
    assert "CSV file not found" in capsys.readouterr().err
