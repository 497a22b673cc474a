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


def test_bench_readme_says_which_commit_and_machine_each_figure_comes_from():
    held = readme.block(readme.BENCH_README.read_text(encoding="utf-8"), readme.PROV_START, readme.PROV_END)
    assert held is not None, "bench/README.md lost the provenance table's markers"
    report = json.loads(readme.RESULTS.read_text(encoding="utf-8"))
    assert held == readme.render_provenance(report)
    for key in report["results"]:  # one row per figure of the results file
        assert f"| `{key}` |" in held
