"""The benchmark keeps working: `python -m bench --quick` end to end, at tiny size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="the benchmark needs mosquitto")


def test_quick_benchmark_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    res = report["results"]
    for section in ("ceiling_qos0", "ceiling_qos1", "pipeline_qos0", "pipeline_qos1", "batched", "latency", "score"):
        assert section in res, section
        assert len(res[section]["runs"]) == 1
    assert res["ceiling_qos0"]["median"]["received"] == 3000
    assert res["pipeline_qos1"]["median"]["msgs_per_s"] > 0
    assert res["batched"]["median"]["windows"] > 0  # the batched run reached the model
    assert res["latency"]["median"]["alerts"] > 0  # alerts arrived and were matched to their reading
    assert {"growth_10", "growth_100"} <= set(res)
    assert res["growth_100"]["median"]["rss_mb"] > 0
    assert "pipeline / ceiling, QoS 0" in proc.stdout and "| measure" in proc.stdout
    assert report["machine"]["cores"] >= 1
    stages = res["stages"]["median"]
    assert all(v > 0 for v in stages.values()) and "in-process cost: score" in proc.stdout
