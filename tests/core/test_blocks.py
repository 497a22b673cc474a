"""Array payloads taken column-wise (`BlockDecoder`, `FleetWindows.push_block`,
`Processor.process` with blocks) give what the one-reading-at-a-time path gives."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from itap_stream.core.pipeline import Processor
from itap_stream.core.readings import Block, BlockDecoder, Reading, decode
from itap_stream.core.rules import RuleEngine
from itap_stream.core.window import FleetWindows
from simulator import Fault, simulate

T0 = 1_767_225_600.0


def _same(a: list[Reading], b: list[Reading]) -> bool:
    """Readings equal field by field, NaN equal to NaN (a dropout)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x._replace(values=()) != y._replace(values=()):
            return False
        if len(x.values) != len(y.values):
            return False
        for u, v in zip(x.values, y.values, strict=True):
            if not (u == v or (math.isnan(u) and math.isnan(v))) or type(u) is not type(v):
                return False
    return True


def _reading(schema, k: int, rng: random.Random, device: str = "DEV-1") -> dict:
    obj = {"device_id": device, "ts": T0 + k, "state": rng.choice(["RUN", "RUN", "IDLE", "MAINT"]), "seq": k}
    for name, lo, hi in schema.bounds:
        obj[name] = round(rng.uniform(max(lo, -1e3), min(hi, 1e3)), 4)
    return obj


#: ways a device (or an attacker) spoils one element of an array payload
_SPOILERS = [
    lambda o, s, r: o.update({s: -1e9}),  # out of range
    lambda o, s, r: o.update({s: True}),  # a boolean
    lambda o, s, r: o.update({s: "12.5"}),  # a number as text
    lambda o, s, r: o.update({s: None}),  # a dropout: fine
    lambda o, s, r: o.update({s: 10**400}),  # an integer no float holds
    lambda o, s, r: o.update({s: 3}),  # an integer: fine
    lambda o, s, r: o.update({s: [1.0]}),
    lambda o, s, r: o.update({"ts": "2026-01-01T00:00:10Z"}),  # RFC 3339: fine, one by one
    lambda o, s, r: o.update({"ts": 5}),  # before min_ts
    lambda o, s, r: o.update({"ts": o["ts"] - 1}),  # repeats the one before
    lambda o, s, r: o.update({"ts": T0 - 100}),  # older than the others
    lambda o, s, r: o.update({"ts": None}),
    lambda o, s, r: o.pop("ts"),
    lambda o, s, r: o.pop("device_id"),
    lambda o, s, r: o.update({"device_id": "DEV-2"}),  # another device
    lambda o, s, r: o.update({"state": "BROKEN"}),
    lambda o, s, r: o.update({"state": None}),
    lambda o, s, r: o.pop("state"),  # RUN by default: fine
    lambda o, s, r: o.update({"seq": 1.5}),
    lambda o, s, r: o.update({"seq": 2**63}),
    lambda o, s, r: o.update({"seq": -(2**63)}),  # the least int64: fine
    lambda o, s, r: o.update({"seq": None}),
    lambda o, s, r: o.pop("seq"),
    lambda o, s, r: o.update({"tag": "bearing F-12"}),  # fine, one by one
    lambda o, s, r: o.update({"label": "bearing_wear"}),  # fine
    lambda o, s, r: o.update({"label": "x" * 65}),
    lambda o, s, r: o.update({"label": "a\u0000b"}),
    lambda o, s, r: o.update({"label": 7}),
    lambda o, s, r: o.update({"extra": {"nested": [1, 2]}}),  # ignored: fine
]


def test_a_clean_array_decodes_to_one_block_with_the_readings_decode_gives(schema):
    rng = random.Random(1)
    payload = json.dumps([_reading(schema, k, rng) for k in range(50)]).encode()
    block = BlockDecoder(schema).decode_block(payload, "DEV-1")
    assert isinstance(block, Block) and len(block) == 50
    good, bad = decode(payload, schema, "DEV-1")
    assert bad == [] and _same(block.readings(), good)
    assert block.values.shape == (50, len(schema.names)) and block.values.flags.c_contiguous


