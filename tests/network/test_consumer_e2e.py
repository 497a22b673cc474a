"""End to end through a real broker: simulator readings in, alerts out, rows in SQLite."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time

import paho.mqtt.client as paho
import pytest
from conftest import _wait_for

from itap_stream.adapters.metrics import Metrics
from itap_stream.app.service import build_consumer
from simulator import Fault, simulate
from simulator.transport import publish

pytestmark = pytest.mark.network


class Subscriber:
    """The test's own MQTT subscriber, collecting every message on a topic filter."""

    def __init__(self, url: str, topic: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-sub-{time.monotonic_ns()}")
        ready = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload, bool(m.retain)))
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _start(settings, metrics=None, clock=time.time):
    consumer = build_consumer(settings, metrics=metrics or Metrics(), clock=clock)
    ready = threading.Event()
    thread = threading.Thread(target=consumer.run, kwargs={"ready": ready}, daemon=True)
    thread.start()
    assert ready.wait(15)
    return consumer, thread


def _run_through(settings, sim, client_id, metrics=None):
    """Start a consumer, publish ``sim`` at QoS 1, wait until it has all of it, stop it."""
    metrics = metrics or Metrics()
    consumer, thread = _start(settings, metrics)
    sent = publish(sim, settings.broker_url, speed=0, qos=1, client_id=client_id)
    assert _wait(lambda: metrics.sample("itap_readings_received_total") >= sent)
    consumer.stop()
    thread.join(20)
    assert not thread.is_alive()
    return sent, metrics


_wait = _wait_for  # the polling helper of tests/conftest.py


@pytest.mark.parametrize("intake", ["process", "thread"])
def test_faulty_device_alerts_healthy_one_does_not_and_rows_are_stored(settings, tmp_path, intake):
    settings = settings.replace(intake=intake)
    alerts = Subscriber(settings.broker_url, "itap/alerts/#")
    sim = simulate(2, 900, seed=21, faults=[Fault("power_instability", "DEV-0002", 300, 600)], maint=False)
    sent, metrics = _run_through(settings, sim, "t-sim-1")
    assert _wait(lambda: len(alerts.messages) > 0, 5)
    alerts.close()

    devices = {json.loads(p)["device_id"] for _t, p, _r in alerts.messages}
    assert devices == {"DEV-0002"}, f"alerts for {devices}"
    first = json.loads(alerts.messages[0][1])
    assert first["status"] == "firing" and first["families"] and first["top_features"]
    assert abs(sum(first["families"].values()) - 100) < 0.1

    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    try:
        assert db.execute("select count(*) from readings_all").fetchone()[0] == sent
        assert db.execute("select count(distinct device_id) from devices").fetchone()[0] == 2
        assert db.execute("select count(*) from windows").fetchone()[0] > 0
        anomalous = db.execute("select device_id, count(*) from anomalies group by device_id").fetchall()
        assert [d for d, _n in anomalous] == ["DEV-0002"]
        assert db.execute("select count(*) from alerts where device_id='DEV-0002'").fetchone()[0] >= 1
    finally:
        db.close()


def test_bad_input_is_rejected_counted_and_the_next_reading_still_processed(settings):
    dead = Subscriber(settings.broker_url, "itap/deadletter")
    metrics = Metrics()
    consumer, thread = _start(settings, metrics)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="t-bad-pub")
    host, port = settings.broker_url.removeprefix("mqtt://").split(":")
    pub.connect(host, int(port))
    pub.loop_start()
    good = {"device_id": "DEV-0001", "ts": 1767225600, "state": "RUN", "rpm": 1500, "temp_c": 40,
            "voltage_v": 230, "current_a": 10, "vibration_mm_s": 2}  # fmt: skip
    bad = [
        b"not json at all",
        json.dumps(good | {"rpm": "fast"}).encode(),
        json.dumps(good | {"device_id": "DEV-0099"}).encode(),
    ]
    for payload in bad:
        pub.publish("itap/telemetry/DEV-0001", payload, qos=1).wait_for_publish(5)
    pub.publish("itap/telemetry/DEV-0001", json.dumps(good), qos=1).wait_for_publish(5)
    assert _wait(lambda: metrics.sample("itap_readings_processed_total") >= 1)
    assert metrics.sample("itap_readings_rejected_total", reason="invalid_json") == 1
    assert metrics.sample("itap_readings_rejected_total", reason="wrong_type") == 1
    assert metrics.sample("itap_readings_rejected_total", reason="device_mismatch") == 1
    assert _wait(lambda: len(dead.messages) == 3, 5)
    reasons = sorted(json.loads(p)["reason"] for _t, p, _r in dead.messages)
    assert reasons == ["device_mismatch", "invalid_json", "wrong_type"]
    consumer.stop()
    thread.join(20)
    pub.disconnect()
    pub.loop_stop()
    dead.close()
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    assert db.execute("select count(*) from readings_all").fetchone()[0] == 1
    db.close()


