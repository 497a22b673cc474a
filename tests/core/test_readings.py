"""Decoding: every kind of bad payload becomes a Rejection with a reason; good ones pass."""

from __future__ import annotations

import json

import pytest

from itap_stream.core.readings import Reading, decode


def _ok(**over):
    r = {"device_id": "D1", "ts": "2026-01-01T00:00:00Z", "state": "RUN", "rpm": 1500, "temp_c": 40.0,
         "voltage_v": 230.0, "current_a": 10.0, "vibration_mm_s": 2.0}  # fmt: skip
    r.update(over)
    return r


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_utf8"),
        (b"[]", "empty_batch"),
        (b"42", "not_an_object"),
        (json.dumps(_ok(device_id=None)).encode(), "missing_device_id"),
        (json.dumps(_ok(device_id="D2")).encode(), "device_mismatch"),
        (json.dumps(_ok(ts=None)).encode(), "missing_ts"),
        (json.dumps(_ok(ts="yesterday")).encode(), "bad_ts"),
        (json.dumps(_ok(state="BROKEN")).encode(), "unknown_state"),
        (json.dumps(_ok(rpm="fast")).encode(), "wrong_type"),
        (json.dumps(_ok(rpm=True)).encode(), "wrong_type"),
        (b'{"device_id":"D1","ts":1767225600,"rpm":NaN}', "non_finite"),
        (b'{"device_id":"D1","ts":1767225600,"rpm":Infinity}', "non_finite"),
        (json.dumps(_ok(temp_c=9999)).encode(), "out_of_range"),
    ],
)
def test_bad_payloads_are_rejected_with_reason(schema, payload, reason):
    good, bad = decode(payload, schema, "D1")
    assert good == []
    assert [r.reason for r in bad] == [reason]


def test_oversized_payload_is_refused_without_parsing(schema):
    good, bad = decode(b"[" + b" " * 2000 + b"]", schema, "D1", max_bytes=1000)
    assert good == [] and bad[0].reason == "oversized"


def test_array_keeps_good_elements(schema):
    t0 = 1767225600
    payload = json.dumps([_ok(ts=t0 + 1), _ok(ts=t0 + 2, rpm="x"), _ok(ts=t0 + 3, temp_c=None)]).encode()
    good, bad = decode(payload, schema, "D1")
    assert [r.ts - t0 for r in good] == [1.0, 3.0]
    assert good[1].values[1] != good[1].values[1]  # dropout -> NaN
    assert [r.reason for r in bad] == ["wrong_type"]


def test_timestamps_epoch_and_rfc3339_agree(schema):
    a, _ = decode(json.dumps(_ok(ts="2026-01-01T00:00:00+00:00")).encode(), schema, "D1")
    b, _ = decode(json.dumps(_ok(ts=1767225600)).encode(), schema, "D1")
    assert a[0].ts == b[0].ts == 1767225600.0


def test_nan_sent_by_a_python_device_is_non_finite_not_invalid_json(schema):
    payload = json.dumps(_ok(rpm=float("nan"))).encode()  # json.dumps writes NaN
    good, bad = decode(payload, schema, "D1")
    assert good == [] and [r.reason for r in bad] == ["non_finite"]


def test_integer_and_string_values_take_the_slow_path_correctly(schema):
    good, bad = decode(json.dumps(_ok(rpm=1500, ts=1767225600)).encode(), schema, "D1")
    assert not bad and good[0].values[0] == 1500.0 and good[0].ts == 1767225600.0
    _, bad = decode(json.dumps(_ok(ts=float("inf"))).encode(), schema, "D1")
    assert bad[0].reason == "bad_ts"


