"""Issue 16, point 7: validate, ingest, train and score read CSVs through the same code, agree
on what is usable, and refuse empty or too-short input clearly; read-only commands never
create a database; the README's examples produce valid data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from itap_stream.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _pump_run(tmp_path: Path) -> tuple[Path, Path]:
    """A single-device test-bed recording (`;`, `datetime`, column names mapped by the schema)."""
    from bench.testbed import make_run, schema_yaml, write_csv

    frame, _truth, _ = make_run(np.random.default_rng(3), "pump8", "valve", "harsh")
    csv, schema = tmp_path / "rig-1.csv", tmp_path / "pump8.yaml"
    write_csv(frame, csv, "pump8")
    schema.write_text(schema_yaml("pump8"), encoding="utf-8")
    return csv, schema


def test_every_command_reads_a_mapped_single_device_recording(tmp_path, capsys):
    csv, schema = _pump_run(tmp_path)
    assert "device_id" not in csv.read_text().splitlines()[0]
    out = tmp_path / "v.json"
    assert main(["validate", str(csv), "--schema", str(schema), "--out", str(out)]) == 0
    assert "usable" in capsys.readouterr().out
    db = f"sqlite:///{tmp_path / 'rig.db'}"
    assert main(["ingest", str(csv), "--schema", str(schema), "--db", db, "--quiet"]) == 0
    rows = len(csv.read_text().splitlines()) - 1
    assert f"read {rows:,} rows: inserted {rows:,}, already stored 0, rejected 0" in capsys.readouterr().out
    model = tmp_path / "m.joblib"
    assert main(["train", "--csv", str(csv), "--schema", str(schema), "--model", str(model),
                 "--until", "2100-01-01T00:00:00Z"]) == 0
    assert main(["score", "--csv", str(csv), "--schema", str(schema), "--model", str(model),
                 "--out-dir", str(tmp_path / "out")]) == 0
    # the store holds the file under the device the other commands name it by: the file's name
    assert main(["train", "--db", db, "--schema", str(schema), "--model", str(tmp_path / "m2.joblib")]) == 0
    assert "1 device" in capsys.readouterr().out


def test_a_file_whose_numbers_are_all_text_is_unusable(tmp_path, capsys):
    csv = tmp_path / "text.csv"
    lines = ["device_id,ts,state,rpm,temp_c,voltage_v,current_a,vibration_mm_s"]
    lines += [f"D1,{1.7e9 + i},RUN,fast,hot,high,some,lots" for i in range(100)]
    csv.write_text("\n".join(lines) + "\n")
    assert main(["validate", str(csv)]) == 1
    err_out = capsys.readouterr().out
    assert "signal rpm has no numeric value (0 empty, 100 not a number, 0 not finite)" in err_out


def test_empty_and_too_short_files_are_clear_errors(tmp_path, capsys, model_file):
    header = "device_id,ts,state,rpm,temp_c,voltage_v,current_a,vibration_mm_s\n"
    empty, short = tmp_path / "empty.csv", tmp_path / "short.csv"
    empty.write_text(header)
    short.write_text(header + "".join(f"D1,{1.7e9 + i},RUN,1500,50,230,10,2\n" for i in range(10)))
    for cmd in (["score", "--csv", str(empty), "--model", str(model_file), "--out-dir", str(tmp_path / "o")],
                ["train", "--csv", str(empty), "--model", str(tmp_path / "x.joblib")],
                ["ingest", str(empty), "--db", f"sqlite:///{tmp_path / 'e.db'}", "--quiet"]):
        assert main(cmd) == 2, cmd
        assert "holds no readings (a header only)" in capsys.readouterr().err
    assert main(["validate", str(empty)]) == 1
    assert "the file has no rows" in capsys.readouterr().out
    assert main(["score", "--csv", str(short), "--model", str(model_file), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no device has the 32 readings one window needs (window: 32); the longest has 10" in \
        capsys.readouterr().err
    assert main(["validate", str(short)]) == 1
    assert "no device has the 32 readings one window needs" in capsys.readouterr().out
    assert main(["train", "--csv", str(short), "--model", str(tmp_path / "x.joblib")]) == 2
    assert "of 32 readings" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["evaluate"], ["rules", "test", "--rules", str(ROOT / "configs" / "alert_rules.yaml")],
                                 ["train", "--model", "{tmp}/m.joblib"]])
def test_read_only_commands_never_create_a_database(tmp_path, capsys, cmd):
    typo = tmp_path / "plnat.db"
    args = [c.replace("{tmp}", str(tmp_path)) for c in cmd]
    assert main([*args, "--db", f"sqlite:///{typo}"]) == 2
    err = capsys.readouterr().err
    assert f"no such database: {typo}" in err and "Traceback" not in err
    assert not typo.exists()


def test_the_readmes_simulate_example_makes_valid_data(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = re.search(r"`(itap simulate [^`]*--out [^`]*)`", readme).group(1)
    argv = shlex.split(example)[1:]
    out = tmp_path / "fleet.csv"
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert main(["validate", str(out), "--out", str(report)]) == 0
    import json

    signals = json.loads(report.read_text())["signals"]
    assert all(s["below_min"] == s["above_max"] == s["non_numeric"] == 0 for s in signals.values()), signals
