"""`itap ingest`: idempotent loading, bad rows reported with their reason instead of failing the file."""

from __future__ import annotations

import pandas as pd

from itap_stream.cli import main
from simulator import simulate


def _csv(tmp_path):
    f = simulate(2, 120, seed=4, maint=False).to_frame().astype({"ts": object, "rpm": object})
    f.loc[3, "rpm"] = "fast"
    f.loc[4, "temp_c"] = 999.0
    f.loc[5, "ts"] = "yesterday"
    f.loc[6, "state"] = "BROKEN"
    f.loc[7, "device_id"] = None
    f.loc[8:9, "current_a"] = None  # dropouts are fine: stored as NULL
    path = tmp_path / "fleet.csv"
    f.to_csv(path, index=False)
    return path, f


def test_ingest_twice_stores_once_and_reports_bad_rows(tmp_path, capsys, db_url):
    import sqlalchemy as sa

    path, frame = _csv(tmp_path)
    rejected = tmp_path / "bad.csv"
    args = ["ingest", str(path), "--db", db_url, "--rejected", str(rejected), "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    good = len(frame) - 5
    assert f"inserted {good:,}, already stored 0, rejected 5" in first
    bad = pd.read_csv(rejected)
    assert sorted(bad["reason"]) == sorted(
        ["wrong_type", "out_of_range", "bad_ts", "unknown_state", "missing_device_id"]
    )
    assert bad.loc[bad["reason"] == "wrong_type", "rpm"].tolist() == ["fast"]  # the original row, as it was

    assert main(args) == 0
    assert f"inserted 0, already stored {good:,}, rejected 5" in capsys.readouterr().out
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://"))
    with engine.connect() as con:
        assert con.execute(sa.text("select count(*) from readings")).scalar() == good
        assert con.execute(sa.text("select count(*) from readings where current_a is null")).scalar() == 2
        row = con.execute(sa.text("select ts, state, rpm from readings where device_id = :d order by ts limit 1"),
                          {"d": frame.loc[0, "device_id"]}).one()
        assert tuple(row) == (float(frame.loc[0, "ts"]), frame.loc[0, "state"], float(frame.loc[0, "rpm"]))
        assert con.execute(sa.text("select count(*) from devices")).scalar() == 2
    engine.dispose()


def test_progress_is_shown_on_stderr(tmp_path, capsys):
    path, frame = _csv(tmp_path)
    assert main(["ingest", str(path), "--db", f"sqlite:///{tmp_path / 'p.db'}"]) == 0
    assert f"ingested {len(frame):,} / {len(frame):,} rows (100.0%)" in capsys.readouterr().err


def test_csv_without_signal_columns_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("device_id,ts,rpm\nD1,0,1\n")
    assert main(["ingest", str(bad), "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert "lacks required column" in err and "Traceback" not in err