def test_every_array_decodes_to_a_block_only_when_decode_takes_all_of_it_and_then_to_the_same_readings(schema):
    """Fuzz: spoiled, shuffled, cut and random payloads. Where the block decoder answers,
    `decode` refuses nothing and gives the same readings; where it does not, `decode`
    (the one-by-one path) decides, so nothing a device sends changes its fate."""
    rng = random.Random(7)
    bd = BlockDecoder(schema)
    names = schema.names
    blocks = fallbacks = 0
    for trial in range(1500):
        n = rng.choice([1, 2, 5, 50])
        items = [_reading(schema, k, rng) for k in range(n)]
        for _ in range(rng.choice([0, 0, 1, 2])):
            rng.choice(_SPOILERS)(rng.choice(items), rng.choice(names), rng)
        if trial % 50 == 0:
            rng.shuffle(items)
        payload = json.dumps(items).encode()
        if trial % 97 == 0:  # cut short or bytes changed
            cut = bytearray(payload[: rng.randrange(1, len(payload))])
            if cut:
                cut[rng.randrange(len(cut))] = rng.randrange(256)
            payload = bytes(cut)
        block = bd.decode_block(payload, "DEV-1")
        good, bad = decode(payload, schema, "DEV-1")
        if block is None:
            fallbacks += 1
            continue
        blocks += 1
        assert bad == [], payload
        assert _same(block.readings(), good), payload
        assert all(r.tag is None for r in good)
    assert blocks > 300 and fallbacks > 300  # both ways were taken, many times
    for junk in (b"", b"[]", b"{}", b"[1,2]", b"null", b"[" * 5000, b"\xff\xfe", b'[{"device_id":"DEV-1"}]'):
        assert bd.decode_block(junk, "DEV-1") is None


def test_a_block_is_refused_for_a_device_id_that_cannot_be_stored_or_beyond_max_readings(schema):
    rng = random.Random(2)
    bd = BlockDecoder(schema)
    bad_id = "<b>x</b>"
    payload = json.dumps([_reading(schema, k, rng, bad_id) for k in range(3)]).encode()
    assert bd.decode_block(payload, bad_id) is None
    assert decode(payload, schema, bad_id)[1][0].reason == "bad_text"
    payload = json.dumps([_reading(schema, k, rng) for k in range(11)]).encode()
    assert bd.decode_block(payload, "DEV-1", max_readings=10) is None
    assert bd.decode_block(payload, "DEV-1", max_readings=11) is not None


def _windows_of(fw: FleetWindows):
    b = fw.take_due()
    return (b.device_ids, b.start_ts.tolist(), b.end_ts.tolist(), b.values, b.states, b.labels, b.tags)


@pytest.mark.parametrize(("window", "hop"), [(32, 4), (5, 5), (8, 3), (2, 1)])
def test_push_block_closes_the_same_windows_and_finds_the_same_gaps_as_pushing_one_by_one(window, hop):
    rng = np.random.default_rng(window * 10 + hop)
    one, blk = FleetWindows(3, window, hop), FleetWindows(3, window, hop)
    k = 0
    for step in range(60):
        device = f"D{step % 3}"
        n = int(rng.integers(1, 3 * window))
        ts = T0 + k + np.arange(n, dtype=np.float64)
        k += n
        values = rng.normal(size=(n, 3))
        values[rng.random((n, 3)) < 0.05] = np.nan
        states = rng.integers(0, 3, n).astype(np.int8)
        seq = [int(q) if rng.random() > 0.1 else None for q in (np.arange(n) + k + (rng.random(n) < 0.05) * 3)]
        labels = [None if rng.random() < 0.7 else "bearing_wear" for _ in range(n)] if step % 2 else None
        block = Block(device, ts, values, states, seq if step % 4 else None, labels)
        due = blk.push_block(block)
        statuses = [one.push(r) for r in block.readings()]
        assert due == statuses.count(1)
        assert [(g.device_id, g.seq_before, g.seq_after, g.ts_before, g.ts_after) for g in blk.gaps] == [
            (g.device_id, g.seq_before, g.seq_after, g.ts_before, g.ts_after) for g in one.gaps]
        a, b = _windows_of(one), _windows_of(blk)
        assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[5] == b[5] and a[6] == b[6]
        np.testing.assert_array_equal(a[3], b[3])
        np.testing.assert_array_equal(a[4], b[4])
    assert blk.gaps, "no gap was exercised"


