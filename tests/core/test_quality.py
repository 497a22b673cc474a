"""Quality metrics against a case small enough to compute by hand."""

from __future__ import annotations

import pytest

from itap_stream.core.quality import quality_report, roc_auc


def test_quality_report_hand_computed():
    dev = ["A"] * 5 + ["B"] * 3
    ts = [10, 20, 30, 40, 50, 10, 20, 30]
    labels = [None, None, "x", "x", "x", None, None, None]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.1, 0.7, 0.2]
    flags = [0, 0, 0, 1, 1, 0, 1, 0]
    alerts = [{"device_id": "A", "status": "firing"}, {"device_id": "B", "status": "firing"},
              {"device_id": "B", "status": "resolved"}]
    r = quality_report(dev, ts, labels, scores, flags, 0.5, alerts)
    # positives A@30, A@40, A@50; flagged A@40, A@50, B@20
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == r["recall"] == r["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["roc_auc"] == pytest.approx(14 / 15)  # 0.3 beats 4 of 5 negatives, 0.9 and 0.8 beat all
    assert r["recall_by_fault"] == {"x": pytest.approx(2 / 3, abs=1e-4)}
    assert r["detection_delay_windows_median"] == 1 and r["detection_delay_s_median"] == 10.0
    assert r["healthy_devices"] == 1 and r["false_alerts_on_healthy_devices"] == 1
    assert r["false_alerts_per_healthy_device_day"] == pytest.approx(86_400 / 20, rel=1e-4)
    assert r["best_f1_threshold"]["f1"] >= r["f1"]


def test_roc_auc_ties_count_half():
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert roc_auc([0.2, 0.9], [0, 0]) is None
