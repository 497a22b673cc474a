"""Issue 15, point 2: alarms end when the process has settled. A small deviation that has
stopped changing becomes the device's new baseline (a ``baseline_shift`` event); a large one
stays alarmed until an operator accepts it. Stand-in: a rig at 1 Hz, a motor temperature
(Temperature: judged against its recent level) and a pressure, trained on 400 flat readings."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from itap_stream.app.offline import score_frame, train_from_frame
from itap_stream.config import PACKAGE_CONFIGS, load
from itap_stream.core.detectors import BaselinePolicy
from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine
from itap_stream.core.schema import SensorSchema
from itap_stream.errors import ConfigError

T0 = 1.6e9
SCHEMA = SensorSchema.from_dict({"signals": [{"name": "motor_temp", "family": "Temperature", "unit": "degC"},
                                             {"name": "pressure", "family": "Pressure", "unit": "bar"}]})
#: a window (32 readings) plus k of n smoothing (4 windows of 4 readings): when a decision can follow
MARGIN = 32 + 16


def _rig(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"device_id": "rig", "ts": T0 + np.arange(n, dtype=float), "state": "RUN",
                         "motor_temp": 60.0 + 0.05 * rng.normal(size=n), "pressure": 2.0 + 0.02 * rng.normal(size=n)})


def _score(frame: pd.DataFrame, art, policy: BaselinePolicy | None):
    res = score_frame(frame.iloc[400:], SCHEMA, art, RuleEngine([]), window=32, hop=4, alarm_k=3, alarm_n=4,
                      workers=1, baseline=policy)
    shifts = [al for al in res.alerts if al.rule == "baseline_shift"]
    return res.windows.end_ts - T0, res.assessment.flags, shifts


def _fault_then_settled(seed: int) -> pd.DataFrame:
    """A fault from reading 1000 to 1299 (motor +3 degC, pressure +5 training std), after
    which the pressure settles 1.5 training std above where it was and stays there."""
    rig = _rig(4000, seed)
    rig.loc[1000:1299, "motor_temp"] += 3.0
    rig.loc[1000:1299, "pressure"] += 0.1
    rig.loc[1300:, "pressure"] += 0.03
    return rig


@pytest.mark.parametrize("seed", [3, 4])
def test_after_a_fault_the_settled_state_becomes_the_baseline_within_the_configured_time(seed):
    rig = _fault_then_settled(seed)
    art, _ = train_from_frame(rig.iloc[:400], SCHEMA, window=32, hop=4)
    assert art.detector.name == "meanshift"
    # without a baseline policy the alarm never ends: 1.5 std is far outside a window mean's noise
    end, flags, shifts = _score(rig, art, None)
    assert flags[end >= 3000].all() and not shifts
    for after_s in (300.0, 600.0):
        end, flags, shifts = _score(rig, art, BaselinePolicy(after_s=after_s))
        assert flags[(end >= 1040) & (end < 1300)].all()  # the fault itself stays an alarm
        assert flags[(end >= 1300 + MARGIN) & (end < 1300 + after_s - MARGIN)].all()  # not before the time
        assert not flags[end >= 1300 + after_s + MARGIN].any()  # and over after it
        [shift] = shifts
        assert shift.status == "event" and shift.note == "settled" and shift.device_id == "rig"
        assert 1300 + after_s <= shift.window_end - T0 <= 1300 + after_s + MARGIN
        moved = dict(shift.top_features)
        assert moved["pressure_mean"] == pytest.approx(1.5, abs=0.4)  # in training std
        assert re.search(r"; pressure (1\.99|2\.00)\d* -> 2\.03\d* bar \(\+1\.\d std\)\. ", shift.root_cause)
        assert "motor_temp" not in shift.root_cause and "new normal" in shift.root_cause


def test_a_plateaued_overheat_stays_alarmed():
    """+3 degC (60 training std) from reading 1000 to the end: it stopped changing, but far out."""
    rig = _rig(4000, 5)
    rig.loc[1000:, "motor_temp"] += 3.0
    art, _ = train_from_frame(rig.iloc[:400], SCHEMA, window=32, hop=4)
    end, flags, shifts = _score(rig, art, BaselinePolicy(after_s=300.0, hold_s=600.0))
    assert flags[end >= 1040].all() and not shifts


def test_a_small_step_that_never_came_back_becomes_the_baseline_only_after_the_hold_time():
    """Pressure +1.5 training std from reading 1000 on: steady, small, but it never came back
    from its largest deviation: alarmed for ``hold_s``, then the new normal."""
    rig = _rig(4000, 6)
    rig.loc[1000:, "pressure"] += 0.03
    art, _ = train_from_frame(rig.iloc[:400], SCHEMA, window=32, hop=4)
    end, flags, shifts = _score(rig, art, BaselinePolicy(after_s=300.0, hold_s=1200.0))
    assert flags[(end >= 1000 + MARGIN) & (end < 1000 + 1200)].all()
    assert not flags[end >= 1000 + 1200 + 2 * MARGIN].any()
    [shift] = shifts
    assert shift.note == "held" and "not changed for 20 min" in shift.root_cause


def test_larger_than_the_allowed_shift_stays_alarmed():
    rig = _fault_then_settled(3)
    art, _ = train_from_frame(rig.iloc[:400], SCHEMA, window=32, hop=4)
    end, flags, shifts = _score(rig, art, BaselinePolicy(after_s=300.0, max_shift=1.0))
    assert flags[end >= 3000].all() and not shifts


def _readings(frame: pd.DataFrame) -> list[Reading]:
    return [Reading("rig", float(ts), "RUN", (float(a), float(b)), i)
            for i, (ts, a, b) in enumerate(zip(frame["ts"], frame["motor_temp"], frame["pressure"], strict=True))]


def _stream(proc: Processor, readings: list[Reading], step: int = 41):
    flags, events = {}, []
    for i in range(0, len(readings), step):
        res = proc.process(readings[i : i + step])
        if res.n_windows:
            flags.update(zip(res.windows.end_ts.tolist(), res.is_anomaly.tolist(), strict=True))
        events += [al for al in res.alerts if al.rule == "baseline_shift"]
    return flags, events


def test_stream_batch_and_a_restart_move_the_baseline_alike():
    rig = _fault_then_settled(3)
    art, _ = train_from_frame(rig.iloc[:400], SCHEMA, window=32, hop=4)
    policy = BaselinePolicy(after_s=300.0)
    end, flags, shifts = _score(rig, art, policy)
    readings = _readings(rig.iloc[400:])
    stream_flags, events = _stream(Processor(SCHEMA, art, RuleEngine([]), window=32, hop=4, baseline=policy),
                                   readings)
    assert stream_flags == dict(zip((end + T0).tolist(), flags.tolist(), strict=True))
    assert [(e.id, e.window_end, e.root_cause) for e in events] == [(e.id, e.window_end, e.root_cause)
                                                                     for e in shifts]
    # a restart after the shift replays it from the stored readings (silently): same decisions after
    cut = 1800 - 400
    again = Processor(SCHEMA, art, RuleEngine([]), window=32, hop=4, baseline=policy)
    again.restore({"rig": (readings[max(0, cut - again.restore_depth()) : cut], cut)})
    after, replayed = _stream(again, readings[cut:])
    assert after == {ts: f for ts, f in stream_flags.items() if ts in after} and not replayed


def test_an_operator_accepts_a_plateau_as_the_new_normal():
    """`itap ack ID --rebaseline` ends up here: the plateaued overheat that no policy would
    take becomes the device's normal at once; a later, further rise is a fault again."""
    rig = _rig(4000, 7)
    rig.loc[1000:, "motor_temp"] += 3.0
    rig.loc[3000:, "motor_temp"] += 3.0
    art, _ = train_from_frame(rig.iloc[:400], SCHEMA, window=32, hop=4)
    readings = _readings(rig.iloc[400:])
    proc = Processor(SCHEMA, art, RuleEngine([]), window=32, hop=4, baseline=BaselinePolicy())
    assert "no scored window" in proc.rebaseline("rig", T0)
    before, _ = _stream(proc, readings[: 1600 - 400])
    assert all(f for ts, f in before.items() if ts - T0 >= 1040)
    event = proc.rebaseline("rig", T0 + 1600)
    assert not isinstance(event, str)
    assert event.rule == "baseline_shift" and event.note == "operator" and event.status == "event"
    assert dict(event.top_features)["motor_temp_mean"] > 30  # 3 degC in training std
    after, _ = _stream(proc, readings[1600 - 400 :])
    assert not any(f for ts, f in after.items() if ts - T0 < 3000)
    assert all(f for ts, f in after.items() if ts - T0 >= 3040)


