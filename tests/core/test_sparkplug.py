"""Sparkplug B in, without a broker: births, aliases, seq, deaths, rebirth requests, bad input."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from itap_stream.core import sparkplug_b_pb2 as pb
from itap_stream.core.health import HealthSettings, SensorHealth
from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Reading, decode
from itap_stream.core.schema import SensorSchema
from itap_stream.core.sparkplug import (
    SparkplugHost,
    birth_payload,
    data_payload,
    death_payload,
    is_rebirth_request,
    rebirth_request,
)
from simulator import Fault, simulate
from simulator.transport import EdgeNode

T0 = 1_767_225_600_000  # 2026-01-01 in ms
SCHEMA = SensorSchema.from_dict({"signals": [
    {"name": "rpm", "family": "RPM", "min": 0, "max": 6000},
    {"name": "temp_c", "family": "Temperature", "min": -40, "max": 250, "sparkplug_metric": "Motor/Temperature"},
]})


def _born(host: SparkplugHost, *, bdseq: int = 1, devices: tuple[str, ...] = ("D1",)) -> int:
    """NBIRTH (seq 0) and one DBIRTH per device; returns the next seq."""
    r = host.handle("spBv1.0/G/NBIRTH/E", birth_payload([], seq=0, bdseq=bdseq, ts_ms=T0), now=0.0)
    assert not r.rejections
    seq = 1
    for d in devices:
        metrics = [("rpm", 1, 1000.0), ("Motor/Temperature", 2, 40.0), ("state", 3, "RUN"), ("tag", 4, "")]
        r = host.handle(f"spBv1.0/G/DBIRTH/E/{d}", birth_payload(metrics, seq=seq, ts_ms=T0), now=0.0)
        assert not r.rejections and not r.readings  # a birth defines metrics; it is no reading
        seq += 1
    return seq


def test_the_generated_module_matches_the_specification_proto(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    src = Path(pb.__file__).with_name("sparkplug_b.proto")
    out = tmp_path / "set.pb"
    assert grpc_tools.main(["protoc", f"-I{src.parent}", f"--descriptor_set_out={out}", str(src)]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]

    def no_json_names(messages):  # protoc adds them to a descriptor set, not to the generated module
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            no_json_names(m.nested_type)

    no_json_names(fresh.message_type)
    shipped = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh == shipped
    # field numbers the wire depends on (Sparkplug 3.0, chapter 6)
    metric = pb.Payload.Metric.DESCRIPTOR.fields_by_name
    assert (metric["alias"].number, metric["timestamp"].number, metric["double_value"].number) == (2, 3, 13)
    assert pb.Payload.DESCRIPTOR.fields_by_name["seq"].number == 3


def test_data_by_alias_and_by_name_become_readings_with_their_timestamps():
    host = SparkplugHost(SCHEMA)
    seq = _born(host)
    r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, 1500.0), (2, 55.5), (3, "IDLE")], seq=seq,
                                                        ts_ms=T0 + 1000), now=0.0)
    assert not r.rejections and not r.rebirth
    assert r.readings == [Reading("G:E:D1", (T0 + 1000) / 1000, "IDLE", (1500.0, 55.5))]
    r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([("Motor/Temperature", 56.0)], seq=seq + 1,
                                                        ts_ms=T0 + 2000), now=0.0)
    # report by exception: rpm and the state kept their last values
    assert r.readings == [Reading("G:E:D1", (T0 + 2000) / 1000, "IDLE", (1500.0, 56.0))]


def test_one_ddata_with_many_timestamps_gives_one_reading_per_timestamp_in_order():
    host = SparkplugHost(SCHEMA)
    seq = _born(host)
    p = pb.Payload(timestamp=T0 + 9000, seq=seq)
    for k in (3, 1, 2):  # out of order inside the message
        p.metrics.add(alias=1, timestamp=T0 + k * 1000, datatype=pb.Double, double_value=1000.0 + k)
        p.metrics.add(alias=2, timestamp=T0 + k * 1000, datatype=pb.Double, double_value=40.0 + k)
    p.metrics.add(alias=2, datatype=pb.Double, is_null=True)  # no timestamp: the payload's; null = dropout
    r = host.handle("spBv1.0/G/DDATA/E/D1", p.SerializeToString(), now=0.0)
    assert not r.rejections
    assert [x.ts for x in r.readings] == [(T0 + k * 1000) / 1000 for k in (1, 2, 3, 9)]
    assert [x.values[0] for x in r.readings] == [1001.0, 1002.0, 1003.0, 1003.0]
    assert r.readings[-1].values[1] != r.readings[-1].values[1]  # NaN


def test_signed_integers_travel_in_twos_complement():
    schema = SensorSchema.from_dict({"signals": [{"name": "t", "family": "Temperature"},
                                                 {"name": "c", "family": "Current"}]})
    host = SparkplugHost(schema)
    host.handle("spBv1.0/G/NBIRTH/E", birth_payload([], seq=0, bdseq=0, ts_ms=T0), now=0.0)
    p = pb.Payload(timestamp=T0, seq=1)
    p.metrics.add(name="t", alias=1, datatype=pb.Int16, int_value=3)
    p.metrics.add(name="c", alias=2, datatype=pb.Int64, long_value=4)
    assert not host.handle("spBv1.0/G/DBIRTH/E/D", p.SerializeToString(), now=0.0).rejections
    p = pb.Payload(timestamp=T0 + 1000, seq=2)
    p.metrics.add(alias=1, int_value=(-5) & 0xFFFFFFFF)
    p.metrics.add(alias=2, long_value=(-7) & 0xFFFFFFFFFFFFFFFF)
    r = host.handle("spBv1.0/G/DDATA/E/D", p.SerializeToString(), now=0.0)
    assert r.readings[0].values == (-5.0, -7.0)


def test_seq_wraps_at_255_without_a_rebirth_request():
    host = SparkplugHost(SCHEMA)
    seq = _born(host)
    seen = []
    for k in range(600):
        r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, float(k))], seq=(seq + k) % 256,
                                                            ts_ms=T0 + 1000 * (k + 1)), now=float(k))
        assert not r.rebirth and not r.rejections, k
        seen.extend(x.values[0] for x in r.readings)
    assert seen == [float(k) for k in range(600)]
    assert host.rebirths_requested == 0


def test_a_seq_gap_asks_the_node_for_a_rebirth_paced_and_keeps_the_data():
    host = SparkplugHost(SCHEMA, rebirth_interval_s=10.0)
    seq = _born(host)
    r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, 1.0)], seq=seq + 3, ts_ms=T0 + 1000), now=100.0)
    assert r.rebirth == [("G", "E")] and len(r.readings) == 1  # the data itself is good
    r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, 2.0)], seq=seq + 9, ts_ms=T0 + 2000), now=105.0)
    assert r.rebirth == []  # asked 5 s ago: not again yet
    r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, 3.0)], seq=seq + 20, ts_ms=T0 + 3000), now=111.0)
    assert r.rebirth == [("G", "E")]
    # the rebirth: NBIRTH starts the count again, no request for it
    assert not host.handle("spBv1.0/G/NBIRTH/E", birth_payload([], seq=0, bdseq=2, ts_ms=T0), now=112.0).rebirth
    assert is_rebirth_request(rebirth_request(T0)) and not is_rebirth_request(b"\x00garbage")


def test_deaths_put_devices_offline_at_once_and_a_stale_will_is_ignored():
    host = SparkplugHost(SCHEMA)
    seq = _born(host, bdseq=4, devices=("D1", "D2", "D3"))
    r = host.handle("spBv1.0/G/DDEATH/E/D3", data_payload([], seq=seq, ts_ms=T0), now=0.0)
    assert r.offline == [("G:E:D3", "DDEATH from G/E/D3")]
    assert host.handle("spBv1.0/G/NDEATH/E", death_payload(3, T0), now=0.0).offline == []  # an older session's
    r = host.handle("spBv1.0/G/NDEATH/E", death_payload(4, T0), now=0.0)
    assert sorted(d for d, _why in r.offline) == ["G:E:D1", "G:E:D2"]
    assert "NDEATH" in r.offline[0][1]
    # after its death the node's data is data before a birth
    r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, 1.0)], seq=seq + 1, ts_ms=T0), now=0.0)
    assert [x.reason for x in r.rejections] == ["sparkplug_no_birth"] and r.rebirth == [("G", "E")]


def test_an_offline_alert_fires_at_once_and_resolves_on_the_next_reading():
    health = SensorHealth(("rpm",), HealthSettings(stale_after_s=300))
    health.seen(["G:E:D1"], now=10.0)
    alert = health.offline("G:E:D1", 12.0, "DDEATH from G/E/D1")
    assert alert is not None and (alert.rule, alert.status) == ("device_offline", "firing")
    assert health.offline("G:E:D1", 13.0, "again") is None  # one alert per outage
    assert health.check_stale(now=1000.0) == []  # not also stale
    [resolved] = health.seen(["G:E:D1"], now=20.0)
    assert (resolved.id, resolved.status) == (alert.id, "resolved")


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("spBv1.0/G/DDATA/E/D1", b"\xff\xff\xff\xff", "invalid_protobuf"),
        ("spBv1.0/G/DDATA/E/D1", data_payload([(99, 1.0)], seq=3, ts_ms=T0 + 1000), "sparkplug_unknown_alias"),
        ("spBv1.0/G/DDATA/E/D9", data_payload([(1, 1.0)], seq=3, ts_ms=T0 + 1000), "sparkplug_no_birth"),
        ("spBv1.0/G/DDATA/E/D1", data_payload([(1, "fast")], seq=3, ts_ms=T0 + 1000), "wrong_type"),
        ("spBv1.0/G/DDATA/E/D1", data_payload([(1, True)], seq=3, ts_ms=T0 + 1000), "wrong_type"),
        ("spBv1.0/G/DDATA/E/D1", data_payload([(1, 99999.0)], seq=3, ts_ms=T0 + 1000), "out_of_range"),
        ("spBv1.0/G/DDATA/E/D1", data_payload([(3, "RUNNING")], seq=3, ts_ms=T0 + 1000), "unknown_state"),
        ("spBv1.0/G/DDATA/E/D1", data_payload([(1, 1.0)], seq=3, ts_ms=5), "bad_ts"),
        ("spBv1.0/G/DDATA/E/D1", pb.Payload(uuid="SPBV1.0_COMPRESSED", body=b"x", seq=3).SerializeToString(),
         "invalid_protobuf"),
        ("spBv1.0/G/XDATA/E/D1", b"", "sparkplug_topic"),
        ("spBv1.0/G/DDATA/E", b"", "sparkplug_topic"),
        ("spBv1.0/G//E/D1", b"", "sparkplug_topic"),
    ],
)
def test_bad_sparkplug_input_is_refused_with_a_reason(topic, payload, reason):
    host = SparkplugHost(SCHEMA)
    _born(host)
    r = host.handle(topic, payload, now=0.0)
    assert [x.reason for x in r.rejections] == [reason]
    assert r.readings == []
    assert r.rejections[0].detail


def test_a_birth_declaring_a_signal_as_text_is_refused_for_that_signal():
    host = SparkplugHost(SCHEMA)
    host.handle("spBv1.0/G/NBIRTH/E", birth_payload([], seq=0, bdseq=0, ts_ms=T0), now=0.0)
    r = host.handle("spBv1.0/G/DBIRTH/E/D1", birth_payload([("rpm", 1, "fast"), ("Motor/Temperature", 2, 40.0)],
                                                           seq=1, ts_ms=T0), now=0.0)
    assert [x.reason for x in r.rejections] == ["wrong_type"] and "rpm" in r.rejections[0].detail
    r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(2, 41.0)], seq=2, ts_ms=T0 + 1000), now=0.0)
    assert len(r.readings) == 1 and math.isnan(r.readings[0].values[0])


def test_a_node_reporting_signals_itself_is_a_device():
    host = SparkplugHost(SCHEMA, node_id="{edge}")
    r = host.handle("spBv1.0/G/NBIRTH/E7", birth_payload([("rpm", 1, 900.0)], seq=0, bdseq=0, ts_ms=T0), now=0.0)
    assert not r.rejections
    r = host.handle("spBv1.0/G/NDATA/E7", data_payload([(1, 950.0)], seq=1, ts_ms=T0 + 1000), now=0.0)
    assert [(x.device_id, x.values[0]) for x in r.readings] == [("E7", 950.0)]


def test_births_beyond_max_devices_are_refused_and_unknown_nodes_do_not_grow_memory():
    host = SparkplugHost(SCHEMA, max_devices=3, rebirth_interval_s=5.0)
    _born(host, devices=("D1", "D2"))  # the node and two devices: 3 tracked
    r = host.handle("spBv1.0/G/DBIRTH/E/D3", birth_payload([("rpm", 1, 1.0)], seq=3, ts_ms=T0), now=0.0)
    assert [x.reason for x in r.rejections] == ["too_many_devices"]
    assert host.handle("spBv1.0/G/DDEATH/E/D2", data_payload([], seq=4, ts_ms=T0), now=0.0).offline
    r = host.handle("spBv1.0/G/DBIRTH/E/D3", birth_payload([("rpm", 1, 1.0)], seq=5, ts_ms=T0), now=0.0)
    assert not r.rejections  # D2's death made room
    for k in range(50):  # data of nodes that never birthed: refused, at most max_devices paced requests held
        host.handle(f"spBv1.0/G/DDATA/X{k}/D", data_payload([(1, 1.0)], seq=0, ts_ms=T0), now=float(k))
    assert len(host._asked) <= 3  # noqa: SLF001


def test_host_and_command_topics_are_not_data():
    host = SparkplugHost(SCHEMA)
    for topic in ("spBv1.0/STATE/itap-1", "spBv1.0/G/NCMD/E", "spBv1.0/G/DCMD/E/D1"):
        r = host.handle(topic, b'{"online":true}', now=0.0)
        assert (r.readings, r.rejections, r.rebirth) == ([], [], [])


def test_fuzzed_payloads_end_as_readings_or_rejections():
    rnd = random.Random(7)
    host = SparkplugHost(SCHEMA)
    seq = _born(host)
    good = data_payload([(1, 1000.0), (2, 41.0), (3, "RUN")], seq=seq, ts_ms=T0 + 1000)
    kinds = ["DDATA", "DBIRTH", "NBIRTH", "NDATA", "NDEATH", "DDEATH"]
    for k in range(3000):
        raw = bytearray(good)
        for _ in range(rnd.randint(1, 6)):
            op = rnd.random()
            if op < 0.5 and raw:
                raw[rnd.randrange(len(raw))] = rnd.randrange(256)
            elif op < 0.75:
                raw.insert(rnd.randrange(len(raw) + 1), rnd.randrange(256))
            elif raw:
                del raw[rnd.randrange(len(raw))]
        if k % 10 == 0:
            raw = bytearray(rnd.randbytes(rnd.randint(0, 64)))
        kind = rnd.choice(kinds)
        topic = f"spBv1.0/G/{kind}/E" + ("/D1" if kind[0] == "D" else "")
        r = host.handle(topic, bytes(raw), now=float(k))
        for x in r.readings:
            assert isinstance(x, Reading) and len(x.values) == 2
        for x in r.rejections:
            assert x.reason and x.detail


def _json_readings(sim):
    import orjson

    out = []
    for reading in sim.iter_readings():
        good, bad = decode(orjson.dumps(reading), SIM_SCHEMA, str(reading["device_id"]))
        assert not bad
        out.extend(good)
    return out


class _Recorder:
    """What a broker would carry: the edge node's publications, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, qos=0):
        self.sent.append((topic, payload))


