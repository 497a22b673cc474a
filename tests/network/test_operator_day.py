"""Issue 16 (the operator's day): simulator time, progress lines that suit a log."""

from __future__ import annotations

import json
import re
import threading
import time

import paho.mqtt.client as paho
import pandas as pd
import pytest

from itap_stream.cli import main

pytestmark = pytest.mark.network


def _first_ts(path) -> float:
    return float(pd.read_csv(path, usecols=["ts"], nrows=1)["ts"].iloc[0])


def test_simulate_start_for_files_is_fixed_by_default_and_settable(tmp_path, capsys):
    out = tmp_path / "a.csv"
    assert main(["simulate", "--devices", "1", "--duration", "60", "--out", str(out)]) == 0
    assert _first_ts(out) == pd.Timestamp("2026-01-01T00:00:00Z").timestamp()  # reproducible from the seed
    assert main(["simulate", "--devices", "1", "--duration", "60", "--start", "2026-06-01T12:00:00Z",
                 "--out", str(out)]) == 0
    assert _first_ts(out) == pd.Timestamp("2026-06-01T12:00:00Z").timestamp()
    before = time.time()
    assert main(["simulate", "--devices", "1", "--duration", "60", "--start", "now", "--out", str(out)]) == 0
    assert before - 1 <= _first_ts(out) <= time.time()
    capsys.readouterr()
    assert main(["simulate", "--devices", "1", "--duration", "60", "--start", "yesterday", "--out", str(out)]) == 2
    assert "--start 'yesterday' is not an RFC 3339 time" in capsys.readouterr().err


def test_a_live_simulation_is_stamped_now_and_its_progress_has_no_carriage_returns(broker, capsys):
    """Faster than real time, the run ends now: a consumer's clock-skew bound refuses nothing,
    and a second simulation against a running consumer is not all `late`."""
    got: list[float] = []
    ready = threading.Event()
    host, port = broker.url.removeprefix("mqtt://").split(":")
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-simtime-{time.monotonic_ns()}")
    sub.on_connect = lambda c, *_a: c.subscribe("simtime/telemetry/#", qos=1)
    sub.on_subscribe = lambda *_a: ready.set()
    sub.on_message = lambda _c, _u, m: got.append(json.loads(m.payload)["ts"])
    sub.connect(host, int(port))
    sub.loop_start()
    try:
        assert ready.wait(10)
        before = time.time()
        assert main(["simulate", "--devices", "2", "--duration", "120", "--speed", "0", "--broker", broker.url,
                     "--topic-prefix", "simtime"]) == 0
        deadline = time.monotonic() + 10
        while len(got) < 240 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert len(got) == 240
    stamps = [pd.Timestamp(t).timestamp() if isinstance(t, str) else float(t) for t in got]
    assert before - 125 <= min(stamps) <= before - 115 and max(stamps) <= time.time()
    err = capsys.readouterr().err
    assert "\r" not in err and "published 120/120 steps\n" in err


def test_the_demo_serves_the_dashboard_and_metrics_and_keeps_them_open_on_request(broker, tmp_path):
    import io
    import re
    import urllib.request

    from itap_stream.app.demo import run_demo
    from itap_stream.config import PACKAGE_CONFIGS, load

    settings = load(PACKAGE_CONFIGS / "itap.yaml", environ={}, http_addr="127.0.0.1:0")
    out = io.StringIO()
    seen = {}

    def look_while_open():
        url = re.search(r"\[demo\] dashboard: (http://127\.0\.0\.1:\d+)/ ", out.getvalue()).group(1)
        with urllib.request.urlopen(url + "/", timeout=10) as r:  # noqa: S310 - our own loopback server
            seen["page"] = r.read().decode()
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:  # noqa: S310
            seen["metrics"] = r.read().decode()
        with urllib.request.urlopen(url + "/api/fleet", timeout=10) as r:  # noqa: S310
            seen["fleet"] = json.loads(r.read())

    summary = run_demo(settings, duration_s=3, devices=3, speed=120, broker_url=broker.url,
                       workdir=str(tmp_path / "demo"), out=out, keep_open=True, wait_open=look_while_open)
    assert "stays up at http://127.0.0.1:" in out.getvalue()
    assert "<html" in seen["page"].lower()
    stored = [ln for ln in seen["metrics"].splitlines() if ln.startswith("itap_readings_processed_total ")]
    assert stored and float(stored[0].split()[1]) == summary["readings_stored"] > 0
    assert seen["fleet"]["totals"]["devices"] == 3


