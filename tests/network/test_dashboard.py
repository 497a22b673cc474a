"""The fleet dashboard in a real headless Chromium (Debian's `chromium`, installed by
.ci/run): it loads, shows the devices of a short simulated run, and an alert appears once
a fault is injected. A screenshot is saved to tests/artifacts/dashboard.png."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from itap_stream.adapters.broker import free_port
from itap_stream.adapters.metrics import Metrics, serve
from simulator import Fault, simulate
from simulator.transport import publish

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"),
]


def _chromium(url: str, *extra: str) -> str:
    out = subprocess.run(  # noqa: S603
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--virtual-time-budget=4000", *extra, url],
        capture_output=True, text=True, timeout=120, check=False,
    )
    return out.stdout


def test_dashboard_shows_the_fleet_and_an_alert_appears_when_a_fault_is_injected(settings, start_consumer, wait):
    metrics = Metrics()
    consumer = start_consumer(settings, metrics)
    server = serve(f"127.0.0.1:{free_port()}", metrics.registry, fleet=consumer.fleet.snapshot)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        healthy = simulate(3, 300, seed=12, maint=False)
        sent = publish(healthy, settings.broker_url, speed=0, qos=1, client_id="t-sim-dash1")
        assert wait(lambda: metrics.sample("itap_readings_processed_total") >= sent)
        dom = _chromium(url, "--dump-dom")
        for dev in ("DEV-0001", "DEV-0002", "DEV-0003"):
            assert f'class="device" data-device="{dev}"' in dom
        assert 'class="alert" data-device="DEV' not in dom and "3 devices" in dom  # a healthy fleet, no alert rows
        # the fault: DEV-0003's voltage and current go unstable, later readings of the same devices
        faulty = simulate(3, 600, seed=13, maint=False, faults=[Fault("power_instability", "DEV-0003", 0, 600)])
        faulty.ts = faulty.ts + 400.0
        publish(faulty, settings.broker_url, speed=0, qos=1, client_id="t-sim-dash2")
        assert wait(lambda: any(a["device_id"] == "DEV-0003" for a in consumer.fleet.snapshot()["alerts"]), 30)
        dom = _chromium(url, "--dump-dom")
        assert 'class="alert" data-device="DEV-0003"' in dom and "power_instability" in dom
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        _chromium(url, "--window-size=1280,900", f"--screenshot={shot}")
        assert shot.is_file() and shot.stat().st_size > 10_000
    finally:
        server.shutdown()


def test_the_dashboard_needs_no_internet():
    from importlib.resources import files

    page = files("itap_stream.app").joinpath("static/dashboard.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page