def _sparkplug_readings(sim, host):
    node = EdgeNode("plant", "line1", SIM_SCHEMA)
    rec = _Recorder()
    for step in range(len(sim.ts)):
        node.publish_step(rec, sim.step_readings(step))
    out = []
    for topic, payload in rec.sent:
        r = host.handle(topic, payload, now=0.0)
        assert not r.rejections and not r.rebirth, topic
        out.extend(r.readings)
    return out


SIM_SCHEMA = SensorSchema.from_dict({"signals": [
    {"name": "rpm", "family": "RPM", "min": 0, "max": 6000},
    {"name": "temp_c", "family": "Temperature", "min": -40, "max": 250},
    {"name": "voltage_v", "family": "Voltage", "min": 0, "max": 600},
    {"name": "current_a", "family": "Current", "min": 0, "max": 500},
    {"name": "vibration_mm_s", "family": "Vibration", "min": 0, "max": 100},
]})


def test_the_same_readings_through_json_and_sparkplug_give_identical_windows_and_scores(trained, default_rules):
    from itap_stream.core.rules import RuleEngine

    sim = simulate(3, 900, seed=5, faults=[Fault("sensor_dropout", "DEV-0002", 200, 500, signal="rpm", rate=0.3),
                                           Fault("overheat", "DEV-0003", 300, 600)])
    via_json = _json_readings(sim)
    via_spb = _sparkplug_readings(sim, SparkplugHost(SIM_SCHEMA, device_id="{device}"))
    # the same readings (labels and seq stay JSON's: Sparkplug carries neither)
    assert [(r.device_id, r.ts, r.state, r.tag) for r in via_spb] == [(r.device_id, r.ts, r.state, r.tag)
                                                                      for r in via_json]
    assert np.array_equal(np.array([r.values for r in via_spb]), np.array([r.values for r in via_json]),
                          equal_nan=True)
    results = []
    for readings in (via_json, via_spb):
        proc = Processor(SIM_SCHEMA, trained, RuleEngine(default_rules[0]), window=32, hop=4)
        res = proc.process(readings)
        results.append(res)
    a, b = results
    assert a.n_windows == b.n_windows > 0
    assert a.windows.device_ids == b.windows.device_ids
    np.testing.assert_array_equal(a.windows.end_ts, b.windows.end_ts)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.is_anomaly, b.is_anomaly)
    assert a.is_anomaly.any()