def test_the_consumer_logs_a_summary_every_interval_and_each_alert_transition(settings, start_consumer, wait,
                                                                              caplog):
    import logging

    from itap_stream.adapters.metrics import Metrics
    from simulator import Fault, simulate
    from simulator.transport import publish

    caplog.set_level(logging.INFO, logger="itap_stream.app.consumer")
    metrics = Metrics()
    consumer = start_consumer(settings.replace(summary_interval=0.5), metrics)
    sim = simulate(2, 900, seed=31, faults=[Fault("power_instability", "DEV-0002", 300, 600)], maint=False)
    sent = publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-sim-talks")
    assert wait(lambda: metrics.sample("itap_readings_processed_total") >= sent)

    def lines(text):
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    assert wait(lambda: lines("alert ") and lines("readings/s stored"), 15)
    fired = [ln for ln in lines("alert ") if " firing: " in ln]
    assert fired and all("on DEV-0002" in ln for ln in fired)
    line = consumer.log_summary()
    assert re.search(r"^last \d+s: [\d,.]+ readings/s stored, 2 devices, [\d,]+ windows, [\d,]+ anomalies, "
                     r"[\d,]+ rejected, \d+ open alerts, store lag \d+ batch\(es\) / [\d.]+s, \d+ unacknowledged$",
                     line)


def _reading(dev: str, i: int, t0: float) -> bytes:
    return json.dumps({"device_id": dev, "ts": t0 + i, "state": "RUN", "seq": i, "rpm": 1500.0, "temp_c": 50.0,
                       "voltage_v": 230.0, "current_a": 10.0, "vibration_mm_s": 2.0}).encode()


def test_readings_lost_on_the_way_show_up_as_a_gap(settings, start_consumer, wait, caplog):
    """Issue 16, point 8: a device numbers its readings; 3 and then 25 of them never arrive:
    counted (itap_readings_gap_total), stored per device, and the large one is a data_gap event."""
    import logging
    import sqlite3

    from itap_stream.adapters.metrics import Metrics
    from itap_stream.adapters.store import Store

    caplog.set_level(logging.INFO, logger="itap_stream.app.consumer")
    metrics = Metrics()
    consumer = start_consumer(settings, metrics)
    host, port = settings.broker_url.removeprefix("mqtt://").split(":")
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"GAP-1-{time.monotonic_ns()}")
    pub.connect(host, int(port))
    pub.loop_start()
    t0 = time.time() - 1000
    sent = [i for i in range(200) if not (50 <= i < 53 or 100 <= i < 125)]
    try:
        for i in sent:
            info = pub.publish(f"{settings.topic_prefix}/telemetry/GAP-1", _reading("GAP-1", i, t0), qos=1)
        info.wait_for_publish(10)
        assert wait(lambda: metrics.sample("itap_readings_processed_total") >= len(sent))
        assert wait(lambda: consumer.store.count("gaps") == 2)
    finally:
        pub.loop_stop()
        pub.disconnect()
    assert metrics.sample("itap_readings_gap_total") == 28
    assert Store(settings.db_url, settings.schema()).missing_readings() == {"GAP-1": 28}
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    events = [json.loads(p) for (p,) in db.execute("SELECT payload FROM alerts WHERE rule = 'data_gap'")]
    db.close()
    assert len(events) == 1  # 25 >= gap_event_readings (10); 3 is below it
    assert events[0]["status"] == "event" and "25 reading(s) of GAP-1 never arrived (seq 100 to 124" in \
        events[0]["root_cause"]
    assert any("jumps in seq" in r.getMessage() and "GAP-1 seq 50..52" in r.getMessage() for r in caplog.records)


