"""Issue 17: a partition changes consumer. The old owner forgets its devices
(`Processor.forget`); the new one restores them from the stored readings
(`Processor.restore`) and goes on exactly as one uninterrupted consumer would."""

from __future__ import annotations

import math

from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine
from itap_stream.core.schema import STATES
from simulator.generator import default_faults, simulate


def _readings(n_devices: int = 3, seconds: int = 600) -> list[Reading]:
    sim = simulate(n_devices, float(seconds), seed=11, faults=default_faults(n_devices, float(seconds)), maint=False)
    out = []
    for r in sim.iter_readings():
        values = tuple(math.nan if r[k] is None else float(r[k]) for k in ("rpm", "temp_c", "voltage_v",
                                                                         "current_a", "vibration_mm_s"))
        assert r["state"] in STATES
        out.append(Reading(str(r["device_id"]), float(r["ts"]), str(r["state"]), values, int(r["seq"])))
    return out


def _proc(schema, trained, rules) -> Processor:
    return Processor(schema, trained, RuleEngine(rules[0]), window=32, hop=4)


def _run(proc: Processor, readings: list[Reading]) -> tuple[list[tuple[str, float, float, bool]], list[tuple]]:
    windows, alerts = [], []
    for i in range(0, len(readings), 50):
        res = proc.process(readings[i : i + 50])
        if res.n_windows:
            windows += [(d, e, round(float(s), 9), bool(f)) for d, e, s, f in zip(
                res.windows.device_ids, res.windows.end_ts.tolist(), res.scores, res.is_anomaly, strict=True)]
        alerts += [(a.device_id, a.rule, a.status, a.window_end) for a in res.alerts]
    return windows, alerts


def test_a_device_taken_over_mid_stream_scores_and_alerts_as_if_nothing_happened(schema, trained, default_rules):
    readings = _readings()
    ref_windows, ref_alerts = _run(_proc(schema, trained, default_rules), readings)
    assert ref_alerts, "the faults raise alerts"

    cut = len(readings) * 2 // 5
    old, new = _proc(schema, trained, default_rules), _proc(schema, trained, default_rules)
    w1, a1 = _run(old, readings[:cut])
    # the partition moves: the old owner forgets every device, the new one restores them
    # from what the old one stored (the last restore_depth readings and the count)
    devices = old.known_devices()
    assert devices == {r.device_id for r in readings}
    assert old.forget(devices) == len(devices)
    assert old.known_devices() == set() and not old.engine.open_alerts()
    stored: dict[str, list[Reading]] = {}
    for r in readings[:cut]:
        stored.setdefault(r.device_id, []).append(r)
    depth = new.restore_depth()
    new.restore({d: (rs[-depth:], len(rs)) for d, rs in stored.items()})
    new.engine.restore([a for a in old_open_alerts(readings[:cut], schema, trained, default_rules)])
    w2, a2 = _run(new, readings[cut:])
    assert w1 + w2 == ref_windows
    assert a1 + a2 == ref_alerts


def old_open_alerts(readings, schema, trained, rules):
    """The alerts open after ``readings`` (what the store's open_alerts gives the new owner)."""
    proc = _proc(schema, trained, rules)
    _run(proc, readings)
    return proc.engine.open_alerts()


def test_a_forgotten_devices_slot_serves_a_new_device_from_scratch(schema, trained, default_rules):
    readings = _readings(n_devices=2, seconds=100)
    proc = _proc(schema, trained, default_rules)
    _run(proc, readings)
    proc.forget({"DEV-0001"})
    assert "DEV-0001" not in proc.windows and "DEV-0002" in proc.windows
    # a new device takes the freed slot and starts with an empty ring: no window before 32 readings
    fresh = [Reading("NEW-1", r.ts, r.state, r.values, r.seq) for r in readings if r.device_id == "DEV-0001"]
    res = proc.process(fresh[:31])
    assert "NEW-1" in proc.windows and res.n_windows == 0 and not res.gaps
    assert proc.process(fresh[31:32]).n_windows == 1
