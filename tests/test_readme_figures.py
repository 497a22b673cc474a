"""The README's performance paragraph is the one the latest bench/results.json gives
(`python -m bench` rewrites it; issue 18, point 4): figures cannot go stale by hand."""

from __future__ import annotations

import json

from bench import readme


def test_the_readme_performance_paragraph_matches_the_latest_results():
    held = readme.block(readme.README.read_text(encoding="utf-8"))
    assert held is not None, "README.md lost the generated paragraph's markers"
    assert held == readme.render(json.loads(readme.RESULTS.read_text(encoding="utf-8")))


def test_a_partial_run_leaves_the_readme_alone(tmp_path):
    report = json.loads(readme.RESULTS.read_text(encoding="utf-8"))
    del report["results"]["latency"]
    partial, copy = tmp_path / "results.json", tmp_path / "README.md"
    partial.write_text(json.dumps(report))
    copy.write_text(readme.README.read_text(encoding="utf-8"))
    assert not readme.update(copy, partial)
    assert copy.read_text(encoding="utf-8") == readme.README.read_text(encoding="utf-8")
