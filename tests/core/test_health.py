"""Stale devices, missing and stuck signals, MAINT and decommissioned devices: raise and
clear at their boundaries, the service clock injected."""

from __future__ import annotations

import numpy as np

from itap_stream.core.health import HealthSettings, SensorHealth
from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine

SIGNALS = ("rpm", "temp_c", "voltage_v", "current_a", "vibration_mm_s")


def _readings(device, t0, n, *, temp=None, state="RUN", seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        vals = [1500 + rng.normal(0, 4), 50 + rng.normal(0, 0.2), 229 + rng.normal(0, 0.8), 14 + rng.normal(0, 0.3),
                2.4 + rng.normal(0, 0.08)]
        if temp is not None:
            vals[1] = temp(i)
        out.append(Reading(device, t0 + i, state, tuple(float(v) for v in vals), i))
    return out


def _processor(schema, trained, **settings):
    health = SensorHealth(SIGNALS, HealthSettings(**({"missing_readings": 8, "stuck_readings": 12} | settings)))
    return Processor(schema, trained, RuleEngine([]), window=32, hop=4, health=health)


def _alerts(res):
    return [(a.rule, a.status, a.device_id, a.changed_at) for a in res.alerts]


def test_missing_signal_fires_after_n_readings_and_clears_on_the_first_good_window(schema, trained):
    proc = _processor(schema, trained)
    assert _alerts(proc.process(_readings("D1", 0, 40))) == []
    # temp_c goes silent at t=40: readings 40..46 (7) do not fire, the window closing at 47 (8 missing) does
    res = proc.process(_readings("D1", 40, 7, temp=lambda i: float("nan")))
    assert _alerts(res) == []
    res = proc.process(_readings("D1", 47, 4, temp=lambda i: float("nan")))
    assert _alerts(res) == [("signal_missing:temp_c", "firing", "D1", 47.0)]
    # the first good value (reading 51) closes a window: it clears there
    res = proc.process(_readings("D1", 51, 4, temp=lambda i: 50.0 + i * 0.1))
    assert _alerts(res) == [("signal_missing:temp_c", "resolved", "D1", 51.0)]


def test_stuck_signal_fires_after_n_identical_values_and_clears(schema, trained):
    proc = _processor(schema, trained)
    proc.process(_readings("D1", 0, 36))
    res = proc.process(_readings("D1", 36, 8, temp=lambda i: 51.5))  # windows at 39 and 43: 4 and 8 flat
    assert _alerts(res) == []
    res = proc.process(_readings("D1", 44, 4, temp=lambda i: 51.5))  # 12 flat readings at the window closing 47
    assert _alerts(res) == [("signal_stuck:temp_c", "firing", "D1", 47.0)]
    assert "repeated 51.5" in res.alerts[0].note
    res = proc.process(_readings("D1", 48, 4, temp=lambda i: 51.5 + i))
    assert _alerts(res) == [("signal_stuck:temp_c", "resolved", "D1", 51.0)]


def test_maint_and_decommissioned_devices_stay_quiet(schema, trained, default_rules):
    rules, resolve = default_rules

    def run(device, state, decommissioned=frozenset()):
        health = SensorHealth(SIGNALS, HealthSettings(missing_readings=8, decommissioned=decommissioned))
        proc = Processor(schema, trained, RuleEngine(rules, resolve_after_s=resolve), window=32, hop=4, health=health)
        # a dead temperature sensor: anomalies (dropout) and signal_missing for a normal device (the burst
        # of those anomalies is the same fault: not reported twice)
        res = proc.process(_readings(device, 0, 120, temp=lambda i: float("nan") if i >= 40 else 50.0, state=state),
                           now=0.0)
        return {a.rule for a in res.alerts}, proc, res

    loud, _, res = run("D1", "RUN")
    assert {"signal_missing:temp_c", "sensor_dropout"} <= loud and "anomaly_burst" not in loud  # the control
    assert res.is_anomaly.any()
    maint, _, res = run("M1", "MAINT")
    assert maint == set() and not res.is_anomaly.any()  # no anomaly, nothing toward a burst
    gone, proc, _ = run("OLD", "RUN", frozenset({"OLD"}))
    assert gone == set()
    assert proc.health.check_stale(now=10_000.0) == []  # never stale either


def test_a_silent_device_goes_stale_by_the_service_clock_and_clears_on_its_next_reading(schema, trained):
    proc = _processor(schema, trained, stale_after_s=300.0)
    proc.process(_readings("D1", 0, 10), now=1000.0)
    proc.process(_readings("D2", 0, 10), now=1100.0)
    assert proc.health.check_stale(now=1299.0) == []
    stale = proc.health.check_stale(now=1300.0)
    assert [(a.rule, a.status, a.device_id) for a in stale] == [("device_stale", "firing", "D1")]
    assert proc.health.check_stale(now=1350.0) == []  # once per silence
    assert [a.device_id for a in proc.health.check_stale(now=1400.0)] == ["D2"]
    res = proc.process(_readings("D1", 10, 1), now=1500.0)
    assert _alerts(res) == [("device_stale", "resolved", "D1", 1500.0)]
    assert res.alerts[0].id == stale[0].id and res.alerts[0].fired_at == 1300.0
