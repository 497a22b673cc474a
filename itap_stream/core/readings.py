"""Readings and their decoding from MQTT payloads.

A payload is one JSON reading object or a JSON array of them. `decode` never raises
on bad telemetry: every problem becomes a `Rejection` with a machine-readable reason,
and in an array the good elements are kept.

Hostile input is normal input. Every value that reaches the store is checked here
against the store's bounds, the same on SQLite and PostgreSQL: ``device_id`` at most
`MAX_ID_CHARS` letters, digits and ``. _ : - @ ~``; ``tag`` and ``label`` at most
`MAX_TAG_CHARS` printable characters; ``seq`` a signed 64-bit integer; ``ts`` not
before ``min_ts``. An array payload costs one dead letter however many of
its elements are bad (`Rejection.counts` has the count per reason), and one with more
than ``max_readings`` elements is refused whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from itap_stream.core.schema import STATES, SensorSchema

__all__ = [
    "DEFAULT_MIN_TS",
    "Block",
    "BlockDecoder",
    "MAX_ID_CHARS",
    "MAX_TAG_CHARS",
    "REJECTION_REASONS",
    "Reading",
    "Rejection",
    "decode",
    "id_problem",
    "parse_ts",
    "reading_from_mapping",
    "text_problem",
]

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
    "bad_text",
    "too_many_readings",
    "too_many_devices",
    "store_rejected",
    "invalid",
)

#: 2000-01-01T00:00:00Z: a reading stamped earlier is a device without a clock, not history.
DEFAULT_MIN_TS = 946_684_800.0
#: Longest ``device_id`` (the store's column width).
MAX_ID_CHARS = 128
#: Longest ``tag`` / ``label``.
MAX_TAG_CHARS = 64
#: ``seq`` is stored as a signed 64-bit integer.
SEQ_MIN, SEQ_MAX = -(1 << 63), (1 << 63) - 1
#: Bad elements of an array payload described one by one in its dead letter.
DETAILED_ELEMENTS = 3


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


#: State name -> its code in `Block.states` (the order of `STATES`).
STATE_CODES: dict[str, int] = {s: i for i, s in enumerate(STATES)}


class Block(NamedTuple):
    """One device's readings from one array payload, column-wise (see `BlockDecoder`).

    ``ts`` rises strictly; ``values`` is ``(n, signals)`` in schema order with NaN for a
    dropout; ``states`` holds codes into `STATES`; ``seq`` and ``labels`` are None when
    no reading of the block carries one. A block never carries a ``tag``.
    """

    device_id: str
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    states: npt.NDArray[np.int8]
    seq: list[int | None] | None = None
    labels: list[str | None] | None = None

    def __len__(self) -> int:  # type: ignore[override]  # the readings, not the fields
        return len(self.ts)

    @classmethod
    def of(cls, readings: list[Reading]) -> Block | None:
        """Readings already validated one by one (a Sparkplug DDATA's) as a block: None
        unless they are one device's, in rising time, without a tag."""
        n = len(readings)
        if n < 2:
            return None
        device_id = readings[0].device_id
        if any(r.device_id != device_id or r.tag is not None for r in readings):
            return None
        ts = np.fromiter((r.ts for r in readings), np.float64, n)
        if not bool((np.diff(ts) > 0).all()):
            return None
        seq = [r.seq for r in readings]
        labels = [r.label for r in readings]
        return cls(device_id, ts, np.array([r.values for r in readings], dtype=np.float64).reshape(n, -1),
                   np.fromiter((STATE_CODES[r.state] for r in readings), np.int8, n),
                   None if seq.count(None) == n else seq, None if labels.count(None) == n else labels)

    def state_names(self) -> list[str]:
        """The state of each reading by name."""
        codes = self.states
        if len(codes) and (codes == codes[0]).all():
            return [STATES[int(codes[0])]] * len(codes)
        return [STATES[c] for c in codes.tolist()]

    def readings(self) -> list[Reading]:
        """The same readings one by one, as `decode` makes them."""
        n = len(self.ts)
        seq = self.seq or [None] * n
        labels = self.labels or [None] * n
        names = self.state_names()
        return [
            Reading(self.device_id, t, st, tuple(v), q, None, lb)
            for t, st, v, q, lb in zip(self.ts.tolist(), names, self.values.tolist(), seq, labels, strict=True)
        ]


class BlockDecoder:
    """Column-wise decoding of the common array payload: every element a valid reading of
    the topic's device, stamped with epoch seconds in rising order, without a ``tag``.

    A typed decoder (msgspec) checks the JSON types while it parses, straight into
    per-reading structs; the columns then go through vectorised checks (ranges, finite
    values, rising time, states, ``seq`` range, label text). `decode_block` answers None
    for anything else (a bad element, RFC 3339 times, a tag, out of order, another
    device): `decode` then takes the payload one element at a time, so a payload gives
    the same readings and rejections either way, only faster when it is clean.

    Examples
    --------
    >>> from itap_stream.core.schema import SensorSchema
    >>> s = SensorSchema.from_dict({"signals": [{"name": "rpm", "family": "RPM", "min": 0, "max": 6000}]})
    >>> bd = BlockDecoder(s)
    >>> b = bd.decode_block(b'[{"device_id":"D1","ts":1767225600,"rpm":900},'
    ...                     b'{"device_id":"D1","ts":1767225601,"rpm":null,"state":"IDLE"}]', "D1")
    >>> b.ts.tolist(), b.values[:, 0].tolist(), b.states.tolist()
    ([1767225600.0, 1767225601.0], [900.0, nan], [0, 1])
    >>> bd.decode_block(b'[{"device_id":"D1","ts":1767225600,"rpm":-1}]', "D1") is None  # decode names it
    True
    """

    def __init__(self, schema: SensorSchema, *, min_ts: float = DEFAULT_MIN_TS) -> None:
        self.min_ts = min_ts
        names = schema.names
        # attribute names s0, s1, ... whatever the signals are called in JSON
        fields: list[Any] = [("device_id", str), ("ts", float), ("state", str, "RUN"),
                             ("seq", int | None, None), ("tag", str | None, None), ("label", str | None, None)]
        fields += [(f"s{i}", float | None, None) for i in range(len(names))]
        struct = msgspec.defstruct("ReadingStruct", fields, rename={f"s{i}": n for i, n in enumerate(names)},
                                   gc=False)
        self._decoder = msgspec.json.Decoder(list[struct])  # type: ignore[valid-type]
        self._fields = ("device_id", "ts", "state", "seq", "tag", "label", *(f"s{i}" for i in range(len(names))))
        self._lo = np.asarray([lo for _, lo, _ in schema.bounds], dtype=np.float64)
        self._hi = np.asarray([hi for _, _, hi in schema.bounds], dtype=np.float64)

    def decode_block(self, payload: bytes, topic_device: str, *, max_readings: int = 10_000) -> Block | None:
        """``payload`` as a `Block` of ``topic_device``, or None when it is not a clean array."""
        try:
            return self._decode_block(payload, topic_device, max_readings)
        except Exception:  # noqa: BLE001 - never seen; `decode` then takes it and names any problem
            return None

    def _decode_block(self, payload: bytes, topic_device: str, max_readings: int) -> Block | None:
        try:
            items = self._decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
            return None
        n = len(items)
        if not n or n > max_readings:
            return None
        cols = list(zip(*map(msgspec.structs.astuple, items), strict=True))
        devices, ts_col, state_col, seq_col, tag_col, label_col = cols[:6]
        if devices.count(topic_device) != n or tag_col.count(None) != n:
            return None
        if topic_device not in _GOOD_IDS:
            if id_problem(topic_device) is not None:
                return None
            if len(_GOOD_IDS) >= _GOOD_IDS_MAX:
                _GOOD_IDS.clear()
            _GOOD_IDS.add(topic_device)
        ts = np.array(ts_col, dtype=np.float64)
        if not (np.isfinite(ts[-1]) and ts[0] >= self.min_ts and (n == 1 or bool((np.diff(ts) > 0).all()))):
            return None  # (rising from a finite last value: every one is finite)
        values = np.array(cols[6:], dtype=np.float64).T if len(cols) > 6 else np.zeros((n, 0))
        # None became NaN (a dropout); anything else must be finite and in range
        ok = np.isnan(values) | ((values >= self._lo) & (values <= self._hi) & np.isfinite(values))
        if not ok.all():
            return None
        kinds = set(state_col)
        if len(kinds) == 1:
            code = STATE_CODES.get(state_col[0])
            if code is None:
                return None
            states = np.full(n, code, dtype=np.int8)
        else:
            if not kinds <= STATE_CODES.keys():
                return None
            states = np.array([STATE_CODES[s] for s in state_col], dtype=np.int8)
        seq: list[int | None] | None = None
        if seq_col.count(None) != n:
            given = [q for q in seq_col if q is not None]
            if min(given) < SEQ_MIN or max(given) > SEQ_MAX:
                return None
            seq = list(seq_col)
        labels: list[str | None] | None = None
        if label_col.count(None) != n:
            if any(lb is not None and text_problem(lb, MAX_TAG_CHARS) is not None for lb in set(label_col)):
                return None
            labels = list(label_col)
        return Block(topic_device, ts, np.ascontiguousarray(values), states, seq, labels)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload (or one element of a batch) was refused."""

    reason: str
    detail: str
    device_id: str | None = None
    element: str | None = None  # the refused element of an array payload, as JSON (truncated)
    counts: dict[str, int] | None = None  # an array payload's bad elements per reason (None: one reading)

    @property
    def n(self) -> int:
        """Readings (or payloads) this rejection stands for."""
        return sum(self.counts.values()) if self.counts else 1


def text_problem(value: str, limit: int) -> str | None:
    """Why ``value`` cannot be stored as text of at most ``limit`` characters, or None.

    Examples
    --------
    >>> text_problem("bearing F-12", 64) is None
    True
    >>> text_problem("a" + chr(0) + "b", 64)
    'contains a non-printable character (U+0000)'
    >>> text_problem(chr(0xD800), 64)
    'is not valid Unicode (a lone surrogate)'
    """
    if len(value) > limit:
        return f"is {len(value)} characters long (at most {limit})"
    if not value.isprintable():
        for ch in value:
            if 0xD800 <= ord(ch) <= 0xDFFF:
                return "is not valid Unicode (a lone surrogate)"
            if not ch.isprintable():
                return f"contains a non-printable character (U+{ord(ch):04X})"
    return None


#: Characters a device id may hold besides letters and digits (any script).
ID_PUNCTUATION = frozenset("._:-@~")
#: Device ids already found good (a set lookup per reading instead of a check per character).
_GOOD_IDS: set[str] = set()
_GOOD_IDS_MAX = 1 << 16


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a device id, or None: at most `MAX_ID_CHARS` letters, digits
    and ``. _ : - @ ~`` (no spaces, markup, control or format characters).

    Examples
    --------
    >>> id_problem("DEV-0001") is None, id_problem("Pumpe-Süd_3") is None
    (True, True)
    >>> id_problem("<b>x</b>")
    "holds '<' (letters, digits and . _ : - @ ~ only)"
    """
    if len(value) > MAX_ID_CHARS:
        return f"is {len(value)} characters long (at most {MAX_ID_CHARS})"
    for ch in value:
        if not (ch.isalnum() or ch in ID_PUNCTUATION):
            shown = repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}"
            return f"holds {shown} (letters, digits and . _ : - @ ~ only)"
    return None


