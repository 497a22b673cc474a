"""Issue 16, point 2: one incident per fault. A device's alerts with the same likely fault
that fire within the grouping interval are one incident; the generic anomaly_burst does not
report again a fault a specific rule already reported (so a WARNING fault stays WARNING)."""

from __future__ import annotations

from collections import defaultdict

from itap_stream.app.fleetview import FleetView
from itap_stream.app.offline import score_frame
from itap_stream.config import PACKAGE_CONFIGS, load
from simulator import default_faults, simulate


def test_the_demo_fleet_gets_one_incident_per_fault(schema, trained):
    engine = load(PACKAGE_CONFIGS / "itap.yaml", environ={}).rule_engine()
    faults = default_faults(10, 2700.0)
    sim = simulate(10, 2700.0, seed=7, faults=faults)  # the default demo's fleet
    res = score_frame(sim.to_frame(), schema, trained, engine, window=32, hop=4, alarm_k=3, alarm_n=4, workers=1)
    fired = [a for a in res.alerts if a.status in ("firing", "flapping")]
    by_device = defaultdict(list)
    for a in fired:
        by_device[a.device_id].append(a)
    faulty = {f.device: f.kind for f in faults}
    assert set(by_device) == set(faulty)  # alerts only where there is a fault
    for dev, alerts in by_device.items():
        assert len({a.incident for a in alerts}) == 1, [(a.rule, a.likely_fault, a.incident) for a in alerts]
        rules = {a.rule for a in alerts}
        assert faulty[dev] in rules  # the specific rule reported it
        assert "anomaly_burst" not in rules, rules  # and the burst did not tell it again
    bearing = next(dev for dev, kind in faulty.items() if kind == "bearing_wear")
    assert all(a.severity == "WARNING" for a in res.alerts if a.device_id == bearing)
    # the dashboard shows one row per incident, with its members and the highest severity
    view = FleetView(trained.threshold)
    view.update([], [], [], [], fired)
    snap = view.snapshot()
    assert snap["totals"]["incidents"] == len(faults) == len(snap["incidents"])
    assert {i["device_id"] for i in snap["incidents"]} == set(faulty)
    assert all(i["members"] and i["severity_reason"].startswith(i["severity"] + " from ") for i in snap["incidents"])


def test_alerts_of_one_fault_close_together_are_one_incident_and_others_are_not():
    from itap_stream.core.explain import Explanation
    from itap_stream.core.rules import RuleEngine, ScoredWindow, rules_from_dict

    rules, _ = rules_from_dict({"rules": [
        {"name": "power", "type": "dominant_family", "families": ["Voltage"], "min_share": 40, "severity": "CRITICAL",
         "cause": "p"},
        {"name": "code", "type": "tag_route", "tags": ["E_POWER"], "require_anomaly": False, "severity": "WARNING",
         "cause": "c"},
    ]})
    eng = RuleEngine(rules, resolve_after_s=60)
    volt = Explanation({"Voltage": 80.0, "Current": 20.0}, [("voltage_v_std", 50.0)])
    w = [ScoredWindow("D1", 0, 10, "RUN", 2.0, True, 1.0, volt),
         ScoredWindow("D1", 10, 20, "RUN", 2.0, True, 1.0, volt, ("E_POWER",))]
    a = eng.evaluate(w)
    assert [x.rule for x in a] == ["power", "code"]
    # same device, 10 s apart: one incident if the tag alert names the same fault, else its own
    assert (a[1].incident == a[0].incident) == (a[1].likely_fault == a[0].likely_fault)
    assert a[0].to_dict()["incident"] == a[0].id
