"""Hostile input is normal input: no payload on any subscribed topic can crash, stall or
hang the consumer, on SQLite and on PostgreSQL.

The fuzz test sends a corpus of hostile payloads to a running consumer, each followed by a
good canary reading: the canary is stored every time, and each hostile payload ends as
exactly one dead letter with a reason. A restart with the same client id then finds
nothing left to choke on.
"""

from __future__ import annotations

import json
import random
import threading
import time

import paho.mqtt.client as paho
import pytest
from conftest import _wait_for

from itap_stream.adapters.metrics import Metrics
from itap_stream.adapters.store import Store, StoreBatch, StoreWriter
from itap_stream.app.service import build_consumer
from itap_stream.core.readings import REJECTION_REASONS
from itap_stream.errors import ServiceFailed

pytestmark = pytest.mark.network

T0 = 1_767_225_600  # 2026-01-01


def _ok(device: str = "D1", **over) -> dict:
    r = {"device_id": device, "ts": T0, "state": "RUN", "rpm": 1500, "temp_c": 40.0, "voltage_v": 230.0,
         "current_a": 10.0, "vibration_mm_s": 2.0}  # fmt: skip
    r.update(over)
    return r


def _nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def hostile_corpus() -> list[tuple[str, bytes]]:
    """``(device part of the topic, payload)``: every kind of hostile telemetry found so far."""
    d = "D1"
    out: list[tuple[str, bytes]] = []

    def add(payload: object, device: str = d) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        out.append((device, raw))

    # numbers the decoder or the store cannot take
    add(b'{"device_id":"D1","ts":1767225600,"rpm":' + b"9" * 400 + b"}")
    add(b'{"device_id":"D1","ts":1767225600,"rpm":-' + b"9" * 400 + b"}")
    add(_ok(seq=2**63))
    add(_ok(seq=-(2**63) - 1))
    add(_ok(seq=10**400))
    add(_ok(seq=1.5))
    add(_ok(seq="7"))
    add(b'{"device_id":"D1","ts":1767225600,"rpm":NaN}')
    add(b'{"device_id":"D1","ts":1767225600,"rpm":Infinity}')
    add(b'{"device_id":"D1","ts":1767225600,"rpm":-Infinity}')
    add(b'{"device_id":"D1","ts":1e400,"rpm":1}')
    add(_ok(temp_c=1e308))
    add(_ok(rpm=True))
    add(_ok(rpm="1500"))
    add(_ok(rpm=[1500]))
    add(_ok(rpm={"v": 1500}))
    # timestamps
    add(_ok(ts=0))
    add(_ok(ts=-1e300))
    add(_ok(ts=1e300))
    add(_ok(ts="yesterday"))
    add(_ok(ts=True))
    add(_ok(ts=[T0]))
    add(_ok(ts={"s": T0}))
    add(_ok(ts=None))
    add(_ok(ts="9999-99-99T99:99:99Z"))
    # text the store cannot hold
    add(b'{"device_id":"D1","ts":1767225600,"tag":"\\ud800"}')
    add(b'{"device_id":"D1","ts":1767225600,"label":"\\udfff"}')
    add(_ok(tag="x" * 65))
    add(_ok(label="y" * 1000))
    add(_ok(tag="a\u0000b"))
    add(_ok(tag=5))
    add(_ok(label=["x"]))
    add(_ok(tag="<script>alert(1)</script>\u202e"))
    # device ids: too long, NUL, control characters, HTML, wrong type, mismatch
    long_id = "L" * 129
    add(_ok(long_id), long_id)
    huge_id = "T" * 300  # a topic over 256 characters
    add(_ok(huge_id), huge_id)
    add(_ok("N\u0000UL"), "N\u0000UL".replace("\u0000", "_"))
    add(_ok("tab\tbed"), "tab_bed")  # mosquitto itself refuses control characters in topics
    add(_ok("sp ace"), "sp ace")
    add(_ok("rtl\u202eevil"), "rtl\u202eevil")
    add(_ok("<img src=x onerror=alert(1)>"), "<img src=x onerror=alert(1)>")
    add(_ok("D2"))  # device_mismatch
    add(_ok(None))
    add(_ok(42))
    add(_ok(""))
    add(_ok(["D1"]))
    # states
    add(_ok(state="BROKEN"))
    add(_ok(state=5))
    add(_ok(state=None))
    add(_ok(state=["RUN"]))
    # shapes: not JSON, not objects, empty, nested, huge
    add(b"")
    add(b"{not json")
    add(b"\xff\xfe\xfd")
    add(b"\xc3\x28")
    add(b"null")
    add(b"true")
    add(b"42")
    add(b'"a string"')
    add(b"[]")
    add(b"[1, 2, 3]")
    add(b"[null]")
    add(b"{}")
    add(("[" + _nested(1000) + "]").encode())  # a deeply nested element of an array payload
    add(_nested(10_000).encode())
    add(_nested(10_000, '{"a":', "}").replace("}", "", 1).encode())
    add(("[" + json.dumps(_ok(ts=T0 - 1)) + "," + _nested(900) + "]").encode())  # one good, one nested
    add(("[" + ",".join(["{}"] * 20_000) + "]").encode())  # over max_readings_per_message
    add(("[" + ",".join(["{}"] * 500) + "]").encode())  # 500 bad elements: one summarising dead letter
    add(b" " * (1_048_576 + 1))  # oversized
    add(b'{"device_id":"D1","ts":1767225600,"rpm":1500,"rpm":"dup"}')
    # random bytes
    rng = random.Random(1414)
    for n in (1, 7, 64, 512, 4096):
        add(bytes(rng.randrange(256) for _ in range(n)))
    return out


