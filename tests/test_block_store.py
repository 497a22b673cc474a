"""The consumer takes clean array payloads column-wise (`BlockDecoder`) and stores, scores
and dead-letters exactly what the one-reading-at-a-time path does, in a real SQLite file."""

from __future__ import annotations

import json
import random
import sqlite3
import time

from itap_stream.adapters.metrics import Metrics
from itap_stream.adapters.store import Store
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
            # every stored reading, as the view people query by hand shows them
            "readings": db.execute("SELECT device_id, ts, state, seq, tag, label, rpm, temp_c, voltage_v, current_a, "
                                   "vibration_mm_s FROM readings_all ORDER BY device_id, ts").fetchall(),
            "windows": db.execute("SELECT device_id, window_start, window_end, state, score, is_anomaly, label "
                                  "FROM windows ORDER BY device_id, window_end").fetchall(),
            "anomalies": db.execute("SELECT device_id, window_end, dominant_family, families FROM anomalies "
                                    "ORDER BY device_id, window_end").fetchall(),
            "alerts": db.execute("SELECT device_id, rule, status FROM alerts ORDER BY id").fetchall(),
            "deadletters": db.execute("SELECT reason, device_id FROM deadletters ORDER BY id").fetchall(),
            "gaps": db.execute("SELECT device_id, seq_before, seq_after FROM gaps").fetchall(),
            "devices": db.execute("SELECT device_id, first_seen, last_seen FROM devices ORDER BY device_id").fetchall(),
        }
        blocks = db.execute("SELECT count(*) FROM reading_blocks").fetchone()[0]
    counts = {name: metrics.registry.get_sample_value(f"itap_{name}_total")
              for name in ("readings_received", "readings_processed", "windows_scored")}
    # what the service reads back: a restart's ring buffers, `itap train --db`, counts
    store = Store(settings.db_url, settings.schema())
    try:
        recent = {d: ([(r.ts, r.state, r.seq, r.label, [None if v != v else v for v in r.values]) for r in rs], n)
                  for d, (rs, n) in store.recent_readings(32).items()}
        frame = store.read_frame("readings").sort_values(["device_id", "ts"], kind="stable", ignore_index=True)
        counted = (store.count("readings"), store.count("readings", device_id="DEV-0002"),
                   store.count("readings", device_id="DEV-0002", label="normal"), store.count("readings", state="RUN"))
    finally:
        store.dispose()
    read_back = {"recent": recent, "counted": counted,
                 "frame": frame.drop(columns=["id"], errors="ignore").astype(object).where(frame.notna(), None)
                 .values.tolist()}
    return tables, counts, read_back, blocks


def test_array_payloads_store_score_and_dead_letter_the_same_column_wise_as_one_by_one(settings, tmp_path, schema):
    payloads = _payloads(schema)
    one = _run(settings.replace(db_url=f"sqlite:///{tmp_path / 'one.db'}"), payloads, blocks=False)
    blk = _run(settings.replace(db_url=f"sqlite:///{tmp_path / 'blk.db'}"), payloads, blocks=True)
    for table in one[0]:
        assert blk[0][table] == one[0][table], table
    assert blk[1] == one[1]
    for what in blk[2]:
        assert blk[2][what] == one[2][what], what
    assert one[3] == 0 and blk[3] > 50  # column-wise: one row per clean payload
    tables = blk[0]
    assert blk[2]["counted"][0] == len(tables["readings"])
    n = sum(len(json.loads(p)) for _, p in payloads)
    assert len(tables["readings"]) == n - 20 - 1 - 1  # the repeat once, the bad element and the future one not
    assert len(tables["windows"]) > 200 and tables["anomalies"] and tables["gaps"] == [("DEV-0002", 199, 205)]
    assert sorted({r for r, _ in tables["deadletters"]}) == ["future", "late", "out_of_range"]
    assert any(rule != "device_stale" for _, rule, _ in tables["alerts"])
    assert ("DEV-0009",) in {(d,) for d, *_ in tables["devices"]}


