"""Held-out test-bed protocol on simulated pump runs: ``python -m bench.testbed`` (table + JSON).

The detectors will be judged on recordings of a water-circulation pump test bed we never see
(SKAB style: 8 sensors, ~1 reading/s, many runs, each a normal start then an induced fault
lasting minutes). This is a stand-in built from physical reasoning, not from those files:

* **Sensor sets.** ``pump8`` mimics the real files (``;``-separated, ``datetime`` as
  ``YYYY-mm-dd HH:MM:SS``, accelerometers, current, pressure, motor temperature,
  thermocouple, voltage, flow, plus ``anomaly``/``changepoint`` label columns). ``rig6`` is
  another layout (``,``-separated, ISO 8601 times with an offset, bracketed column names, no
  flow or water temperature, a ``fault_label`` column) so that nothing is tuned to one file.
* **Normal behaviour** is not stationary white noise: a per-run operating point (levels differ
  between runs by far more than the noise within one), AR(1) noise with heavy-ish tails and a
  per-run noise factor 0.5-2, a shared slow load process coupling flow, pressure, current and
  vibration, warm-up of both temperatures (exponential approach), a slow random-walk drift of
  the other signals, isolated spikes (~1 per 500 readings) and ADC quantisation on some signals.
* **Runs** are 900-1400 readings: 400 normal (training), 100-400 more normal, a fault of
  180-480 readings (step onset or a 10-90 s ramp), then 0-200 normal readings again.
  Faults couple several sensors: partial valve closure, rotor imbalance, cavitation, leak,
  fluid addition (water temperature disturbance), bearing friction heating. Magnitudes are in
  units of the run's noise std, subtle (1.5-3) in 40 % of runs, clear (3-8) otherwise.
* **Protocol** (as the judges run it, one fixed configuration for all runs): per run
  ``itap train --csv train.csv`` (first 400 rows) and ``itap score --csv test.csv --rows-out``
  (the rest), both in-process; the ``anomaly`` column of rows.csv against the truth (fault
  start to fault end). TP/FP/FN/TN are pooled over all runs: F1, precision, recall,
  false-alarm rate FAR = FP/(FP+TN), missed-alarm rate MAR = FN/(FN+TP). The baseline row is a
  plain scikit-learn IsolationForest on the standardised raw readings (published: F1 0.29).
  Target: F1 >= 0.78 at FAR <= 0.20.
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
TARGETS = {"f1": 0.78, "far": 0.20}
N_TRAIN = 400
REFERENCES = ("always anomaly", "raw IsolationForest", "point-wise T²")  # rows of the table that are not itap
#: The public SKAB leaderboard (outlier detection; F1, FAR %, MAR %) and the corpus it was
#: computed on (v0.9: 34 files, 37 401 readings, 13 067 of them anomalous, training on each
#: file's first 400 readings). `published_on_test_parts` converts it to the judges' protocol.
LEADERBOARD: dict[str, tuple[float, float, float]] = {
    "Conv-AE": (0.79, 13.69, 17.77),
    "MSET": (0.73, 20.82, 20.08),
    "LSTM-AE": (0.68, 14.24, 35.56),
    "T-squared+Q (PCA)": (0.67, 13.95, 36.32),
    "T-squared": (0.56, 12.14, 52.56),
    "Isolation forest": (0.40, 6.86, 72.09),
}
CORPUS = {"files": 34, "readings": 37401, "anomalous": 13067}
FAULTS = ("valve", "imbalance", "cavitation", "leak", "fluid", "friction")
# role: (column, schema name, family, unit, level lo, level hi, noise std, AR phi, quantum, min, max)
SETS: dict[str, dict[str, tuple]] = {
    "pump8": {
        "vib1": ("Accelerometer1RMS", "accelerometer1_rms", "Vibration", "g", 0.20, 0.27, 0.004, 0.6, 0.0, 0, 10),
        "vib2": ("Accelerometer2RMS", "accelerometer2_rms", "Vibration", "g", 0.20, 0.27, 0.004, 0.6, 0.0, 0, 10),
        "current": ("Current", "current", "Current", "A", 1.0, 2.5, 0.06, 0.4, 0.0, 0, 50),
        "pressure": ("Pressure", "pressure", "Pressure", "bar", 0.05, 0.9, 0.04, 0.5, 0.0545, -5, 30),
        "temp_motor": ("Temperature", "temperature", "Temperature", "degC", 65.0, 85.0, 0.08, 0.9, 0.01, -40, 250),
        "temp_fluid": ("Thermocouple", "thermocouple", "Temperature", "degC", 24.0, 32.0, 0.03, 0.9, 0.01, -40, 150),
        "voltage": ("Voltage", "voltage", "Voltage", "V", 220.0, 240.0, 1.2, 0.3, 0.01, 0, 500),
        "flow": ("Volume Flow RateRMS", "volume_flow_rate_rms", "Flow", "l/min", 30.0, 33.0, 0.25, 0.6, 0.0, 0, 300),
    },
    "rig6": {
        "vib1": ("Vib X [mm/s]", "vib_x_mm_s", "Vibration", "mm/s", 1.5, 4.0, 0.05, 0.5, 0.0, 0, 100),
        "vib2": ("Vib Y [mm/s]", "vib_y_mm_s", "Vibration", "mm/s", 1.5, 4.0, 0.05, 0.5, 0.0, 0, 100),
        "current": ("Motor current [A]", "motor_current_a", "Current", "A", 10.0, 30.0, 0.3, 0.5, 0.0, 0, 500),
        "voltage": ("Supply voltage [V]", "supply_voltage_v", "Voltage", "V", 395.0, 405.0, 1.5, 0.2, 0.5, 0, 1000),
        "pressure": ("Outlet pressure [bar]", "p_out_bar", "Pressure", "bar", 3.0, 6.0, 0.03, 0.7, 0.01, 0, 50),
        "temp_motor": ("Bearing temp [C]", "bearing_t_c", "Temperature", "degC", 40.0, 55.0, 0.1, 0.9, 0.1, -40, 250),
    },
}
ROLES = ("vib1", "vib2", "current", "pressure", "temp_motor", "temp_fluid", "voltage", "flow")
LOAD_COUPLING = {"flow": 0.8, "pressure": -0.5, "current": 0.6, "vib1": 0.3, "vib2": 0.3}  # x sigma
# fault -> role -> (mean shift, extra noise) per unit of magnitude, in sigmas of that role
EFFECTS: dict[str, dict[str, tuple[float, float]]] = {
    "valve": {"flow": (-1.0, 0), "pressure": (0.8, 0), "current": (-0.4, 0), "vib1": (0.3, 0), "vib2": (0.3, 0)},
    "imbalance": {"vib1": (1.0, 0.2), "vib2": (0.5, 0.1), "current": (0.3, 0.2)},
    "cavitation": {"vib1": (0.5, 0.5), "vib2": (0.5, 0.5), "flow": (-0.5, 0.5), "pressure": (-0.5, 0.5),
                   "current": (-0.2, 0.3)},
    "leak": {"pressure": (-1.0, 0), "flow": (0.6, 0), "current": (0.3, 0)},
    "fluid": {"temp_fluid": (-1.2, 0), "pressure": (0.6, 0), "temp_motor": (-0.5, 0), "flow": (0.3, 0)},
    "friction": {"temp_motor": (1.5, 0), "current": (0.7, 0), "vib1": (0.2, 0), "vib2": (0.2, 0)},
}


def _ar1(rng: np.random.Generator, n: int, phi: float, std: float) -> np.ndarray:
    """AR(1) noise with marginal std ``std`` and t(6)-distributed innovations."""
    e = rng.standard_t(6, n) / np.sqrt(1.5) * std * np.sqrt(1 - phi**2)
    out = np.empty(n)
    out[0] = rng.normal(0, std)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + e[i]
    return out


#: How hard the stand-in is. ``published``: meant to put a plain Isolation Forest on the raw
#: readings near its published F1 (~0.3): faults of 0.75-3 noise std, warm-up of 1-4 std
#: over a run. The published point-wise T² finds almost none of these faults (F1 0.00; 0.56
#: on the real bed): they are smaller than the real ones. ``harsh``: clear faults (3-8 std in
#: 60 % of runs) and a warm-up of 0.3-4 degC (twice that on the motor). ``hot``: the same
#: faults, a warm-up of 2-10 degC (4-20 on the motor); its point-wise T² (F1 0.62-0.71) is
#: the closest to the real bed's. ``drifting``: the same faults, and every other signal also
#: settles by 8-32 std over a run (time constant 10-40 min): a failure case, see bench/README.md.
#: ``settling`` (issue 15, behaviour 1): the faults of ``harsh``, then 7-13 minutes of normal
#: operation in which the process does not return to where it was: from the fault's start the
#: motor temperature moves 1.5-3 degC away (as on the real bed; time constant 1-4 minutes) and
#: stays there, and every other signal the fault moved keeps 15-35 % of its shift.
PROFILES: dict[str, dict[str, Any]] = {
    "published": {"subtle_share": 1.0, "subtle": (0.75, 3.0), "clear": (3.0, 8.0), "warmup_std": (1.0, 4.0)},
    "harsh": {"subtle_share": 0.4, "subtle": (1.5, 3.0), "clear": (3.0, 8.0), "warmup_abs": (0.3, 4.0)},
    "drifting": {"subtle_share": 0.4, "subtle": (1.5, 3.0), "clear": (3.0, 8.0), "warmup_std": (64.0, 256.0),
                 "settle_std": (8.0, 32.0)},
    "hot": {"subtle_share": 0.4, "subtle": (1.5, 3.0), "clear": (3.0, 8.0), "warmup_abs": (2.0, 10.0)},
    "settling": {"subtle_share": 0.4, "subtle": (1.5, 3.0), "clear": (3.0, 8.0), "warmup_abs": (0.3, 4.0),
                 "post": (420, 780), "residual": (0.15, 0.35), "residual_motor_abs": (1.5, 3.0)},
}


def make_run(
    rng: np.random.Generator, sensor_set: str, fault_kind: str, profile_name: str = "published"
) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """One simulated run (a CSV-shaped frame), the truth per row and what was drawn."""
    prof = PROFILES[profile_name]
    while True:  # 900-1400 readings: 400 + 100-400 normal, 180-480 fault, 0-200 normal
        ext, flen = int(rng.integers(100, 401)), int(rng.integers(180, 481))
        if "post" in prof:  # a long normal part after the fault (no length bound)
            post = int(rng.integers(*prof["post"]))
            break
        post = 0 if rng.random() < 0.25 else int(rng.integers(1, 201))
        if 900 <= N_TRAIN + ext + flen + post <= 1400:
            break
    n, f0 = N_TRAIN + ext + flen + post, N_TRAIN + ext
    f1 = f0 + flen
    t = np.arange(n, dtype=float)
    spec = SETS[sensor_set]
    noise_factor = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    magnitude = float(
        rng.uniform(*prof["subtle"]) if rng.random() < prof["subtle_share"] else rng.uniform(*prof["clear"])
    )
    ramp = 0 if rng.random() < 0.5 else int(rng.integers(10, 91))
    profile = np.zeros(n)
    profile[f0:f1] = np.minimum(1.0, (t[f0:f1] - f0 + 1) / ramp) if ramp else 1.0
    if fault_kind == "friction":  # heating builds up over the fault, on top of the onset ramp
        profile[f0:f1] *= np.minimum(1.0, 0.3 + (t[f0:f1] - f0) / 150.0)
    load = _ar1(rng, n, 0.995, 1.0) * rng.uniform(0.3, 1.0)
    data: dict[str, np.ndarray] = {}
    for role in ROLES:
        if role not in spec:
            continue
        _, _, _, _, lo, hi, std0, phi, quantum, _, _ = spec[role]
        std = std0 * noise_factor
        level = rng.uniform(lo, hi)
        x = level + _ar1(rng, n, phi, std) + LOAD_COUPLING.get(role, 0.0) * std * load
        if role.startswith("temp"):  # warm-up: exponential approach to the run's steady value
            if "warmup_abs" in prof:  # degrees
                rise = rng.uniform(*prof["warmup_abs"]) * (2.0 if role == "temp_motor" else 0.5)
            else:  # in noise std
                rise = rng.uniform(*prof["warmup_std"]) * std
            x += rise * (1 - np.exp(-t / rng.uniform(900, 3600)))
        else:  # slow drift, ~0.5 sigma over a run
            x += np.cumsum(rng.normal(0, 0.5 * std / np.sqrt(n), n))
            if "settle_std" in prof:  # the loop settling after start-up moves the other signals too
                settle = rng.choice([-1, 1]) * rng.uniform(*prof["settle_std"]) * std
                x += settle * (1 - np.exp(-t / rng.uniform(600, 2400)))
        shift, extra = EFFECTS[fault_kind].get(role, (0.0, 0.0))
        x += magnitude * std * (shift * profile + extra * profile * rng.standard_t(6, n) / np.sqrt(1.5))
        if "residual" in prof:  # after the fault the process settles a little away from where it was
            if role == "temp_motor":  # moves from the fault's start, settling with a time constant of 1-4 min
                tau = rng.uniform(60.0, 240.0)
                x[f0:] += rng.choice([-1, 1]) * rng.uniform(*prof["residual_motor_abs"]) * (
                    1 - np.exp(-(t[f0:] - f0) / tau))
            else:
                x[f1:] += rng.uniform(*prof["residual"]) * magnitude * std * shift
        spikes = rng.random(n) < 1 / (500 * len(spec))  # ~1 spike per 500 readings over all signals
        x[spikes] += rng.choice([-1, 1], spikes.sum()) * rng.uniform(4, 10, spikes.sum()) * std
        if quantum:
            x = np.round(x / quantum) * quantum
        data[spec[role][0]] = np.round(x, 6)
    truth = np.zeros(n, dtype=bool)
    truth[f0:f1] = True
    start = pd.Timestamp("2020-02-08 13:30:00") + pd.Timedelta(seconds=int(rng.integers(0, 30 * 86400)))
    ts = start + pd.to_timedelta(t, unit="s")
    if sensor_set == "pump8":
        frame = pd.DataFrame({"datetime": ts.strftime("%Y-%m-%d %H:%M:%S"), **data})
        frame["anomaly"] = truth.astype(float)
        cp = np.zeros(n)
        cp[[f0, f1 - 1]] = 1.0
        frame["changepoint"] = cp
    else:
        frame = pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S+01:00"), **data})
        frame["fault_label"] = truth.astype(int)
    info = {"n": n, "fault_start": f0, "fault_end": f1, "magnitude": round(magnitude, 2), "ramp_s": ramp,
            "noise_factor": round(noise_factor, 2)}
    return frame, truth, info


def schema_yaml(sensor_set: str) -> str:
    ts_col, label = ("datetime", "anomaly") if sensor_set == "pump8" else ("timestamp", "fault_label")
    lines = [f"timestamp_column: {ts_col}", f"label_column: {label}", "signals:"]
    for col, name, family, unit, *_, lo, hi in SETS[sensor_set].values():
        lines.append(f'  - {{name: {name}, column: "{col}", family: {family}, unit: {unit}, min: {lo}, max: {hi}}}')
    return "\n".join(lines) + "\n"


def write_csv(frame: pd.DataFrame, path: Path, sensor_set: str) -> None:
    frame.to_csv(path, index=False, sep=";" if sensor_set == "pump8" else ",")


def plan(runs: int, seed: int) -> list[tuple[int, str, str, np.random.Generator]]:
    """Run i: every 6 consecutive runs cover all fault kinds, sensor sets alternate."""
    names = list(SETS)
    return [(i, names[(i + i // len(FAULTS)) % len(names)], FAULTS[i % len(FAULTS)],
             np.random.default_rng([seed, i])) for i in range(runs)]


def counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    return {"tp": int((pred & truth).sum()), "fp": int((pred & ~truth).sum()),
            "fn": int((~pred & truth).sum()), "tn": int((~pred & ~truth).sum())}


def rates(c: dict[str, int]) -> dict[str, float]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"f1": 2 * p * r / (p + r) if p + r else 0.0, "precision": p, "recall": r,
            "far": fp / (fp + tn) if fp + tn else 0.0, "mar": fn / (fn + tp) if fn + tp else 0.0}


def pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    def tot(rs: list[dict[str, Any]]) -> dict[str, int]:
        return {k: sum(r[k] for r in rs) for k in ("tp", "fp", "fn", "tn")}
    ok = [r for r in results if not r.get("error")]
    out: dict[str, Any] = {"runs": len(ok), "errors": len(results) - len(ok), **tot(ok), **rates(tot(ok))}
    out["recall_by_fault"] = {f: rates(tot([r for r in ok if r["fault"] == f]))["recall"] for f in FAULTS}
    out["f1_by_set"] = {s: rates(tot([r for r in ok if r["set"] == s]))["f1"] for s in SETS}
    out["met"] = out["f1"] >= TARGETS["f1"] and out["far"] <= TARGETS["far"]
    return out


def run_itap(d: Path, truth: np.ndarray, train_extra: list[str], score_extra: list[str]) -> dict[str, Any]:
    """train on d/train.csv, score d/test.csv, compare rows.csv with the truth of the test part."""
    model, rows, err = d / "model.joblib", d / "rows.csv", io.StringIO()
    for f in (model, rows):
        f.unlink(missing_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = itap(["train", "--csv", str(d / "train.csv"), "--schema", str(d / "schema.yaml"),
                   "--model", str(model), *train_extra])
        if rc == 0:
            rc = itap(["score", "--csv", str(d / "test.csv"), "--model", str(model), "--rows-out", str(rows),
                       "--out-dir", str(d / "out"), *score_extra])
    if rc != 0:
        return {"error": f"rc {rc}: {err.getvalue().strip()[-600:]}"}
    out = pd.read_csv(rows)
    test_truth = truth[N_TRAIN:]
    if len(out) != len(test_truth) or out["row"].tolist() != list(range(len(out))):
        return {"error": f"rows.csv has {len(out)} rows for {len(test_truth)} readings"}
    pred = out["anomaly"].to_numpy().astype(bool)
    res = counts(pred, test_truth)
    res |= {"warmup_rows": int(out["warmup"].sum()), "dropped_rows": int(out.get("dropped", pd.Series([0])).sum()),
            "score_nan_after_warmup": int(out.loc[out["warmup"] == 0, "score"].isna().sum())}
    # first alarm inside the fault, seconds after its start (None: missed)
    hit = np.flatnonzero(pred & test_truth)
    res["delay_s"] = int(hit[0] - np.flatnonzero(test_truth)[0]) if len(hit) else None
    return res


def raw_iforest(frame: pd.DataFrame, sensor_set: str, truth: np.ndarray) -> dict[str, Any]:
    from sklearn.ensemble import IsolationForest

    cols = [v[0] for v in SETS[sensor_set].values()]
    x = frame[cols].to_numpy(dtype=float)
    mu, sd = x[:N_TRAIN].mean(0), x[:N_TRAIN].std(0) + 1e-12
    model = IsolationForest(random_state=0).fit((x[:N_TRAIN] - mu) / sd)
    pred = model.predict((x[N_TRAIN:] - mu) / sd) == -1
    return counts(pred, truth[N_TRAIN:])


def pointwise_t2(frame: pd.DataFrame, sensor_set: str, truth: np.ndarray) -> dict[str, Any]:
    """The leaderboard's "T-squared" entry as published: Hotelling's T² of each standardised
    reading against the first 400, a running median of 5, alarm above twice the F-based
    upper control limit at 0.999. A calibration point: on the real test bed it scored F1 0.56."""
    from scipy.stats import f as f_dist

    cols = [v[0] for v in SETS[sensor_set].values()]
    x = frame[cols].to_numpy(dtype=float)
    train = x[:N_TRAIN]
    mu, sd = train.mean(0), train.std(0) + 1e-12
    z, zt = (x - mu) / sd, (train - mu) / sd
    precision = np.linalg.pinv(np.cov(zt.T))
    t2 = pd.Series(np.einsum("ij,jk,ik->i", z, precision, z)).rolling(5).median().to_numpy()
    n, m = zt.shape
    ucl = m * (n - 1) * (n + 1) / (n * (n - m)) * f_dist.ppf(0.999, m, n - m)
    pred = np.nan_to_num(t2, nan=0.0) > 2 * ucl
    return counts(pred[N_TRAIN:], truth[N_TRAIN:])


def published_on_test_parts(corpus: dict[str, int] = CORPUS, train: int = N_TRAIN) -> list[dict[str, Any]]:
    """The leaderboard's rows in the judges' terms.

    The leaderboard's F1 follows from its FAR and MAR only if its false alarms are counted
    over every normal reading of every file, the 400 training readings included (recomputed
    F1 below, equal to the published one to two decimals). The judges score the readings
    after the first 400, so the same alarms give a higher false-alarm rate there: FP over the
    normal readings of the test parts, assuming, as for a model fitted on those 400 readings,
    that no alarm fell on them (at most that; exactly that when none did).

    Examples
    --------
    >>> row = published_on_test_parts()[0]
    >>> row["method"], row["f1_recomputed"], row["far_test_parts"]
    ('Conv-AE', 0.792, 0.31)
    """
    anomalous = corpus["anomalous"]
    normal = corpus["readings"] - anomalous
    normal_test = normal - corpus["files"] * train
    out = []
    for method, (f1, far, mar) in LEADERBOARD.items():
        tp, fp = (1 - mar / 100) * anomalous, far / 100 * normal
        p, r = tp / (tp + fp), tp / anomalous
        out.append({"method": method, "f1": f1, "far": far / 100, "mar": mar / 100,
                    "f1_recomputed": round(2 * p * r / (p + r), 3), "far_test_parts": round(fp / normal_test, 3)})
    return out


def has_detector_option() -> bool:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        itap(["train", "--help"])
    return "--detector" in buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="6 runs")
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--profile", choices=sorted(PROFILES), default="published",
                   help="published (default): small faults; harsh: clear faults, warm-up; hot: a stronger warm-up; "
                        "drifting: every signal settles for minutes; settling: after the fault the process settles "
                        "a little away for 7-13 minutes")
    p.add_argument("--detectors", default="auto,isolation_forest,pca,hst,ensemble",
                   help="comma list, passed as `itap train --detector NAME` (default: all)")
    p.add_argument("--train-args", default="", help="extra `itap train` arguments (one string)")
    p.add_argument("--score-args", default="", help="extra `itap score` arguments (one string)")
    p.add_argument("--config", default=str(ROOT / "configs" / "itap.yaml"),
                   help="settings YAML; its folder is snapshotted at start, so edits during a run do not leak in")
    p.add_argument("--keep", default="", help="keep the generated runs in this folder")
    p.add_argument("--out", default=str(ROOT / "bench" / "testbed.json"))
    args = p.parse_args(argv)
    n_runs = 6 if args.quick else args.runs
    train_extra, score_extra = shlex.split(args.train_args), shlex.split(args.score_args)
    wanted = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if wanted and not has_detector_option():
        print(f"[testbed] `itap train` has no --detector option; running the default, not {wanted}", file=sys.stderr)
        wanted = []
    detectors = [(d, ["--detector", d]) for d in wanted] or [("default", [])]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        base = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cfg_dir = base / "_configs"
        shutil.copytree(Path(args.config).parent, cfg_dir, dirs_exist_ok=True)
        cfg = ["--config", str(cfg_dir / Path(args.config).name)]
        runs = []
        for i, sensor_set, fault, rng in plan(n_runs, args.seed):
            frame, truth, info = make_run(rng, sensor_set, fault, args.profile)
            d = base / f"run{i:03d}_{sensor_set}_{fault}"
            d.mkdir(parents=True, exist_ok=True)
            write_csv(frame, d / "full.csv", sensor_set)
            write_csv(frame.iloc[:N_TRAIN], d / "train.csv", sensor_set)
            write_csv(frame.iloc[N_TRAIN:], d / "test.csv", sensor_set)
            (d / "schema.yaml").write_text(schema_yaml(sensor_set), encoding="utf-8")
            runs.append({"run": i, "set": sensor_set, "fault": fault, **info, "dir": d, "frame": frame, "truth": truth})
        results: dict[str, Any] = {}
        # reference: alarm on every reading (F1 = 2p/(1+p) at the fault share p of the test parts)
        per = [{"run": r["run"], "set": r["set"], "fault": r["fault"],
                **counts(np.ones(r["n"] - N_TRAIN, dtype=bool), r["truth"][N_TRAIN:])} for r in runs]
        results["always anomaly"] = {"pooled": pooled(per), "runs": per, "seconds": 0.0}
        t = time.perf_counter()
        per = [{"run": r["run"], "set": r["set"], "fault": r["fault"],
                **raw_iforest(r["frame"], r["set"], r["truth"])} for r in runs]
        results["raw IsolationForest"] = {"pooled": pooled(per), "runs": per, "seconds": time.perf_counter() - t}
        t = time.perf_counter()
        per = [{"run": r["run"], "set": r["set"], "fault": r["fault"],
                **pointwise_t2(r["frame"], r["set"], r["truth"])} for r in runs]
        results["point-wise T²"] = {"pooled": pooled(per), "runs": per, "seconds": time.perf_counter() - t}
        for label, extra in detectors:
            t = time.perf_counter()
            per = []
            for r in runs:
                res = run_itap(r["dir"], r["truth"], [*cfg, *extra, *train_extra], [*cfg, *score_extra])
                per.append({"run": r["run"], "set": r["set"], "fault": r["fault"], **res})
                note = res.get("error") or f"F1 {rates(res)['f1']:.2f} FAR {rates(res)['far']:.2f}"
                print(f"[testbed] {label} run {r['run']:3d} {r['set']:5s} {r['fault']:10s} "
                      f"m={r['magnitude']:.1f}: {note}", file=sys.stderr)
            results[label] = {"pooled": pooled(per), "runs": per, "seconds": time.perf_counter() - t}
    table = [("detector", "runs", "F1", "precision", "recall", "FAR", "MAR", "seconds", "target")]
    for label, res in results.items():
        q = res["pooled"]
        table.append((label, f"{q['runs']}" + (f" ({q['errors']} failed)" if q["errors"] else ""), f"{q['f1']:.3f}",
                      f"{q['precision']:.3f}", f"{q['recall']:.3f}", f"{q['far']:.3f}", f"{q['mar']:.3f}",
                      f"{res['seconds']:.1f}", "met" if q["met"] else "NOT met"))
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]))]
    for j, row in enumerate(table):
        cells = (c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("| " + " | ".join(cells) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) if k == 0 else "-" * (w + 1) + ":" for k, w in enumerate(widths)) + "|")
    print("\nrecall by fault / F1 by sensor set:")
    for label, res in results.items():
        q = res["pooled"]
        print(f"  {label:20s} " + "  ".join(f"{f} {v:.2f}" for f, v in q["recall_by_fault"].items())
              + " | " + "  ".join(f"{s} {v:.2f}" for s, v in q["f1_by_set"].items()))
    published = published_on_test_parts()
    print("\nthe public leaderboard in the judges' terms (false alarms after each file's first 400 readings):")
    for row in published:
        print(f"  {row['method']:18s} F1 {row['f1']:.2f} (recomputed {row['f1_recomputed']:.3f})  "
              f"FAR {row['far']:.3f} over whole files -> {row['far_test_parts']:.3f} over the scored parts")
    report = {
        "args": vars(args), "runs": n_runs, "targets": TARGETS, "wall_s": time.perf_counter() - t0,
        "published_on_test_parts": published,
        "generated": [{k: v for k, v in r.items() if k not in ("frame", "truth", "dir")} for r in runs],
        "results": results,
        "targets_met": {k: v["pooled"]["met"] for k, v in results.items() if k not in REFERENCES},
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"[testbed] {n_runs} runs, written to {args.out} in {report['wall_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