class Publisher:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-hostile-{time.monotonic_ns()}")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CommandAnswers:
    """The consumer's answers on ``{prefix}/status/commands``, as they arrive."""

    def __init__(self, settings) -> None:
        host, port = settings.broker_url.removeprefix("mqtt://").split(":")
        self.replies: list[dict] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-cmd-sub-{time.monotonic_ns()}")
        ready = threading.Event()
        self.client.on_connect = lambda c, *_a: c.subscribe(settings.topic("status", "commands"), qos=1)
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.on_message = lambda _c, _u, m: self.replies.append(json.loads(m.payload))
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _start(settings, metrics=None):
    consumer = build_consumer(settings, metrics=metrics or Metrics())
    ready = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run(ready=ready)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(15)
    return consumer, thread, errors


def _stop(consumer, thread) -> None:
    consumer.stop()
    thread.join(30)
    assert not thread.is_alive()


def test_the_corpus_is_large_and_varied():
    corpus = hostile_corpus()
    assert len(corpus) >= 60
    assert len({p for _d, p in corpus}) == len(corpus)


def test_fuzz_corpus_every_hostile_payload_is_dead_lettered_and_every_canary_stored(settings, db_url):
    settings = settings.replace(db_url=db_url)
    corpus = hostile_corpus()
    consumer, thread, errors = _start(settings)
    store = consumer.store
    pub = Publisher(settings.broker_url)
    try:
        for i, (device, payload) in enumerate(corpus):
            pub.send(settings.topic("telemetry", device), payload)
            canary = _ok("CANARY", ts=T0 + 60 * i)
            pub.send(settings.topic("telemetry", "CANARY"), json.dumps(canary).encode())
            assert _wait_for(lambda i=i: store.count("readings", device_id="CANARY") == i + 1), (
                f"canary after hostile payload {i} ({payload[:80]!r}) was not stored; errors: {errors}"
            )
            assert thread.is_alive(), f"the consumer died on payload {i}: {errors}"
            # one dead letter per hostile message, committed with (or before) the canary
            assert _wait_for(lambda i=i: store.count("deadletters") >= i + 1, 10), f"payload {i} not dead-lettered"
            assert store.count("deadletters") == i + 1, f"payload {i} ({payload[:80]!r}): not exactly one dead letter"
        ok, detail = consumer.health()
        assert ok, detail
        dead = store.read_frame("deadletters")
        assert set(dead["reason"]) <= {*REJECTION_REASONS, "future"}  # future: ts=1e300, refused by the windows
        assert dead["reason"].notna().all() and (dead["reason"] != "").all()
        summary = dead[dead["detail"].str.contains("500 of 500 elements refused", regex=False)]
        assert len(summary) == 1  # 500 bad elements, one dead letter
        assert store.count("readings", device_id="D1") == 1  # only the good element of the mixed array
    finally:
        _stop(consumer, thread)
    assert not errors

    # the same client id again: nothing is left in its session to choke on, and a second pass
    # of the corpus queued while it was away is taken the same way
    for device, payload in corpus:
        pub.send(settings.topic("telemetry", device), payload)
    pub.send(settings.topic("telemetry", "CANARY"), json.dumps(_ok("CANARY", ts=T0 + 10**6)).encode())
    consumer, thread, errors = _start(settings)
    try:
        assert _wait_for(lambda: consumer.store.count("readings", device_id="CANARY") == len(corpus) + 1, 60)
        assert _wait_for(lambda: consumer.store.count("deadletters") >= 2 * len(corpus), 30)
        assert thread.is_alive() and not errors
        ok, detail = consumer.health()
        assert ok, detail
    finally:
        _stop(consumer, thread)
        pub.close()
    assert not errors