def test_status_topic_has_birth_message_and_offline_on_stop(settings):
    status_topic = f"itap/status/consumer/{settings.client_id}"
    consumer, thread = _start(settings)
    online = Subscriber(settings.broker_url, status_topic)
    assert _wait(lambda: any(p == b"online" for _t, p, _r in online.messages), 5)
    consumer.stop()
    thread.join(20)
    assert _wait(lambda: any(p == b"offline" for _t, p, _r in online.messages), 5)
    online.close()


def test_metrics_are_scraped_over_http_and_parse(settings):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from itap_stream.adapters.broker import free_port
    from itap_stream.adapters.metrics import serve

    metrics = Metrics()
    consumer, thread = _start(settings, metrics)
    server = serve(f"127.0.0.1:{free_port()}", metrics.registry)
    try:
        sim = simulate(1, 120, seed=2, maint=False)
        sent = publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-sim-metrics")
        assert _wait(lambda: metrics.sample("itap_readings_processed_total") >= sent)
        host, port = server.server_address[:2]
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
        samples = {s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples}
        assert samples["itap_readings_processed_total"] == sent
        assert samples["itap_windows_scored_total"] > 0
        assert samples["itap_mqtt_connected"] == 1
        info = next(s.labels for fam in text_string_to_metric_families(body) for s in fam.samples
                    if s.name == "itap_model_info")
        assert {"version", "detector", "trained_at", "schema_hash"} <= set(info) and len(info["schema_hash"]) == 16
    finally:
        server.shutdown()
        consumer.stop()
        thread.join(20)


