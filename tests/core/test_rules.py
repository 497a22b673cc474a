"""Rules fire exactly at their boundary, once per condition, and resolve after the hold time."""

from __future__ import annotations

import pytest

from itap_stream.core.explain import Explanation
from itap_stream.core.rules import RuleEngine, ScoredWindow, rules_from_dict
from itap_stream.errors import ConfigError


def _engine(rule: dict, resolve_after: str = "60s") -> RuleEngine:
    rules, resolve = rules_from_dict({"resolve_after": resolve_after, "rules": [rule | {"severity": "WARNING"}]})
    return RuleEngine(rules, resolve_after_s=resolve)


def _w(t: float, anomaly: bool = True, families=None, tags=(), device="D1") -> ScoredWindow:
    exp = Explanation(families=families or {"Voltage": 50.0, "Current": 50.0}, top_features=[("voltage_v_std", 30.0)])
    return ScoredWindow(device, t - 4, t, "RUN", 0.8 if anomaly else 0.3, anomaly, 0.9, exp if anomaly else None, tags)


def test_burst_fires_at_the_nth_anomaly_inside_the_window_not_before():
    eng = _engine({"name": "b", "type": "burst", "count": 3, "within": "60s"})
    assert eng.evaluate([_w(0), _w(30)]) == []
    fired = eng.evaluate([_w(60)])  # 0, 30, 60: exactly 60 s apart -> inside
    assert [a.status for a in fired] == ["firing"] and fired[0].anomalies == 3


def test_burst_counts_by_event_time_not_arrival():
    eng = _engine({"name": "b", "type": "burst", "count": 3, "within": "60s"})
    assert eng.evaluate([_w(0), _w(30), _w(60.5)]) == []  # first one fell out of the window
    assert eng.evaluate([_w(61)])[0].status == "firing"


def test_burst_ignores_normal_windows_and_other_devices():
    eng = _engine({"name": "b", "type": "burst", "count": 2, "within": "60s"})
    assert eng.evaluate([_w(0), _w(10, anomaly=False), _w(20, device="D2")]) == []


def test_dominant_family_fires_at_min_share_and_not_below():
    rule = {"name": "p", "type": "dominant_family", "families": ["Voltage"], "min_share": 50}
    eng = _engine(rule)
    assert eng.evaluate([_w(0, families={"Voltage": 49.99, "Current": 50.01})]) == []
    assert eng.evaluate([_w(4, families={"Voltage": 50.0, "Current": 50.0})])[0].rule == "p"


def test_dominant_family_sums_listed_families():
    eng = _engine({"name": "p", "type": "dominant_family", "families": ["Voltage", "Current"], "min_share": 80})
    assert eng.evaluate([_w(0, families={"Voltage": 40.0, "Current": 40.0, "RPM": 20.0})])[0].status == "firing"


def test_tag_route_fires_on_the_tag_and_routes():
    eng = _engine({"name": "t", "type": "tag_route", "tags": ["E_BEARING"], "route": "maintenance"})
    assert eng.evaluate([_w(0, tags=("E_OTHER",)), _w(4, anomaly=False, tags=("E_BEARING",))]) == []
    alert = eng.evaluate([_w(8, tags=("E_BEARING",))])[0]
    assert alert.route == "maintenance"


def test_tag_route_without_anomaly_when_configured():
    eng = _engine({"name": "t", "type": "tag_route", "tags": ["E_POWER"], "require_anomaly": False})
    assert eng.evaluate([_w(0, anomaly=False, tags=("E_POWER",))])[0].status == "firing"


def test_one_condition_fires_once_and_resolves_after_the_hold_time():
    eng = _engine({"name": "p", "type": "dominant_family", "families": ["Voltage"], "min_share": 40}, "60s")
    first = eng.evaluate([_w(0), _w(4), _w(8)])
    assert [a.status for a in first] == ["firing"]
    assert eng.evaluate([_w(60, anomaly=False), _w(67.9, anomaly=False)]) == []  # 59.9 s after the last anomaly
    resolved = eng.evaluate([_w(68, anomaly=False)])
    assert [a.status for a in resolved] == ["resolved"]
    assert resolved[0].id == first[0].id and resolved[0].resolved_at == 68
    assert eng.evaluate([_w(100)])[0].id != first[0].id  # a new episode is a new alert


