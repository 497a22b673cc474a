"""Chaos: faults of the broker, the consumer and the store while devices publish, and a
sequence checker that counts lost, duplicated and reordered readings.

Every scenario runs real processes: a mosquitto the scenario starts (persistence on and
autosaved as mosquitto/mosquitto.conf has it, a free port), the consumer as ``itap run``
in its own process (so it can be killed), and devices publishing readings with
per-device ``seq`` numbers over QoS 1 from one paho client whose queue is their own
persistence while the broker is away. The checker then reads the store: for every
device, which sequence numbers arrived, how often, and in which order.

    python -m bench.chaos                 # every scenario, table + bench/chaos.json
    python -m bench.chaos --quick         # fewer readings, broker down 10 s instead of 30 s

The tests in ``tests/network/test_delivery.py`` run the same scenarios and assert 0 lost,
0 duplicated and no dead letter; ``tests/network/test_broker_chaos.py`` kills the broker
with the shipped mosquitto.conf (`CRASH_SCENARIOS`). ``duplicated`` counts rows sharing a device's ``seq``:
the store's unique (device, ts) key already refuses a second row for the same reading,
so this guards against a reading stored twice under another timestamp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as paho

from itap_stream.adapters.broker import MOSQUITTO_CONF, BrokerHandle, free_port, start_broker
from itap_stream.adapters.mqtt import BrokerAuth
from itap_stream.config import parse_broker_url

__all__ = ["CRASH_SCENARIOS", "SCENARIOS", "ConsumerProc", "Outcome", "SeqPublisher", "check_sequences", "main",
           "run_scenario"]

ROOT = Path(__file__).resolve().parent.parent
SIGNALS = ("rpm", "temp_c", "voltage_v", "current_a", "vibration_mm_s")


def reading(device: str, seq: int, ts: float) -> dict[str, Any]:
    """A valid, normal reading of the default sensor schema carrying its sequence number."""
    return {"device_id": device, "ts": ts, "seq": seq, "state": "RUN", "rpm": 1500.0 + seq % 7,
            "temp_c": 60.0 + (seq % 5) * 0.1, "voltage_v": 230.0, "current_a": 10.0, "vibration_mm_s": 2.0}


class SeqPublisher:
    """Devices publishing ``per_device`` readings each (``seq`` 0, 1, …; event time one
    second apart, ending now) at ``rate`` messages a second, QoS 1.

    One paho client with a persistent session and an unbounded queue: while the broker
    is away it keeps what it could not hand over and sends it after reconnecting.
    ``payloads`` overrides what is sent (for bad input and time chaos): a list of
    ``(topic, bytes)``. ``auth`` logs in (a gateway account such as itap-simulator);
    ``reconnect_min_s`` is the first pause before reconnecting (doubling up to 2 s);
    ``inflight``: QoS 1 messages sent and not yet acknowledged, at most.
    """

    def __init__(self, url: str, devices: list[str], per_device: int, *, rate: float = 1000.0,
                 prefix: str = "itap", payloads: list[tuple[str, bytes]] | None = None,
                 auth: BrokerAuth | None = None, reconnect_min_s: float = 1.0, inflight: int = 100) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.devices, self.per_device, self.rate = devices, per_device, rate
        t0 = time.time() - per_device - 5
        self.payloads = payloads if payloads is not None else [
            (f"{prefix}/telemetry/{d}", json.dumps(reading(d, i, t0 + i)).encode())
            for i in range(per_device) for d in devices
        ]
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"chaos-pub-{time.monotonic_ns()}",
                                  clean_session=False, protocol=paho.MQTTv311)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(inflight)
        # paho types the delays int but computes with floats
        self.client.reconnect_delay_set(min_delay=cast(int, reconnect_min_s), max_delay=2)
        if auth is not None:
            auth.apply(self.client, parse_broker_url(url))
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="chaos-publisher", daemon=True)

    def start(self) -> SeqPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        for i, (topic, payload) in enumerate(self.payloads):
            self.client.publish(topic, payload, qos=1)
            self.sent = i + 1
            ahead = (i + 1) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def progress(self) -> float:
        return self.sent / max(1, len(self.payloads))

    def wait_until(self, fraction: float, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.progress() < fraction and time.monotonic() < deadline:
            time.sleep(0.01)

    def finish(self, timeout_s: float = 120.0) -> None:
        """Wait until everything was published and acknowledged by the broker."""
        self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.client._out_messages and time.monotonic() < deadline:  # noqa: SLF001 - paho has no accessor
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ConsumerProc:
    """``itap run`` in its own process (so it can be killed), configured by environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 60.0) -> None:
        self.starts += 1
        mark = f"--- start {self.starts} ---\n"
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(mark)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "itap_stream.cli", "run"], env=self.env,  # noqa: S603
                                         stdout=log, stderr=log, cwd=str(ROOT))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace").rsplit(mark, 1)[-1]
            if " subscribed to " in text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        msg = f"the consumer did not come up: {self.log_path.read_text(errors='replace')[-2000:]}"
        raise RuntimeError(msg)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def sigterm(self, timeout_s: float = 30.0) -> float:
        """SIGTERM; returns seconds until it exited."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def check_sequences(db_path: Path | str, devices: list[str], per_device: int) -> dict[str, int]:
    """What the store holds against what was sent: per device, every ``seq`` in 0..per_device-1
    once. ``reordered`` counts rows stored after a row with a higher ``seq`` of the same device."""
    con = sqlite3.connect(str(db_path))
    try:
        rows = con.execute("SELECT device_id, seq FROM readings WHERE seq IS NOT NULL ORDER BY id").fetchall()
        dead = con.execute("SELECT reason, payload FROM deadletters").fetchall()
    finally:
        con.close()
    stored = set(rows)
    copies = 0  # dead letters that are copies of stored readings
    reasons: dict[str, int] = {}
    for reason, payload in dead:
        reasons[reason] = reasons.get(reason, 0) + 1
        try:
            obj = json.loads(payload)
            copies += (obj.get("device_id"), obj.get("seq")) in stored
        except (ValueError, AttributeError):
            pass
    seen: dict[str, list[int]] = {d: [] for d in devices}
    for device, seq in rows:
        seen.setdefault(device, []).append(int(seq))
    lost = duplicated = reordered = 0
    for d in devices:
        seqs = seen[d]
        lost += len(set(range(per_device)) - set(seqs))
        duplicated += len(seqs) - len(set(seqs))
        top = -1
        for s in seqs:
            if s < top:
                reordered += 1
            top = max(top, s)
    return {"stored": len(rows), "dead_lettered": len(dead), "dead_copies": copies, "lost": lost,
            "duplicated": duplicated, "reordered": reordered, "dead_reasons": reasons}


def stored_count(db_path: Path) -> int:
    try:
        con = sqlite3.connect(str(db_path))
        try:
            return int(con.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def wait_settled(db_path: Path, expected: int, timeout_s: float = 90.0, quiet_s: float = 15.0) -> None:
    """Until the store holds ``expected`` readings, or nothing changed for ``quiet_s`` (longer
    than the consumer's longest reconnect backoff)."""
    wait_count(lambda: stored_count(db_path), expected, timeout_s, quiet_s, poll_s=0.1)


def wait_count(count: Callable[[], int], expected: int, timeout_s: float, quiet_s: float, poll_s: float) -> None:
    """Until ``count()`` reaches ``expected``, stays unchanged for ``quiet_s``, or ``timeout_s`` ends."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = count()
        if n >= expected:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(poll_s)


@dataclass
class Outcome:
    """One row of the chaos table."""

    scenario: str
    sent: int
    stored: int
    dead_lettered: int
    lost: int
    duplicated: int
    reordered: int = 0
    dead_copies: int = 0  # dead letters that are copies of stored readings
    # copies the broker sent again after a fault, counted by the consumer (itap_readings_redelivered_total)
    redelivered: int = 0
    dead_reasons: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bed:
    """What a scenario works with: broker, consumer process, store file, publisher settings."""

    broker: BrokerHandle
    consumer: ConsumerProc
    db_path: Path
    devices: list[str]
    per_device: int
    rate: float
    http_port: int
    quick: bool
    receive_max: int = 500

    def publisher(self, payloads: list[tuple[str, bytes]] | None = None) -> SeqPublisher:
        return SeqPublisher(self.broker.url, self.devices, self.per_device, rate=self.rate, payloads=payloads)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as resp:  # noqa: S310
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0


def _consumer_kill9(bed: Bed) -> dict[str, Any]:
    pub = bed.publisher().start()
    pub.wait_until(0.4)
    bed.consumer.kill9()
    time.sleep(1.0)  # readings keep coming while it is down: the broker queues them in its session
    bed.consumer.start()
    pub.finish()
    return {"restarts": 1}


def _broker_restart(bed: Bed) -> dict[str, Any]:
    pub = bed.publisher().start()
    pub.wait_until(0.4)
    bed.broker.terminate()  # SIGTERM: mosquitto saves sessions and queued messages
    time.sleep(1.0)
    bed.broker.start()
    pub.finish()
    return {"broker_down_s": 1.0}


def _broker_kill9(bed: Bed) -> dict[str, Any]:
    """SIGKILL: mosquitto saves nothing at exit and comes back with its last autosave
    (``autosave_interval 1`` of mosquitto/mosquitto.conf, every 2 s in mosquitto 2.0):
    the consumer's session as it was then. What the broker took since and had not passed
    to the consumer yet is lost, so the kill comes while the consumer keeps up, with less
    than half its ``receive_max`` unstored (it waits up to 30 s for that moment); the
    notes say how far behind it was."""
    pub = bed.publisher().start()
    pub.wait_until(0.4)
    deadline = time.monotonic() + 30
    while pub.sent - stored_count(bed.db_path) > bed.receive_max // 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    behind = pub.sent - stored_count(bed.db_path)
    reconnects = bed.metric("itap_mqtt_reconnects_total")
    bed.broker.kill()
    sent_at_kill = pub.sent
    time.sleep(1.0)
    bed.broker.start()
    back = time.monotonic()
    reconnected_s = None
    while time.monotonic() - back < 30:
        with contextlib.suppress(OSError):
            if bed.metric("itap_mqtt_reconnects_total") > reconnects:
                reconnected_s = round(time.monotonic() - back, 2)
                break
        time.sleep(0.01)
    pub.finish()
    return {"broker_down_s": 1.0, "sent_at_kill": sent_at_kill, "unstored_at_kill": behind,
            "consumer_back_s": reconnected_s}


def _broker_down(bed: Bed) -> dict[str, Any]:
    down = 10.0 if bed.quick else 30.0
    pub = bed.publisher().start()
    pub.wait_until(0.3)
    bed.broker.terminate()
    time.sleep(down)
    alive = bed.consumer.alive()
    bed.broker.start()
    pub.finish()
    return {"broker_down_s": down, "consumer_survived": alive}


def _consumer_sigterm(bed: Bed) -> dict[str, Any]:
    pub = bed.publisher().start()
    pub.wait_until(0.5)
    exit_s = bed.consumer.sigterm()
    code = bed.consumer.proc.returncode if bed.consumer.proc else None
    stored_at_exit = stored_count(bed.db_path)
    time.sleep(0.5)
    bed.consumer.start()  # what it had not acknowledged comes with the next session
    pub.finish()
    return {"exit_s": round(exit_s, 2), "exit_code": code, "stored_at_exit": stored_at_exit}


def _slow_store(bed: Bed) -> dict[str, Any]:
    """Another connection holds the SQLite write lock for a few seconds: the consumer must
    stop acknowledging and let the broker hold the backlog, not buffer it all."""
    hold = 3.0
    pub = bed.publisher().start()
    pub.wait_until(0.2)
    con = sqlite3.connect(str(bed.db_path), timeout=30, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    peak = 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < hold:
        with contextlib.suppress(OSError):
            peak = max(peak, bed.metric("itap_mqtt_unacked_messages"))
        time.sleep(0.1)
    con.execute("COMMIT")
    con.close()
    pub.finish()
    return {"store_locked_s": hold, "peak_unacked": int(peak)}


SCENARIOS: dict[str, Callable[[Bed], dict[str, Any]]] = {
    "consumer kill -9 mid-stream": _consumer_kill9,
    "broker SIGTERM + restart under load": _broker_restart,
    "broker down 30 s": _broker_down,
    "consumer SIGTERM under load": _consumer_sigterm,
    "store locked 3 s (backpressure)": _slow_store,
}

#: Crashes: the broker forgets what it did after its last autosave, so it sends copies of
#: readings the consumer already stored without the MQTT DUP flag, and the consumer
#: dead-letters them (``late`` or ``duplicate``, counted as ``dead_copies``). The contract
#: here is 0 lost, 0 stored twice, and dead letters that are only such copies
#: (tests/network/test_broker_chaos.py); SCENARIOS promise no dead letter at all.
CRASH_SCENARIOS: dict[str, Callable[[Bed], dict[str, Any]]] = {
    "broker kill -9 + restart under load": _broker_kill9,
}


def shipped_durability() -> str:
    """The ``autosave_*`` lines of mosquitto/mosquitto.conf: how often the deployed broker
    saves its sessions and queues (what a kill -9 can lose)."""
    text = (ROOT / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    return "".join(line + "\n" for line in text.splitlines() if line.startswith("autosave_"))


def run_scenario(name: str, model_path: str | Path, *, devices: int = 10, per_device: int = 200,
                 rate: float = 800.0, quick: bool = False, receive_max: int = 500,
                 workdir: Path | None = None, intake: str = "process") -> Outcome:
    """Run one scenario from `SCENARIOS` or `CRASH_SCENARIOS` on a fresh broker, consumer and store."""
    tmp = tempfile.TemporaryDirectory(prefix="itap-chaos-") if workdir is None else None
    work = Path(tmp.name) if tmp is not None else workdir
    assert work is not None
    work.mkdir(parents=True, exist_ok=True)
    # persistence as deployed (start_broker adds the folder), on the test broker's anonymous listener
    broker = start_broker("mosquitto", conf=MOSQUITTO_CONF + shipped_durability(), persistence=True)
    db_path = work / f"chaos-{abs(hash(name)) % 10**8}.db"
    http_port = free_port()
    env = os.environ | {
        "ITAP_BROKER_URL": broker.url,
        "ITAP_DB_URL": f"sqlite:///{db_path}",
        "ITAP_MODEL_PATH": str(model_path),
        "ITAP_CLIENT_ID": f"itap-chaos-{time.monotonic_ns()}",
        "ITAP_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "ITAP_RECEIVE_MAX": str(receive_max),
        "ITAP_INTAKE": intake,
        "ITAP_LOG_LEVEL": "INFO",
    }
    consumer = ConsumerProc(env, work / "consumer.log")
    ids = [f"DEV-{i:04d}" for i in range(1, devices + 1)]
    bed = Bed(broker, consumer, db_path, ids, per_device, rate, http_port, quick, receive_max)
    try:
        consumer.start()
        notes = (SCENARIOS | CRASH_SCENARIOS)[name](bed)
        expected = devices * per_device
        wait_settled(db_path, expected)
        redelivered = 0
        if consumer.alive():
            redelivered = int(bed.metric("itap_readings_redelivered_total"))  # of the process running now
            notes.setdefault("final_exit_s", round(consumer.sigterm(), 2))
        counts = check_sequences(db_path, ids, per_device)
        return Outcome(name, expected, redelivered=redelivered, notes=notes, **counts)
    finally:
        if consumer.alive():
            consumer.kill9()
        broker.stop()
        if tmp is not None:
            tmp.cleanup()


def _train_model(path: Path) -> Path:
    from itap_stream.adapters import artifacts
    from itap_stream.app.offline import train_from_frame
    from itap_stream.config import PACKAGE_CONFIGS, load_yaml
    from itap_stream.core.schema import SensorSchema
    from simulator import simulate

    schema = SensorSchema.from_dict(load_yaml(PACKAGE_CONFIGS / "sensors.yaml"))
    art, _ = train_from_frame(simulate(4, 3600.0, seed=101, maint=False).to_frame(), schema, window=32, hop=4, seed=0)
    artifacts.save(art, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer readings; broker down 10 s instead of 30 s")
    ap.add_argument("--out", default=str(ROOT / "bench" / "chaos.json"))
    ap.add_argument("--only", default="", help="comma-separated scenario name prefixes")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="itap-chaos-model-") as tmp:
        model = _train_model(Path(tmp) / "model.joblib")
        per_device = 100 if args.quick else 300
        rows = []
        for name in SCENARIOS | CRASH_SCENARIOS:
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            print(f"[chaos] {name} …", file=sys.stderr, flush=True)
            rows.append(run_scenario(name, model, per_device=per_device, quick=args.quick))
    header = (
        f"| {'scenario':<38} | sent | stored | dead-lettered | redelivered | lost | duplicated | reordered | notes |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.notes.items())
        print(f"| {r.scenario:<38} | {r.sent} | {r.stored} | {r.dead_lettered} | {r.redelivered} | {r.lost} "
              f"| {r.duplicated} | {r.reordered} | {notes} |")
    Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    bad = [r.scenario for r in rows if r.lost or r.duplicated]
    if bad:
        print(f"readings lost or duplicated in: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