COMMANDS = [
    ("silence", {"action": "add", "hours": [1]}),
    ("silence", {"action": "add", "weekly": 5}),
    ("silence", {"action": "add", "start": 10**400}),
    ("silence", {"action": "add", "start": "nan"}),
    ("silence", {"action": "add", "duration": [1]}),
    ("silence", {"action": "remove", "id": {"x": 1}}),
    ("silence", {"action": ["add"]}),
    ("reload", {"parts": [["model"]]}),
    ("reload", {"parts": ["model"], "model_path": ["/tmp/x"]}),
    ("reload", {"parts": ["model"], "model_path": "/tmp/elsewhere/e.joblib"}),
    ("ack", {"alert_id": ["x"]}),
    ("ack", {"alert_id": "x" * 10_000}),
    ("ack", {"alert_id": "x", "rebaseline": "yes"}),
    ("rebaseline", {"device_id": {"a": 1}}),
    ("rebaseline", {"device_id": "x" * 10_000}),
    ("rebaseline", {"device_id": "D1", "note": ["x"] * 1000}),
    ("nope", {}),
]


def test_hostile_commands_are_refused_and_the_consumer_keeps_running(settings):
    consumer, thread, errors = _start(settings)
    answers = CommandAnswers(settings)
    replies = answers.replies
    pub = Publisher(settings.broker_url)
    try:
        payloads = [(name, json.dumps(body).encode()) for name, body in COMMANDS]
        payloads.append(("reload", _nested(10_000).encode()))
        payloads.append(("reload", _nested(10_000, '{"a":', "}").encode()))
        payloads.append(("silence", b"\xff\xfe"))
        for i, (name, raw) in enumerate(payloads):
            pub.send(settings.topic("commands", name), raw)
            assert _wait_for(lambda i=i: len(replies) == i + 1, 15), f"no reply to command {i}: {raw[:80]!r}"
            assert replies[-1]["ok"] is False and replies[-1]["reason"], replies[-1]
            assert thread.is_alive(), errors
        # the consumer still stores readings
        pub.send(settings.topic("telemetry", "D1"), json.dumps(_ok()).encode())
        assert _wait_for(lambda: consumer.store.count("readings", device_id="D1") == 1)
    finally:
        _stop(consumer, thread)
        pub.close()
        answers.close()
    assert not errors


def test_a_hostile_array_costs_one_dead_letter_and_stays_bounded(settings):
    settings = settings.replace(max_readings_per_message=1000)
    consumer, thread, errors = _start(settings)
    pub = Publisher(settings.broker_url)
    try:
        pub.send(settings.topic("telemetry", "D1"), ("[" + ",".join(["{}"] * 1000) + "]").encode())
        pub.send(settings.topic("telemetry", "D1"), ("[" + ",".join(["{}"] * 1001) + "]").encode())
        pub.send(settings.topic("telemetry", "D1"), json.dumps(_ok()).encode())
        assert _wait_for(lambda: consumer.store.count("readings", device_id="D1") == 1)
        dead = consumer.store.read_frame("deadletters")
        assert list(dead["reason"]) == ["missing_device_id", "too_many_readings"]
        assert "1000 of 1000 elements refused" in dead["detail"][0]
        # every bad element is still counted by reason
        assert consumer.metrics.sample("itap_readings_rejected_total", reason="missing_device_id") == 1000
    finally:
        _stop(consumer, thread)
        pub.close()
    assert not errors