def _safe_id(value: Any) -> str | None:
    """``value`` when it can name a device in a dead letter, else None."""
    if isinstance(value, str) and value and (value in _GOOD_IDS or id_problem(value) is None):
        return value
    return None


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
    obj: Any, schema: SensorSchema, topic_device: str | None = None, *, min_ts: float = DEFAULT_MIN_TS
) -> Reading | Rejection:
    """Validate one reading object against the schema.

    Examples
    --------
    >>> from itap_stream.core.schema import SensorSchema
    >>> s = SensorSchema.from_dict({"signals": [{"name": "temp_c", "family": "Temperature",
    ...                                          "min": -40, "max": 200}]})
    >>> reading_from_mapping({"device_id": "D1", "ts": 1767225600, "state": "RUN", "temp_c": 21.5}, s)
    Reading(device_id='D1', ts=1767225600.0, state='RUN', values=(21.5,), seq=None, tag=None, label=None)
    >>> reading_from_mapping({"device_id": "D1", "ts": 1767225600, "temp_c": 999}, s).reason
    'out_of_range'
    >>> reading_from_mapping({"device_id": "D1", "ts": 0, "temp_c": 20}, s).reason
    'bad_ts'
    """
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    device = obj.get("device_id")
    if not isinstance(device, str) or not device:
        return Rejection("missing_device_id", "device_id must be a non-empty string")
    if topic_device is not None and device != topic_device:
        return Rejection(
            "device_mismatch", f"payload device_id {device[:MAX_ID_CHARS]!r} differs from topic device "
            f"{topic_device[:MAX_ID_CHARS]!r}", _safe_id(topic_device)
        )
    if device not in _GOOD_IDS:
        problem = id_problem(device)
        if problem is not None:
            return Rejection("bad_text", f"device_id {problem}")
        if len(_GOOD_IDS) >= _GOOD_IDS_MAX:
            _GOOD_IDS.clear()
        _GOOD_IDS.add(device)
    raw_ts = obj.get("ts")
    if raw_ts is None:
        return Rejection("missing_ts", "reading has no ts", device)
    if type(raw_ts) is float and raw_ts - raw_ts == 0.0:  # finite epoch seconds: no call needed
        ts = raw_ts
    else:
        try:
            ts = parse_ts(raw_ts)
        except (ValueError, OverflowError) as exc:
            return Rejection("bad_ts", f"ts {_short(raw_ts)}: {exc}", device)
    if ts < min_ts:
        return Rejection("bad_ts", f"ts {ts:g} is before min_ts {min_ts:g} (a device without a set clock?)", device)
    state = obj.get("state", "RUN")
    if not isinstance(state, str) or state not in STATES:
        return Rejection("unknown_state", f"state {_short(state)} is not one of {', '.join(STATES)}", device)
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
    if seq is not None:
        if type(seq) is float and math.isfinite(seq) and seq.is_integer() and abs(seq) > SEQ_MAX:
            # orjson reads an integer beyond 64 bits as a float
            return Rejection("out_of_range", "seq must fit a signed 64-bit integer", device)
        if isinstance(seq, bool) or not isinstance(seq, int):
            return Rejection("wrong_type", f"seq must be an integer, got {type(seq).__name__}", device)
        if not SEQ_MIN <= seq <= SEQ_MAX:
            return Rejection("out_of_range", "seq must fit a signed 64-bit integer", device)
    tag = obj.get("tag")
    label = obj.get("label")
    for key, text in (("tag", tag), ("label", label)):
        if text is None:
            continue
        if not isinstance(text, str):
            return Rejection("wrong_type", f"{key} must be a string or null", device)
        problem = text_problem(text, MAX_TAG_CHARS)
        if problem is not None:
            return Rejection("bad_text", f"{key} {problem}", device)
    return Reading(device, ts, state, tuple(values), seq, tag, label)


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a hostile value, cut short (a 400-digit number, a megabyte string)."""
    try:
        text = (
            repr(value)
            if not isinstance(value, int) or abs(value) < 10**40
            else f"<integer of {len(str(value))} digits>"
        )
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_value(name: str, v: Any, lo: float, hi: float) -> float | str:
    """The slow path of one value: a float to keep, or the reason to refuse it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "wrong_type"
    try:
        fv = float(v)
    except OverflowError:  # an integer of hundreds of digits
        return "out_of_range"
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
    shown = _short(v) if isinstance(v, int) and abs(v) >= 10**40 else format(float(v), "g")
    return f"{name}={shown} outside its valid range [{lo:g}, {hi:g}]"


