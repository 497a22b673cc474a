"""`itap rules test`: replay stored anomalies through the current and a candidate rules file.

Nothing is published or stored. The scored windows and the explanations of the anomalous
ones come from the store; both rule engines see them in event-time order, exactly as the
consumer fed its engine, and the alerts each would have raised are counted per rule and
per device. Where the windows carry labels (simulator or replayed data), an alert is
*true* when the window that fired it lies inside a fault, and a fault (a device's labelled
stretch) is *caught* when any alert fired inside it.

Only tags of anomalous windows are stored, so a ``tag_route`` rule with
``require_anomaly: false`` is replayed on anomalous windows only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from itap_stream.core.explain import Explanation
from itap_stream.core.rules import Alert, RuleEngine, ScoredWindow

__all__ = ["DryRun", "dry_run", "format_dry_run", "stored_windows"]


def stored_windows(windows: pd.DataFrame, anomalies: pd.DataFrame) -> tuple[list[ScoredWindow], list[str | None]]:
    """Scored windows rebuilt from the store, in event-time order, and each one's label."""
    exp: dict[tuple[str, float], tuple[Explanation | None, tuple[str, ...], float]] = {}
    r: Any  # a row of the store's table (itertuples gives no per-column types)
    for r in anomalies.itertuples(index=False):
        families = json.loads(r.families)
        top = [(str(n), float(s)) for n, s in json.loads(r.top_features)]
        tags = tuple(json.loads(r.tags)) if isinstance(r.tags, str) and r.tags else ()
        exp[(r.device_id, float(r.window_end))] = (Explanation(families, top), tags, float(r.confidence))
    w = windows.sort_values(["window_end", "id"] if "id" in windows.columns else ["window_end"], kind="stable")
    out: list[ScoredWindow] = []
    labels: list[str | None] = []
    for r in w.itertuples(index=False):
        key = (r.device_id, float(r.window_end))
        e, tags, conf = exp.get(key, (None, (), 0.0))
        out.append(
            ScoredWindow(r.device_id, float(r.window_start), float(r.window_end), r.state, float(r.score),
                         bool(r.is_anomaly), conf, e, tags)
        )
        labels.append(r.label if isinstance(r.label, str) and r.label else None)
    return out, labels


@dataclass
class DryRun:
    """Alerts each rules file would have raised, counted."""

    windows: int
    by_rule: dict[str, dict[str, int]] = field(default_factory=dict)  # rule -> {current, candidate, ...}
    by_device: dict[str, dict[str, int]] = field(default_factory=dict)
    faults: int = 0
    caught: dict[str, int] = field(default_factory=dict)  # current / candidate -> faults caught
    labelled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _firing(engine: RuleEngine, windows: list[ScoredWindow]) -> list[Alert]:
    return [a for a in engine.evaluate(windows) if a.status == "firing"]


def dry_run(
    windows: list[ScoredWindow], labels: list[str | None], current: RuleEngine, candidate: RuleEngine
) -> DryRun:
    """Replay ``windows`` through both engines and count what each would have raised."""
    label_at = {(w.device_id, w.end_ts): lab for w, lab in zip(windows, labels, strict=True)}
    res = DryRun(windows=len(windows), labelled=any(labels))
    # a fault = one device's labelled stretch (a label run, broken by unlabelled windows)
    episodes: dict[tuple[str, float], int] = {}
    last: dict[str, tuple[str | None, int]] = {}
    n_ep = 0
    for w, lab in zip(windows, labels, strict=True):
        prev_lab, ep = last.get(w.device_id, (None, -1))
        if lab is not None and lab != prev_lab:
            ep, n_ep = n_ep, n_ep + 1
        last[w.device_id] = (lab, ep)
        if lab is not None:
            episodes[(w.device_id, w.end_ts)] = ep
    res.faults = n_ep
    for which, engine in (("current", current), ("candidate", candidate)):
        for r in engine.rules:  # every rule of either file gets a row, zeros included
            counts = res.by_rule.setdefault(r.name, Counter())
            counts[which] += 0
            counts[f"{which}_true"] += 0
        alerts = _firing(engine, windows)
        caught = set()
        for a in alerts:
            true = label_at.get((a.device_id, a.window_end)) is not None
            rule = res.by_rule.setdefault(a.rule, Counter())
            rule[which] += 1
            rule[f"{which}_true"] += int(true)
            res.by_device.setdefault(a.device_id, Counter())[which] += 1
            if true:
                caught.add(episodes[(a.device_id, a.window_end)])
        res.caught[which] = len(caught)
    res.by_rule = {k: dict(v) for k, v in sorted(res.by_rule.items())}
    res.by_device = {k: dict(v) for k, v in sorted(res.by_device.items())}
    return res


def format_dry_run(res: DryRun) -> str:
    """The per-rule and per-device tables `itap rules test` prints."""
    lines = [f"replayed {res.windows:,} stored windows (nothing published)", ""]
    head = "rule                           current  candidate"
    if res.labelled:
        head += "  current true  candidate true"
    lines.append(head)
    for rule, c in res.by_rule.items():
        row = f"{rule:30s} {c.get('current', 0):8d} {c.get('candidate', 0):10d}"
        if res.labelled:
            row += f" {c.get('current_true', 0):13d} {c.get('candidate_true', 0):15d}"
        lines.append(row)
    lines += ["", "device                         current  candidate"]
    lines += [f"{d:30s} {c.get('current', 0):8d} {c.get('candidate', 0):10d}" for d, c in res.by_device.items()]
    if res.labelled:
        lines += ["", f"faults caught: current {res.caught.get('current', 0)} of {res.faults}, "
                      f"candidate {res.caught.get('candidate', 0)} of {res.faults}"]
    return "\n".join(lines)
