"""Benchmark traffic: simulated readings rendered to MQTT packets up front.

Rendering is vectorised (values formatted by numpy, one string template per reading)
so a few million readings are ready in seconds; the payloads are the same JSON the
simulator publishes (`simulator.transport.publish`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.feed import encode_publish
from simulator.generator import SIGNALS, FleetSimulation

__all__ = ["Traffic", "array_messages", "render_readings", "single_messages", "sparkplug_messages"]

_STATES = ("RUN", "IDLE", "MAINT")


@dataclass
class Traffic:
    """Pre-encoded packets plus, per packet, the (device, ts) of its last reading."""

    packets: list[bytes]
    keys: list[tuple[str, float]]
    readings: int

    def joined(self) -> bytes:
        return b"".join(self.packets)


def render_readings(sim: FleetSimulation, steps: Sequence[int] | None = None) -> list[list[str]]:
    """JSON text of every reading: ``out[d][k]`` is device d at the k-th chosen step."""
    steps = list(range(len(sim.ts))) if steps is None else list(steps)
    k, n_dev = len(steps), len(sim.device_ids)
    vals = sim.values[steps]  # (k, D, S)
    cols = []
    for s in range(len(SIGNALS)):
        v = vals[:, :, s].ravel()
        text = list(map(str, v.round(4).tolist()))
        for i in np.flatnonzero(np.isnan(v)).tolist():
            text[i] = "null"
        cols.append(text)
    ts = np.repeat(np.asarray([repr(float(t)) for t in sim.ts[steps]], dtype=object), n_dev).tolist()
    seq = np.repeat(np.asarray(steps), n_dev).tolist()
    devs = list(sim.device_ids) * k
    states = np.asarray(_STATES, dtype=object)[sim.states[steps]].ravel().tolist()
    labels = ["null" if x is None else json.dumps(x) for x in sim.labels[steps].ravel().tolist()]
    fields = ",".join(f'"{n}":%s' for n in SIGNALS)
    tmpl = '{"device_id":"%s","ts":%s,"state":"%s","seq":%d,' + fields + ',"label":%s}'
    flat = [tmpl % row for row in zip(devs, ts, states, seq, *cols, labels, strict=True)]
    return [flat[d::n_dev] for d in range(n_dev)]


def single_messages(
    sim: FleetSimulation, *, qos: int, prefix: str = "itap", steps: Sequence[int] | None = None
) -> Traffic:
    """One reading per message, time-major (every device at step t, then t+1 ...)."""
    steps = list(range(len(sim.ts))) if steps is None else list(steps)
    text = render_readings(sim, steps)
    topics = [f"{prefix}/telemetry/{dev}" for dev in sim.device_ids]
    packets: list[bytes] = []
    keys: list[tuple[str, float]] = []
    pid = 0
    for k, step in enumerate(steps):
        ts = float(sim.ts[step])
        for d, dev in enumerate(sim.device_ids):
            pid = pid % 65535 + 1
            packets.append(encode_publish(topics[d], text[d][k].encode(), qos, pid))
            keys.append((dev, ts))
    return Traffic(packets, keys, len(packets))


def array_messages(
    sim: FleetSimulation, *, qos: int, per_message: int = 50, prefix: str = "itap", steps: Sequence[int] | None = None
) -> Traffic:
    """JSON arrays of ``per_message`` consecutive readings of one device, time-major."""
    steps = list(range(len(sim.ts))) if steps is None else list(steps)
    text = render_readings(sim, steps)
    packets: list[bytes] = []
    keys: list[tuple[str, float]] = []
    pid = 0
    readings = 0
    for start in range(0, len(steps), per_message):
        chunk = slice(start, min(start + per_message, len(steps)))
        last_ts = float(sim.ts[steps[chunk.stop - 1]])
        for d, dev in enumerate(sim.device_ids):
            pid = pid % 65535 + 1
            body = ("[" + ",".join(text[d][chunk]) + "]").encode()
            packets.append(encode_publish(f"{prefix}/telemetry/{dev}", body, qos, pid))
            keys.append((dev, last_ts))
            readings += chunk.stop - chunk.start
    return Traffic(packets, keys, readings)


def sparkplug_messages(
    sim: FleetSimulation, *, qos: int, per_message: int = 1, group: str = "bench", edge: str = "edge1",
    steps: Sequence[int] | None = None,
) -> Traffic:
    """The fleet as one Sparkplug B edge node: NBIRTH, a DBIRTH per device, then time-major
    DDATA messages by alias, each with ``per_message`` consecutive readings of one device
    (every metric stamped with its reading's time), ``seq`` counting 0..255."""
    from itap_stream.core import sparkplug_b_pb2 as pb
    from itap_stream.core.sparkplug import birth_payload

    steps = list(range(len(sim.ts))) if steps is None else list(steps)
    packets: list[bytes] = []
    keys: list[tuple[str, float]] = []
    pid = 0
    seq = 0

    def add(topic: str, body: bytes) -> None:
        nonlocal pid, seq
        pid = pid % 65535 + 1
        seq = (seq + 1) % 256
        packets.append(encode_publish(topic, body, qos, pid))

    t0 = round(float(sim.ts[steps[0]]) * 1000)
    add(f"spBv1.0/{group}/NBIRTH/{edge}", birth_payload([], seq=0, bdseq=0, ts_ms=t0))
    first = sim.values[steps[0]]
    for d, dev in enumerate(sim.device_ids):
        metrics = [(name, i + 1, None if np.isnan(first[d, i]) else float(first[d, i]))
                   for i, name in enumerate(SIGNALS)]
        metrics.append(("state", len(SIGNALS) + 1, "RUN"))
        add(f"spBv1.0/{group}/DBIRTH/{edge}/{dev}", birth_payload(metrics, seq=seq, ts_ms=t0))
    state_alias = len(SIGNALS) + 1
    readings = 0
    vals = sim.values.round(4)
    for start in range(0, len(steps), per_message):
        chunk = steps[start : start + per_message]
        for d, dev in enumerate(sim.device_ids):
            p = pb.Payload(timestamp=round(float(sim.ts[chunk[-1]]) * 1000), seq=seq)
            for step in chunk:
                ts = round(float(sim.ts[step]) * 1000)
                for i in range(len(SIGNALS)):
                    v = vals[step, d, i]
                    if np.isnan(v):
                        p.metrics.add(alias=i + 1, timestamp=ts, is_null=True)
                    else:
                        p.metrics.add(alias=i + 1, timestamp=ts, double_value=float(v))
                p.metrics.add(alias=state_alias, timestamp=ts, string_value=_STATES[int(sim.states[step, d])])
            add(f"spBv1.0/{group}/DDATA/{edge}/{dev}", p.SerializeToString())
            keys.append((dev, float(sim.ts[chunk[-1]])))
            readings += len(chunk)
    return Traffic(packets, keys, readings)
