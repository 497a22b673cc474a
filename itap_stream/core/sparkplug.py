"""Eclipse Sparkplug B 3.0 in: births, aliases, sequence numbers and deaths, as readings.

A Sparkplug edge node publishes on ``spBv1.0/{group}/{type}/{edge}[/{device}]``:

- ``NBIRTH`` / ``DBIRTH`` declare the node's / a device's metrics (name, alias, datatype)
  with their current values. They define metrics; they are not readings (a rebirth
  repeats the current values, which would be stored twice).
- ``NDATA`` / ``DDATA`` carry values, by alias or by name, each with its timestamp (or the
  payload's). Sparkplug reports by exception: a metric missing from a message kept its
  last value, so every distinct timestamp of a message becomes one reading made of the
  device's last values updated with that timestamp's metrics (``is_null`` = dropout).
  The reading then goes through the same validation as a JSON reading
  (`reading_from_mapping`), so the same values give the same windows and scores.
- ``NDEATH`` (the node's MQTT will, matched to its birth by ``bdSeq``) and ``DDEATH`` put
  the node's devices / the device offline at once.
- ``seq`` counts every message of a node except its death, 0..255 and round again. A gap
  (a message lost), data before a birth or an alias the birth did not declare make the
  host ask the node to publish its births again: an ``NCMD`` with
  ``Node Control/Rebirth = true`` (at most once per node every ``rebirth_interval_s``).

`SparkplugHost` is pure: it takes a topic, a payload and the service clock and returns
readings, rejections (dead letters, with reasons), devices gone offline and nodes to
ask for a rebirth; the consumer does the publishing.

Device ids come from templates over ``{group}``, ``{edge}`` and ``{device}``; a node's
own metrics are readings of the node's id (``node_id``) when its birth declares any
signal of the schema. Signals map to metric names with ``sparkplug_metric:`` in the
sensor schema (default: the signal's name), the operating state and the fault tag to
String metrics named by ``sparkplug_state_metric`` / ``sparkplug_tag_metric``.

Payloads are decoded with ``protobuf`` from the specification's ``sparkplug_b.proto``
(``sparkplug_b_pb2`` is generated from it).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from itap_stream.core import sparkplug_b_pb2 as pb
from itap_stream.core.readings import DEFAULT_MIN_TS, Reading, Rejection, id_problem, reading_from_mapping
from itap_stream.core.schema import SensorSchema

__all__ = [
    "NAMESPACE", "REBIRTH_METRIC", "SparkplugHost", "SparkplugResult", "birth_payload", "data_payload",
    "death_payload", "is_rebirth_request", "rebirth_request", "state_payload",
]

#: The first topic level of Sparkplug B.
NAMESPACE = "spBv1.0"
#: The node-control metric a host sets to ask an edge node for its births again.
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"

_DT = pb.DataType
#: Datatypes whose values are numbers, and the value field each one travels in.
_NUMERIC: dict[int, str] = {
    _DT.Int8: "int_value", _DT.Int16: "int_value", _DT.Int32: "int_value", _DT.UInt8: "int_value",
    _DT.UInt16: "int_value", _DT.UInt32: "int_value", _DT.Int64: "long_value", _DT.UInt64: "long_value",
    _DT.DateTime: "long_value", _DT.Float: "float_value", _DT.Double: "double_value", _DT.Boolean: "boolean_value",
}
#: Signed datatypes and the width of the unsigned field carrying them in two's complement.
_SIGNED_WIDTH: dict[int, int] = {_DT.Int8: 32, _DT.Int16: 32, _DT.Int32: 32, _DT.Int64: 64}
_TEXT: dict[int, str] = {_DT.String: "string_value", _DT.Text: "string_value", _DT.UUID: "string_value"}
#: Shown of an undecodable payload in its dead letter.
_DEAD_BYTES = 768


@dataclass
class SparkplugResult:
    """What one Sparkplug message gave."""

    readings: list[Reading] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    #: ``(device id, why)`` of devices that just went offline (a death certificate)
    offline: list[tuple[str, str]] = field(default_factory=list)
    #: ``(group, edge)`` of nodes to send a rebirth request to
    rebirth: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Metric:
    slot: int  # index of the signal in the schema; -1 state, -2 tag, -3 not used by us
    datatype: int
    name: str


_STATE, _TAG, _OTHER = -1, -2, -3


@dataclass
class _Device:
    device_id: str
    by_alias: dict[int, _Metric]
    by_name: dict[str, _Metric]
    values: list[Any]  # last value per signal (None = never reported or null)
    state: str | None = None
    tag: str | None = None


@dataclass
class _Node:
    bdseq: int | None
    seq: int | None
    node: _Device | None  # the node's own metrics, when its birth declares signals of the schema
    devices: dict[str, _Device] = field(default_factory=dict)


class SparkplugHost:
    """The host application's view of a Sparkplug namespace (births, aliases, seq, deaths).

    Parameters
    ----------
    schema
        Signals and the metric names they come from (``Signal.sparkplug_metric``).
    device_id, node_id
        Templates of the device ids over ``{group}``, ``{edge}``, ``{device}``.
    min_ts
        Readings stamped earlier are refused (``bad_ts``), as for JSON.
    rebirth_interval_s
        The least time (service clock) between two rebirth requests to one node.
    max_devices
        Births tracked at most (nodes and devices together); a birth beyond it is refused
        (``too_many_devices``), so a flood of new ids cannot take the service's memory.

    Examples
    --------
    >>> s = SensorSchema.from_dict({"signals": [{"name": "rpm", "family": "RPM"}]})
    >>> host = SparkplugHost(s)
    >>> t = 1767225600000
    >>> _ = host.handle("spBv1.0/G/NBIRTH/E", birth_payload([], seq=0, bdseq=1, ts_ms=t), now=0.0)
    >>> r = host.handle("spBv1.0/G/DBIRTH/E/D1", birth_payload([("rpm", 1, 900.0)], seq=1, ts_ms=t), now=0.0)
    >>> r = host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, 950.0)], seq=2, ts_ms=t + 1000), now=0.0)
    >>> r.readings
    [Reading(device_id='G:E:D1', ts=1767225601.0, state='RUN', values=(950.0,), seq=None, tag=None, label=None)]
    >>> host.handle("spBv1.0/G/DDATA/E/D1", data_payload([(1, 960.0)], seq=9, ts_ms=t + 2000), now=0.0).rebirth
    [('G', 'E')]
    """

    def __init__(
        self,
        schema: SensorSchema,
        *,
        device_id: str = "{group}:{edge}:{device}",
        node_id: str = "{group}:{edge}",
        min_ts: float = DEFAULT_MIN_TS,
        rebirth_interval_s: float = 10.0,
        max_devices: int = 100_000,
    ) -> None:
        self.schema = schema
        self.device_template = device_id
        self.node_template = node_id
        self.min_ts = min_ts
        self.rebirth_interval_s = rebirth_interval_s
        self.max_devices = max_devices
        self._tracked = 0  # births held: nodes plus devices
        self._slots: dict[str, int] = {s.sparkplug_metric or s.name: i for i, s in enumerate(schema.signals)}
        self._slots.setdefault(schema.sparkplug_state_metric, _STATE)
        self._slots.setdefault(schema.sparkplug_tag_metric, _TAG)
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._asked: dict[tuple[str, str], float] = {}  # node -> when it was last asked for a rebirth
        self.rebirths_requested = 0

    # -- the namespace ------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now: float) -> SparkplugResult:
        """One message on ``spBv1.0/...`` (``now``: the service clock, for rebirth pacing)."""
        out = SparkplugResult()
        parts = topic.split("/")
        if len(parts) >= 2 and parts[1] == "STATE":
            return out  # host applications' state (ours included): nothing for us
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE or not all(parts):
            out.rejections.append(Rejection("sparkplug_topic", "not a Sparkplug B topic "
                                            "(spBv1.0/{group}/{type}/{edge}[/{device}])"))
            return out
        group, kind, edge = parts[1], parts[2], parts[3]
        device = parts[4] if len(parts) == 5 else None
        if kind in ("NCMD", "DCMD"):
            return out  # commands to edge nodes (our own rebirth requests among them)
        if kind not in ("NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA") or (device is None) != (
            kind[0] == "N"
        ):
            out.rejections.append(Rejection("sparkplug_topic", f"unknown Sparkplug message type {kind[:16]!r} "
                                            "for this topic"))
            return out
        the_id = self._device_id(group, edge, device)
        try:
            msg = pb.Payload.FromString(payload)
        except (DecodeError, RuntimeError, ValueError) as exc:
            out.rejections.append(Rejection("invalid_protobuf", f"{kind} payload is not a Sparkplug B protobuf: "
                                            f"{str(exc)[:120] or type(exc).__name__}", the_id, _raw(payload)))
            return out
        if msg.uuid == "SPBV1.0_COMPRESSED":
            out.rejections.append(Rejection("invalid_protobuf", f"{kind} payload is Sparkplug-compressed, which this "
                                            "host does not read; publish uncompressed payloads", the_id,
                                            _raw(payload)))
            return out
        key = (group, edge)
        node = self._nodes.get(key)
        if kind == "NDEATH":
            self._death(key, node, msg, out)
            return out
        if kind == "NBIRTH":
            if node is not None:
                self._tracked -= 1 + len(node.devices)
            elif self._tracked >= self.max_devices:
                out.rejections.append(self._too_many(the_id))
                return out
            self._nodes[key] = self._node_birth(group, edge, msg, out)
            self._tracked += 1
            return out
        if node is None:
            out.rejections.append(Rejection("sparkplug_no_birth", f"{kind} from edge node {group}/{edge} before its "
                                            "NBIRTH; a rebirth was requested", the_id, _shown(msg)))
            self._ask_rebirth(key, now, out)
            return out
        if msg.HasField("seq"):
            expected = (node.seq + 1) % 256 if node.seq is not None else msg.seq
            if msg.seq != expected:
                # messages were lost: what the node reported by exception meanwhile is unknown
                self._ask_rebirth(key, now, out)
            node.seq = msg.seq % 256
        if kind == "DBIRTH":
            assert device is not None
            if device not in node.devices:
                if self._tracked >= self.max_devices:
                    out.rejections.append(self._too_many(the_id))
                    return out
                self._tracked += 1
            node.devices[device] = self._birth(the_id, msg, out)
            return out
        if kind == "DDEATH":
            assert device is not None
            if node.devices.pop(device, None) is not None:
                self._tracked -= 1
                out.offline.append((the_id, f"DDEATH from {group}/{edge}/{device}"))
            return out
        target = node.node if device is None else node.devices.get(device)
        if target is None:
            what = "its DBIRTH" if device is not None else "signals of the schema in its NBIRTH"
            out.rejections.append(Rejection("sparkplug_no_birth", f"{kind} from {'/'.join(parts[1:])} before {what}; "
                                            "a rebirth was requested", the_id, _shown(msg)))
            self._ask_rebirth(key, now, out)
            return out
        if self._data(target, msg, out):
            self._ask_rebirth(key, now, out)
        return out

    # -- births and deaths --------------------------------------------------------------

    def _device_id(self, group: str, edge: str, device: str | None) -> str:
        template = self.node_template if device is None else self.device_template
        return template.format(group=group, edge=edge, device=device or "")

    def _node_birth(self, group: str, edge: str, msg: Any, out: SparkplugResult) -> _Node:
        bdseq = None
        for m in msg.metrics:
            if m.name == BDSEQ_METRIC:
                bdseq = _int(m)
        node = _Node(bdseq=bdseq, seq=msg.seq % 256 if msg.HasField("seq") else None, node=None)
        own = self._birth(self._device_id(group, edge, None), msg, out)
        if any(m.slot >= 0 for m in own.by_name.values()):
            node.node = own
        return node  # a new session: its devices report again after their DBIRTH

    def _birth(self, the_id: str, msg: Any, out: SparkplugResult) -> _Device:
        dev = _Device(the_id, {}, {}, [None] * len(self.schema.signals))
        problems = []
        for m in msg.metrics:
            if not m.name:
                problems.append("a metric without a name")
                continue
            slot = self._slots.get(m.name, _OTHER)
            dt = m.datatype
            if slot >= 0 and dt not in _NUMERIC:
                problems.append(f"{m.name} is declared {_dt_name(dt)}, not a number")
                slot = _OTHER
            elif slot in (_STATE, _TAG) and dt not in _TEXT:
                problems.append(f"{m.name} is declared {_dt_name(dt)}, not a string")
                slot = _OTHER
            metric = _Metric(slot, dt, m.name)
            dev.by_name[m.name] = metric
            if m.HasField("alias"):
                dev.by_alias[m.alias] = metric
            if slot != _OTHER and not m.is_null and m.WhichOneof("value") is not None:
                value = _value(m, metric)
                if isinstance(value, str) and slot >= 0:
                    problems.append(value)
                elif slot >= 0:
                    dev.values[slot] = value
                elif slot == _STATE:
                    dev.state = value if isinstance(value, str) else None
                elif slot == _TAG:
                    dev.tag = value if isinstance(value, str) else None
        if problems:
            out.rejections.append(Rejection("wrong_type", "birth of " + the_id[:64] + ": " + "; ".join(problems[:3]),
                                            _ok_id(the_id), _shown(msg)))
        return dev

    def _death(self, key: tuple[str, str], node: _Node | None, msg: Any, out: SparkplugResult) -> None:
        if node is None:
            return  # dead before we saw it born: nothing of it is tracked
        bdseq = next((_int(m) for m in msg.metrics if m.name == BDSEQ_METRIC), None)
        if bdseq is not None and node.bdseq is not None and bdseq != node.bdseq:
            return  # the will of an earlier session, delivered after the node came back
        del self._nodes[key]
        self._tracked -= 1 + len(node.devices)
        why = f"NDEATH of edge node {key[0]}/{key[1]}"
        if node.node is not None:
            out.offline.append((node.node.device_id, why))
        out.offline.extend((d.device_id, why) for d in node.devices.values())

    def _too_many(self, the_id: str) -> Rejection:
        return Rejection("too_many_devices", f"birth of {the_id[:64]} refused: {self.max_devices} Sparkplug nodes "
                         "and devices are tracked already (max_devices)", _ok_id(the_id))

    def _ask_rebirth(self, key: tuple[str, str], now: float, out: SparkplugResult) -> None:
        last = self._asked.get(key)
        if last is not None and now - last < self.rebirth_interval_s:
            return
        if len(self._asked) >= self.max_devices:  # unknown nodes flooding in: forget the paced-out ones
            self._asked = {k: t for k, t in self._asked.items() if now - t < self.rebirth_interval_s}
            if len(self._asked) >= self.max_devices:
                return
        self._asked[key] = now
        self.rebirths_requested += 1
        out.rebirth.append(key)

    # -- data ------------------------------------------------------------------------------

    def _data(self, dev: _Device, msg: Any, out: SparkplugResult) -> bool:
        """Readings of one NDATA/DDATA; True when an unknown alias calls for a rebirth."""
        unknown: list[str] = []
        problems: list[str] = []
        by_ts: dict[int, list[tuple[_Metric, Any]]] = {}
        default_ts = msg.timestamp if msg.HasField("timestamp") else None
        for m in msg.metrics:
            if m.HasField("alias"):
                metric = dev.by_alias.get(m.alias)
                if metric is None:
                    unknown.append(f"alias {m.alias}")
                    continue
            else:
                metric = dev.by_name.get(m.name)
                if metric is None:
                    unknown.append(f"metric {m.name[:40]!r}")
                    continue
            if metric.slot == _OTHER:
                continue
            if m.is_null:
                value: Any = None
            else:
                value = _value(m, metric)
                if isinstance(value, str) and metric.slot >= 0:
                    problems.append(value)
                    continue
            ts = m.timestamp if m.HasField("timestamp") else default_ts
            if ts is None:
                problems.append(f"{metric.name} has no timestamp (neither its own nor the payload's)")
                continue
            by_ts.setdefault(ts, []).append((metric, value))
        if unknown:
            out.rejections.append(Rejection("sparkplug_unknown_alias", f"{len(unknown)} metric(s) not declared by "
                                            f"the birth of {dev.device_id[:64]} ({', '.join(unknown[:3])}); a rebirth "
                                            "was requested", _ok_id(dev.device_id), _shown(msg)))
        if problems:
            out.rejections.append(Rejection("wrong_type", f"{dev.device_id[:64]}: {'; '.join(problems[:3])}",
                                            _ok_id(dev.device_id), _shown(msg)))
        names = self.schema.names
        for ts in sorted(by_ts):
            values = list(dev.values)
            state, tag = dev.state, dev.tag
            for metric, value in by_ts[ts]:
                if metric.slot >= 0:
                    values[metric.slot] = value
                elif metric.slot == _STATE:
                    state = value
                else:
                    tag = value
            obj: dict[str, Any] = {"device_id": dev.device_id, "ts": ts / 1000.0, **dict(zip(names, values,
                                                                                              strict=True))}
            if state is not None:
                obj["state"] = state
            if tag:  # an empty tag metric: no fault code
                obj["tag"] = tag
            r = reading_from_mapping(obj, self.schema, min_ts=self.min_ts)
            if isinstance(r, Reading):
                dev.values, dev.state, dev.tag = values, state, tag
                out.readings.append(r)
            else:
                out.rejections.append(Rejection(r.reason, r.detail, r.device_id, _shown(msg)))
        return bool(unknown)


# -- values ------------------------------------------------------------------------------


def _value(m: Any, metric: _Metric) -> Any:
    """A metric's value as a float (signals) or a string (state, tag); a problem as
    ``"<text>"`` for a signal whose value is not the number its birth declared."""
    dt = metric.datatype  # as its birth declared it
    kind = m.WhichOneof("value")
    if metric.slot < 0:
        return getattr(m, kind) if kind == "string_value" else None
    if m.HasField("datatype") and m.datatype != dt:
        return f"{metric.name}: born {_dt_name(dt)}, sent as {_dt_name(m.datatype)}"
    if dt not in _NUMERIC or kind != _NUMERIC[dt]:
        return f"{metric.name}: a {_dt_name(dt)} metric carrying {kind or 'no value'}"
    v = getattr(m, kind)
    width = _SIGNED_WIDTH.get(dt)
    if width is not None and v >= 1 << (width - 1):
        v -= 1 << width
    return float(v)


def _int(m: Any) -> int | None:
    kind = m.WhichOneof("value")
    return int(getattr(m, kind)) if kind in ("int_value", "long_value") else None


def _dt_name(dt: int) -> str:
    try:
        return str(pb.DataType.Name(dt))
    except ValueError:
        return f"datatype {dt}"


def _ok_id(the_id: str) -> str | None:
    return the_id if id_problem(the_id) is None else None


def _raw(payload: bytes) -> str:
    return "base64:" + base64.b64encode(payload[:_DEAD_BYTES]).decode("ascii")


def _shown(msg: Any) -> str:
    """A decoded payload in a dead letter: its metrics as text (truncated)."""
    return str(msg)[:1024]


# -- payloads (the simulator's edge node, the host's requests) ------------------------------


def birth_payload(metrics: Sequence[tuple[str, int | None, Any]], *, seq: int | None, ts_ms: int,
                  bdseq: int | None = None) -> bytes:
    """An NBIRTH/DBIRTH: ``(name, alias, value)`` per metric (float = Double, str = String,
    bool = Boolean); an NBIRTH gets ``bdSeq`` and ``Node Control/Rebirth``."""
    p = pb.Payload(timestamp=ts_ms)
    if seq is not None:
        p.seq = seq
    if bdseq is not None:
        p.metrics.add(name=BDSEQ_METRIC, datatype=_DT.Int64, long_value=bdseq, timestamp=ts_ms)
        p.metrics.add(name=REBIRTH_METRIC, datatype=_DT.Boolean, boolean_value=False, timestamp=ts_ms)
    for name, alias, value in metrics:
        m = p.metrics.add(name=name, timestamp=ts_ms)
        if alias is not None:
            m.alias = alias
        _set(m, value)
    return p.SerializeToString()


def data_payload(metrics: Sequence[tuple[int | str, Any]], *, seq: int, ts_ms: int) -> bytes:
    """An NDATA/DDATA: ``(alias or name, value)`` per metric, all stamped ``ts_ms``."""
    p = pb.Payload(timestamp=ts_ms, seq=seq)
    for key, value in metrics:
        m = p.metrics.add(timestamp=ts_ms)
        if isinstance(key, str):
            m.name = key
        else:
            m.alias = key
        _set(m, value)
    return p.SerializeToString()


def death_payload(bdseq: int, ts_ms: int) -> bytes:
    """An NDEATH (the edge node's MQTT will)."""
    p = pb.Payload(timestamp=ts_ms)
    p.metrics.add(name=BDSEQ_METRIC, datatype=_DT.Int64, long_value=bdseq)
    return p.SerializeToString()


def rebirth_request(ts_ms: int) -> bytes:
    """The NCMD a host sends to ask an edge node to publish its births again."""
    p = pb.Payload(timestamp=ts_ms)
    p.metrics.add(name=REBIRTH_METRIC, datatype=_DT.Boolean, boolean_value=True, timestamp=ts_ms)
    return p.SerializeToString()


def is_rebirth_request(payload: bytes) -> bool:
    """Whether an NCMD asks for a rebirth (what the simulator's edge node answers)."""
    try:
        p = pb.Payload.FromString(payload)
    except (DecodeError, RuntimeError, ValueError):
        return False
    return any(m.name == REBIRTH_METRIC and m.WhichOneof("value") == "boolean_value" and m.boolean_value
               for m in p.metrics)


def state_payload(online: bool, ts_ms: int) -> bytes:
    """A Sparkplug 3.0 host application's ``STATE`` message (JSON, sent retained)."""
    return (b'{"online":%s,"timestamp":%d}' % (b"true" if online else b"false", ts_ms))


def _set(m: Any, value: Any) -> None:
    if value is None:
        m.datatype = _DT.Double
        m.is_null = True
    elif isinstance(value, bool):
        m.datatype = _DT.Boolean
        m.boolean_value = value
    elif isinstance(value, str):
        m.datatype = _DT.String
        m.string_value = value
    elif isinstance(value, float) and math.isnan(value):
        m.datatype = _DT.Double
        m.is_null = True
    else:
        m.datatype = _DT.Double
        m.double_value = float(value)