def test_blocks_read_back_like_rows_on_sqlite_and_postgresql(db_url, schema):
    """Readings stored column-wise come back exactly (the view, counts, frames, the rings
    a restart refills), and a late copy of one of them is not stored a second time."""
    import numpy as np
    import sqlalchemy as sa

    from itap_stream.adapters.store import StoreBatch, block_record, reading_rows
    from itap_stream.core.readings import Block, Reading

    s = len(schema.names)
    rng = np.random.default_rng(5)
    values = rng.uniform(1, 100, (40, s)).round(6)
    values[3, 1] = np.nan  # a dropout
    values[7] = 1 / 3  # a float that must read back bit for bit
    first = Block("DEV-1", T0 + np.arange(20.0), values[:20], np.zeros(20, dtype=np.int8), list(range(20)),
                  ["bearing_wear"] * 5 + [None] * 15)
    second = Block("DEV-1", T0 + 20 + np.arange(20.0) / 4, values[20:], np.full(20, 2, dtype=np.int8))
    single = Reading("DEV-2", T0 + 1, "IDLE", tuple(range(1, s + 1)), None, "bearing F-12", None)
    store = Store(db_url, schema)
    try:
        store.write(StoreBatch(readings=reading_rows([single]), blocks=[block_record(first), block_record(second)]))
        # late copies: one of a block's readings (not stored again), one new (stored)
        copy = first.readings()[4]
        new = Reading("DEV-1", T0 + 0.5, "RUN", tuple([5.0] * s))
        assert store.write(StoreBatch(late=reading_rows([copy, new]))) == 1
        expected = sorted([*first.readings(), *second.readings(), single, new], key=lambda r: (r.device_id, r.ts))

        def plain(r):
            return (r.device_id, r.ts, r.state, r.seq, r.tag, r.label, *[None if v != v else v for v in r.values])

        with store.engine.connect() as conn:
            view = conn.execute(sa.text("SELECT * FROM readings_all ORDER BY device_id, ts")).all()
        assert [tuple(row) for row in view] == [plain(r) for r in expected]
        assert store.count("readings") == 42 and store.count("readings", device_id="DEV-1") == 41
        assert store.count("readings", state="MAINT") == 20 and store.count("readings", label="bearing_wear") == 5
        frame = store.read_frame("readings").sort_values(["device_id", "ts"], kind="stable")
        got = [tuple(None if (isinstance(v, float) and v != v) else v for v in row)
               for row in frame[list(store.reading_columns)].astype(object).values.tolist()]
        assert got == [plain(r) for r in expected]
        part = store.read_frame("readings", since=T0 + 10, until=T0 + 21)
        assert sorted(part["ts"]) == [T0 + k for k in range(10, 20)] + [T0 + 20 + k / 4 for k in range(4)]
        recent = store.recent_readings(8)
        assert [plain(r) for r in recent["DEV-1"][0]] == [plain(r) for r in second.readings()[-8:]]
        assert recent["DEV-1"][1] == 41 and recent["DEV-2"][1] == 1
        assert store.recent_readings(8, max_devices=1).keys() == {"DEV-1"}
    finally:
        store.dispose()


