"""Operator-facing text for alerts and summaries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

__all__ = ["SHORT_ID", "format_alert", "format_summary"]

#: Characters of an alert id shown to people; `itap ack` takes this short form (or any unique prefix).
SHORT_ID = 8


def _short_time(text: str) -> str:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return text


def format_alert(alert: dict[str, Any]) -> str:
    """Four lines per alert, as printed by `itap demo` (and `itap alerts`).

    Examples
    --------
    >>> print(format_alert({"severity": "CRITICAL", "window_end": "2026-01-01T05:31:10.000Z",
    ...     "device_id": "DEV-0006", "state": "RUN", "score": 0.7, "confidence": 0.97,
    ...     "families": {"Voltage": 45.1, "Current": 30.2}, "top_features": [["voltage_v_std", 9.8]],
    ...     "root_cause": "Power instability", "rule": "power_instability", "status": "firing",
    ...     "id": "3f2c9a1b0d4e5f60", "fired_at": "2026-01-01T05:30:40.000Z", "route": "electrical"}))
    CRITICAL | 2026-01-01 05:31:10 | DEV-0006 | RUN | score=0.700 conf=0.97
      Families: Voltage 45.1%, Current 30.2%
      Top features: voltage_v_std 9.8%
      Root cause: Power instability   Rule: power_instability
      Id: 3f2c9a1b (itap ack 3f2c9a1b)   Fired: 2026-01-01 05:30:40, 30 s before this   Route: electrical
    """
    status = "" if alert.get("status", "firing") == "firing" else f" | {alert['status'].upper()}"
    when = alert.get("changed_at") or (
        alert.get("resolved_at") if alert.get("status") == "resolved" else alert.get("window_end")
    )
    likely = alert.get("likely_fault") or {}
    likely_text = (
        f"   Likely fault: {likely['class']} ({likely.get('confidence', 0.0):.0%})" if likely.get("class") else ""
    )
    note = f"\n  Note: {alert['note']}" if alert.get("note") else ""
    fams = sorted(alert.get("families", {}).items(), key=lambda kv: -kv[1])
    fam_text = ", ".join(f"{f} {v:.1f}%" for f, v in fams[:4] if v > 0) or "-"
    if len([v for _f, v in fams if v > 0]) > 4:
        fam_text += " ..."
    top = ", ".join(f"{n} {v:.1f}%" for n, v in alert.get("top_features", [])[:3]) or "-"
    ident = ""
    if alert.get("id"):
        short = str(alert["id"])[:SHORT_ID]
        fired, age = alert.get("fired_at"), ""
        try:
            t_fired = datetime.fromisoformat(str(fired).replace("Z", "+00:00"))
            t_now = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
            age = f", {_age((t_now - t_fired).total_seconds())} before this"
        except ValueError:
            pass
        incident = alert.get("incident")
        ident = (f"\n  Id: {short} (itap ack {short})   Fired: {_short_time(str(fired))}{age}   "
                 f"Route: {alert.get('route') or '-'}"
                 + (f"   Incident: {str(incident)[:SHORT_ID]}" if incident and incident != alert["id"] else "")
                 + ("   Acknowledged" if alert.get("acknowledged") and alert.get("status") != "acknowledged" else ""))
    return (
        f"{alert['severity']} | {_short_time(str(when))} | {alert['device_id']} | {alert.get('state', '?')} | "
        f"score={alert['score']:.3f} conf={alert.get('confidence', 0.0):.2f}{status}\n"
        f"  Families: {fam_text}\n"
        f"  Top features: {top}\n"
        f"  Root cause: {alert.get('root_cause', '?')}   Rule: {alert['rule']}{likely_text}{note}{ident}"
    )


def _age(seconds: float) -> str:
    """``95`` -> ``'1 min 35 s'``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'device':<12} {'windows':>7} {'anomalies':>9} {'avg':>7} {'p95':>7}  dominant families"]
    for dev, s in summary["devices"].items():
        fams = ", ".join(f"{f} ({n})" for f, n in list(s["dominant_families"].items())[:3]) or "-"
        lines.append(
            f"{dev:<12} {s['windows']:>7} {s['anomalies']:>9} {s['avg_score']:>7.3f} {s['p95_score']:>7.3f}  {fams}"
        )
    f = summary["fleet"]
    fams = ", ".join(f"{k} ({n})" for k, n in list(f["dominant_families"].items())[:4]) or "-"
    lines.append(
        f"fleet: {f['devices']} devices, {f['windows']} windows, {f['anomalies']} anomalies on "
        f"{f['devices_with_anomalies']} device(s), avg score {f['avg_score']:.3f}, p95 {f['p95_score']:.3f}; "
        f"families: {fams}"
    )
    return "\n".join(lines)
