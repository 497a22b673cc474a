"""Issue 5: nothing lost, nothing duplicated, every bad reading dead-lettered with its reason.

The chaos scenarios are the ones `python -m bench.chaos` tables: real mosquitto processes
started, stopped and killed on free ports, the consumer as ``itap run`` in its own
process, devices publishing per-device sequence numbers, and a checker reading the store.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest

from bench.chaos import SCENARIOS, run_scenario
from itap_stream.adapters.metrics import Metrics
from itap_stream.core.batch import batch_windows
from itap_stream.core.features import extract
from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Reading
from itap_stream.core.rules import RuleEngine
from itap_stream.core.schema import STATES

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("mosquitto") is None and not __import__("os").path.exists("/usr/sbin/mosquitto"),
    reason="the chaos scenarios start and kill real mosquitto processes",
)

RECEIVE_MAX = 200


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_chaos_scenario_loses_and_duplicates_nothing(name, model_file, tmp_path):
    out = run_scenario(name, model_file, devices=5, per_device=120, rate=600.0, receive_max=RECEIVE_MAX,
                       workdir=tmp_path)
    full = (tmp_path / "consumer.log").read_text(errors="replace")
    log = full[-3000:]  # shown when an assertion fails
    assert (out.lost, out.duplicated) == (0, 0), (out, log)
    assert out.stored == out.sent == 600
    # at least once: a fault may bring readings again; the copies are counted as redelivered
    # (itap_readings_redelivered_total), never stored twice and not dead letters
    assert out.dead_lettered == 0, out.dead_reasons
    if name.startswith("broker"):
        assert out.redelivered > 0, out  # the messages in flight when the broker went away came again
    if name.startswith("consumer SIGTERM"):
        assert out.notes["exit_code"] == 0 and out.notes["exit_s"] < 10, out.notes
        assert out.notes["stored_at_exit"] > 0  # it drained and committed what it had before exiting
    if name.startswith("broker down"):
        assert out.notes["broker_down_s"] == 30.0 and out.notes["consumer_survived"], log
        assert "unreachable (attempt 1)" in full and "reconnected to broker" in full, log
    if name.startswith("store locked"):
        # the consumer stopped acknowledging while it could not commit: the broker held the
        # backlog (at most receive_max messages in the consumer's hands), nothing was dropped
        assert 0 < out.notes["peak_unacked"] <= RECEIVE_MAX, out.notes


@pytest.mark.parametrize("name", ["consumer kill -9 mid-stream", "broker SIGTERM + restart under load"])
def test_the_thread_intake_gives_the_same_guarantees(name, model_file, tmp_path):
    out = run_scenario(name, model_file, devices=5, per_device=120, rate=600.0, receive_max=RECEIVE_MAX,
                       workdir=tmp_path, intake="thread")
    assert (out.lost, out.duplicated, out.dead_lettered) == (0, 0, 0), out
    assert out.stored == out.sent == 600


def _reading(device, ts, **over):
    obj = {"device_id": device, "ts": ts, "state": "RUN", "rpm": 1500.0, "temp_c": 60.0, "voltage_v": 230.0,
           "current_a": 10.0, "vibration_mm_s": 2.0}
    obj.update(over)
    return obj


def test_every_kind_of_bad_input_is_dead_lettered_with_its_reason_and_the_good_ones_go_on(
    settings, start_consumer, wait
):
    st = settings.replace(max_payload_bytes=4096, max_clock_skew=60.0)
    metrics = Metrics()
    consumer = start_consumer(st, metrics)
    dead: list[dict] = []
    host, port = st.broker_url.removeprefix("mqtt://").split(":")
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-dead-{time.monotonic_ns()}")
    sub.on_message = lambda _c, _u, m: dead.append(json.loads(m.payload))
    sub.connect(host, int(port))
    sub.subscribe("itap/deadletter", qos=1)
    sub.loop_start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-bad-{time.monotonic_ns()}")
    pub.connect(host, int(port))
    pub.loop_start()
    time.sleep(0.3)
    now = time.time()
    d1 = "itap/telemetry/DEV-0001"
    # the device's own history first: 40 good readings, one a second up to now
    history = [_reading("DEV-0001", now - 40 + i) for i in range(40)]
    for k in range(0, 40, 10):
        pub.publish(d1, json.dumps(history[k : k + 10]), qos=1).wait_for_publish(5)
    assert wait(lambda: metrics.sample("itap_readings_processed_total") >= 40)
    cases = [  # (payload, expected reason)
        (b"not json at all", "invalid_json"),
        (b"\xff\xfe{\"device_id\": \"DEV-0001\"}", "invalid_utf8"),
        (json.dumps(_reading("DEV-0001", now + 1, rpm="fast")).encode(), "wrong_type"),
        (b'{"device_id": "DEV-0001", "ts": %f, "rpm": NaN}' % (now + 1), "non_finite"),
        (b'{"device_id": "DEV-0001", "ts": %f, "temp_c": Infinity}' % (now + 1), "non_finite"),
        (json.dumps(_reading("DEV-0001", now + 1, voltage_v=9999.0)).encode(), "out_of_range"),
        (json.dumps({k: v for k, v in _reading("DEV-0001", now + 1).items() if k != "device_id"}).encode(),
         "missing_device_id"),
        (json.dumps({k: v for k, v in _reading("DEV-0001", now + 1).items() if k != "ts"}).encode(), "missing_ts"),
        (json.dumps(_reading("DEV-0099", now + 1)).encode(), "device_mismatch"),
        (json.dumps(_reading("DEV-0001", now + 1, state="PARTY")).encode(), "unknown_state"),
        (json.dumps([_reading("DEV-0001", now + 1)] * 60).encode(), "oversized"),
        (json.dumps(_reading("DEV-0001", now + 3600)).encode(), "future"),
        (json.dumps(_reading("DEV-0001", now - 400)).encode(), "late"),
        (json.dumps(history[-1]).encode(), "duplicate"),
    ]
    for payload, _reason in cases:
        pub.publish(d1, payload, qos=1).wait_for_publish(5)
    # an array with some bad elements: the good ones are kept, each bad one dead-lettered
    mixed = [_reading("DEV-0001", now + 1), _reading("DEV-0001", now + 2, rpm=None, temp_c="hot"),
             _reading("DEV-0001", now + 3)]
    pub.publish(d1, json.dumps(mixed), qos=1).wait_for_publish(5)
    expected = sorted([r for _p, r in cases] + ["wrong_type"])
    assert wait(lambda: len(dead) >= len(expected), 15), dead
    time.sleep(0.3)
    assert sorted(d["reason"] for d in dead) == expected
    for d in dead:
        assert d["topic"] == d1 and isinstance(d["received_at"], float) and len(d["payload"]) <= 1024
    element = next(d for d in dead if d["detail"].startswith("element 1:"))
    assert json.loads(element["payload"])["temp_c"] == "hot"  # the bad element itself, not the whole array
    for reason in set(expected):
        assert metrics.sample("itap_readings_rejected_total", reason=reason) == expected.count(reason), reason
    # the good readings around them: 40 of history + 2 of the mixed array, and the late one stored
    assert wait(lambda: metrics.sample("itap_readings_processed_total") >= 42)
    consumer.stop()
    pub.disconnect()
    pub.loop_stop()
    sub.disconnect()
    sub.loop_stop()
    db = sqlite3.connect(st.db_url.removeprefix("sqlite:///"))
    try:
        tss = [r[0] for r in db.execute("select ts from readings_all where device_id = 'DEV-0001' order by ts")]
        stored_reasons = sorted(r[0] for r in db.execute("select reason from deadletters"))
    finally:
        db.close()
    # history, the two good elements and the late reading (stored for the record, not featured);
    # the duplicate once, the far-future one not at all
    assert len(tss) == 40 + 2 + 1 and math.isclose(tss[0], now - 400, abs_tol=1e-3)
    assert max(tss) < now + 60
    assert stored_reasons == expected


def _frame_readings(n_devices=3, per_device=120, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n_devices):
        base = 1_767_225_600.0
        for i in range(per_device):
            vals = (1500.0 + rng.normal(0, 5), 60.0 + rng.normal(0, 0.5), 230.0 + rng.normal(0, 1),
                    10.0 + rng.normal(0, 0.2), 2.0 + abs(rng.normal(0, 0.1)))
            out.append(Reading(f"DEV-{d}", base + i, "RUN", vals, i))
    return out


def test_time_chaos_is_counted_per_rule_and_features_equal_the_sorted_deduplicated_batch(trained, schema):
    """Duplicates, reordering within the tolerance, late and far-future readings: each
    counted under its rule, and the windows' features equal those of the batch computation
    over the sorted, de-duplicated readings (without the late and future ones)."""
    clean = _frame_readings()
    rng = np.random.default_rng(7)
    by_dev: dict[str, list[Reading]] = {}
    for r in clean:
        by_dev.setdefault(r.device_id, []).append(r)
    arrivals: list[Reading] = []
    late_ones: list[Reading] = []
    n_dup = n_swap = 0
    for rs in by_dev.values():
        seq = list(rs)
        held_back = seq.pop(50)  # withheld and sent after the device moved 60 readings on: late
        late_ones.append(held_back)
        i = 0
        while i < len(seq) - 1:  # swap neighbours now and then (1 s apart, tolerance 2 s)
            if rng.random() < 0.15:
                seq[i], seq[i + 1] = seq[i + 1], seq[i]
                n_swap += 1
                i += 2
            else:
                i += 1
        for j, r in enumerate(seq):
            arrivals.append(r)
            if rng.random() < 0.05:  # the device retried: the same reading again, a little later
                arrivals.append(r)
                n_dup += 1
            if j == 110:
                arrivals.append(held_back)
    future = [Reading("DEV-0", 1_767_225_600.0 + 10_000, "RUN", clean[0].values, 9999)]
    arrivals[200:200] = future
    proc = Processor(schema, trained, RuleEngine([]), window=32, hop=4, reorder_tolerance_s=2.0,
                     max_clock_skew_s=300.0)
    feats, ends, devs, dropped = [], [], [], []
    for k in range(0, len(arrivals), 17):  # micro-batches; the service clock follows the devices
        chunk = arrivals[k : k + 17]
        res = proc.process(chunk, now=max(r.ts for r in chunk if r not in future) + 0.5)
        dropped += [reason for _r, reason in res.dropped]
        if res.features is not None:
            feats.append(res.features)
            ends += res.windows.end_ts.tolist()
            devs += res.windows.device_ids
    res = proc.process([], now=None, flush=True)
    dropped += [reason for _r, reason in res.dropped]
    if res.features is not None:
        feats.append(res.features)
        ends += res.windows.end_ts.tolist()
        devs += res.windows.device_ids
    assert sorted(dropped) == sorted(["duplicate"] * n_dup + ["late"] * 3 + ["future"])
    assert n_swap > 10 and "out_of_order" not in dropped  # every swap was put back in order
    # the batch computation over the sorted, de-duplicated readings, less the late ones
    keep = sorted((r for r in clean if r not in late_ones), key=lambda r: (r.device_id, r.ts))
    code = {s: i for i, s in enumerate(STATES)}
    bw = batch_windows([r.device_id for r in keep], [r.ts for r in keep], [code[r.state] for r in keep],
                       [r.values for r in keep], window=32, hop=4)
    stream = {(d, e): row for d, e, row in zip(devs, ends, np.concatenate(feats), strict=True)}
    batch = {
        (d, e): row for d, e, row in zip(bw.device_ids.tolist(), bw.end_ts.tolist(), bw.features, strict=True)
    }
    assert stream.keys() == batch.keys() and len(batch) > 60
    for key, row in batch.items():
        np.testing.assert_array_equal(stream[key], row)
    assert extract  # the same feature code serves both paths (imported by both)


def test_alerts_raised_while_the_broker_is_away_are_held_and_published_on_reconnect(
    settings, start_consumer, wait, tmp_path
):
    from itap_stream.adapters.broker import start_broker

    broker = start_broker("mosquitto", persistence=True)
    try:
        st = settings.replace(broker_url=broker.url, stale_after=60.0)
        now = [time.time()]
        metrics = Metrics()
        consumer = start_consumer(st, metrics, clock=lambda: now[0])
        got: list[dict] = []
        watcher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="t-held-watch", clean_session=False)
        watcher.on_message = lambda _c, _u, m: got.append(json.loads(m.payload))
        watcher.reconnect_delay_set(1, 2)
        watcher.connect(broker.host, broker.port)
        watcher.subscribe("itap/alerts/#", qos=1)
        watcher.loop_start()
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="t-held-pub")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        pub.publish("itap/telemetry/DEV-0007", json.dumps([_reading("DEV-0007", now[0] - 5 + i) for i in range(5)]),
                    qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        assert wait(lambda: metrics.sample("itap_readings_processed_total") == 5)
        broker.terminate()
        assert wait(lambda: metrics.sample("itap_mqtt_connected") == 0, 10)
        now[0] += 61  # DEV-0007 goes stale while the broker is away: the alert waits in the outbox
        assert wait(lambda: metrics.sample("itap_mqtt_outbox_messages") >= 1, 10)
        assert not got
        broker.start()
        assert wait(lambda: any(a["rule"] == "device_stale" and a["device_id"] == "DEV-0007" for a in got), 30)
        assert metrics.sample("itap_mqtt_reconnects_total") >= 1
        assert metrics.sample("itap_mqtt_publish_refused_total") == 0
        consumer.stop()
        watcher.disconnect()
        watcher.loop_stop()
    finally:
        broker.stop()


def test_metrics_and_dashboard_bind_to_loopback_by_default():
    from itap_stream.config import PACKAGE_CONFIGS, Settings, load

    assert Settings().http_addr.startswith("127.0.0.1:")
    assert load(PACKAGE_CONFIGS / "itap.yaml", environ={}).http_addr.startswith("127.0.0.1:")


def _joinable_consumer(settings, metrics, request):
    """A consumer running in a thread this test can join (``start_consumer`` joins only at
    teardown); `run` returns once its store writer committed everything it was handed and
    its MQTT connections are closed."""
    from itap_stream.app.service import build_consumer

    consumer = build_consumer(settings, metrics=metrics)
    ready = threading.Event()
    thread = threading.Thread(target=consumer.run, kwargs={"ready": ready}, daemon=True)
    thread.start()

    def finish():
        consumer.stop()
        thread.join(20)

    request.addfinalizer(finish)
    assert ready.wait(15)
    return consumer, thread


def test_a_restarted_consumer_refills_its_windows_from_the_store(settings, start_consumer, wait, request):
    """Stop after 100 readings, restart, go on: the windows are those of one uninterrupted
    run, and readings the restarted consumer gets a second time count as duplicates."""
    t0 = time.time() - 300
    readings = [_reading("DEV-0003", t0 + i, seq=i) for i in range(200)]
    host, port = settings.broker_url.removeprefix("mqtt://").split(":")
    db_path = settings.db_url.removeprefix("sqlite:///")

    def send(rs):
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-refill-{time.monotonic_ns()}")
        pub.connect(host, int(port))
        pub.loop_start()
        for k in range(0, len(rs), 20):
            pub.publish("itap/telemetry/DEV-0003", json.dumps(rs[k : k + 20]), qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()

    def stored() -> int:
        db = sqlite3.connect(db_path)
        try:
            return db.execute("select count(*) from readings_all where device_id = 'DEV-0003'").fetchone()[0]
        finally:
            db.close()

    first = Metrics()
    consumer, thread = _joinable_consumer(settings, first, request)
    send(readings[:100])
    assert wait(lambda: first.sample("itap_readings_processed_total") == 100)
    consumer.stop()
    # the restart refills its windows from the store: the first consumer must have committed
    # its last batch and closed its session (the same client id) before the second starts
    thread.join(30)
    assert not thread.is_alive() and stored() == 100
    again = Metrics()
    start_consumer(settings, again)
    send(readings[96:])  # 96..99 again: a device retrying after the restart
    # processed_total counts a micro-batch's accepted readings before its dropped ones are
    # counted (and dead-lettered) and before the batch goes to the store: wait until reading
    # 199 is committed, i.e. every micro-batch of this send was processed to its end
    assert wait(lambda: stored() == 200)
    assert again.sample("itap_readings_processed_total") == 100
    assert again.sample("itap_readings_rejected_total", reason="duplicate") == 4
    db = sqlite3.connect(db_path)
    try:
        # committed in the same transaction as the readings that closed them
        ends = [r[0] for r in db.execute(
            "select window_end from windows where device_id = 'DEV-0003' order by window_end")]
    finally:
        db.close()
    signals = ("rpm", "temp_c", "voltage_v", "current_a", "vibration_mm_s")
    whole = batch_windows(["DEV-0003"] * 200, [r["ts"] for r in readings], [0] * 200,
                          [[r[n] for n in signals] for r in readings], window=32, hop=4)
    assert ends == whole.end_ts.tolist()  # 43 windows, none missing after the restart, none twice


def test_stopping_under_a_flood_of_large_payloads_neither_hangs_nor_loses(settings, start_consumer, wait, request):
    """More in flight than the intake child's inbox holds: at stop the child must keep
    draining (paho has to write the last acknowledgements) and exit; the next start gets
    the rest from the session."""
    from itap_stream.adapters.broker import start_broker

    broker = start_broker("mosquitto")
    request.addfinalizer(broker.stop)
    st = settings.replace(receive_max=5000, broker_url=broker.url)
    metrics = Metrics()
    consumer = start_consumer(st, metrics)
    child = consumer.inbox._proc  # noqa: SLF001 - the test checks the process itself
    host, port = st.broker_url.removeprefix("mqtt://").split(":")
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-flood-{time.monotonic_ns()}")
    pub.max_inflight_messages_set(1000)
    pub.connect(host, int(port))
    pub.loop_start()
    t0 = time.time() - 50_000
    infos = []
    for k in range(1200):  # 1200 payloads of 40 readings (~9 KB each): about 11 MB
        batch = [_reading(f"DEV-{k % 20:04d}", t0 + (k // 20) * 40 + i) for i in range(40)]
        infos.append(pub.publish(f"itap/telemetry/DEV-{k % 20:04d}", json.dumps(batch), qos=1))
    for info in infos:
        info.wait_for_publish(30)
    pub.disconnect()
    pub.loop_stop()
    assert wait(lambda: metrics.sample("itap_readings_received_total") > 0)
    t_stop = time.monotonic()
    consumer.stop()
    # polled, not joined: the consumer's thread reaps the child, and a second waiter on the
    # same process can see it "alive" for a moment (its own waitpid finds nothing to reap)
    assert wait(lambda: not child.is_alive(), 20) and time.monotonic() - t_stop < 20
    again = Metrics()
    start_consumer(st, again)
    db = sqlite3.connect(st.db_url.removeprefix("sqlite:///"))
    try:
        assert wait(lambda: db.execute("select count(*) from readings_all").fetchone()[0] == 1200 * 40, 60), (
            broker.directory / "mosquitto.log").read_text()[-2000:]
    finally:
        db.close()


def test_qos_2_and_a_client_certificate_without_tls_are_refused():
    from itap_stream.config import Settings
    from itap_stream.errors import ConfigError

    with pytest.raises(ConfigError, match="qos must be 1"):
        Settings(qos=2)
    with pytest.raises(ConfigError, match="TLS is off"):
        Settings(tls_cert="/etc/client.crt", tls_key="/etc/client.key").broker_auth()
