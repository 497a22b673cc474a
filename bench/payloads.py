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

__all__ = ["Traffic", "render_readings", "single_messages", "array_messages"]

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