def test_a_detector_without_a_per_device_baseline_says_so(schema, trained):
    proc = Processor(schema, trained, RuleEngine([]), window=32, hop=4)
    assert "keeps no per-device baseline" in proc.rebaseline("DEV-0001", T0)


def test_the_baseline_policy_comes_from_the_settings():
    settings = load(PACKAGE_CONFIGS / "itap.yaml", environ={})
    assert settings.baseline_policy() == BaselinePolicy(after_s=300.0, hold_s=3600.0, max_shift=3.0, max_settled=20.0)
    assert load(PACKAGE_CONFIGS / "itap.yaml", environ={"ITAP_REBASELINE_MAX_SHIFT": "0"}).baseline_policy() is None
    with pytest.raises(ConfigError, match="rebaseline_after"):
        load(PACKAGE_CONFIGS / "itap.yaml", environ={}, rebaseline_after=7200.0)


def test_a_restart_applies_an_operators_rebaseline_again():
    """The consumer passes the stored operator baseline_shift events to `Processor.restore`:
    the accepted plateau stays normal after a restart; without them it is an alarm again."""
    rig = _rig(3000, 9)
    rig.loc[1000:, "motor_temp"] += 3.0
    art, _ = train_from_frame(rig.iloc[:400], SCHEMA, window=32, hop=4)
    readings = _readings(rig.iloc[400:])
    proc = Processor(SCHEMA, art, RuleEngine([]), window=32, hop=4, baseline=BaselinePolicy())
    _stream(proc, readings[: 1600 - 400])
    event = proc.rebaseline("rig", 0.0)
    assert not isinstance(event, str) and event.window_end == T0 + 1599  # the latest window, in event time
    cut = 2200 - 400
    _stream(proc, readings[1600 - 400 : cut])
    for old in (False, True):  # the rebaseline inside the replayed readings, or older than them
        again = Processor(SCHEMA, art, RuleEngine([]), window=32, hop=4, baseline=BaselinePolicy())
        depth = 300 if old else again.restore_depth()
        again.restore({"rig": (readings[max(0, cut - depth) : cut], cut)}, {"rig": [event.window_end]})
        after, _ = _stream(again, readings[cut:])
        assert after and not any(after.values())
    bare = Processor(SCHEMA, art, RuleEngine([]), window=32, hop=4, baseline=BaselinePolicy())
    bare.restore({"rig": (readings[max(0, cut - bare.restore_depth()) : cut], cut)})
    after, _ = _stream(bare, readings[cut:])
    assert all(after.values())
