"""`itap alerts`: live alerts from the broker, filtered, for people and for machines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest

from itap_stream.app.watch import watch_alerts

pytestmark = pytest.mark.network


def _alert(device, severity, rule="power_instability"):
    return {
        "id": f"{device}-{severity}", "rule": rule, "severity": severity, "device_id": device, "state": "RUN",
        "window_start": "2026-01-01T00:00:00.000Z", "window_end": "2026-01-01T00:00:31.000Z", "score": 0.91,
        "confidence": 0.99, "root_cause": "Power instability", "families": {"Voltage": 60.0, "Current": 40.0},
        "top_features": [["voltage_v_std", 30.0]], "route": "electrical", "status": "firing",
        "fired_at": "2026-01-01T00:00:31.000Z", "resolved_at": None, "anomalies": 3,
    }


def _publish(url, items):
    host, port = url.removeprefix("mqtt://").split(":")
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-alert-pub-{time.monotonic_ns()}")
    c.connect(host, int(port))
    c.loop_start()
    for topic, payload in items:
        c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_watch_filters_by_device_and_severity(settings):
    out = io.StringIO()
    ready = threading.Event()
    result = {}

    def run():
        result["n"] = watch_alerts(settings, out, devices=["DEV-0001"], severities=["critical"], count=1,
                                   timeout_s=20, on_ready=ready.set)

    t = threading.Thread(target=run)
    t.start()
    assert ready.wait(10)
    _publish(settings.broker_url, [
        ("itap/alerts/DEV-0001", json.dumps(_alert("DEV-0001", "WARNING"))),   # wrong severity
        ("itap/alerts/DEV-0002", json.dumps(_alert("DEV-0002", "CRITICAL"))),  # other device
        ("itap/alerts/DEV-0001", b"not json"),                                  # not an alert
        ("itap/alerts/DEV-0001", json.dumps(_alert("DEV-0001", "CRITICAL"))),
    ])
    t.join(25)
    assert result["n"] == 1
    text = out.getvalue()
    assert text.startswith("CRITICAL | 2026-01-01 00:00:31 | DEV-0001 | RUN | score=0.910")
    assert "Families: Voltage 60.0%, Current 40.0%" in text and "WARNING" not in text and "\033[" not in text


def test_cli_json_lines_until_count(settings):
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "itap_stream.cli", "alerts", "--broker", settings.broker_url, "--json",
         "--count", "2", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # the subscription is confirmed before anything is printed; give it a moment, then resend until seen
        deadline = time.monotonic() + 20
        alerts = [_alert("DEV-0003", "CRITICAL"), _alert("DEV-0004", "INFO", rule="anomaly_burst")]
        while proc.poll() is None and time.monotonic() < deadline:
            _publish(settings.broker_url, [(f"itap/alerts/{a['device_id']}", json.dumps(a)) for a in alerts])
            time.sleep(0.5)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(line in alerts for line in lines)  # full alert objects, one per line


def test_cli_unknown_severity_is_one_clear_error(settings):
    proc = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "itap_stream.cli", "alerts", "--broker", settings.broker_url, "--severity", "LOUD"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "unknown severity" in proc.stderr and "Traceback" not in proc.stderr