def test_alert_shape_has_every_documented_field():
    eng = _engine({"name": "p", "type": "dominant_family", "families": ["Voltage"], "min_share": 40})
    d = eng.evaluate([_w(0)])[0].to_dict()
    for key in (
        "id", "rule", "severity", "device_id", "state", "window_start", "window_end", "score", "confidence",
        "root_cause", "families", "top_features", "route", "status", "likely_fault",
    ):  # fmt: skip
        assert key in d


def test_a_tag_alert_without_anomalies_stays_open_while_the_tag_comes_and_resolves_after_the_hold():
    eng = _engine({"name": "t", "type": "tag_route", "tags": ["E_POWER"], "require_anomaly": False}, "60s")
    fired = eng.evaluate([_w(0, anomaly=False, tags=("E_POWER",))])
    assert [a.status for a in fired] == ["firing"]
    # untagged normal windows 4 s later no longer resolve it (the device never had an anomaly)
    assert eng.evaluate([_w(4, anomaly=False), _w(30, anomaly=False, tags=("E_POWER",)), _w(89.9, anomaly=False)]) == []
    resolved = eng.evaluate([_w(90, anomaly=False)])  # 60 s after the last tagged window
    assert [(a.status, a.id) for a in resolved] == [("resolved", fired[0].id)]


def test_each_condition_resolves_on_its_own_hold_not_on_other_anomalies():
    eng = _engine({"name": "v", "type": "dominant_family", "families": ["Vibration"], "min_share": 40}, "60s")
    vib, volt = {"Vibration": 80.0, "Voltage": 20.0}, {"Voltage": 90.0, "Vibration": 10.0}
    assert [a.status for a in eng.evaluate([_w(0, families=vib)])] == ["firing"]
    # voltage anomalies keep coming, but the vibration condition stopped holding at t=0
    assert [a.status for a in eng.evaluate([_w(30, families=volt), _w(60, families=volt)])] == ["resolved"]


def test_rules_route_by_the_dominant_family_and_alerts_name_the_likely_fault():
    rules, resolve = rules_from_dict({"rules": [{
        "name": "burst", "type": "burst", "count": 1, "within": "60s", "severity": "CRITICAL", "route": "operations",
        "routes": {"Vibration": "maintenance", "Voltage": "electrical", "Current": "electrical"},
    }]})
    cases = [
        ({"Vibration": 70.0, "Temperature": 30.0}, "maintenance", "bearing_wear", 0.7),
        ({"Current": 60.0, "Voltage": 30.0, "RPM": 10.0}, "electrical", "power_instability", 0.9),
        ({"Temperature": 55.0, "RPM": 45.0}, "operations", "overheat", 0.55),
        ({"Pressure": 80.0, "RPM": 20.0}, "operations", "unknown", 0.8),
    ]
    for i, (families, route, fault, conf) in enumerate(cases):
        eng = RuleEngine(rules, resolve_after_s=resolve)
        a = eng.evaluate([_w(10.0 * i, families=families, device=f"D{i}")])[0]
        assert (a.route, a.likely_fault, a.likely_fault_confidence) == (route, fault, conf)
        assert a.to_dict()["likely_fault"] == {"class": fault, "confidence": conf}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "x", "type": "nope"}, "type 'nope'"),
        ({"name": "x", "type": "burst", "count": 0, "within": "1m"}, "count >= 1"),
        ({"name": "x", "type": "dominant_family", "families": [], "min_share": 50}, "families"),
        ({"name": "x", "type": "tag_route"}, "tags"),
        ({"name": "x", "type": "burst", "count": 2, "within": "soon"}, "duration"),
        ({"name": "x", "type": "burst", "count": 2, "within": "1m", "colour": "red"}, "unknown key"),
    ],
)
def test_bad_rules_are_refused_with_the_rule_named(rule, message):
    with pytest.raises(ConfigError, match=message):
        rules_from_dict({"rules": [rule]})