def test_devices_past_max_devices_are_refused_with_a_dead_letter(settings):
    settings = settings.replace(max_devices=3)
    consumer, thread, errors = _start(settings)
    pub = Publisher(settings.broker_url)
    try:
        for i in range(5):
            pub.send(settings.topic("telemetry", f"D{i}"), json.dumps(_ok(f"D{i}")).encode())
        pub.send(settings.topic("telemetry", "D0"), json.dumps(_ok("D0", ts=T0 + 1)).encode())
        assert _wait_for(lambda: consumer.store.count("readings", device_id="D0") == 2)
        assert consumer.store.count("readings") == 4
        assert consumer.store.count("deadletters", reason="too_many_devices") == 2
        assert len(consumer.processor.windows) == 3
    finally:
        _stop(consumer, thread)
    assert not errors
    # a restart refills at most max_devices devices, those heard from most recently
    with consumer.store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO readings (device_id, ts, state) VALUES ('OLD', 1767225000, 'RUN')")
    consumer, thread, errors = _start(settings.replace(max_devices=2))
    try:
        assert len(consumer.processor.windows) == 2  # of 4 stored devices
        assert "D0" in consumer.processor.windows and "OLD" not in consumer.processor.windows
    finally:
        _stop(consumer, thread)
        pub.close()
    assert not errors


@pytest.mark.parametrize(
    ("column", "value", "sqlite_refuses"),
    [
        ("tag", "x" * 65, False),  # SQLite does not enforce column widths (the decoder does: see the corpus)
        ("seq", 2**63, True),
        ("tag", "a\u0000b", False),
        ("device_id", "D" * 129, False),
        ("tag", "\ud800", True),
    ],
)
def test_rows_the_store_refuses_are_dead_lettered_and_the_rest_stored(db_url, schema, column, value, sqlite_refuses):
    """The last line of defence behind the decoder: a batch the store refuses is split until
    the refused rows are found; they become ``store_rejected`` dead letters, the rest is
    stored and the batch counts as committed (its messages are acknowledged)."""
    store = Store(db_url, schema)
    rejected: list[tuple[str, list]] = []

    def on_rejected(part, rows, why):
        rejected.append((part, rows))
        return [{"topic": "itap/telemetry/x" * 40, "reason": "store_rejected", "detail": why,
                 "device_id": "\ud800" * 200, "payload": "p\u0000" * 100, "received_at": 1.0}]

    writer = StoreWriter(store, on_rejected=on_rejected)
    cols = store.reading_columns
    good = [dict.fromkeys(cols) | {"device_id": "OK", "ts": float(T0 + i), "state": "RUN"} for i in range(20)]
    bad = dict.fromkeys(cols) | {"device_id": "OK", "ts": float(T0 + 100), "state": "RUN", column: value}
    committed = threading.Event()
    batch = StoreBatch(readings=[tuple(r[c] for c in cols) for r in [*good[:7], bad, *good[7:]]])
    batch.on_commit.append(committed.set)
    writer.submit(batch)
    assert writer.flush(timeout_s=60)
    assert committed.is_set() and writer.alive
    kept = store.read_frame("readings")
    if store.dialect == "sqlite" and not sqlite_refuses:
        assert len(kept) == 21 and not rejected
    else:
        assert sorted(kept["ts"]) == [float(T0 + i) for i in range(20)]
        assert [part for part, _rows in rejected] == ["readings"]
        assert store.count("deadletters", reason="store_rejected") == 1
    writer.close(timeout_s=10)
    store.dispose()


def test_a_dead_store_writer_ends_the_service(settings):
    """A dead thread is a dead service: `run` raises `ServiceFailed` (exit 3 from `itap run`)."""
    consumer, thread, errors = _start(settings)
    pub = Publisher(settings.broker_url)
    try:
        batch = StoreBatch()

        def explode() -> None:
            raise SystemError("a bug in a commit callback")

        batch.on_commit.append(explode)
        consumer.writer.submit(batch)
        thread.join(30)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ServiceFailed)
        assert "store writer" in str(errors[0])
        ok, detail = consumer.health()
        assert not ok and any("store writer" in p for p in detail["problems"])
    finally:
        pub.close()


