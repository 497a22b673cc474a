"""Issue 17: scale-out on NATS JetStream, proven on this machine.

A 3-node nats-server cluster (JetStream, stream replicas 3, an MQTT listener on each node)
on free loopback ports, 1-2 ``itap run --source nats`` processes and a fresh PostgreSQL
database per run (`bench.cluster`). The devices publish MQTT to node 0; the same readings
(simulated, with faults, so alerts fire) go through every run of this module, and the
single consumer's windows, scores and alerts are the reference the others must equal.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import pytest

from bench.cluster import NatsCluster, fault_payloads, nats_server, postgres_reachable, run_cluster
from itap_stream.adapters.jetstream import partition_of

pytestmark = [
    pytest.mark.skipif(nats_server() is None, reason="nats-server is not installed (.ci/run installs it)"),
    pytest.mark.skipif(not postgres_reachable(), reason="no PostgreSQL at ITAP_TEST_PG (the cluster's shared store)"),
]

TAKEOVER_AFTER = 10.0  # the default
DEVICES, SECONDS, RATE = 6, 400, 300.0


@pytest.fixture(scope="module")
def data():
    return fault_payloads(DEVICES, SECONDS)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster")


def _run(name, model_file, data, work, **kw):
    ids, payloads = data
    return run_cluster(name, model_file, work / f"{name.replace(' ', '_')}-{uuid.uuid4().hex[:6]}",
                       payloads=payloads, device_ids=ids, seconds=SECONDS, rate=RATE,
                       takeover_after=TAKEOVER_AFTER, **kw)


@pytest.fixture(scope="module")
def reference(model_file, data, work):
    """One consumer alone on the cluster: what every device's results must be."""
    run = _run("single", model_file, data, work)
    assert (run.lost, run.duplicated, run.dead_lettered) == (0, 0, 0), run.logs
    assert run.alerts, "the faults raise alerts"
    return run


def _intact(run, copies_allowed=False):
    """Every reading stored once. ``copies_allowed``: a device whose server went away sends
    again what it had not seen acknowledged (MQTT QoS 1); such a copy of a stored reading may
    become a ``duplicate`` dead letter, nothing else may."""
    assert run.stored == run.distinct == run.sent == DEVICES * SECONDS, (run.notes, run.logs)
    assert (run.lost, run.duplicated) == (0, 0), (run.notes, run.logs)
    if copies_allowed:
        assert run.dead_lettered == run.dead_copies and set(run.dead_reasons) <= {"duplicate"}, run
    else:
        assert run.dead_lettered == 0, (run.dead_reasons, run.logs)


def test_the_servers_mapping_puts_each_device_where_partition_of_says(tmp_path):
    cluster = NatsCluster(tmp_path).start()
    try:
        import nats

        async def probe():
            nc = await nats.connect(cluster.urls.split(","))
            got = {}
            done = asyncio.Event()

            async def cb(msg):
                _prefix, _part, p, device = msg.subject.split(".", 3)
                got[device] = int(p)
                if len(got) == 200:
                    done.set()

            await nc.subscribe("itap.part.>", cb=cb)
            await nc.flush()
            for i in range(200):
                await nc.publish(f"itap.telemetry.DEV-{i:05d}", b"{}")
            await asyncio.wait_for(done.wait(), 10)
            await nc.close()
            return got

        got = asyncio.run(probe())
    finally:
        cluster.stop()
    assert got == {d: partition_of(d, cluster.partitions) for d in got}
    assert len(set(got.values())) == cluster.partitions  # every partition used