def decode(
    payload: bytes,
    schema: SensorSchema,
    topic_device: str | None = None,
    *,
    max_bytes: int = 1_048_576,
    max_readings: int = 10_000,
    min_ts: float = DEFAULT_MIN_TS,
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
    max_readings
        An array with more elements is refused whole (``too_many_readings``).
    min_ts
        Readings stamped earlier are ``bad_ts``.

    Examples
    --------
    >>> from itap_stream.core.schema import SensorSchema
    >>> s = SensorSchema.from_dict({"signals": [{"name": "rpm", "family": "RPM"}]})
    >>> ok, bad = decode(b'[{"device_id":"D1","ts":1767225600,"rpm":900}, {"device_id":"D1","ts":"x"}]', s, "D1")
    >>> len(ok), [r.reason for r in bad]
    (1, ['bad_ts'])
    >>> decode(b"not json", s)[1][0].reason
    'invalid_json'
    """
    try:
        return _decode(payload, schema, topic_device, max_bytes, max_readings, min_ts)
    except Exception as exc:  # noqa: BLE001 - whatever a device sends must end as a dead letter, not a crash
        return [], [Rejection("invalid", f"payload could not be decoded: {type(exc).__name__}", _safe_id(topic_device))]


def _decode(
    payload: bytes, schema: SensorSchema, topic_device: str | None, max_bytes: int, max_readings: int, min_ts: float
) -> tuple[list[Reading], list[Rejection]]:
    topic_id = _safe_id(topic_device)
    if len(payload) > max_bytes:
        return [], [Rejection("oversized", f"payload of {len(payload)} bytes exceeds {max_bytes}", topic_id)]
    try:
        obj = orjson.loads(payload)  # strict RFC 8259 and several times faster than json
    except orjson.JSONDecodeError:
        # the rare bad payload: the standard parser names the problem, and accepts the
        # NaN / Infinity some devices send, so they are refused as non_finite instead
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return [], [Rejection("invalid_utf8", f"payload is not UTF-8: {exc.reason}", topic_id)]
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return [], [Rejection("invalid_json", f"payload is not JSON: {_short(str(exc), 200)}", topic_id)]
    if not isinstance(obj, list):
        r = reading_from_mapping(obj, schema, topic_device, min_ts=min_ts)
        return ([r], []) if isinstance(r, Reading) else ([], [r])
    if not obj:
        return [], [Rejection("empty_batch", "payload is an empty array", topic_id)]
    if len(obj) > max_readings:
        return [], [Rejection("too_many_readings", f"array of {len(obj)} readings exceeds max_readings_per_message "
                              f"({max_readings}); send smaller batches", topic_id)]
    good: list[Reading] = []
    counts: dict[str, int] = {}
    details: list[str] = []
    first: Rejection | None = None
    first_element: str | None = None
    for i, item in enumerate(obj):
        r = reading_from_mapping(item, schema, topic_device, min_ts=min_ts)
        if isinstance(r, Reading):
            good.append(r)
            continue
        # a bad element of a batch: counted, the first few named; the good ones are kept
        counts[r.reason] = counts.get(r.reason, 0) + 1
        if len(details) < DETAILED_ELEMENTS:
            details.append(f"element {i}: {r.detail}")
        if first is None:
            first = r
            first_element = _element_json(item)
    if first is None:
        return good, []
    n_bad = sum(counts.values())
    if n_bad == 1:
        return good, [Rejection(first.reason, details[0], first.device_id or topic_id, first_element, counts)]
    reason = max(counts, key=lambda k: counts[k])  # the commonest reason names the dead letter
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    more = f"; {n_bad - len(details)} more" if n_bad > len(details) else ""
    detail = f"{n_bad} of {len(obj)} elements refused ({summary}): {'; '.join(details)}{more}"
    return good, [Rejection(reason, detail, first.device_id or topic_id, first_element, counts)]


def _element_json(item: Any) -> str | None:
    """A refused element as JSON for its dead letter (truncated; None when it cannot be written)."""
    try:
        return json.dumps(item, allow_nan=True)[:1024]
    except (TypeError, ValueError, RecursionError):
        return None