def test_a_store_that_stops_committing_makes_health_fail_and_the_service_end(settings, tmp_path):
    """A store that cannot commit (here: another process holds SQLite's write lock) is
    retried without loss; once it has lasted ``stall_timeout`` seconds, ``health`` fails and
    the watchdog ends the service, without hanging on the unfinished batch."""
    import sqlite3

    settings = settings.replace(stall_timeout=2.0)
    consumer, thread, errors = _start(settings)
    pub = Publisher(settings.broker_url)
    path = settings.db_url.removeprefix("sqlite:///")
    lock = sqlite3.connect(path, timeout=1, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        pub.send(settings.topic("telemetry", "D1"), json.dumps(_ok()).encode())
        seen_unhealthy = _wait_for(lambda: not consumer.health()[0] or not thread.is_alive(), 60)
        assert seen_unhealthy
        thread.join(90)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ServiceFailed), errors
        assert "has not committed" in str(errors[0])
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        pub.close()
    # nothing was acknowledged: the reading comes again to the next consumer
    consumer2, thread2, errors2 = _start(settings.replace(stall_timeout=120.0))
    try:
        assert _wait_for(lambda: consumer2.store.count("readings", device_id="D1") == 1)
    finally:
        _stop(consumer2, thread2)
    assert not errors2


def test_the_reload_attack_through_a_running_consumer_runs_no_code(settings, tmp_path, trained):
    """Issue 14's attack, end to end: a reload command naming a planted pickle (with a
    manifest holding its sha256) is refused outside the models folder, and refused
    unpickled inside it when the operator holds a model key; the model in use stays."""
    from test_model_trust import _plant_attack

    from itap_stream.adapters import artifacts

    key_file = tmp_path / "model.key"
    key_file.write_text("operator-secret-key-0123456789\n", encoding="utf-8")
    models = tmp_path / "models"
    models.mkdir()
    artifacts.save(trained, models / "current.joblib", key=key_file.read_bytes().strip())
    settings = settings.replace(model_path=str(models / "current.joblib"), model_key_file=str(key_file))
    marker = tmp_path / "pwned"
    outside = _plant_attack(tmp_path / "elsewhere", marker)
    inside = _plant_attack(models / "sub", marker)
    consumer, thread, errors = _start(settings)
    answers = CommandAnswers(settings)
    replies = answers.replies
    pub = Publisher(settings.broker_url)
    try:
        for i, path in enumerate((outside, inside, models / ".." / "elsewhere" / "e.joblib")):
            body = {"parts": ["model"], "model_path": str(path)}
            pub.send(settings.topic("commands", "reload"), json.dumps(body).encode())
            assert _wait_for(lambda i=i: len(replies) == i + 1, 15)
            assert replies[-1]["ok"] is False, replies[-1]
            assert not marker.exists(), f"the planted pickle ran: {path}"
        assert "models" in replies[0]["reason"] and "not signed" in replies[1]["reason"]
        assert consumer.settings.model_path == str(models / "current.joblib")
        assert thread.is_alive() and not errors
    finally:
        _stop(consumer, thread)
        pub.close()
        answers.close()


def test_stop_returns_while_the_store_cannot_commit(settings):
    """SIGTERM never hangs: with a batch the store cannot commit (another process holds
    SQLite's write lock), `stop` still returns, after at most the stop's bounded waits; the
    reading was not acknowledged, so the broker delivers it to the next start."""
    import sqlite3

    consumer, thread, errors = _start(settings)
    pub = Publisher(settings.broker_url)
    lock = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"), timeout=1, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        pub.send(settings.topic("telemetry", "D1"), json.dumps(_ok()).encode())
        assert _wait_for(lambda: consumer.writer.stalled_for() > 0.5)
        consumer.stop()  # what the SIGTERM handler does
        thread.join(60)
        assert not thread.is_alive(), "stop hung on a store that cannot commit"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert not errors
    consumer2, thread2, errors2 = _start(settings)
    try:
        assert _wait_for(lambda: consumer2.store.count("readings", device_id="D1") == 1)
    finally:
        _stop(consumer2, thread2)
        pub.close()
    assert not errors2