def test_reorder_buffer_is_bounded_and_flushes_a_device_whose_clock_stands_still():
    from itap_stream.core.ordering import Reorderer

    ro = Reorderer(tolerance_s=2.0, max_held=50)
    released = 0
    for i in range(1000):  # one reading a second, all with the same (stuck) timestamp
        released += len(ro.add([Reading("D1", 5.0, "RUN", (0.0,))], now=float(i)))
        released += len(ro.expire(now=float(i)))
        assert ro.held <= 3  # flushed every 2 s of service time, not held for ever
    assert released == 1000 - ro.held
    burst = Reorderer(tolerance_s=3600.0, max_held=50)
    out = burst.add([Reading("D2", float(t), "RUN", (0.0,)) for t in range(200, 0, -1)], now=0.0)
    assert burst.held == 50 and len(out) == 150  # the cap releases the oldest at once


T0 = 1767225600


@pytest.mark.parametrize(
    ("obj_or_raw", "reason"),
    [
        (b'{"device_id":"D1","ts":1767225600,"rpm":' + b"9" * 400 + b"}", "out_of_range"),
        (_ok(ts=T0, seq=2**63), "out_of_range"),
        (_ok(ts=T0, seq=10**30), "out_of_range"),
        (_ok(ts=T0, seq=1.5), "wrong_type"),
        (_ok(ts=T0, seq=-(2**63) - 1), "out_of_range"),
        (b'{"device_id":"D1","ts":1767225600,"tag":"\\ud800"}', "bad_text"),
        (_ok(ts=T0, tag="x" * 65), "bad_text"),
        (_ok(ts=T0, tag="a\u0000b"), "bad_text"),
        (_ok(ts=T0, label="\u202e"), "bad_text"),
        (_ok(ts=0), "bad_ts"),
        (_ok(ts=-1e300), "bad_ts"),
        (_ok(ts=T0, state=["RUN"]), "unknown_state"),
    ],
)
def test_values_the_store_cannot_hold_are_refused_at_decode(schema, obj_or_raw, reason):
    raw = obj_or_raw if isinstance(obj_or_raw, bytes) else json.dumps(obj_or_raw).encode()
    good, bad = decode(raw, schema, "D1")
    assert good == [] and [r.reason for r in bad] == [reason]


@pytest.mark.parametrize("device", ["D" * 129, "<b>x</b>", "sp ace", "nul\u0000", "rtl\u202e"])
def test_device_ids_are_bounded_and_plain(schema, device):
    good, bad = decode(json.dumps(_ok(device_id=device, ts=T0)).encode(), schema, device)
    assert good == [] and bad[0].reason == "bad_text" and bad[0].device_id is None


def test_a_deeply_nested_array_element_is_a_dead_letter_not_a_crash(schema):
    payload = ("[" + json.dumps(_ok(ts=T0)) + "," + "[" * 1000 + "]" * 1000 + "]").encode()
    good, bad = decode(payload, schema, "D1")
    assert len(good) == 1 and [r.reason for r in bad] == ["not_an_object"] and bad[0].element is None


def test_bad_elements_of_an_array_share_one_rejection_with_counts(schema):
    items = [_ok(ts=T0 + i) for i in range(3)] + [{}] * 40 + [_ok(ts=T0 + 9, rpm="x")] * 2
    good, bad = decode(json.dumps(items).encode(), schema, "D1")
    assert len(good) == 3 and len(bad) == 1
    assert bad[0].reason == "missing_device_id" and bad[0].counts == {"missing_device_id": 40, "wrong_type": 2}
    assert bad[0].n == 42 and "42 of 45 elements refused" in bad[0].detail


def test_an_array_over_max_readings_is_refused_whole(schema):
    good, bad = decode(json.dumps([_ok(ts=T0 + i) for i in range(11)]).encode(), schema, "D1", max_readings=10)
    assert good == [] and [r.reason for r in bad] == ["too_many_readings"]
    good, bad = decode(json.dumps([_ok(ts=T0 + i) for i in range(10)]).encode(), schema, "D1", max_readings=10)
    assert len(good) == 10 and not bad


def test_decode_never_raises_on_random_bytes(schema):
    import random

    rng = random.Random(7)
    for _ in range(2000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        for topic in ("D1", "", "x" * 300):
            good, bad = decode(raw, schema, topic)
            assert len(good) + len(bad) >= 1
