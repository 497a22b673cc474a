"""The consumer takes clean array payloads column-wise (`BlockDecoder`) and stores, scores
and dead-letters exactly what the one-reading-at-a-time path does, in a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
import time

from itap_stream.adapters.metrics import Metrics
from itap_stream.app.service import build_consumer
from simulator import Fault, simulate

T0 = 1_767_225_600.0


def _payloads(schema):
    """Array payloads of 3 devices (one with a fault, one sending labels and seq), 20 per
    message, with the hostile and odd cases a fleet sends among them."""
    sim = simulate(3, 400.0, seed=11, maint=False, faults=[Fault("overheat", "DEV-0001", 100.0, 300.0)])
    frame = sim.to_frame()
    out = []
    for start in range(0, 400, 20):
        for dev, g in frame.groupby("device_id", sort=True):
            items = []
            for k, row in enumerate(g.iloc[start : start + 20].itertuples(index=False)):
                obj = {"device_id": dev, "ts": float(row.ts), "state": row.state}
                obj |= {n: (None if getattr(row, n) != getattr(row, n) else float(getattr(row, n)))
                        for n in schema.names}
                if dev == "DEV-0002":
                    obj |= {"seq": start + k + (5 if start >= 200 else 0), "label": "normal"}  # a gap at 200
                items.append(obj)
            out.append((f"itap/telemetry/{dev}", json.dumps(items).encode()))
    # odd ones: an element out of range (one dead letter, the rest stored), a repeat of an
    # earlier message (duplicates), a tag (one by one), a future stamp, a new device
    bad = json.loads(out[30][1])
    bad[3]["rpm"] = -5.0
    out[30] = (out[30][0], json.dumps(bad).encode())
    out.insert(40, out[12])
    tagged = json.loads(out[50][1])
    tagged[0]["tag"] = "bearing F-12"
    out[50] = (out[50][0], json.dumps(tagged).encode())
    future = json.loads(out[55][1])
    future[-1]["ts"] = time.time() + 10 * 86400
    out[55] = (out[55][0], json.dumps(future).encode())
    out.append(("itap/telemetry/DEV-0009", json.dumps([{"device_id": "DEV-0009", "ts": T0 + i, "rpm": 900.0}
                                                        for i in range(5)]).encode()))
    return out


def _run(settings, payloads, *, blocks: bool):
    metrics = Metrics()
    consumer = build_consumer(settings, metrics=metrics)
    if not blocks:
        consumer.blocks = None
    try:
        for i in range(0, len(payloads), 6):
            consumer.process_messages([(t, p, time.time(), 0, 0, 0) for t, p in payloads[i : i + 6]])
        assert consumer.writer.flush(timeout_s=30)
    finally:
        consumer.writer.close(timeout_s=10)
    with sqlite3.connect(settings.db_url.removeprefix("sqlite:///")) as db:
        tables = {
            "readings": db.execute("SELECT device_id, ts, state, seq, tag, label, rpm, temp_c, voltage_v, current_a, "
                                   "vibration_mm_s FROM readings ORDER BY device_id, ts").fetchall(),
            "windows": db.execute("SELECT device_id, window_start, window_end, state, score, is_anomaly, label "
                                  "FROM windows ORDER BY device_id, window_end").fetchall(),
            "anomalies": db.execute("SELECT device_id, window_end, dominant_family, families FROM anomalies "
                                    "ORDER BY device_id, window_end").fetchall(),
            "alerts": db.execute("SELECT device_id, rule, status FROM alerts ORDER BY id").fetchall(),
            "deadletters": db.execute("SELECT reason, device_id FROM deadletters ORDER BY id").fetchall(),
            "gaps": db.execute("SELECT device_id, seq_before, seq_after FROM gaps").fetchall(),
            "devices": db.execute("SELECT device_id, first_seen, last_seen FROM devices ORDER BY device_id").fetchall(),
        }
    counts = {name: metrics.registry.get_sample_value(f"itap_{name}_total")
              for name in ("readings_received", "readings_processed", "windows_scored")}
    return tables, counts


def test_array_payloads_store_score_and_dead_letter_the_same_column_wise_as_one_by_one(settings, tmp_path, schema):
    payloads = _payloads(schema)
    one = _run(settings.replace(db_url=f"sqlite:///{tmp_path / 'one.db'}"), payloads, blocks=False)
    blk = _run(settings.replace(db_url=f"sqlite:///{tmp_path / 'blk.db'}"), payloads, blocks=True)
    for table in one[0]:
        assert blk[0][table] == one[0][table], table
    assert blk[1] == one[1]
    tables = blk[0]
    n = sum(len(json.loads(p)) for _, p in payloads)
    assert len(tables["readings"]) == n - 20 - 1 - 1  # the repeat once, the bad element and the future one not
    assert len(tables["windows"]) > 200 and tables["anomalies"] and tables["gaps"] == [("DEV-0002", 199, 205)]
    assert sorted({r for r, _ in tables["deadletters"]}) == ["future", "late", "out_of_range"]
    assert any(rule != "device_stale" for _, rule, _ in tables["alerts"])
    assert ("DEV-0009",) in {(d,) for d, *_ in tables["devices"]}
