"""Detection quality on simulated fleets: ``python -m bench.quality`` (table + JSON).

For each evaluation seed (never used while developing the defaults), a fleet of
``--devices`` runs for ``--hours`` with every fault kind injected on its own device at a
random onset; the model is trained on a separate simulated healthy fleet, exactly as
``itap train`` does, and the fleet is scored through the batch path (`itap score`'s
code: same features, model, smoothing and rules as the stream). Reported per seed and
as the median over seeds: window F1, recall per fault, median detection delay after onset
(windows) and false alerts per healthy device-day.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from itap_stream.app.offline import score_frame, train_from_frame
from itap_stream.config import load
from itap_stream.core.quality import quality_report
from itap_stream.core.rules import RuleEngine
from simulator.generator import FAULT_KINDS, Fault, device_name, simulate

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEEDS = (9001, 9002, 9003)
TARGETS = {"f1": 0.90, "recall_each_fault": 0.90, "delay_windows": 2.0, "false_alerts_per_device_day": 1.0}


def one_seed(seed: int, devices: int, hours: float, settings: Any, artifact: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    duration = hours * 3600.0
    faults = []
    for k, kind in enumerate(FAULT_KINDS):
        onset = float(rng.uniform(0.2, 0.6) * duration)
        faults.append(Fault(kind=kind, device=device_name(devices - k), onset_s=onset, duration_s=min(1800.0, duration - onset)))
    frame = simulate(devices, duration, seed=seed, faults=faults).to_frame()
    schema = settings.schema()
    rules, resolve_after = settings.rules()
    result = score_frame(
        frame, schema, artifact, RuleEngine(rules, resolve_after_s=resolve_after),
        window=settings.window, hop=settings.hop, alarm_k=settings.alarm_k, alarm_n=settings.alarm_n,
    )
    bw, a = result.windows, result.assessment
    r = quality_report(
        bw.device_ids.tolist(), bw.end_ts, bw.label.tolist(), a.scores, a.flags, artifact.threshold,
        [al.to_dict() for al in result.alerts], hop_s=float(settings.hop),
    )
    return {
        "seed": seed,
        "f1": r["f1"],
        "precision": r["precision"],
        "recall": r["recall"],
        "roc_auc": r["roc_auc"],
        "recall_by_fault": r["recall_by_fault"],
        "delay_windows": r["detection_delay_windows_median"],
        "false_alerts_per_device_day": r["false_alerts_per_healthy_device_day"],
        "faults_missed": r["faults_missed"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=12)
    p.add_argument("--hours", type=float, default=4.0)
    p.add_argument("--seeds", default=",".join(map(str, EVAL_SEEDS)))
    p.add_argument("--out", default=str(ROOT / "bench" / "quality.json"))
    args = p.parse_args(argv)
    settings = load(ROOT / "configs" / "itap.yaml", environ={})
    t0 = time.perf_counter()
    normal = simulate(20, 7200.0, seed=1234).to_frame()
    artifact, _ = train_from_frame(normal, settings.schema(), window=settings.window, hop=settings.hop,
                                   quantile=settings.threshold_quantile, seed=0)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = one_seed(seed, args.devices, args.hours, settings, artifact)
        print(f"[quality] seed {seed}: F1 {r['f1']:.3f}, recall by fault {r['recall_by_fault']}", file=sys.stderr)
        runs.append(r)
    med = {
        "f1": statistics.median(r["f1"] for r in runs),
        "precision": statistics.median(r["precision"] for r in runs),
        "recall": statistics.median(r["recall"] for r in runs),
        "recall_by_fault": {k: statistics.median(r["recall_by_fault"].get(k, 0.0) for r in runs) for k in FAULT_KINDS},
        "delay_windows": statistics.median(r["delay_windows"] for r in runs if r["delay_windows"] is not None),
        "false_alerts_per_device_day": statistics.median(r["false_alerts_per_device_day"] or 0.0 for r in runs),
    }
    rows = [
        ("detector", "isolation_forest (default)", ""),
        ("window F1 (smoothed flags)", f"{med['f1']:.4f}", f">= {TARGETS['f1']} {'met' if med['f1'] >= TARGETS['f1'] else 'NOT met'}"),
        ("precision / recall", f"{med['precision']:.3f} / {med['recall']:.3f}", ""),
    ]
    for k, v in med["recall_by_fault"].items():
        ok = v >= TARGETS["recall_each_fault"]
        rows.append((f"recall, {k}", f"{v:.3f}", f">= {TARGETS['recall_each_fault']} {'met' if ok else 'NOT met'}"))
    rows.append(("median detection delay (windows after onset)", f"{med['delay_windows']:.1f}",
                 f"<= {TARGETS['delay_windows']:g} {'met' if med['delay_windows'] <= TARGETS['delay_windows'] else 'NOT met'}"))
    fa = med["false_alerts_per_device_day"]
    rows.append(("false alerts per healthy device-day", f"{fa:.2f}",
                 f"<= {TARGETS['false_alerts_per_device_day']:g} {'met' if fa <= TARGETS['false_alerts_per_device_day'] else 'NOT met'}"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"| {'measure'.ljust(w0)} | {'median'.rjust(w1)} | target |\n|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|--------|")
    for a, b, c in rows:
        print(f"| {a.ljust(w0)} | {b.rjust(w1)} | {c} |")
    report = {"median": med, "runs": runs, "targets": TARGETS, "devices": args.devices, "hours": args.hours,
              "wall_s": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"[quality] written to {args.out} in {report['wall_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
