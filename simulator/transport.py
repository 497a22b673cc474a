"""Where simulated telemetry goes: an MQTT broker (real time or accelerated) or a CSV file."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho

from itap_stream.adapters.mqtt import BrokerAuth, connect_client
from simulator.generator import FleetSimulation

__all__ = ["publish", "write_csv"]

log = logging.getLogger(__name__)


def publish(
    sim: FleetSimulation,
    url: str,
    *,
    topic_prefix: str = "itap",
    speed: float = 1.0,
    qos: int = 1,
    client_id: str = "itap-simulator",
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    auth: BrokerAuth | None = None,
) -> int:
    """Publish every reading to ``{prefix}/telemetry/{device_id}``, one message each.

    ``speed`` accelerates event time (60 = one simulated minute per second; 0 = as fast
    as possible). ``auth``: credentials and TLS (a gateway account such as ``itap-simulator``
    that may write every device's telemetry). Returns the number of readings published, all
    acknowledged for QoS 1.
    """

    def limits(c: paho.Client) -> None:
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(200)

    client = connect_client(url, client_id, setup=limits, what="simulator", auth=auth)
    steps = len(sim.ts)
    interval = float(sim.ts[1] - sim.ts[0]) if steps > 1 else 1.0
    t0 = time.monotonic()
    sent = 0
    last: paho.MQTTMessageInfo | None = None
    try:
        for step in range(steps):
            if stop is not None and stop.is_set():
                break
            if speed > 0:
                due = t0 + step * interval / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            for reading in sim.step_readings(step):
                last = client.publish(
                    f"{topic_prefix}/telemetry/{reading['device_id']}", json.dumps(reading), qos=qos
                )
                sent += 1
            if progress is not None:
                progress(step + 1, steps)
        if last is not None and qos > 0:
            deadline = time.monotonic() + 30
            while client.want_write() or (not last.is_published() and time.monotonic() < deadline):
                time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()
    return sent


def write_csv(sim: FleetSimulation, path: str) -> int:
    """Write the simulation as a readings CSV; returns the number of rows."""
    from itap_stream.adapters.csvio import write_readings

    frame = sim.to_frame()
    write_readings(frame, path)
    return len(frame)
