"""Issue 16, point 3: device health from the calibrated score distribution. 100 % is as
healthy as normal training windows; it falls as the score approaches and passes the threshold."""

from __future__ import annotations

import numpy as np

from itap_stream.app.offline import score_frame
from itap_stream.core.model import device_health, typical_score
from itap_stream.core.rules import RuleEngine
from simulator import Fault, simulate


def test_normal_windows_read_healthy_and_anomalous_ones_do_not(schema, trained):
    typical = typical_score(trained.stats.calibration_scores, trained.threshold)
    assert 0 < typical < trained.threshold
    healthy = simulate(4, 3600, seed=5, maint=False).to_frame()
    res = score_frame(healthy, schema, trained, RuleEngine([]), window=32, hop=4, alarm_k=3, alarm_n=4, workers=1)
    h = device_health(res.assessment.scores, typical, trained.threshold)
    # the old definition (1 - score / threshold) read healthy machines at 23-39 %
    assert np.median(h) == 1.0 and (h >= 0.9).mean() >= 0.9
    faulty = simulate(2, 3600, seed=6, maint=False,
                      faults=[Fault("power_instability", "DEV-0002", 1200, 1800)]).to_frame()
    res = score_frame(faulty, schema, trained, RuleEngine([]), window=32, hop=4, alarm_k=3, alarm_n=4, workers=1)
    flagged = res.assessment.flags
    assert flagged.sum() > 10
    h = device_health(res.assessment.scores, typical, trained.threshold)
    assert (h[flagged] < 0.5).mean() >= 0.9  # over the threshold: under 50 %
    assert np.median(h[~flagged & (res.windows.device_ids == "DEV-0001")]) == 1.0


def test_health_falls_steadily_through_the_threshold():
    s = np.linspace(0.0, 3.0, 301)
    h = device_health(s, typical=1.0, threshold=2.0)
    assert (np.diff(h) <= 0).all() and h[0] == 1.0 and h[-1] == 0.0
    assert h[s == 2.0][0] == 0.5