def test_a_sparkplug_ddata_of_many_readings_goes_in_as_one_block_with_the_windows_json_gives(settings, tmp_path):
    from itap_stream.core import sparkplug_b_pb2 as pb
    from itap_stream.core.sparkplug import birth_payload

    names = ["rpm", "temp_c", "voltage_v", "current_a", "vibration_mm_s"]
    rng = random.Random(3)
    rows = [(T0 + k, [round(rng.uniform(900, 1100), 3), round(rng.uniform(50, 70), 3), round(rng.uniform(390, 410), 3),
                      round(rng.uniform(18, 22), 3), round(rng.uniform(1, 3), 3)]) for k in range(200)]
    born = [("NBIRTH", birth_payload([], seq=0, bdseq=1, ts_ms=int(T0 * 1000)), None),
            ("DBIRTH", birth_payload([(n, i + 1, 0.0) for i, n in enumerate(names)], seq=1, ts_ms=int(T0 * 1000)),
             "M1")]
    data = []
    for m, start in enumerate(range(0, 200, 20)):  # 20 readings per DDATA, each metric with its time
        p = pb.Payload(timestamp=int(rows[start][0] * 1000), seq=(2 + m) % 256)
        for ts, vals in rows[start : start + 20]:
            for i, v in enumerate(vals):
                p.metrics.add(alias=i + 1, timestamp=int(ts * 1000), datatype=10, double_value=v)
        data.append(("DDATA", p.SerializeToString(), "M1"))

    def run(db, msgs):
        st = settings.replace(db_url=f"sqlite:///{db}", sparkplug_groups="G")
        consumer = build_consumer(st, metrics=Metrics())
        try:
            consumer.process_messages([(t, p, time.time(), 0, 0, 0) for t, p in msgs])
            assert consumer.writer.flush(timeout_s=30)
        finally:
            consumer.writer.close(timeout_s=10)
        with sqlite3.connect(db) as conn:
            return (conn.execute("SELECT device_id, ts, state, rpm, temp_c, voltage_v, current_a, vibration_mm_s "
                                 "FROM readings_all ORDER BY ts").fetchall(),
                    conn.execute("SELECT device_id, window_start, window_end, score, is_anomaly FROM windows "
                                 "ORDER BY window_end").fetchall(),
                    conn.execute("SELECT count(*), coalesce(sum(n), 0) FROM reading_blocks").fetchone())

    spb = run(tmp_path / "spb.db", [(f"spBv1.0/G/{kind}/E" + (f"/{dev}" if dev else ""), p) for kind, p, dev in
                                    [*born, *data]])
    singles = [("itap/telemetry/G:E:M1", json.dumps({"device_id": "G:E:M1", "ts": ts, "state": "RUN",
                                                      **dict(zip(names, vals, strict=True))}).encode())
               for ts, vals in rows]
    one = run(tmp_path / "json.db", singles)
    assert spb[2] == (10, 200) and one[2] == (0, 0)  # ten DDATA, ten blocks
    assert spb[0] == one[0] and len(spb[0]) == 200
    assert spb[1] == one[1] and len(spb[1]) == (200 - 32) // 4 + 1


def test_a_device_heard_again_after_a_restart_gets_no_reading_stored_twice(settings, tmp_path):
    """A consumer that did not refill a device's window (a fresh process without its
    history, or a device beyond what a restart restores) stores a block only when nothing
    stored overlaps it; the rest go one by one, so a reading sent twice is stored once."""
    db = tmp_path / "again.db"
    st = settings.replace(db_url=f"sqlite:///{db}")
    names = ["rpm", "temp_c", "voltage_v", "current_a", "vibration_mm_s"]

    def arr(dev, start, n):
        return (f"itap/telemetry/{dev}", json.dumps([{"device_id": dev, "ts": T0 + k, "rpm": 1000.0 + k,
                                                      **dict.fromkeys(names[1:], 1.0)}
                                                     for k in range(start, start + n)]).encode())

    def run(msgs):
        consumer = build_consumer(st, metrics=Metrics())  # no restore: every device is new to it
        try:
            consumer.process_messages([(t, p, time.time(), 0, 0, 0) for t, p in msgs])
            assert consumer.writer.flush(timeout_s=30)
        finally:
            consumer.writer.close(timeout_s=10)

    singles = [("itap/telemetry/D1", json.dumps({"device_id": "D1", "ts": T0 + k, "rpm": 1.0}).encode())
               for k in range(10)]
    run([*singles, arr("D2", 0, 20), arr("D3", 0, 20)])
    # again, in new processes: D1's and D2's readings overlap what is stored, D3 goes on after its own
    run([arr("D1", 5, 20)])
    run([arr("D2", 10, 20), arr("D3", 20, 20)])
    with sqlite3.connect(db) as conn:
        per_device = dict(conn.execute("SELECT device_id, count(*) FROM readings_all GROUP BY device_id").fetchall())
        distinct = dict(conn.execute("SELECT device_id, count(DISTINCT ts) FROM readings_all GROUP BY device_id"))
        blocks = dict(conn.execute("SELECT device_id, count(*) FROM reading_blocks GROUP BY device_id").fetchall())
        first = conn.execute("SELECT rpm FROM readings_all WHERE device_id = 'D1' AND ts = ?", (T0 + 5,)).fetchall()
    assert per_device == distinct == {"D1": 25, "D2": 30, "D3": 40}
    assert blocks == {"D2": 1, "D3": 2}  # D1's and D2's second arrays overlapped: stored one by one
    assert first == [(1.0,)]  # the first copy stays, as with rows