def test_two_consumers_give_every_device_the_results_of_one(model_file, data, work, reference):
    def operator(cluster, procs, db_url):
        # `itap ack` / `itap silence` over MQTT to node 2, unchanged: exactly one consumer answers
        from itap_stream.app.commands import send_command
        from itap_stream.config import PACKAGE_CONFIGS, load

        replies = []
        seen = threading.Event()
        import paho.mqtt.client as paho

        host, port = cluster.mqtt_url(2).removeprefix("mqtt://").split(":")
        watcher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:6]}",
                              protocol=paho.MQTTv311)
        watcher.on_connect = lambda c, *_a: c.subscribe("itap/status/commands", qos=1)
        watcher.on_subscribe = lambda *_a: seen.set()
        watcher.on_message = lambda _c, _u, m: replies.append(json.loads(m.payload))
        watcher.connect(host, int(port))
        watcher.loop_start()
        assert seen.wait(10)
        settings = load(PACKAGE_CONFIGS / "itap.yaml", environ={}, broker_url=cluster.mqtt_url(2))
        from bench.cluster import stored_rows

        open_ids = [r[0] for r in stored_rows(db_url, "SELECT DISTINCT alert_id FROM alerts WHERE status = 'firing'")]
        answers = {"ack": send_command(settings, "ack", {"alert_id": open_ids[0][:8], "note": "seen", "by": "op"}),
                   "ack_unknown": send_command(settings, "ack", {"alert_id": "feedfacecafe"}),
                   "silence": send_command(settings, "silence", {"action": "add", "device": "DEV-0001",
                                                                 "duration": "1h", "comment": "test"})}
        listed = [send_command(settings, "silence", {"action": "list"}) for _ in range(1)]
        watcher.loop_stop()
        watcher.disconnect()
        return {"answers": answers, "replies": len(replies), "listed": listed}

    run = _run("clean", model_file, data, work, after=operator)
    _intact(run)
    assert run.windows == reference.windows
    assert run.alerts[: len(reference.alerts)] == reference.alerts or _same_anomaly_alerts(run, reference)
    answers = run.notes["answers"]
    assert answers["ack"]["ok"], answers
    assert not answers["ack_unknown"]["ok"] and "no open" in answers["ack_unknown"]["reason"], answers
    assert answers["silence"]["ok"], answers
    # one answer per command although two consumers received each
    assert run.notes["replies"] == 4, run.notes
    # every consumer applied the silence under the same id
    assert run.notes["listed"][0]["silences"][0]["id"] == answers["silence"]["silence"]["id"]
    # MQTT subscribers of the servers received every alert the consumers published
    assert run.notes["alerts_received"] >= len(reference.alerts), run.notes


def _same_anomaly_alerts(run, reference):
    """The alerts of the scored windows equal (the operator's ack adds an acknowledged transition)."""
    return [a for a in run.alerts if a[2] != "acknowledged"] == reference.alerts


def test_kill_9_of_a_consumer_moves_its_partitions_and_loses_nothing(model_file, data, work, reference):
    run = _run("consumer kill -9", model_file, data, work)
    _intact(run)
    assert run.notes["sent_at_kill"] < run.sent, run.notes  # killed mid-stream
    assert run.notes["takeover_s"] <= 15.0, run.notes  # issue 17: within takeover_after, at most 15 s
    # the survivor restored the dead consumer's devices from the store: results as if nothing happened
    assert run.windows == reference.windows
    assert run.alerts == reference.alerts


def test_a_consumer_stopped_with_sigterm_hands_its_partitions_over_at_once(model_file, data, work, reference):
    run = _run("consumer SIGTERM", model_file, data, work)
    _intact(run)
    # its leases were released on the way out: the survivor did not wait for them to expire
    assert run.notes["takeover_s"] < TAKEOVER_AFTER, run.notes
    assert run.windows == reference.windows
    assert run.alerts == reference.alerts


def test_kill_9_of_a_server_node_loses_and_duplicates_nothing(model_file, data, work, reference):
    # a node holding a replica of the stream (and maybe leading consumers, leases or MQTT
    # sessions, which elect new leaders on the two nodes left); the devices publish to another
    run = _run("node kill -9", model_file, data, work, kill="follower")
    _intact(run, copies_allowed=True)
    assert "replica" in run.notes["killed_node"] and run.notes["sent_at_kill"] < run.sent, run.notes
    assert run.windows == reference.windows
    assert run.alerts == reference.alerts


def test_kill_9_of_the_stream_leader_loses_only_what_the_server_dropped_and_reports_it(model_file, data, work):
    """nats-server acknowledges an MQTT QoS 1 publish before the stream stores it (a core NATS
    publish inside the server): while the stream elects a new leader, what the devices send is
    dropped by the server (nats-io/nats-server#3402; README "Scaling out"). What must hold: no
    reading stored twice, nothing dead-lettered but copies, and every lost reading reported as
    missing by its device's seq gap (``gaps`` table, ``itap_readings_gap_total``, data_gap events)."""
    # slower and earlier, so that every device publishes long after the election: a reading
    # lost at the very end of a device's stream shows only with its next one
    ids, payloads = data
    run = run_cluster("node kill -9", model_file, work / f"leader-{uuid.uuid4().hex[:6]}", payloads=payloads,
                      device_ids=ids, seconds=SECONDS, rate=100.0, takeover_after=TAKEOVER_AFTER, kill="leader",
                      kill_at=0.15)
    assert "stream leader" in run.notes["killed_node"], run.notes
    assert run.duplicated == 0 and run.stored == run.distinct, run
    assert run.dead_lettered == run.dead_copies, run.dead_reasons
    assert run.gap_missing == run.lost, (run.lost, run.gap_missing, run.notes)


def test_a_consumer_joining_mid_stream_takes_partitions_without_loss_or_duplication(model_file, data, work,
                                                                                    reference):
    run = _run("consumer joins", model_file, data, work)
    _intact(run)
    assert run.notes["released"], run.logs  # the first consumer handed partitions over
    assert run.windows == reference.windows
    assert run.alerts == reference.alerts
