"""Readings and their decoding from MQTT payloads.

A payload is one JSON reading object or a JSON array of them. `decode` never raises
on bad telemetry: every problem becomes a `Rejection` with a machine-readable reason,
and in an array the good elements are kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from itap_stream.core.schema import STATES, SensorSchema

__all__ = ["REJECTION_REASONS", "Reading", "Rejection", "decode", "parse_ts", "reading_from_mapping"]

#: Every reason `decode` can give, for metrics labels and documentation.
REJECTION_REASONS: tuple[str, ...] = (
    "oversized",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "empty_batch",
    "missing_device_id",
    "device_mismatch",
    "missing_ts",
    "bad_ts",
    "unknown_state",
    "wrong_type",
    "non_finite",
    "out_of_range",
)


_NAN = float("nan")


class Reading(NamedTuple):
    """One decoded reading. ``values`` follow the schema order; NaN marks a dropout.

    A named tuple rather than a dataclass: the consumer makes one per reading, and a
    tuple is built several times faster than a frozen dataclass.
    """

    device_id: str
    ts: float
    state: str
    values: tuple[float, ...]
    seq: int | None = None
    tag: str | None = None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload (or one element of a batch) was refused."""

    reason: str
    detail: str
    device_id: str | None = None
    element: str | None = None  # the refused element of an array payload, as JSON (truncated)


def parse_ts(value: Any) -> float:
    """Event time as epoch seconds from an RFC 3339 string or a number.

    Examples
    --------
    >>> parse_ts("2026-01-01T00:00:10Z")
    1767225610.0
    >>> parse_ts(1767225610)
    1767225610.0
    """
    if isinstance(value, bool):
        msg = "ts must be a number or an RFC 3339 string, got a boolean"
        raise ValueError(msg)
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, str):
        dt = datetime.fromisoformat(value.strip())
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ts = dt.timestamp()
    else:
        msg = f"ts must be a number or an RFC 3339 string, got {type(value).__name__}"
        raise ValueError(msg)  # noqa: TRY004 - mapped to a Rejection by the caller
    if not math.isfinite(ts):
        msg = "ts must be finite"
        raise ValueError(msg)
    return ts


def reading_from_mapping(
    obj: Any, schema: SensorSchema, topic_device: str | None = None
) -> Reading | Rejection:
    """Validate one reading object against the schema.

    Examples
    --------
    >>> from itap_stream.core.schema import SensorSchema
    >>> s = SensorSchema.from_dict({"signals": [{"name": "temp_c", "family": "Temperature",
    ...                                          "min": -40, "max": 200}]})
    >>> reading_from_mapping({"device_id": "D1", "ts": 0, "state": "RUN", "temp_c": 21.5}, s)
    Reading(device_id='D1', ts=0.0, state='RUN', values=(21.5,), seq=None, tag=None, label=None)
    >>> reading_from_mapping({"device_id": "D1", "ts": 0, "temp_c": 999}, s).reason
    'out_of_range'
    """
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    device = obj.get("device_id")
    if not isinstance(device, str) or not device:
        return Rejection("missing_device_id", "device_id must be a non-empty string")
    if topic_device is not None and device != topic_device:
        return Rejection(
            "device_mismatch", f"payload device_id {device!r} differs from topic device {topic_device!r}", device
        )
    raw_ts = obj.get("ts")
    if raw_ts is None:
        return Rejection("missing_ts", "reading has no ts", device)
    if type(raw_ts) is float and raw_ts - raw_ts == 0.0:  # finite epoch seconds: no call needed
        ts = raw_ts
    else:
        try:
            ts = parse_ts(raw_ts)
        except (ValueError, OverflowError) as exc:
            return Rejection("bad_ts", f"ts {raw_ts!r}: {exc}", device)
    state = obj.get("state", "RUN")
    if state not in STATES:
        return Rejection("unknown_state", f"state {state!r} is not one of {', '.join(STATES)}", device)
    values: list[float] = []
    for name, lo, hi in schema.bounds:
        v = obj.get(name)
        if v is None:
            values.append(_NAN)
        elif type(v) is float and lo <= v <= hi:
            values.append(v)
        else:
            bad = _check_value(name, v, lo, hi)
            if isinstance(bad, str):
                return Rejection(bad, _value_detail(bad, name, v, lo, hi), device)
            values.append(bad)
    seq = obj.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        return Rejection("wrong_type", f"seq must be an integer, got {type(seq).__name__}", device)
    tag = obj.get("tag")
    label = obj.get("label")
    if tag is not None and not isinstance(tag, str):
        return Rejection("wrong_type", "tag must be a string or null", device)
    if label is not None and not isinstance(label, str):
        return Rejection("wrong_type", "label must be a string or null", device)
    return Reading(device, ts, state, tuple(values), seq, tag, label)


