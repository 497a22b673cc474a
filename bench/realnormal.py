"""False alarms on a real recording of normal operation: ``python -m bench.realnormal`` (table + JSON).

The recording (``../shared/data/testbed-normal/anomaly-free.csv``, SKAB v0.9, GPL-3.0; read
from there, never copied into this repository) is 9,405 readings at 1 Hz (2 h 46 min) of a
water-pump test bed with 8 signals, every one of them normal. So the share of readings a
detector flags is its false-alarm rate (FAR) on real normal operation, and the slow drift
of a real bed (the fluid warms by ~29 std of its first minutes) is in it.

* **Protocol**, per training prefix N (default 3,600 and 6,000 readings) and detector:
  ``itap train --csv train.csv --schema schema.yaml --detector D --model …`` on the first N
  readings, then ``itap score --csv all.csv --model … --rows-out rows.csv`` on the whole
  recording (so every scored reading has its history, as a live consumer would), both
  in-process with the shipped settings. FAR = the share of readings after the prefix whose
  causal decision (``anomaly`` in rows.csv) is 1. Also reported: FAR in the first and the
  second half of that held-out part, the alarm episodes (runs of flagged readings), the
  detector ``auto`` chose, and the dominant families of the flagged windows.
* **References** on the raw readings, the same split: the textbook T²+Q (standardised on
  the prefix, PCA 85 %, Hotelling T² with its F-based limit and Q with its 0.999 quantile
  over the training readings, running median of 5, alarm when either is over) and
  a point-wise Isolation Forest (contamination 0.0005, running median of 3).
* **Target** for the default detector: FAR <= 2 % with 3,600 training readings and <= 1 %
  with 6,000.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itap_stream.cli import main as itap

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "testbed-normal" / "anomaly-free.csv"
PREFIXES = (3600, 6000)
DETECTORS = ("auto", "isolation_forest", "pca", "hst", "ensemble")
#: FAR the default detector must stay under, per training prefix
TARGETS = {3600: 0.02, 6000: 0.01}
REFERENCES = ("T²+Q on raw readings", "point-wise IsolationForest")
# CSV column: (schema name, family, unit, min, max)
SIGNALS: dict[str, tuple[str, str, str, float, float]] = {
    "Accelerometer1RMS": ("accelerometer1_rms", "Vibration", "g", 0, 10),
    "Accelerometer2RMS": ("accelerometer2_rms", "Vibration", "g", 0, 10),
    "Current": ("current", "Current", "A", 0, 50),
    "Pressure": ("pressure", "Pressure", "bar", -5, 30),
    "Temperature": ("temperature", "Temperature", "degC", -40, 250),
    "Thermocouple": ("thermocouple", "Temperature", "degC", -40, 150),
    "Voltage": ("voltage", "Voltage", "V", 0, 500),
    "Volume Flow RateRMS": ("volume_flow_rate_rms", "Flow", "l/min", 0, 300),
}


def schema_yaml() -> str:
    """The sensor schema of the recording: its ``datetime`` clock and no device column.

    Examples
    --------
    >>> schema_yaml().splitlines()[:2]
    ['timestamp_column: datetime', 'signals:']
    """
    lines = ["timestamp_column: datetime", "signals:"]
    for col, (name, family, unit, lo, hi) in SIGNALS.items():
        lines.append(f'  - {{name: {name}, column: "{col}", family: {family}, unit: {unit}, min: {lo}, max: {hi}}}')
    return "\n".join(lines) + "\n"


def episodes(flags: np.ndarray) -> list[int]:
    """Lengths of the runs of consecutive flagged readings, in order.

    Examples
    --------
    >>> episodes(np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1]))
    [2, 1, 3]
    """
    f = np.concatenate([[0], np.asarray(flags, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(f))
    return [int(v) for v in edges[1::2] - edges[::2]]


def far_summary(flags: np.ndarray) -> dict[str, Any]:
    """FAR of the held-out readings, of their halves, and the alarm episodes.

    Examples
    --------
    >>> s = far_summary(np.array([1, 1, 0, 0, 0, 0, 0, 0]))
    >>> s["far"], s["far_first_half"], s["far_second_half"], s["episodes"]
    (0.25, 0.5, 0.0, 1)
    """
    f = np.asarray(flags, dtype=bool)
    half = len(f) // 2
    runs = episodes(f)
    return {
        "scored": len(f), "flagged": int(f.sum()), "far": float(f.mean()) if len(f) else 0.0,
        "far_first_half": float(f[:half].mean()) if half else 0.0,
        "far_second_half": float(f[half:].mean()) if len(f) - half else 0.0,
        "episodes": len(runs), "longest_episode": max(runs, default=0),
    }


def run_itap(d: Path, n_train: int, detector: str, cfg: list[str], train_extra: list[str],
             score_extra: list[str]) -> dict[str, Any]:
    """Train on d/train.csv, score d/all.csv; the decisions after the prefix and what was trained."""
    from itap_stream.adapters.artifacts import read_manifest

    model, rows, err = d / "model.joblib", d / "rows.csv", io.StringIO()
    for f in (model, rows):
        f.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = itap(["train", "--csv", str(d / "train.csv"), "--schema", str(d / "schema.yaml"), "--model", str(model),
                   "--detector", detector, *cfg, *train_extra])
        t1 = time.perf_counter()
        if rc == 0:
            rc = itap(["score", "--csv", str(d / "all.csv"), "--model", str(model), "--rows-out", str(rows),
                       "--out-dir", str(d / f"out-{detector}"), *cfg, *score_extra])
    t2 = time.perf_counter()
    if rc != 0:
        return {"error": f"rc {rc}: {err.getvalue().strip()[-600:]}"}
    out = pd.read_csv(rows)
    if out["row"].tolist() != list(range(len(out))):
        return {"error": "rows.csv is not one row per reading in input order"}
    held = out.iloc[n_train:]
    res = far_summary(held["anomaly"].to_numpy())
    manifest = read_manifest(model)
    training = manifest.get("training", {})
    explained = json.loads((d / f"out-{detector}" / "explanations_top.json").read_text(encoding="utf-8"))
    res |= {
        "trained": manifest["detector"], "features_used": training.get("features_used"),
        "threshold": manifest["threshold"], "warmup_after_prefix": int(held["warmup"].sum()),
        "flagged_in_prefix": int(out.iloc[:n_train]["anomaly"].sum()),
        "dominant_families": explained["fleet"]["dominant_families"],
        "top_features": explained["fleet"]["top_features"],
        "train_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2),
    }
    return res


def t2q_flags(x: np.ndarray, n_train: int, *, variance: float = 0.85, p: float = 0.999, median: int = 5) -> np.ndarray:
    """The textbook T²+Q chart on raw readings: True where either statistic (running median
    of ``median`` readings) is over its limit; fitted on the first ``n_train`` rows.

    T²'s limit is the F-based one; Q's is its ``p`` quantile over the training readings (the
    share of training readings taken as normal). The Jackson-Mudholkar limit instead, which
    assumes independent Gaussian readings, flags about 10 % at either prefix here."""
    from scipy.stats import f as f_dist

    train = x[:n_train]
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    zt, z = (train - mu) / sd, (x - mu) / sd
    eigval, eigvec = np.linalg.eigh(np.cov(zt.T))
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    k = int(np.searchsorted(np.cumsum(eigval) / eigval.sum(), variance) + 1)
    k = min(k, len(eigval) - 1)
    scores = z @ eigvec[:, :k]
    t2 = (scores * scores / eigval[:k]).sum(axis=1)
    resid = z - scores @ eigvec[:, :k].T
    q = (resid * resid).sum(axis=1)
    n = len(zt)
    t2_limit = k * (n - 1) * (n + 1) / (n * (n - k)) * f_dist.ppf(p, k, n - k)
    q_limit = float(np.quantile(q[:n_train], p))
    t2m = pd.Series(t2).rolling(median).median().to_numpy()
    qm = pd.Series(q).rolling(median).median().to_numpy()
    return np.asarray((np.nan_to_num(t2m) > t2_limit) | (np.nan_to_num(qm) > q_limit))


def iforest_flags(x: np.ndarray, n_train: int, *, contamination: float = 0.0005, median: int = 3) -> np.ndarray:
    """A point-wise Isolation Forest on the standardised raw readings (running median of its
    0/1 decisions over ``median`` readings); fitted on the first ``n_train`` rows."""
    from sklearn.ensemble import IsolationForest

    train = x[:n_train]
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    model = IsolationForest(contamination=contamination, random_state=0).fit((train - mu) / sd)
    pred = (model.predict((x - mu) / sd) == -1).astype(float)
    return np.asarray(pd.Series(pred).rolling(median).median().fillna(0.0).to_numpy() > 0.5)


def table(results: dict[str, dict[int, dict[str, Any]]], prefixes: list[int]) -> str:
    """Markdown: one row per detector, FAR (first half / second half) per prefix."""
    head = ["detector", *(f"FAR, train {n:,}" for n in prefixes), *(f"episodes ({n:,})" for n in prefixes),
            "trained as", "seconds"]
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    for label, per in results.items():
        cells = [label]
        for n in prefixes:
            r = per.get(n, {})
            if r.get("error"):
                cells.append("failed")
                continue
            mark = ""
            if label.startswith("auto") and n in TARGETS:
                mark = " met" if r["far"] <= TARGETS[n] else " NOT met"
            cells.append(f"{r['far']:.1%} ({r['far_first_half']:.1%} / {r['far_second_half']:.1%}){mark}")
        cells += [str(per.get(n, {}).get("episodes", "-")) for n in prefixes]
        cells.append(" / ".join(dict.fromkeys(str(per[n].get("trained", "-")) for n in prefixes if n in per)))
        cells.append(f"{sum(per[n].get('seconds', 0.0) for n in prefixes if n in per):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.realnormal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=str(DATA), help="the anomaly-free recording (default: %(default)s)")
    p.add_argument("--prefixes", default=",".join(map(str, PREFIXES)), help="training prefixes, in readings")
    p.add_argument("--detectors", default=",".join(DETECTORS), help="comma list, `itap train --detector NAME`")
    p.add_argument("--train-args", default="", help="extra `itap train` arguments (one string)")
    p.add_argument("--score-args", default="", help="extra `itap score` arguments (one string)")
    p.add_argument("--config", default=str(ROOT / "configs" / "itap.yaml"),
                   help="settings YAML; its folder is snapshotted at start, so edits during a run do not leak in")
    p.add_argument("--keep", default="", help="keep the CSVs, models and rows.csv files in this folder")
    p.add_argument("--out", default=str(ROOT / "bench" / "realnormal.json"))
    args = p.parse_args(argv)
    src = Path(args.csv)
    if not src.is_file():
        print(f"python -m bench.realnormal: error: the recording {src} is not there (see its README.md in "
              "../shared/data/testbed-normal/)", file=sys.stderr)
        return 2
    prefixes = [int(s) for s in args.prefixes.split(",") if s.strip()]
    detectors = [s.strip() for s in args.detectors.split(",") if s.strip()]
    train_extra, score_extra = shlex.split(args.train_args), shlex.split(args.score_args)
    frame = pd.read_csv(src, sep=";")
    missing = [c for c in SIGNALS if c not in frame.columns]
    if missing or "datetime" not in frame.columns:
        print(f"python -m bench.realnormal: error: {src} lacks column(s) {missing or ['datetime']}", file=sys.stderr)
        return 2
    x = frame[list(SIGNALS)].to_numpy(dtype=float)
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {label: {} for label in REFERENCES}
    with contextlib.ExitStack() as stack:
        base = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base.mkdir(parents=True, exist_ok=True)
        cfg_dir = base / "_configs"
        shutil.copytree(Path(args.config).parent, cfg_dir, dirs_exist_ok=True)
        cfg = ["--config", str(cfg_dir / Path(args.config).name)]
        for n in prefixes:
            if not 0 < n < len(frame):
                print(f"python -m bench.realnormal: error: prefix {n} is not inside the {len(frame)} readings",
                      file=sys.stderr)
                return 2
            for label, flags_of in ((REFERENCES[0], t2q_flags), (REFERENCES[1], iforest_flags)):
                t = time.perf_counter()
                flags = flags_of(x, n)
                results[label][n] = far_summary(flags[n:]) | {"seconds": round(time.perf_counter() - t, 2)}
            d = base / f"train{n}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "schema.yaml").write_text(schema_yaml(), encoding="utf-8")
            frame.iloc[:n].to_csv(d / "train.csv", sep=";", index=False)
            frame.to_csv(d / "all.csv", sep=";", index=False)
            for det in detectors:
                r = run_itap(d, n, det, cfg, train_extra, score_extra)
                r["seconds"] = round(r.get("train_s", 0.0) + r.get("score_s", 0.0), 2)
                results.setdefault(det, {})[n] = r
                note = r.get("error") or (f"FAR {r['far']:.1%} ({r['trained']}, {r['episodes']} episodes; "
                                          f"families {r['dominant_families']})")
                print(f"[realnormal] train {n:5d} {det:16s}: {note}", file=sys.stderr)
    wall = time.perf_counter() - t0
    text = table(results, prefixes)
    print(text)
    print(f"\ntarget for the default (auto): FAR <= {', '.join(f'{v:.0%} ({k:,})' for k, v in TARGETS.items())}; "
          f"FAR (first half / second half of the held-out readings); whole run {wall:.0f}s")
    default = results.get("auto", {})
    report = {
        "args": vars(args), "readings": len(frame), "targets": {str(k): v for k, v in TARGETS.items()},
        "wall_s": round(wall, 1),
        "results": {label: {str(n): r for n, r in per.items()} for label, per in results.items()},
        "targets_met": {str(n): default[n]["far"] <= TARGETS[n] for n in default
                        if n in TARGETS and not default[n].get("error")},
        "table": text,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"[realnormal] written to {args.out} in {wall:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
