"""`itap validate`: a data-quality report of a readings CSV before it is ingested or trained on.

It reads everything as text first, so one bad cell is counted instead of aborting the
file: required columns, types, per-signal missing rate and range violations against the
sensor schema, duplicate readings, timestamp reversals and gaps per device, and the
state distribution. The data is *unusable* (``usable: false``, with the reasons) when
a required column is missing, there are no rows, no row has a device and a readable time,
a signal has no numeric value at all, or no device has the readings one window needs;
everything else is reported and left to the user to judge. The file is read as
``train``, ``score`` and ``ingest`` read it (`adapters.csvio.map_columns`: the schema's
column mapping, a timestamp column, no device column, the separator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from itap_stream.adapters.csvio import map_columns, open_csv
from itap_stream.core.schema import STATES, SensorSchema

__all__ = ["GAP_FACTOR", "format_report", "parse_ts_column", "validate_csv"]

#: A step between two readings of a device larger than this many times the device's
#: median step is reported as a gap.
GAP_FACTOR = 3.0


def parse_ts_column(raw: pd.Series) -> pd.Series:
    """Epoch seconds from numbers or RFC 3339 text; NaN where neither."""
    num = pd.to_numeric(raw, errors="coerce")
    text = raw[num.isna() & raw.notna()]
    if len(text):
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="mixed")
        num.loc[text.index] = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return num.astype(np.float64)


def validate_csv(path: str | Path, schema: SensorSchema, *, window: int = 32) -> dict[str, Any]:
    """The report as a JSON-ready dict; raises `DataError` only when the file cannot be read.
    ``window``: readings per window (a device with fewer can never be scored)."""
    p = Path(path)
    df = map_columns(open_csv(p, dtype=str, keep_default_na=True, low_memory=False), schema, p)
    report: dict[str, Any] = {"file": str(p), "rows": len(df), "columns": list(df.columns), "usable": True}
    reasons: list[str] = []
    required = ["device_id", "ts", *schema.names]
    missing_cols = [c for c in required if c not in df.columns]
    report["missing_columns"] = missing_cols
    if missing_cols:
        reasons.append(f"required column(s) {missing_cols} missing")
    if not len(df):
        reasons.append("the file has no rows")
    if "device_id" in df.columns and "ts" in df.columns and len(df):
        ts = parse_ts_column(df["ts"])
        dev = df["device_id"]
        ok = ts.notna() & dev.notna()
        report["rows_without_device"] = int(dev.isna().sum())
        report["unreadable_ts"] = int((ts.isna() & df["ts"].notna()).sum())
        report["missing_ts"] = int(df["ts"].isna().sum())
        if not ok.any():
            reasons.append("no row has both a device_id and a readable ts")
        else:
            report.update(_time_checks(dev[ok], ts[ok]))
            longest = max((d["readings"] for d in report["per_device"].values()), default=0)
            if longest < window:
                reasons.append(f"no device has the {window} readings one window needs (window: {window}); the "
                               f"longest has {longest}")
    report["signals"] = _signal_checks(df, schema)
    for name, sig in report["signals"].items():
        if len(df) and sig["missing"] + sig["non_numeric"] + sig["non_finite"] >= len(df):
            reasons.append(f"signal {name} has no numeric value ({sig['missing']} empty, {sig['non_numeric']} not a "
                           f"number, {sig['non_finite']} not finite)")
    states = df["state"].fillna("RUN") if "state" in df.columns else pd.Series(["RUN"] * len(df))
    counts = states.value_counts()
    report["states"] = {s: int(counts.get(s, 0)) for s in STATES}
    unknown = {str(k): int(v) for k, v in counts.items() if k not in STATES}
    report["unknown_states"] = unknown
    report["usable"] = not reasons
    report["reasons"] = reasons
    report["warnings"] = _warnings(report)
    return report


def _time_checks(dev: pd.Series, ts: pd.Series) -> dict[str, Any]:
    frame = pd.DataFrame({"device": dev.to_numpy(), "ts": ts.to_numpy()})
    dup = frame.duplicated(["device", "ts"])
    prev_max = frame.groupby("device")["ts"].cummax().groupby(frame["device"]).shift(1)
    reversal = frame["ts"] < prev_max
    per_device: dict[str, Any] = {}
    gaps_total = 0
    for d, g in frame[~dup].sort_values(["device", "ts"], kind="stable").groupby("device", sort=True):
        steps = np.diff(g["ts"].to_numpy())
        steps = steps[steps > 0]
        median = float(np.median(steps)) if len(steps) else 0.0
        gaps = steps[steps > GAP_FACTOR * median] if median > 0 else steps[:0]
        gaps_total += len(gaps)
        per_device[str(d)] = {
            "readings": int(len(g)),
            "first_ts": float(g["ts"].iloc[0]),
            "last_ts": float(g["ts"].iloc[-1]),
            "median_step_s": round(median, 6),
            "gaps": int(len(gaps)),
            "largest_gap_s": round(float(gaps.max()), 3) if len(gaps) else 0.0,
            "duplicates": int(dup[frame["device"] == d].sum()),
            "reversals": int(reversal[frame["device"] == d].sum()),
        }
    return {
        "devices": len(per_device),
        "duplicates": int(dup.sum()),
        "reversals": int(reversal.sum()),
        "gaps": gaps_total,
        "per_device": per_device,
    }


def _signal_checks(df: pd.DataFrame, schema: SensorSchema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = max(len(df), 1)
    for sig in schema.signals:
        if sig.name not in df.columns:
            continue
        raw = df[sig.name]
        num = pd.to_numeric(raw, errors="coerce")
        non_numeric = int((num.isna() & raw.notna()).sum())
        finite = num[np.isfinite(num)]
        out[sig.name] = {
            "family": sig.family,
            "missing": int(raw.isna().sum()),
            "missing_rate": round(float(raw.isna().sum()) / n, 6),
            "non_numeric": non_numeric,
            "non_finite": int(num.notna().sum() - len(finite)),
            "below_min": int((finite < sig.min).sum()),
            "above_max": int((finite > sig.max).sum()),
            "valid_range": [sig.min, sig.max],
            "min": float(finite.min()) if len(finite) else None,
            "max": float(finite.max()) if len(finite) else None,
        }
    return out


def _warnings(r: dict[str, Any]) -> list[str]:
    w = []
    for key, what in (("duplicates", "duplicate readings (same device and ts)"),
                      ("reversals", "readings older than an earlier reading of their device"),
                      ("gaps", f"gaps longer than {GAP_FACTOR:g}x a device's usual step"),
                      ("unreadable_ts", "unreadable timestamps"), ("rows_without_device", "rows without device_id")):
        if r.get(key):
            w.append(f"{r[key]:,} {what}")
    for name, s in r.get("signals", {}).items():
        bad = s["non_numeric"] + s["non_finite"] + s["below_min"] + s["above_max"]
        if bad:
            w.append(
                f"{name}: {bad:,} value(s) not usable ({s['non_numeric']} non-numeric, {s['non_finite']} non-finite, "
                f"{s['below_min']} below {s['valid_range'][0]:g}, {s['above_max']} above {s['valid_range'][1]:g})"
            )
        if s["missing_rate"] >= 0.5:
            w.append(f"{name}: {s['missing_rate']:.0%} missing")
    if r.get("unknown_states"):
        w.append(f"unknown state(s) {sorted(r['unknown_states'])} (expected {', '.join(STATES)})")
    return w


def format_report(r: dict[str, Any]) -> str:
    """The human summary `itap validate` prints."""
    lines = [
        f"{r['file']}: {r['rows']:,} rows, {r.get('devices', 0)} device(s) — {'usable' if r['usable'] else 'UNUSABLE'}"
    ]
    lines += [f"  unusable: {x}" for x in r["reasons"]]
    if r.get("signals"):
        lines.append(f"  {'signal':<16} {'missing':>8} {'out of range':>12} {'min':>10} {'max':>10}")
        for name, s in r["signals"].items():
            rng = s["below_min"] + s["above_max"]
            lo = "-" if s["min"] is None else f"{s['min']:.4g}"
            hi = "-" if s["max"] is None else f"{s['max']:.4g}"
            lines.append(f"  {name:<16} {s['missing_rate']:>8.1%} {rng:>12,} {lo:>10} {hi:>10}")
    states = ", ".join(f"{k} {v:,}" for k, v in r.get("states", {}).items())
    lines.append(f"  states: {states}")
    if "duplicates" in r:
        lines.append(f"  duplicates {r['duplicates']:,}, reversals {r['reversals']:,}, gaps {r['gaps']:,}")
    lines += [f"  warning: {x}" for x in r["warnings"]]
    return "\n".join(lines)