def _check_value(name: str, v: Any, lo: float, hi: float) -> float | str:
    """The slow path of one value: a float to keep, or the reason to refuse it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "wrong_type"
    fv = float(v)
    if not math.isfinite(fv):
        return "non_finite"
    if fv < lo or fv > hi:
        return "out_of_range"
    return fv


def _value_detail(reason: str, name: str, v: Any, lo: float, hi: float) -> str:
    if reason == "wrong_type":
        return f"{name} must be a number or null, got {type(v).__name__}"
    if reason == "non_finite":
        return f"{name} is {v!r}"
    return f"{name}={float(v):g} outside its valid range [{lo:g}, {hi:g}]"


def decode(
    payload: bytes,
    schema: SensorSchema,
    topic_device: str | None = None,
    *,
    max_bytes: int = 1_048_576,
) -> tuple[list[Reading], list[Rejection]]:
    """Decode one MQTT payload into readings and rejections.

    Parameters
    ----------
    payload
        Raw message bytes: a reading object or a JSON array of reading objects.
    schema
        The sensor schema the values are validated against.
    topic_device
        The device id taken from the topic; a payload naming another device is refused.
    max_bytes
        Larger payloads are refused whole without parsing.

    Examples
    --------
    >>> from itap_stream.core.schema import SensorSchema
    >>> s = SensorSchema.from_dict({"signals": [{"name": "rpm", "family": "RPM"}]})
    >>> ok, bad = decode(b'[{"device_id":"D1","ts":1,"rpm":900}, {"device_id":"D1","ts":"x"}]', s, "D1")
    >>> len(ok), [r.reason for r in bad]
    (1, ['bad_ts'])
    >>> decode(b"not json", s)[1][0].reason
    'invalid_json'
    """
    if len(payload) > max_bytes:
        return [], [Rejection("oversized", f"payload of {len(payload)} bytes exceeds {max_bytes}", topic_device)]
    try:
        obj = orjson.loads(payload)  # strict RFC 8259 and several times faster than json
    except orjson.JSONDecodeError:
        # the rare bad payload: the standard parser names the problem, and accepts the
        # NaN / Infinity some devices send, so they are refused as non_finite instead
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return [], [Rejection("invalid_utf8", f"payload is not UTF-8: {exc.reason}", topic_device)]
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return [], [Rejection("invalid_json", f"payload is not JSON: {exc}", topic_device)]
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        return [], [Rejection("empty_batch", "payload is an empty array", topic_device)]
    good: list[Reading] = []
    bad: list[Rejection] = []
    many = isinstance(obj, list)
    for i, item in enumerate(items):
        r = reading_from_mapping(item, schema, topic_device)
        if isinstance(r, Reading):
            good.append(r)
        elif many:
            # one bad element of a batch: name it, keep the good ones
            try:
                text = json.dumps(item, allow_nan=True)[:1024]
            except (TypeError, ValueError):
                text = None
            bad.append(Rejection(r.reason, f"element {i}: {r.detail}", r.device_id, text))
        else:
            bad.append(r)
    return good, bad
