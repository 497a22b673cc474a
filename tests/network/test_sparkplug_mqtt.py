"""Sparkplug B through a real broker: the consumer as primary host application, the simulator
as edge node, rebirth requests, deaths, dead letters, and the same results as JSON."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from conftest import _wait_for

from itap_stream.adapters.metrics import Metrics
from itap_stream.core.sparkplug import birth_payload, data_payload, is_rebirth_request
from simulator import Fault, simulate
from simulator.transport import publish

pytestmark = pytest.mark.network

T0 = int(time.time() * 1000) - 600_000


class Watch:
    """The test's own subscriber: every message on some topic filters, retained ones flagged."""

    def __init__(self, url: str, *topics: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-watch-{time.monotonic_ns()}")
        ready = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert ready.wait(10)

    def on(self, prefix: str) -> list[bytes]:
        return [p for t, p, _r in self.messages if t.startswith(prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class EdgeNode:
    """A hand-driven edge node, for what the simulator never does wrong."""

    def __init__(self, url: str, group: str, edge: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.group, self.edge = group, edge
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-edge-{time.monotonic_ns()}")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def send(self, kind: str, payload: bytes, device: str | None = None) -> None:
        topic = f"spBv1.0/{self.group}/{kind}/{self.edge}" + (f"/{device}" if device else "")
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("intake", ["process", "thread"])
def test_the_consumer_is_a_primary_host_with_a_retained_state_message(settings, start_consumer, intake):
    settings = settings.replace(sparkplug_groups="+", intake=intake, sparkplug_host_id=f"host-{intake}")
    topic = f"spBv1.0/STATE/host-{intake}"
    watch = Watch(settings.broker_url, topic)
    consumer = start_consumer(settings)
    assert _wait_for(lambda: watch.messages, 10)
    state = json.loads(watch.messages[-1][1])
    assert state["online"] is True and isinstance(state["timestamp"], int)
    late = Watch(settings.broker_url, topic)  # subscribed after the fact: the retained copy
    assert _wait_for(lambda: late.messages, 10)
    assert late.messages[-1][1:] == (watch.messages[-1][1], True)
    late.close()
    consumer.stop()
    assert _wait_for(lambda: json.loads(watch.messages[-1][1])["online"] is False, 20)
    assert json.loads(watch.messages[-1][1])["timestamp"] == state["timestamp"]  # 3.0: the birth's timestamp
    watch.close()


def _windows(db_path):
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT device_id, window_end, score, is_anomaly FROM windows "
                          "ORDER BY device_id, window_end").fetchall()


def test_the_simulator_as_edge_node_gives_the_windows_and_scores_of_json(settings, start_consumer, tmp_path):
    sim = simulate(3, 600, seed=11, faults=[Fault("power_instability", "DEV-0003", 200, 400)], maint=False)
    runs = {}
    for fmt in ("json", "sparkplug"):
        db = tmp_path / f"{fmt}.db"
        cfg = settings.replace(db_url=f"sqlite:///{db}", client_id=f"{settings.client_id}-{fmt}",
                               sparkplug_groups="plant" if fmt == "sparkplug" else "",
                               sparkplug_device_id="{device}")
        metrics = Metrics()
        consumer = start_consumer(cfg, metrics=metrics)
        alerts = Watch(cfg.broker_url, "itap/alerts/#")
        sent = publish(sim, cfg.broker_url, speed=0, qos=1, client_id=f"t-sim-{fmt}", fmt=fmt, group="plant",
                       edge="line1")
        assert sent == sim.n_readings
        assert _wait_for(lambda m=metrics, n=sent: m.sample("itap_readings_processed_total") >= n, 60)
        assert _wait_for(lambda c=consumer, n=sent: c.store.count("readings") >= n, 30)
        assert metrics.sample("itap_sparkplug_rebirth_requests_total") == 0
        assert consumer.store.count("deadletters") == 0
        if fmt == "sparkplug":
            # the simulator's clean exit: NDEATH -> every device offline at once
            assert _wait_for(lambda a=alerts: len([p for p in a.on("itap/alerts/")
                                                   if json.loads(p)["rule"] == "device_offline"]) == 3, 20)
        alerts.close()
        consumer.stop()
        runs[fmt] = _windows(db)
    assert len(runs["json"]) > 100
    # the same windows and flags; scores to rounding (micro-batches are cut by timing, and
    # numpy's vectorised sums may round differently in a batch of another size)
    assert [(d, end, flag) for d, end, _s, flag in runs["sparkplug"]] == [(d, end, flag) for d, end, _s, flag
                                                                          in runs["json"]]
    assert [s for *_x, s, _f in runs["sparkplug"]] == pytest.approx([s for *_x, s, _f in runs["json"]], rel=1e-9)
    assert any(flag for *_x, flag in runs["json"])


def test_gaps_deaths_and_bad_payloads_over_the_broker(settings, start_consumer):
    settings = settings.replace(sparkplug_groups="G1", sparkplug_rebirth_interval=0)
    metrics = Metrics()
    consumer = start_consumer(settings, metrics=metrics)
    watch = Watch(settings.broker_url, "spBv1.0/G1/NCMD/#", "itap/alerts/#", "itap/deadletter")
    node = EdgeNode(settings.broker_url, "G1", "E1")
    signals = [("rpm", 1, 1500.0), ("temp_c", 2, 60.0), ("voltage_v", 3, 400.0), ("current_a", 4, 20.0),
               ("vibration_mm_s", 5, 2.0), ("state", 6, "RUN")]
    try:
        # data before any birth: dead-lettered, and the node is asked for its births
        node.send("DDATA", data_payload([(1, 1.0)], seq=7, ts_ms=T0), "M1")
        assert _wait_for(lambda: watch.on("spBv1.0/G1/NCMD/E1"), 10)
        assert is_rebirth_request(watch.on("spBv1.0/G1/NCMD/E1")[0])
        node.send("NBIRTH", birth_payload([], seq=0, bdseq=3, ts_ms=T0))
        node.send("DBIRTH", birth_payload(signals, seq=1, ts_ms=T0), "M1")
        for k in range(2, 260):  # through 255 and round: no request
            node.send("DDATA", data_payload([(1, 1500.0 + k)], seq=k % 256, ts_ms=T0 + 1000 * k), "M1")
        assert _wait_for(lambda: consumer.store.count("readings") >= 258, 20)
        assert len(watch.on("spBv1.0/G1/NCMD/E1")) == 1
        # a lost message (seq 4 -> 9): the node is asked for a rebirth; the data is kept
        node.send("DDATA", data_payload([(1, 1.0)], seq=9, ts_ms=T0 + 300_000), "M1")
        assert _wait_for(lambda: len(watch.on("spBv1.0/G1/NCMD/E1")) == 2, 10)
        assert _wait_for(lambda: consumer.store.count("readings") == 259, 10)
        # hostile payloads: dead letters with reasons, nothing stops
        node.send("DDATA", b"\xff\x00garbage", "M1")
        node.send("DDATA", data_payload([(42, 1.0)], seq=10, ts_ms=T0 + 301_000), "M1")
        node.send("DDATA", data_payload([(2, "hot")], seq=11, ts_ms=T0 + 302_000), "M1")
        reasons = lambda: [json.loads(p)["reason"] for p in watch.on("itap/deadletter")]  # noqa: E731
        want = ["sparkplug_no_birth", "invalid_protobuf", "sparkplug_unknown_alias", "wrong_type"]
        assert _wait_for(lambda: reasons() == want, 10), reasons()
        letter = json.loads(watch.on("itap/deadletter")[1])
        assert letter["payload"].startswith("base64:") and letter["topic"] == "spBv1.0/G1/DDATA/E1/M1"
        # a device's death: offline at once, resolved by its next reading after a new birth
        node.send("DDEATH", data_payload([], seq=12, ts_ms=T0 + 303_000), "M1")
        offline = lambda: [json.loads(p) for p in watch.on("itap/alerts/") if b"device_offline" in p]  # noqa: E731
        assert _wait_for(lambda: len(offline()) == 1, 10)
        assert offline()[0]["device_id"] == "G1:E1:M1" and offline()[0]["status"] == "firing"
        node.send("DBIRTH", birth_payload(signals, seq=13, ts_ms=T0 + 304_000), "M1")
        node.send("DDATA", data_payload([(1, 1600.0)], seq=14, ts_ms=T0 + 305_000), "M1")
        assert _wait_for(lambda: [a["status"] for a in offline()] == ["firing", "resolved"], 10)
        assert consumer.store.count("readings") == 260
        assert consumer.fatal is None
    finally:
        node.close()
        watch.close()


def test_a_death_in_the_same_micro_batch_as_the_devices_last_readings_keeps_it_offline(settings):
    from itap_stream.app.service import build_consumer

    consumer = build_consumer(settings.replace(sparkplug_groups="G"), metrics=Metrics())
    signals = [("rpm", 1, 1500.0), ("temp_c", 2, 60.0), ("voltage_v", 3, 400.0), ("current_a", 4, 20.0),
               ("vibration_mm_s", 5, 2.0)]

    def msg(kind, payload, device=None):  # as the intake hands them over: one micro-batch, QoS 0
        return (f"spBv1.0/G/{kind}/E" + (f"/{device}" if device else ""), payload, time.time(), 0, 0, 0)

    try:
        born = [msg("NBIRTH", birth_payload([], seq=0, bdseq=1, ts_ms=T0)),
                msg("DBIRTH", birth_payload(signals, seq=1, ts_ms=T0), "M1"),
                msg("DBIRTH", birth_payload(signals, seq=2, ts_ms=T0), "M2")]
        # M1 reports, then dies, in one batch; M2 dies, is born again and reports, in the same batch
        batch = [*born, msg("DDATA", data_payload([(1, 1501.0)], seq=3, ts_ms=T0 + 1000), "M1"),
                 msg("DDEATH", data_payload([], seq=4, ts_ms=T0 + 2000), "M1"),
                 msg("DDEATH", data_payload([], seq=5, ts_ms=T0 + 2000), "M2"),
                 msg("DBIRTH", birth_payload(signals, seq=6, ts_ms=T0 + 3000), "M2"),
                 msg("DDATA", data_payload([(1, 1502.0)], seq=7, ts_ms=T0 + 4000), "M2")]
        consumer.process_messages(batch)
        assert consumer.writer.flush(timeout_s=10)
        with sqlite3.connect(settings.db_url.removeprefix("sqlite:///")) as db:
            rows = db.execute("SELECT device_id, status FROM alerts WHERE rule = 'device_offline'").fetchall()
        assert rows == [("G:E:M1", "firing")]
    finally:
        consumer.writer.close(timeout_s=5)


def test_itap_simulate_publishes_as_a_sparkplug_edge_node(settings, start_consumer, tmp_path):
    settings = settings.replace(sparkplug_groups="cli")
    metrics = Metrics()
    start_consumer(settings, metrics=metrics)
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "itap_stream.cli", "simulate", "--devices", "2", "--duration", "120", "--speed", "0",
         "--broker", settings.broker_url, "--format", "sparkplug", "--sparkplug-group", "cli",
         "--sparkplug-edge", "press7"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "as Sparkplug B edge node cli/press7" in proc.stdout
    assert _wait_for(lambda: metrics.sample("itap_readings_processed_total") >= 240, 30)
    with sqlite3.connect(settings.db_url.removeprefix("sqlite:///")) as db:
        devices = {d for (d,) in db.execute("SELECT DISTINCT device_id FROM readings_all")}
    assert devices == {"cli:press7:DEV-0001", "cli:press7:DEV-0002"}
