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
        # a healthy fleet, no alert rows
        assert 'class="alert incident" data-device="DEV' not in dom and "3 devices" in dom
        # the fault: DEV-0003's voltage and current go unstable, later readings of the same devices
        faulty = simulate(3, 600, seed=13, maint=False, faults=[Fault("power_instability", "DEV-0003", 0, 600)])
        faulty.ts = faulty.ts + 400.0
        publish(faulty, settings.broker_url, speed=0, qos=1, client_id="t-sim-dash2")
        assert wait(lambda: any(a["device_id"] == "DEV-0003" for a in consumer.fleet.snapshot()["alerts"]), 30)
        dom = _chromium(url, "--dump-dom")
        assert 'class="alert incident" data-device="DEV-0003"' in dom and "power_instability" in dom
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


class _Browser:
    """A headless Chromium driven over the DevTools protocol (a websocket): navigate, run
    JavaScript in the page, take a screenshot. Enough to click a button as an operator does."""

    def __init__(self, tmp_path: Path) -> None:
        import json as _json
        import time
        import urllib.request

        from websockets.sync.client import connect

        port = free_port()
        self.proc = subprocess.Popen(  # noqa: S603
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        targets: list = []
        while time.monotonic() < deadline and not targets:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:  # noqa: S310
                    targets = [t for t in _json.loads(r.read()) if t.get("type") == "page"]
            except OSError:
                time.sleep(0.2)
        assert targets, "chromium's DevTools endpoint did not come up"
        self.ws = connect(targets[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
        self._id = 0
        self._json = _json

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(self._json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = self._json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self._id:
                assert "error" not in msg, msg
                return msg.get("result", {})

    def js(self, expression: str):
        got = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in got, got
        return got["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 20.0):
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        return self.js(expression)

    def close(self) -> None:
        self.ws.close()
        self.proc.kill()
        self.proc.wait(10)


def test_an_operator_acknowledges_and_silences_from_the_page_only_with_credentials(settings, start_consumer, wait,
                                                                                   tmp_path):
    """Issue 16, point 1: the page shows each incident's short id, fired-at time and age,
    status, route and acknowledgement; with HTTP credentials configured an operator clicks
    "acknowledge" (the same command path as `itap ack`) and sees the state change, and
    silences a device for a chosen time. Without credentials the actions are refused."""
    import base64
    import json
    import urllib.error
    import urllib.request

    metrics = Metrics()
    consumer = start_consumer(settings, metrics)
    creds = ("operator", "correct horse battery")
    server = serve(f"127.0.0.1:{free_port()}", metrics.registry, fleet=consumer.fleet.snapshot,
                   actions=consumer.http_action, credentials=creds)
    closed = serve(f"127.0.0.1:{free_port()}", metrics.registry, fleet=consumer.fleet.snapshot,
                   actions=consumer.http_action, credentials=None)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    browser = _Browser(tmp_path)
    try:
        faulty = simulate(3, 900, seed=13, maint=False, faults=[Fault("power_instability", "DEV-0003", 300, 600)])
        publish(faulty, settings.broker_url, speed=0, qos=1, client_id="t-sim-dash-ack")
        assert wait(lambda: consumer.fleet.snapshot()["incidents"], 30)
        incident = consumer.fleet.snapshot()["incidents"][0]
        member = incident["members"][0]

        def post(base, path, body, auth=None):
            req = urllib.request.Request(base + path.lstrip("/"), data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            if auth:
                req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=15) as r:  # noqa: S310
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        # no credentials configured: refused, whoever asks; wrong password: refused
        code, answer = post(f"http://127.0.0.1:{closed.server_address[1]}/", "/api/ack", {"alert_id": member["id"]})
        assert code == 403 and "actions from the dashboard are off" in answer["reason"]
        code, _answer = post(url, "/api/ack", {"alert_id": member["id"]}, ("operator", "guess"))
        assert code == 401
        assert not consumer.processor.engine.find_open(member["id"]).acknowledged

        browser.call("Page.navigate", url=url)
        row = f'tr.incident[data-id="{incident["id"]}"]'
        text = browser.wait_js(f"document.querySelector('{row}') && document.querySelector('{row}').innerText")
        assert member["id"][:8] in text and "ago" in text and incident["route"] in text and "no" in text
        assert browser.wait_js("!document.getElementById('login').hidden")
        browser.js(f"document.getElementById('user').value = {json.dumps(creds[0])};"
                   f"document.getElementById('password').value = {json.dumps(creds[1])};"
                   "document.getElementById('note').value = 'crew on the way'; true")
        browser.js(f"document.querySelector('{row} button.ack').click(); true")
        status = browser.wait_js(f"(document.querySelector('{row} .status') || {{}}).innerText === 'acknowledged'")
        assert status, browser.js(f"document.querySelector('{row}').innerText")
        assert "crew on the way" in browser.js(f"document.querySelector('{row} .note').innerText")
        assert consumer.processor.engine.find_open(member["id"]).acknowledged  # the consumer's own state
        assert metrics.sample("itap_commands_total", command="ack", result="ok") >= 1
        # silence DEV-0001 for 2 h from the page
        browser.js("document.querySelector('select.duration[data-device=\"DEV-0001\"]').value = '2h';"
                   "document.querySelector('button.silence[data-device=\"DEV-0001\"]').click(); true")
        assert wait(lambda: any(s.device == "DEV-0001" for s in consumer.silences.all()), 15)
        s = next(s for s in consumer.silences.all() if s.device == "DEV-0001")
        assert s.end is not None and s.start is not None and abs(s.end - s.start - 7200) < 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        (ARTIFACTS / "dashboard-actions.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
        server.shutdown()
        closed.shutdown()
