"""Alert lifecycle at its boundaries, time injected through the windows' event time:
fire once, reminders, acknowledgement, hysteresis, flapping, escalation, family shift."""

from __future__ import annotations

from itap_stream.core.explain import Explanation
from itap_stream.core.rules import Lifecycle, RuleEngine, ScoredWindow, rules_from_dict

VIB = {"Vibration": 80.0, "Voltage": 20.0}
VOLT = {"Voltage": 90.0, "Vibration": 10.0}


def _engine(rule: dict, **lifecycle) -> RuleEngine:
    rules, _ = rules_from_dict({"rules": [{"severity": "WARNING"} | rule]})
    return RuleEngine(rules, lifecycle=Lifecycle(**({"repeat_interval_s": 0.0} | lifecycle)))


def _w(t: float, anomaly: bool = True, families=VIB, device="D1") -> ScoredWindow:
    exp = Explanation(dict(families), [("vibration_mm_s_std", 40.0)]) if anomaly else None
    return ScoredWindow(device, t - 4, t, "RUN", 0.9 if anomaly else 0.2, anomaly, 0.9, exp)


VIB_RULE = {"name": "vib", "type": "dominant_family", "families": ["Vibration"], "min_share": 40}


def _statuses(alerts):
    return [(a.status, a.changed_at) for a in alerts]


def test_fires_once_then_reminds_every_repeat_interval_with_the_same_id():
    eng = _engine(VIB_RULE, repeat_interval_s=60.0)
    out = eng.evaluate([_w(t) for t in range(0, 131, 10)])
    assert _statuses(out) == [("firing", 0), ("reminder", 60), ("reminder", 120)]
    assert len({a.id for a in out}) == 1


def test_acknowledged_alert_gets_no_more_reminders_and_still_resolves():
    eng = _engine(VIB_RULE, repeat_interval_s=60.0, resolve_after_s=30.0)
    fired = eng.evaluate([_w(0), _w(10)])[0]
    ack = eng.acknowledge(fired.id, at=15.0, note="crew on the way")
    assert (ack.status, ack.changed_at, ack.note, ack.acknowledged) == ("acknowledged", 15.0, "crew on the way", True)
    assert eng.acknowledge(fired.id, at=16.0) is None  # once is enough
    assert eng.acknowledge("no-such-id", at=16.0) is None
    assert eng.evaluate([_w(t) for t in range(20, 200, 10)]) == []  # no reminder at 60, 120, 180
    resolved = eng.evaluate([_w(t, anomaly=False) for t in (210, 220, 229, 230)])
    assert _statuses(resolved) == [("resolved", 220)] and resolved[0].acknowledged


def test_resolving_needs_the_hold_time_and_the_window_count():
    eng = _engine(VIB_RULE, resolve_after_s=30.0, resolve_after_windows=3)
    eng.evaluate([_w(10)])
    # one window 100 s later: the time has passed but only 1 quiet window
    assert eng.evaluate([_w(100, anomaly=False), _w(104, anomaly=False)]) == []
    assert _statuses(eng.evaluate([_w(108, anomaly=False)])) == [("resolved", 108)]
    # and many quiet windows in less than the hold time do not resolve either
    eng2 = _engine(VIB_RULE, resolve_after_s=30.0, resolve_after_windows=3)
    eng2.evaluate([_w(10)])
    assert eng2.evaluate([_w(t, anomaly=False) for t in range(11, 40)]) == []
    assert _statuses(eng2.evaluate([_w(40, anomaly=False)])) == [("resolved", 40)]


def test_a_flapping_condition_is_held_as_one_flapping_alert():
    eng = _engine(VIB_RULE, resolve_after_s=10.0, flap_count=3, flap_period_s=600.0)
    # fire at 0, resolve at 10; fire at 100, resolve at 110; the third fire at 200 is flapping
    out = eng.evaluate([_w(0), _w(10, anomaly=False), _w(100), _w(110, anomaly=False), _w(200)])
    assert [a.status for a in out] == ["firing", "resolved", "firing", "resolved", "flapping"]
    flap_id = out[-1].id
    # it keeps toggling: nothing new is published, and it resolves only after 600 quiet seconds
    assert eng.evaluate([_w(210, anomaly=False), _w(300), _w(310, anomaly=False), _w(899, anomaly=False)]) == []
    resolved = eng.evaluate([_w(900, anomaly=False)])
    assert [(a.status, a.id) for a in resolved] == [("resolved", flap_id)]


def test_a_growing_burst_escalates_severity_keeping_its_id_only_when_one_family_dominates():
    rule = {"name": "b", "type": "burst", "count": 3, "within": "60s", "escalate_at": 5}
    eng = _engine(rule)
    out = eng.evaluate([_w(t) for t in (0, 10, 20, 30, 40)])
    assert [(a.status, a.severity) for a in out] == [("firing", "WARNING"), ("escalated", "CRITICAL")]
    assert out[0].id == out[1].id and out[1].changed_at == 40
    assert eng.evaluate([_w(50)]) == []  # escalated once
    mixed = _engine(rule)
    fams = [VIB, VIB, VOLT, VIB, VIB]
    out = mixed.evaluate([_w(t, families=f) for t, f in zip((0, 10, 20, 30, 40), fams, strict=True)])
    # five anomalies, but two families: no escalation (the 3rd, Voltage, fired it; the shift
    # back to Vibration is noted)
    assert [(a.status, a.severity) for a in out] == [("firing", "WARNING"), ("updated", "WARNING")]


def test_an_open_alert_notes_when_the_dominant_family_shifts():
    eng = _engine({"name": "b", "type": "burst", "count": 1, "within": "60s"})
    out = eng.evaluate([_w(0), _w(10, families=VOLT), _w(20, families=VOLT), _w(30, families=VOLT)])
    assert [a.status for a in out] == ["firing", "updated"]
    assert out[1].note == "dominant family shifted from Vibration to Voltage" and out[1].id == out[0].id
    assert out[1].changed_at == 20
