"""Imports happen at start-up, never on the serving path (issue 18, point 3)."""

from __future__ import annotations

import subprocess
import sys


def test_the_drift_monitor_imports_river_when_it_is_made_not_on_the_first_window():
    code = (
        "import sys\n"
        "from itap_stream.core.drift import DriftMonitor\n"
        "assert 'river.drift' not in sys.modules\n"
        "DriftMonitor()\n"  # the consumer makes it at start
        "assert 'river.drift' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
