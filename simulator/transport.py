"""Where simulated telemetry goes: an MQTT broker (real time or accelerated), as JSON readings
or as a Sparkplug B edge node, or a CSV file."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho

from itap_stream.adapters.mqtt import BrokerAuth, connect_client
from itap_stream.core import sparkplug as spb
from itap_stream.core.schema import SensorSchema
from simulator.generator import SIGNALS, FleetSimulation

__all__ = ["EdgeNode", "publish", "write_csv"]

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
    fmt: str = "json",
    group: str = "itap",
    edge: str = "simulator",
    schema: SensorSchema | None = None,
) -> int:
    """Publish every reading to ``{prefix}/telemetry/{device_id}``, one message each, or
    with ``fmt="sparkplug"`` as Sparkplug B edge node ``edge`` of ``group`` (`EdgeNode`).

    ``speed`` accelerates event time (60 = one simulated minute per second; 0 = as fast
    as possible). ``auth``: credentials and TLS (a gateway account such as ``itap-simulator``
    that may write every device's telemetry). Returns the number of readings published, all
    acknowledged for QoS 1.
    """

    def limits(c: paho.Client) -> None:
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(200)

    node: EdgeNode | None = None
    if fmt == "sparkplug":
        node = EdgeNode(group, edge, schema, qos=qos)
        user_limits = limits

        def limits(c: paho.Client) -> None:
            user_limits(c)
            node.setup(c)

    elif fmt != "json":
        msg = f"format must be json or sparkplug, got {fmt!r}"
        raise ValueError(msg)
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
            if node is not None:
                readings = sim.step_readings(step)
                last = node.publish_step(client, readings) or last
                sent += len(readings)
            else:
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
        if node is not None:
            node.die(client)  # a clean disconnect sends no will: the node says it is going
        client.disconnect()
        client.loop_stop()
    return sent


class EdgeNode:
    """The simulator as a Sparkplug B edge node: each simulated device is a Sparkplug device.

    On connect it publishes ``NBIRTH`` (``bdSeq``, ``Node Control/Rebirth``) and, as devices
    first report, their ``DBIRTH`` (every signal with an alias, the state and tag String
    metrics); each reading is a ``DDATA`` by alias, ``seq`` counting 0..255 over the node's
    messages. The MQTT will is the ``NDEATH`` with the same ``bdSeq``; a rebirth request
    (``NCMD`` ``Node Control/Rebirth``) makes it publish all births again before its next
    readings.
    """

    def __init__(self, group: str, edge: str, schema: SensorSchema | None = None, *, qos: int = 0,
                 bdseq: int = 0) -> None:
        self.group, self.edge, self.qos = group, edge, qos
        names = schema.names if schema is not None else SIGNALS
        metric = {s.name: s.sparkplug_metric or s.name for s in schema.signals} if schema is not None else {}
        self.signals = [(name, metric.get(name, name)) for name in names]
        self.state_metric = schema.sparkplug_state_metric if schema is not None else "state"
        self.tag_metric = schema.sparkplug_tag_metric if schema is not None else "tag"
        self.bdseq = bdseq
        self.seq = 0
        self.born: dict[str, dict[str, object]] = {}  # device -> its latest reading
        self.node_born = False
        self.rebirth_requested = threading.Event()

    def topic(self, kind: str, device: str | None = None) -> str:
        return "/".join((spb.NAMESPACE, self.group, kind, self.edge, *((device,) if device else ())))

    def setup(self, client: paho.Client) -> None:
        """Will and rebirth subscription; call before connecting."""
        client.will_set(self.topic("NDEATH"), spb.death_payload(self.bdseq, _ms(time.time())), qos=1)

        def on_connect(c: paho.Client, *_args: object) -> None:
            c.subscribe(self.topic("NCMD"), qos=0)

        def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
            if msg.topic == self.topic("NCMD") and spb.is_rebirth_request(bytes(msg.payload)):
                self.rebirth_requested.set()

        client.on_connect = on_connect
        client.on_message = on_message

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq = (self.seq + 1) % 256
        return seq

    def _metrics(self, reading: dict[str, object]) -> list[tuple[int, object]]:
        out: list[tuple[int, object]] = [(i + 1, reading.get(name)) for i, (name, _m) in enumerate(self.signals)]
        n = len(self.signals)
        out.append((n + 1, str(reading.get("state", "RUN"))))
        if reading.get("tag") is not None:
            out.append((n + 2, str(reading["tag"])))
        return out

    def _births(self, client: paho.Client) -> paho.MQTTMessageInfo:
        now = _ms(time.time())
        self.seq = 0
        self.node_born = True
        last = client.publish(self.topic("NBIRTH"), spb.birth_payload([], seq=self._next_seq(), ts_ms=now,
                                                                         bdseq=self.bdseq), qos=self.qos)
        for device, reading in self.born.items():
            last = self._dbirth(client, device, reading)
        return last

    def _dbirth(self, client: paho.Client, device: str, reading: dict[str, object]) -> paho.MQTTMessageInfo:
        ts = _ms(float(reading["ts"]))  # type: ignore[arg-type]
        metrics: list[tuple[str, int | None, object]] = [
            (m, i + 1, reading.get(name)) for i, (name, m) in enumerate(self.signals)]
        n = len(self.signals)
        metrics.append((self.state_metric, n + 1, str(reading.get("state", "RUN"))))
        metrics.append((self.tag_metric, n + 2, str(reading.get("tag") or "")))
        return client.publish(self.topic("DBIRTH", device), spb.birth_payload(metrics, seq=self._next_seq(),
                                                                              ts_ms=ts), qos=self.qos)

    def publish_step(self, client: paho.Client, readings: list[dict[str, object]]) -> paho.MQTTMessageInfo | None:
        """One DDATA per reading (births first where due); returns the last publication."""
        last = None
        if not self.node_born or self.rebirth_requested.is_set():
            self.rebirth_requested.clear()
            last = self._births(client)
        for reading in readings:
            device = str(reading["device_id"])
            if device not in self.born:
                self.born[device] = reading
                self._dbirth(client, device, reading)
            self.born[device] = reading
            payload = spb.data_payload(self._metrics(reading), seq=self._next_seq(),
                                       ts_ms=_ms(float(reading["ts"])))  # type: ignore[arg-type]
            last = client.publish(self.topic("DDATA", device), payload, qos=self.qos)
        return last

    def die(self, client: paho.Client) -> None:
        """The NDEATH of a clean shutdown (Sparkplug: an edge node going away says so)."""
        if self.node_born and client.is_connected():
            info = client.publish(self.topic("NDEATH"), spb.death_payload(self.bdseq, _ms(time.time())), qos=1)
            try:
                info.wait_for_publish(timeout=5)
            except (RuntimeError, ValueError):
                log.warning("could not publish the NDEATH before disconnecting")


def _ms(ts: float) -> int:
    return round(ts * 1000)


def write_csv(sim: FleetSimulation, path: str) -> int:
    """Write the simulation as a readings CSV; returns the number of rows."""
    from itap_stream.adapters.csvio import write_readings

    frame = sim.to_frame()
    write_readings(frame, path)
    return len(frame)