def test_push_block_refuses_a_block_that_overlaps_what_the_device_sent_before():
    fw = FleetWindows(1, 4, 2)
    first = Block("D", T0 + np.arange(3.0), np.zeros((3, 1)), np.zeros(3, dtype=np.int8))
    assert fw.push_block(first) == 0
    again = Block("D", T0 + np.arange(2.0, 6.0), np.ones((4, 1)), np.zeros(4, dtype=np.int8))
    assert fw.push_block(again) is None  # its first reading repeats the last one: one by one
    assert fw.last_ts("D") == T0 + 2


def _fleet_payloads(schema, n_dev=4, steps=600, per=25, seed=3):
    """Array payloads of a simulated fleet with faults, as devices send them."""
    sim = simulate(n_dev, float(steps), seed=seed, maint=False,
                   faults=[Fault("power_instability", "DEV-0002", 200.0, 400.0)])
    frame = sim.to_frame()
    msgs = []
    for start in range(0, steps, per):
        for dev, g in frame.groupby("device_id", sort=True):
            part = g.iloc[start : start + per]
            items = []
            for row in part.itertuples(index=False):
                obj = {"device_id": dev, "ts": float(row.ts), "state": row.state}
                for name in schema.names:
                    v = getattr(row, name)
                    obj[name] = None if v != v else float(v)
                items.append(obj)
            msgs.append((dev, json.dumps(items).encode()))
    return msgs


def test_the_processor_gives_the_same_windows_scores_and_alerts_for_blocks_as_for_single_readings(
        schema, trained, default_rules):
    msgs = _fleet_payloads(schema)
    # replayed messages: a device sends a stretch again (duplicates, taken one by one)
    msgs.insert(20, msgs[3])
    bd = BlockDecoder(schema)

    def run(as_blocks: bool):
        proc = Processor(schema, trained, RuleEngine(default_rules[0]), window=32, hop=4)
        out = []
        for i in range(0, len(msgs), 7):  # micro-batches of 7 messages
            items: list = []
            for dev, payload in msgs[i : i + 7]:
                block = bd.decode_block(payload, dev) if as_blocks else None
                if block is not None:
                    items.append(block)
                else:
                    items.extend(decode(payload, schema, dev)[0])
            res = proc.process(items, now=T0 + 10**6)
            w = res.windows
            out.append((
                res.n_accepted,
                sorted((r.device_id, r.ts, reason) for r, reason in res.dropped),
                [] if w is None else list(zip(w.device_ids, w.start_ts.tolist(), w.end_ts.tolist(), strict=True)),
                [] if res.scores is None else res.scores.tolist(),
                [] if res.is_anomaly is None else res.is_anomaly.tolist(),
                sorted(res.explanations),
                [(a.id, a.rule, a.status, a.device_id) for a in res.alerts],
            ))
        return out

    one, blk = run(False), run(True)
    assert one == blk
    assert sum(len(b[2]) for b in blk) > 200 and any(b[1] for b in blk)  # windows and duplicates were there
    assert any(b[6] for b in blk), "no alert was raised: the comparison says little"
