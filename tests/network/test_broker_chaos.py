"""The broker's faults and features against a running consumer (issue 14, points 6 and 7).

A real mosquitto runs the shipped mosquitto/mosquitto.conf and mosquitto/acl (logins from
`itap passwd`'s code, persistence and autosave as shipped) on a free port and a temporary
folder. The consumer is the one of the ``start_consumer`` fixture, intake process and all.

* kill -9 of mosquitto mid-stream: nothing lost, nothing stored twice, and the consumer is
  back within about a second of the broker;
* a backlog the broker holds for a stopped consumer survives a kill -9 once an autosave
  has it (without ``autosave_interval`` it would be gone: mosquitto saves only at exit);
* retained telemetry and commands are neither stored, dead-lettered nor run, at the
  first start or any later one.

Every wait polls for progress (the store, the metrics, the broker's save file) with a
generous timeout; the only sleep is the length of the outage itself.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from bench.chaos import SeqPublisher, check_sequences, reading, stored_count
from itap_stream.adapters.broker import BrokerHandle, start_broker
from itap_stream.adapters.metrics import Metrics
from itap_stream.adapters.mqtt import BrokerAuth, connect_client
from itap_stream.app.passwd import update_password_file

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
)

pytestmark = [pytest.mark.network, pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")]

PASSWORD = "chaos-test-password"  # the test broker listens on 127.0.0.1 only
DEVICES = [f"DEV-{i:04d}" for i in range(1, 11)]
PER_DEVICE = 300  # 3000 readings
RATE = 500.0  # messages a second: 6 s of publishing
OUTAGE_S = 3.0  # long enough that a 1-2-4 s backoff would reconnect 4 s after the broker is back


@pytest.fixture()
def shipped(tmp_path) -> BrokerHandle:
    """mosquitto with the shipped config and ACL; the consumer's two accounts and a gateway."""
    passwd = tmp_path / "passwd"
    update_password_file(passwd, dict.fromkeys(("itap-consumer", "itap-consumer-out", "itap-simulator"), PASSWORD))
    text = (ROOT / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    conf = (
        text.replace("listener 1883", "listener {port} {host}")
        .replace("/mosquitto/config/passwd", str(passwd))
        .replace("/mosquitto/config/acl", str(ROOT / "mosquitto" / "acl"))
        .replace("/mosquitto/data/", "{dir}/")
        .replace("log_dest stdout", "log_dest stderr")
    )
    assert "\nautosave_interval 1\n" in conf and "\npersistence true\n" in conf
    handle = start_broker(conf=conf + "user root\n")  # as root, mosquitto would drop to a user that cannot read passwd
    yield handle
    handle.stop()


def _consumer_settings(settings: Any, broker: BrokerHandle) -> Any:
    return settings.replace(broker_url=broker.url, broker_username="itap-consumer", broker_password=PASSWORD)


def _gateway() -> BrokerAuth:
    return BrokerAuth(username="itap-simulator", password=PASSWORD)


def test_kill_9_of_the_broker_mid_stream_loses_and_duplicates_nothing(shipped, settings, start_consumer, wait):
    st = _consumer_settings(settings, shipped)
    metrics = Metrics()
    start_consumer(st, metrics)
    db = Path(st.db_url.removeprefix("sqlite:///"))
    total = len(DEVICES) * PER_DEVICE
    pub = SeqPublisher(shipped.url, DEVICES, PER_DEVICE, rate=RATE, auth=_gateway()).start()
    try:
        assert wait(lambda: stored_count(db) >= total // 4, 60)
        # saved while running: a kill -9 leaves the last autosave, not nothing
        assert wait(lambda: (shipped.directory / "mosquitto.db").exists(), 10)
        reconnects = metrics.sample("itap_mqtt_reconnects_total")
        shipped.kill()
        sent_at_kill = pub.sent
        time.sleep(OUTAGE_S)  # the outage itself
        shipped.start()
        back = time.monotonic()
        assert wait(lambda: metrics.sample("itap_mqtt_reconnects_total") > reconnects, 30)
        resubscribed_s = time.monotonic() - back
        pub.finish()
        wait(lambda: stored_count(db) >= total, 120)
    finally:
        pub.close()
    counts = check_sequences(db, DEVICES, PER_DEVICE)
    assert sent_at_kill < total, "the broker was killed after the last reading: not mid-stream"
    assert (counts["lost"], counts["duplicated"], counts["stored"]) == (0, 0, total), counts
    # at least once: any dead letter is a copy of a stored reading (a publisher resending
    # what the dead broker had taken without its acknowledgement getting out)
    assert counts["dead_lettered"] == counts["dead_copies"], counts
    # the first attempts come every 0.25 s (mqtt.FAST_RECONNECT_DELAY_S): back within about
    # a second of the broker (measured 0.1-0.3 s), where paho's 1-2-4 s backoff took 4 s
    assert resubscribed_s < 1.5, resubscribed_s


def test_a_backlog_held_for_a_stopped_consumer_survives_kill_9_once_autosaved(
    shipped, settings, start_consumer, wait
):
    st = _consumer_settings(settings, shipped)
    first = start_consumer(st)
    first.stop()  # its session (subscription, QoS 1 queue) stays on the broker
    assert wait(lambda: first._finished.is_set())  # noqa: SLF001 - `run` has returned
    db = Path(st.db_url.removeprefix("sqlite:///"))
    assert stored_count(db) == 0
    pub = SeqPublisher(shipped.url, DEVICES, 100, rate=5000.0, auth=_gateway()).start()
    pub.finish()  # every reading acknowledged by the broker: queued in the consumer's session
    pub.close()
    save = shipped.directory / "mosquitto.db"

    def saved_at() -> int | None:
        return save.stat().st_mtime_ns if save.exists() else None

    saves = [saved_at()]
    # the second save to finish from now began after the first, so after the last reading came in
    assert wait(lambda: saves.append(saved_at()) or len(set(saves)) >= 3, 15), "no autosave"
    shipped.kill()
    shipped.start()
    start_consumer(st)
    wait(lambda: stored_count(db) >= len(DEVICES) * 100, 60)
    counts = check_sequences(db, DEVICES, 100)
    assert (counts["lost"], counts["duplicated"], counts["dead_lettered"]) == (0, 0, 0), counts


@pytest.mark.parametrize("mqtt_version", [5, 4])
def test_retained_telemetry_and_commands_are_ignored_at_every_start(
    broker, settings, start_consumer, wait, mqtt_version
):
    """MQTT 5: the consumer subscribes with Retain Handling 2, so the broker sends no retained
    copy; MQTT 3.1.1 sends them at every subscribe, and the link acknowledges and drops them."""
    prefix = f"t{time.monotonic_ns()}"  # topics of this test only: the session broker keeps retained messages
    st = settings.replace(topic_prefix=prefix, mqtt_version=mqtt_version)
    telemetry, command = f"{prefix}/telemetry/DEV-0001", f"{prefix}/commands/probe"
    now = time.time()
    answers: list[str] = []
    ready = threading.Event()

    def setup(c: paho.Client) -> None:
        c.on_connect = lambda cl, *_a: cl.subscribe(f"{prefix}/status/commands", qos=1)
        c.on_subscribe = lambda *_a: ready.set()
        c.on_message = lambda _c, _u, m: answers.append(json.loads(m.payload).get("request_id"))

    watcher = connect_client(broker.url, f"t-answers-{prefix}", setup=setup)
    pub = connect_client(broker.url, f"t-retain-{prefix}")

    def send(topic: str, body: dict[str, Any], *, retain: bool = False) -> None:
        pub.publish(topic, json.dumps(body), qos=1, retain=retain).wait_for_publish(5)

    try:
        assert ready.wait(10)
        send(telemetry, reading("DEV-0001", 0, now - 10), retain=True)
        send(command, {"request_id": "retained"}, retain=True)
        for start, (seq, ts) in enumerate([(1, now - 5), (2, now - 3)], start=1):
            consumer = start_consumer(st)
            send(telemetry, reading("DEV-0001", seq, ts))
            send(command, {"request_id": f"live {start}"})
            assert wait(lambda: consumer.store.count("readings", seq=seq) == 1 and f"live {start}" in answers)  # noqa: B023
            assert consumer.store.count("readings", seq=0) == 0  # the retained reading: not stored ...
            assert consumer.store.count("deadletters") == 0  # ... nor a `duplicate` dead letter
            assert answers == [f"live {i}" for i in range(1, start + 1)]  # the retained command did not run
            if mqtt_version == 4:  # the broker sent both retained copies again; dropped, counted
                assert wait(lambda: consumer.inbox.retained_ignored == 2)  # noqa: B023
                assert wait(lambda: consumer.metrics.sample("itap_mqtt_retained_ignored_total") == 2)  # noqa: B023
            else:
                assert consumer.inbox.retained_ignored == 0
            consumer.stop()
            assert wait(lambda: consumer._finished.is_set())  # noqa: B023, SLF001 - `run` has returned
    finally:
        for topic in (telemetry, command):  # an empty retained message removes the retained one
            pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        for client in (pub, watcher):
            client.disconnect()
            client.loop_stop()