def test_a_stock_mosquitto_dropping_a_slowed_consumers_messages_is_seen(tmp_path, settings, caplog):
    """A stock mosquitto (max_queued_messages 1000) and a consumer whose store is locked by
    another writer: the broker drops messages beyond its queue. The consumer exports the
    broker's own count and warns, and the readings that never came are seq gaps."""
    import logging
    import sqlite3

    from itap_stream.adapters.broker import start_broker
    from itap_stream.adapters.metrics import Metrics
    from itap_stream.app.service import build_consumer

    caplog.set_level(logging.WARNING, logger="itap_stream.app.consumer")
    try:
        broker = start_broker("mosquitto", conf="listener {port} {host}\nallow_anonymous true\nsys_interval 1\n")
    except Exception as exc:  # noqa: BLE001 - no mosquitto here
        pytest.skip(f"needs mosquitto: {exc}")
    st = settings.replace(broker_url=broker.url, receive_max=50, stall_timeout=600.0)
    metrics = Metrics()
    consumer = build_consumer(st, metrics=metrics)
    ready = threading.Event()
    thread = threading.Thread(target=consumer.run, kwargs={"ready": ready}, daemon=True)
    thread.start()
    lock = sqlite3.connect(st.db_url.removeprefix("sqlite:///"), timeout=1, isolation_level=None)
    host, port = broker.url.removeprefix("mqtt://").split(":")
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"SLOW-1-{time.monotonic_ns()}")
    try:
        assert ready.wait(15)
        lock.execute("BEGIN EXCLUSIVE")  # an `itap ingest` into the same file, say
        pub.connect(host, int(port))
        pub.loop_start()
        t0 = time.time() - 3000
        for i in range(2000):
            info = pub.publish(f"{st.topic_prefix}/telemetry/SLOW-1", _reading("SLOW-1", i, t0), qos=1)
        info.wait_for_publish(30)
        deadline = time.monotonic() + 30
        while metrics.sample("itap_broker_dropped_messages") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        dropped = metrics.sample("itap_broker_dropped_messages")
        assert dropped >= 1, "the broker's dropped count never rose"
        lock.execute("ROLLBACK")
        deadline = time.monotonic() + 60
        while metrics.sample("itap_readings_processed_total") + dropped < 2000 and time.monotonic() < deadline:
            time.sleep(0.1)  # the backlog the broker kept comes through
        # the broker dropped the newest messages: the device's next reading shows the jump
        pub.publish(f"{st.topic_prefix}/telemetry/SLOW-1", _reading("SLOW-1", 2000, t0), qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 60
        while metrics.sample("itap_readings_processed_total") + metrics.sample("itap_readings_gap_total") < 2001 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        pub.loop_stop()
        pub.disconnect()
        consumer.stop()
        thread.join(20)
        broker.stop()
    processed = metrics.sample("itap_readings_processed_total")
    missing = metrics.sample("itap_readings_gap_total")
    assert processed < 2000 and processed + missing == 2001  # every lost reading is a counted gap
    assert missing == dropped  # this consumer's queue was the one that overflowed
    assert any("the broker dropped" in r.getMessage() for r in caplog.records)


def test_open_alerts_acks_silences_and_the_dashboard_survive_a_restart(settings, wait, capsys):
    """Issue 16, point 4: stop the consumer while a fault's alert is open (acknowledged, a
    silence added at runtime); a new consumer on the same store has the same open alerts,
    acknowledgement, silence, devices and dashboard alerts, and the alert resolves normally
    once the device is healthy again."""
    from itap_stream.adapters.metrics import Metrics
    from itap_stream.app.service import build_consumer
    from simulator import Fault, simulate
    from simulator.transport import publish

    def start():
        metrics = Metrics()
        consumer = build_consumer(settings, metrics=metrics)
        ready = threading.Event()
        thread = threading.Thread(target=consumer.run, kwargs={"ready": ready}, daemon=True)
        thread.start()
        assert ready.wait(15)
        return consumer, thread, metrics

    def stop(consumer, thread):
        consumer.stop()
        thread.join(20)
        assert not thread.is_alive()

    args = ["--broker", settings.broker_url]
    sim = simulate(2, 900, seed=31, faults=[Fault("power_instability", "DEV-0002", 300, 600)], maint=False)
    consumer, thread, metrics = start()
    try:
        sent = publish(sim, settings.broker_url, speed=0, qos=1, client_id="t-restart-1")
        assert wait(lambda: metrics.sample("itap_readings_processed_total") >= sent)
        assert wait(lambda: consumer.processor.engine.open_alerts())
        fired = consumer.processor.engine.open_alerts()[0]
        assert main(["ack", fired.id, "--note", "crew on site", *args]) == 0
        assert main(["silence", "add", "--device", "DEV-0001", "--duration", "2h", "--comment", "pump swap",
                     *args]) == 0
        assert wait(lambda: consumer.writer.pending == 0)
        before = consumer.fleet.snapshot()
        open_before = {(a.id, a.rule) for a in consumer.processor.engine.open_alerts()}
    finally:
        stop(consumer, thread)
    assert fired.device_id == "DEV-0002" and open_before

    consumer, thread, metrics = start()
    try:
        engine = consumer.processor.engine
        assert {(a.id, a.rule) for a in engine.open_alerts()} == open_before
        assert engine.find_open(fired.id).acknowledged
        capsys.readouterr()
        assert main(["silence", "list", *args]) == 0
        assert "device=DEV-0001" in capsys.readouterr().out and "pump swap" in consumer.silences.all()[0].comment
        after = consumer.fleet.snapshot()
        assert [d["device_id"] for d in after["devices"]] == [d["device_id"] for d in before["devices"]]
        assert {a["id"] for a in after["alerts"]} == {a["id"] for a in before["alerts"]}
        # the device is healthy again: the restored alert resolves as it would have without the restart
        healthy = simulate(2, 900, seed=32, maint=False, start_ts=float(sim.ts[-1]) + 1.0)
        sent = publish(healthy, settings.broker_url, speed=0, qos=1, client_id="t-restart-2")
        assert wait(lambda: metrics.sample("itap_readings_processed_total") >= sent)
        assert wait(lambda: not engine.open_alerts())
        assert metrics.sample("itap_alerts_total", rule=fired.rule, severity=fired.severity, status="resolved") >= 1
    finally:
        stop(consumer, thread)


def test_an_activated_model_is_the_one_loaded_after_a_restart(settings, tmp_path, trained, normal_frame):
    """`itap train --activate` (the reload command with a model_path) is stored: a restart loads
    that model, not the configured one; writing the configured file anew goes back to it."""
    import os
    import shutil

    from itap_stream.adapters import artifacts
    from itap_stream.adapters.metrics import Metrics
    from itap_stream.app.commands import send_command
    from itap_stream.app.offline import train_from_frame
    from itap_stream.app.service import build_consumer

    models = tmp_path / "models"
    models.mkdir()
    current = models / "current.joblib"
    shutil.copy(settings.model_path, current)
    shutil.copy(settings.model_path + ".json", str(current) + ".json")
    other, _ = train_from_frame(normal_frame, settings.schema(), window=32, hop=4, quantile=0.99, seed=1)
    assert other.threshold != trained.threshold
    newer = models / "2026-12.joblib"
    artifacts.save(other, newer)
    st = settings.replace(model_path=str(current))

    def run_until_ready():
        consumer = build_consumer(st, metrics=Metrics())
        ready = threading.Event()
        thread = threading.Thread(target=consumer.run, kwargs={"ready": ready}, daemon=True)
        thread.start()
        assert ready.wait(15)
        return consumer, thread

    consumer, thread = run_until_ready()
    try:
        assert consumer.processor.artifact.threshold == trained.threshold
        answer = send_command(st, "reload", {"parts": ["model"], "model_path": str(newer)})
        assert answer["ok"], answer
        deadline = time.monotonic() + 10
        while consumer.store.get_state("model_path") is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        consumer.stop()
        thread.join(20)
    consumer = build_consumer(st, metrics=Metrics())
    assert consumer.processor.artifact.threshold == other.threshold  # the activated one
    consumer.store.dispose()
    later = time.time() + 5
    os.utime(current, (later, later))  # the configured file written anew: it wins again
    consumer = build_consumer(st, metrics=Metrics())
    assert consumer.processor.artifact.threshold == trained.threshold
    consumer.store.dispose()


def test_dashboard_credentials_come_from_the_environment_or_a_file_never_the_config(tmp_path):
    from itap_stream.config import PACKAGE_CONFIGS, load
    from itap_stream.errors import ConfigError

    base = PACKAGE_CONFIGS / "itap.yaml"
    assert load(base, environ={}).http_credentials() is None  # off by default
    env = {"ITAP_HTTP_USERNAME": "operator", "ITAP_HTTP_PASSWORD": "long enough pw"}
    assert load(base, environ=env).http_credentials() == ("operator", "long enough pw")
    with pytest.raises(ConfigError, match="shorter than 8 characters"):
        load(base, environ={"ITAP_HTTP_USERNAME": "operator", "ITAP_HTTP_PASSWORD": "short"}).http_credentials()
    secret = tmp_path / "pw"
    secret.write_text("from a file 123\n")
    cfg = tmp_path / "itap.yaml"
    cfg.write_text(base.read_text() + "\nhttp_username: operator\nhttp_password_file: pw\n")
    assert load(cfg, environ={}).http_credentials() == ("operator", "from a file 123")
    cfg.write_text(base.read_text() + "\nhttp_username: operator\nhttp_password: in-the-repo\n")
    with pytest.raises(ConfigError, match="holds http_password"):
        load(cfg, environ={})