def test_itap_run_stops_on_sigterm_with_everything_stored(settings, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    env = os.environ | {
        "ITAP_BROKER_URL": settings.broker_url,
        "ITAP_DB_URL": settings.db_url,
        "ITAP_MODEL_PATH": settings.model_path,
        "ITAP_CLIENT_ID": settings.client_id,
        "ITAP_HTTP_ADDR": "",
    }
    status = Subscriber(settings.broker_url, f"itap/status/consumer/{settings.client_id}")
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "itap_stream.cli", "run"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert _wait(lambda: any(p == b"online" for _t, p, _r in status.messages), 20)
        sim = simulate(3, 300, seed=8, maint=False)
        sent = publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-sim-term")
        time.sleep(1.0)  # let the broker hand everything over; SIGTERM mid-delivery is issue 5's chaos test
        proc.send_signal(signal.SIGHUP)  # reload rules, sensor ranges and model, and go on
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(timeout=15)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGHUP" in err and "reloaded rules" in err and "reloaded model" in err
    assert _wait(lambda: any(p == b"offline" for _t, p, _r in status.messages), 5)
    status.close()
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    assert db.execute("select count(*) from readings_all").fetchone()[0] == sent
    db.close()


def test_intake_process_hands_over_its_backlog_and_exits_on_stop(settings):
    """The intake child holds the subscription: on stop it forwards nothing more, what it
    handed over is committed and acknowledged, it exits, and the rest stays in the session
    for the next start; "online" is announced only once it is subscribed."""
    status = Subscriber(settings.broker_url, f"itap/status/consumer/{settings.client_id}")
    metrics = Metrics()
    consumer, thread = _start(settings.replace(intake="process"), metrics)
    assert _wait(lambda: any(p == b"online" for _t, p, _r in status.messages), 10)
    child = consumer.inbox._proc  # noqa: SLF001 - the test checks the process itself
    assert child.is_alive()
    sim = simulate(3, 400, seed=5, maint=False)
    sent = publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-sim-handover")
    consumer.stop()  # at once: part of the traffic is still in the child, the pipe or the broker
    thread.join(20)
    assert not thread.is_alive()
    child.join(5)
    assert not child.is_alive() and child.exitcode == 0
    first = metrics.sample("itap_readings_received_total")
    db = settings.db_url.removeprefix("sqlite:///")
    stored = sqlite3.connect(db).execute("select count(*) from readings_all").fetchone()[0]
    assert 0 < first <= sent and stored == first  # everything handed over was committed
    assert metrics.sample("itap_mqtt_connected") == 1  # reported by the child while it ran
    assert _wait(lambda: status.messages[-1][1] == b"offline", 5)
    # the next start gets exactly the rest from the session: nothing lost, nothing twice
    again = Metrics()
    consumer, thread = _start(settings.replace(intake="process"), again)
    assert _wait(lambda: sqlite3.connect(db).execute("select count(*) from readings_all").fetchone()[0] == sent, 20)
    consumer.stop()
    thread.join(20)
    assert again.sample("itap_readings_rejected_total", reason="duplicate") == 0
    status.close()


def test_a_killed_intake_process_is_replaced_and_its_session_delivers_the_gap(settings):
    import os
    import signal

    metrics = Metrics()
    consumer, thread = _start(settings.replace(intake="process", qos=1), metrics)
    try:
        first = publish(
            simulate(2, 200, seed=6, maint=False), settings.broker_url, speed=0, qos=1, client_id="t-sim-k1"
        )
        assert _wait(lambda: metrics.sample("itap_readings_received_total") >= first)
        child = consumer.inbox._proc  # noqa: SLF001 - the test kills the process itself
        os.kill(child.pid, signal.SIGKILL)
        child.join(5)
        # published while no intake process runs: the broker keeps them in the consumer's session
        sim = simulate(2, 300, seed=7, maint=False)
        sim.ts = sim.ts + 10_000.0
        gap = publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-sim-k2")
        assert _wait(lambda: consumer.intake_restarts == 1, 20)
        assert consumer.inbox._proc.pid != child.pid  # noqa: SLF001
        assert _wait(lambda: metrics.sample("itap_readings_received_total") >= first + gap, 20)
        assert metrics.sample("itap_mqtt_reconnects_total") >= 1
    finally:
        consumer.stop()
        thread.join(20)
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    assert db.execute("select count(*) from readings_all").fetchone()[0] == first + gap
    db.close()


def test_evaluate_a_stored_live_run(settings, tmp_path, capsys, db_url):
    """Also against PostgreSQL when one is reachable: the consumer's writes and evaluate's reads."""
    from itap_stream.cli import main

    settings = settings.replace(db_url=db_url)
    sim = simulate(3, 1200, seed=23, faults=[Fault("power_instability", "DEV-0003", 600, 600)], maint=False)
    _sent, metrics = _run_through(settings, sim, "t-sim-eval")
    out = tmp_path / "live.json"
    assert main(["evaluate", "--db", settings.db_url, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert set(r["recall_by_fault"]) == {"power_instability"} and r["recall_by_fault"]["power_instability"] > 0.8
    assert r["faults_detected"] == 1 and r["healthy_devices"] == 2
    assert r["windows"] == metrics.sample("itap_windows_scored_total")
    assert "recall by fault: power_instability" in text


def test_model_drift_in_a_live_run_is_published_stored_counted_and_evaluated(settings, tmp_path, capsys):
    from itap_stream.cli import main

    sim = simulate(4, 3 * 3600.0, seed=808, faults=[Fault("power_instability", "DEV-0004", 1800, 600)], maint=False)
    # DEV-0002's voltage sensor is recalibrated halfway (+2 V): no alarm, but not the plant it was trained on
    later = (sim.ts - sim.ts[0]) >= 5400
    sim.values[later, 1, 2] += 2.0
    sub = Subscriber(settings.broker_url, f"{settings.topic_prefix}/alerts/#")
    try:
        _sent, metrics = _run_through(settings, sim, "t-sim-drift")
        assert _wait(lambda: any(json.loads(p).get("rule") == "model_drift" for _t, p, _r in sub.messages), 10)
    finally:
        sub.close()
    published = [json.loads(p) for _t, p, _r in sub.messages if json.loads(p).get("rule") == "model_drift"]
    assert {a["device_id"] for a in published} == {"DEV-0002"}
    assert all(a["status"] == "event" and "retrain" in a["root_cause"] for a in published)
    assert metrics.sample("itap_model_drift_total", scope="device") == len(published)
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    stored = db.execute("SELECT device_id, status FROM alerts WHERE rule = 'model_drift'").fetchall()
    db.close()
    assert stored == [("DEV-0002", "event")] * len(published)
    assert main(["evaluate", "--db", settings.db_url]) == 0
    text = capsys.readouterr().out
    assert f"model_drift events: {len(published)}" in text and "DEV-0002: model drift" in text


def test_itap_ack_acknowledges_an_open_alert_through_the_command_topic(settings, capsys):
    from itap_stream.cli import main

    sim = simulate(2, 900, seed=31, faults=[Fault("power_instability", "DEV-0002", 300, 600)], maint=False)
    sub = Subscriber(settings.broker_url, f"{settings.topic_prefix}/alerts/#")
    metrics = Metrics()
    consumer, thread = _start(settings, metrics)
    try:
        publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-sim-ack")
        assert _wait(lambda: any(json.loads(p)["status"] == "firing" for _t, p, _r in sub.messages))
        fired = next(json.loads(p) for _t, p, _r in sub.messages if json.loads(p)["status"] == "firing")
        args = ["--broker", settings.broker_url, "--timeout", "10"]
        short = fired["id"][:8]  # the short form `itap alerts` and the dashboard show
        assert main(["ack", short, "--note", "crew on the way", "--by", "alice", *args]) == 0
        assert f"alert {short} acknowledged" in capsys.readouterr().out
        assert _wait(lambda: any(json.loads(p)["status"] == "acknowledged" for _t, p, _r in sub.messages), 10)
        # twice, or an id nobody knows: refused with the reason, exit 1
        assert main(["ack", fired["id"], *args]) == 1
        assert "already acknowledged" in capsys.readouterr().err
        assert main(["ack", "no-such-alert", *args]) == 1
        assert metrics.sample("itap_commands_total", command="ack", result="ok") == 1
        assert metrics.sample("itap_commands_total", command="ack", result="refused") == 2
    finally:
        consumer.stop()
        thread.join(20)
        sub.close()
    ack = next(json.loads(p) for _t, p, _r in sub.messages if json.loads(p)["status"] == "acknowledged")
    assert (ack["id"], ack["note"], ack["acknowledged"]) == (fired["id"], "alice: crew on the way", True)
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    rows = db.execute("SELECT status FROM alerts WHERE alert_id = ?", (fired["id"],)).fetchall()
    db.close()
    assert ("acknowledged",) in rows and ("firing",) in rows


def test_itap_ack_without_a_consumer_is_one_clear_error(broker, capsys):
    from itap_stream.cli import main

    assert main(["ack", "abc", "--broker", broker.url, "--topic-prefix", "nobody-home", "--timeout", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no consumer answered within 1 s" in err[0]


def test_a_silent_device_goes_stale_by_the_injected_clock_and_clears_on_its_next_reading(settings):
    sim = simulate(2, 60, seed=5, maint=False)
    now = [float(sim.ts[-1])]  # the service clock agrees with the devices' clocks (no clock-skew dead letters)
    sub = Subscriber(settings.broker_url, f"{settings.topic_prefix}/alerts/#")
    metrics = Metrics()
    consumer, thread = _start(settings, metrics, clock=lambda: now[0])
    try:
        sent = publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-stale")
        assert _wait(lambda: metrics.sample("itap_readings_received_total") >= sent)
        now[0] += settings.stale_after - 1  # not yet: the loop checks at this time and finds nothing
        assert _wait(lambda: consumer.stale_checked_at == now[0], 5)
        assert not [p for _t, p, _r in sub.messages if b"device_stale" in p]
        now[0] += 1
        assert _wait(lambda: len([p for _t, p, _r in sub.messages if b"device_stale" in p]) == 2, 10)
        later = json.dumps({"device_id": "DEV-0001", "ts": 1767225600 + 61, "state": "RUN", "rpm": 1500.0,
                            "temp_c": 50.0, "voltage_v": 229.0, "current_a": 14.0, "vibration_mm_s": 2.4})
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="t-stale-late")
        host, port = settings.broker_url.removeprefix("mqtt://").split(":")
        pub.connect(host, int(port))
        pub.loop_start()
        pub.publish(f"{settings.topic_prefix}/telemetry/DEV-0001", later, qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        assert _wait(lambda: any(json.loads(p)["status"] == "resolved" for _t, p, _r in sub.messages
                                 if b"device_stale" in p), 10)
    finally:
        consumer.stop()
        thread.join(20)
        sub.close()
    stale = [json.loads(p) for _t, p, _r in sub.messages if b"device_stale" in p]
    assert sorted((a["device_id"], a["status"]) for a in stale) == [
        ("DEV-0001", "firing"), ("DEV-0001", "resolved"), ("DEV-0002", "firing")]
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    rows = db.execute("SELECT device_id, status FROM alerts WHERE rule = 'device_stale' ORDER BY id").fetchall()
    db.close()
    assert sorted(rows) == [("DEV-0001", "firing"), ("DEV-0001", "resolved"), ("DEV-0002", "firing")]


def test_silenced_alerts_are_stored_not_published_and_published_when_the_silence_ends(settings, tmp_path, capsys):
    from itap_stream.cli import main

    sim = simulate(2, 900, seed=31, faults=[Fault("power_instability", "DEV-0002", 300, 600)], maint=False)
    now = [float(sim.ts[-1])]  # the service clock agrees with the devices' clocks
    silences = tmp_path / "silences.yaml"
    silences.write_text(f"silences:\n  - {{id: pump-swap, device: DEV-0002, start: {now[0]}, duration: 10m,"
                        " comment: bearing change}\n")
    st = settings.replace(silences_file=str(silences))
    sub = Subscriber(st.broker_url, f"{st.topic_prefix}/alerts/#")
    metrics = Metrics()
    consumer, thread = _start(st, metrics, clock=lambda: now[0])
    try:
        sent = publish(sim, st.broker_url, speed=0, qos=1, client_id="t-sim-silence")
        assert _wait(lambda: metrics.sample("itap_readings_received_total") >= sent)
        assert _wait(lambda: metrics.sample("itap_alerts_silenced_total", rule="power_instability") >= 1, 10)
        # a command round trip after the data: had an alert been published, it would be here by now
        assert main(["silence", "list", "--broker", st.broker_url]) == 0 and "pump-swap" in capsys.readouterr().out
        assert [p for _t, p, _r in sub.messages if b"DEV-0002" in p] == []  # nothing published during the silence
        now[0] += 600  # the silence ends; the fault (and its alerts) still hold
        assert _wait(lambda: any(b"end of a silence" in p for _t, p, _r in sub.messages), 10)
        args = ["--broker", st.broker_url]
        assert main(["silence", "add", "--device", "DEV-0001", "--duration", "1h", "--comment", "test", *args]) == 0
        sid = capsys.readouterr().out.split()[1]
        assert main(["silence", "list", *args]) == 0
        listed = capsys.readouterr().out
        assert sid in listed and "pump-swap" not in listed  # the ended one is gone
        assert main(["silence", "remove", sid, *args]) == 0
        assert main(["silence", "remove", sid, *args]) == 1
        assert "no silence with id" in capsys.readouterr().err
        assert main(["silence", "add", "--severity", "LOUD", *args]) == 1
        capsys.readouterr()
        # issue 16, point 5: no silence of everything for ever by accident
        assert main(["silence", "add", *args]) == 1
        assert "needs at least one of device, rule, family, severity (or --all" in capsys.readouterr().err
        assert main(["silence", "add", "--device", "DEV-0001", *args]) == 1
        assert "needs an end: --duration or --end (at most 7d)" in capsys.readouterr().err
        assert main(["silence", "add", "--all", "--duration", "30d", *args]) == 1
        assert "at most 7d (silence_max); this one lasts 30d" in capsys.readouterr().err
        assert main(["silence", "add", "--all", "--start", "2026-12-01T08:00:00Z", "--duration", "4h", *args]) == 0
        assert "all alerts, from 2026-12-01T08:00:00Z to 2026-12-01T12:00:00Z" in capsys.readouterr().out
        assert main(["silence", "add", "--rule", "signal_*", "--weekly", "sat,sun", "--at", "22:00", "--hours", "8",
                     *args]) == 0
        capsys.readouterr()
        assert main(["silence", "list", *args]) == 0
        listed = capsys.readouterr().out
        assert "rule=signal_*, every Saturday and Sunday from 22:00 UTC for 8 h" in listed
        assert "start=" not in listed and "weekly=" not in listed
    finally:
        consumer.stop()
        thread.join(20)
        sub.close()
    late = [json.loads(p) for _t, p, _r in sub.messages if b"end of a silence" in p]
    assert {a["device_id"] for a in late} == {"DEV-0002"} and all(a["status"] == "firing" for a in late)
    db = sqlite3.connect(st.db_url.removeprefix("sqlite:///"))
    stored = [json.loads(p) for (p,) in db.execute("SELECT payload FROM alerts WHERE device_id = 'DEV-0002'")]
    db.close()
    held = [a for a in stored if a.get("silenced")]
    assert held and {a["id"] for a in held} == {a["id"] for a in late}  # stored then, published later, same ids


def test_hot_reload_of_rules_sensor_ranges_and_model_keeps_the_old_one_when_the_new_is_bad(settings, tmp_path, capsys):
    import shutil

    import yaml

    from itap_stream.adapters import artifacts
    from itap_stream.cli import main
    from itap_stream.config import PACKAGE_CONFIGS

    rules, sensors, model = tmp_path / "rules.yaml", tmp_path / "sensors.yaml", tmp_path / "model.joblib"
    shutil.copy(PACKAGE_CONFIGS / "alert_rules.yaml", rules)
    shutil.copy(PACKAGE_CONFIGS / "sensors.yaml", sensors)
    shutil.copy(settings.model_path, model)
    shutil.copy(settings.model_path + ".json", str(model) + ".json")
    st = settings.replace(rules_file=str(rules), sensors_file=str(sensors), model_path=str(model))
    metrics = Metrics()
    consumer, thread = _start(st, metrics)
    args = ["--broker", st.broker_url]
    try:
        # 1. a rules file edited on disk is picked up by the file watch
        data = yaml.safe_load(rules.read_text())
        data["rules"][0]["min_share"] = 77
        rules.write_text(yaml.safe_dump(data))
        assert _wait(lambda: metrics.sample("itap_reloads_total", part="rules", result="ok") >= 1, 10)
        assert consumer.processor.engine.rules[0].min_share == 77
        # 2. a broken one is rejected, the running rules stay
        rules.write_text("rules: [{name: x, type: nope}]\n")
        assert _wait(lambda: metrics.sample("itap_reloads_total", part="rules", result="rejected") >= 1, 10)
        assert consumer.processor.engine.rules[0].min_share == 77
        # 3. new sensor ranges by command; a schema with other signals is refused
        s = yaml.safe_load(sensors.read_text())
        s["signals"][1]["max"] = 120
        sensors.write_text(yaml.safe_dump(s))
        consumer.request_reload()
        assert _wait(lambda: consumer.schema.signals[1].max == 120, 10)
        # 4. itap train --activate: a new model goes live; a tampered one is refused and the old stays
        old_threshold = consumer.processor.artifact.threshold
        data_csv = tmp_path / "normal.csv"
        assert main(["simulate", "--devices", "2", "--duration", "30m", "--seed", "77", "--out", str(data_csv)]) == 0
        fresh = tmp_path / "fresh.joblib"
        assert main(["train", "--csv", str(data_csv), "--model", str(fresh), "--activate", "--config",
                     str(PACKAGE_CONFIGS / "itap.yaml"), *args]) == 0
        assert "activated on the running consumer" in capsys.readouterr().out
        live = artifacts.load(fresh).threshold
        assert consumer.processor.artifact.threshold == live != old_threshold
        with open(fresh, "ab") as fh:
            fh.write(b"tampered")
        consumer.request_reload()
        assert _wait(lambda: metrics.sample("itap_reloads_total", part="model", result="rejected") >= 1, 10)
        assert consumer.processor.artifact.threshold == live  # the tampered file is refused, the model stays
    finally:
        consumer.stop()
        thread.join(20)


def test_itap_ack_rebaseline_makes_a_plateau_the_devices_new_normal(settings, tmp_path, capsys):
    """Issue 15, point 2: a plateaued overheat stays alarmed (far out: no automatic baseline
    shift); `itap ack ID --rebaseline` accepts it, a baseline_shift event is published, stored
    and counted, the device's alarm ends and its alert resolves as the plateau goes on."""
    import numpy as np
    import pandas as pd
    import yaml

    from itap_stream.adapters import artifacts
    from itap_stream.app.offline import train_from_frame
    from itap_stream.cli import main
    from itap_stream.core.schema import SensorSchema

    spec = {"signals": [{"name": "motor_temp", "family": "Temperature", "unit": "degC", "min": -40, "max": 250},
                        {"name": "pressure", "family": "Pressure", "unit": "bar", "min": -5, "max": 30}]}
    (tmp_path / "sensors.yaml").write_text(yaml.safe_dump(spec))
    rng = np.random.default_rng(8)
    n, t0 = 2400, time.time() - 3000.0
    temp, pres = 60.0 + 0.05 * rng.normal(size=n), 2.0 + 0.02 * rng.normal(size=n)
    temp[1000:] += 3.0  # 60 training std, and it stays there
    frame = pd.DataFrame({"device_id": "rig", "ts": t0 + np.arange(n, dtype=float), "state": "RUN",
                          "motor_temp": temp, "pressure": pres})
    art, _ = train_from_frame(frame.iloc[:400], SensorSchema.from_dict(spec), window=32, hop=4)
    artifacts.save(art, tmp_path / "rig.joblib")
    settings = settings.replace(sensors_file=str(tmp_path / "sensors.yaml"), model_path=str(tmp_path / "rig.joblib"))
    host, port = settings.broker_url.removeprefix("mqtt://").split(":")
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"rig-{time.monotonic_ns()}")
    pub.connect(host, int(port))
    pub.loop_start()

    def send(lo, hi):
        for i in range(lo, hi):
            body = {"device_id": "rig", "ts": t0 + i, "state": "RUN", "seq": i,
                    "motor_temp": round(float(temp[i]), 4), "pressure": round(float(pres[i]), 4)}
            info = pub.publish(f"{settings.topic_prefix}/telemetry/rig", json.dumps(body), qos=1)
        info.wait_for_publish(10)

    sub = Subscriber(settings.broker_url, f"{settings.topic_prefix}/alerts/#")
    metrics = Metrics()
    consumer, thread = _start(settings, metrics)

    def alerts(**match):
        got = [json.loads(p) for _t, p, _r in sub.messages]
        return [a for a in got if all(a.get(k) == v for k, v in match.items())]

    try:
        send(400, 1600)
        assert _wait(lambda: metrics.sample("itap_readings_received_total") >= 1200)
        assert _wait(lambda: alerts(status="firing"))
        fired = alerts(status="firing")[0]
        args = ["--broker", settings.broker_url, "--timeout", "10"]
        assert main(["ack", fired["id"], "--rebaseline", "--note", "new seal, runs warmer", "--by", "bob", *args]) == 0
        out = capsys.readouterr().out
        assert f"alert {fired['id']} acknowledged" in out and "new normal (baseline_shift event" in out
        assert _wait(lambda: alerts(rule="baseline_shift"), 10)
        [shift] = alerts(rule="baseline_shift")
        assert shift["status"] == "event" and shift["note"] == "operator bob: new seal, runs warmer"
        before, after = map(float, re.search(r"motor_temp ([\d.]+) -> ([\d.]+) degC \(\+\d+\.\d std\)",
                                             shift["root_cause"]).groups())
        assert (before, after) == (pytest.approx(60.0, abs=0.05), pytest.approx(63.0, abs=0.05))
        assert metrics.sample("itap_baseline_shifts_total", how="operator") == 1
        anomalies_before = metrics.sample("itap_anomalies_total", family="Temperature")
        send(1600, 2000)
        assert _wait(lambda: metrics.sample("itap_readings_received_total") >= 1600)
        assert _wait(lambda: alerts(status="resolved", id=fired["id"]), 15)
        assert metrics.sample("itap_anomalies_total", family="Temperature") <= anomalies_before + 3
        # a restart applies the stored rebaseline again: the plateau stays normal
        consumer.stop()
        thread.join(20)
        metrics = Metrics()
        consumer, thread = _start(settings, metrics)
        firing_before = len(alerts(status="firing"))
        send(2000, n)
        assert _wait(lambda: metrics.sample("itap_readings_received_total") >= n - 2000)
        assert _wait(lambda: metrics.sample("itap_windows_scored_total") >= (n - 2000) // 4 - 1)
        assert metrics.sample("itap_anomalies_total", family="Temperature") == 0
        assert len(alerts(status="firing")) == firing_before
    finally:
        consumer.stop()
        thread.join(20)
        sub.close()
        pub.loop_stop()
        pub.disconnect()
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    stored = db.execute("SELECT status, device_id FROM alerts WHERE rule = 'baseline_shift'").fetchall()
    db.close()
    assert stored == [("event", "rig")]
