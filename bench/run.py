"""The ITAP Stream benchmark: `python -m bench` (see bench/README.md).

Everything runs on this machine against a mosquitto the benchmark starts on a free
loopback port. The consumer under test is the real ``itap run`` process (real model,
rules and SQLite store), fed by `bench.feed.RawPublisher`, which writes pre-encoded
packets and costs almost no CPU. A section's figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho

from bench.feed import RawPublisher
from bench.payloads import Traffic, array_messages, single_messages, sparkplug_messages
from itap_stream.adapters.broker import BrokerHandle, free_port, start_broker
from itap_stream.core.readings import parse_ts
from simulator.generator import FAULT_KINDS, Fault, device_name, simulate

__all__ = ["Scale", "main", "run_benchmark"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scale:
    """How big each section is; `FULL` for the published table, `QUICK` for the smoke test."""

    messages: int = 200_000  # ceiling and pipeline, per run
    batched_samples: int = 500_000
    latency_s: float = 10.0
    latency_devices: int = 500
    growth_devices: tuple[int, ...] = (100, 1_000, 10_000, 100_000)
    growth_messages: int = 100_000  # at least 4 readings per device on top
    score_rows: int = 1_000_000
    runs: int = 3


FULL = Scale()
QUICK = Scale(
    messages=3_000,
    batched_samples=5_000,
    latency_s=2.0,
    latency_devices=20,
    growth_devices=(10, 100),
    growth_messages=1_000,
    score_rows=20_000,
    runs=1,
)

TARGETS = {
    "pipeline_qos0_ratio": (">=", 0.7),
    "pipeline_qos1_ratio": (">=", 0.8),
    "batched_samples_per_s": (">=", 500_000),
    "alert_latency_p99_ms": ("<=", 50.0),
    "stored_latency_p99_ms": ("<=", 250.0),
    "rss_100k_devices_mb": ("<=", 500.0),
    "score_rows_per_s": (">=", 200_000),
}


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers
class Watcher:
    """A paho subscriber in the benchmark process: consumer status and alerts, timestamped."""

    def __init__(self, broker: BrokerHandle, prefix: str = "itap") -> None:
        self.online: set[str] = set()
        self.alerts: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._prefix = prefix
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"itap-bench-watch-{os.getpid()}")
        c.on_message = self._on_message
        c.connect(broker.host, broker.port, keepalive=600)
        c.subscribe([(f"{prefix}/status/consumer/+", 1), (f"{prefix}/alerts/#", 1)])
        c.loop_start()
        self.client = c

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
        if msg.topic.startswith(f"{self._prefix}/status/consumer/"):
            cid = msg.topic.rsplit("/", 1)[1]
            with self._lock:
                (self.online.add if msg.payload == b"online" else self.online.discard)(cid)
        else:
            with self._lock:
                self.alerts.append((now, json.loads(msg.payload)))

    def wait_online(self, client_id: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while client_id not in self.online:
            if time.monotonic() > deadline:
                msg = f"consumer {client_id} did not come online within {timeout_s:.0f}s"
                raise RuntimeError(msg)
            time.sleep(0.02)

    def take_alerts(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            out, self.alerts = self.alerts, []
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ConsumerProc:
    """``itap run`` in a subprocess with its own SQLite file."""

    def __init__(self, broker: BrokerHandle, workdir: Path, model: Path, *, qos: int, name: str,
                 env_extra: dict[str, str] | None = None) -> None:
        self.client_id = f"itap-bench-{name}-{time.time_ns()}"
        self.db = workdir / f"{name}-{time.time_ns()}.db"
        env = dict(os.environ)
        env.update(
            ITAP_BROKER_URL=broker.url,
            ITAP_DB_URL=f"sqlite:///{self.db}",
            ITAP_MODEL_PATH=str(model),
            ITAP_QOS=str(qos),
            ITAP_CLIENT_ID=self.client_id,
            ITAP_HTTP_ADDR=f"127.0.0.1:{free_port()}",  # metrics on, as in production
            ITAP_LOG_LEVEL="WARNING",
        )
        env.update(env_extra or {})
        self.proc = subprocess.Popen(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "itap_stream.cli", "run"], env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL
        )
        self._conn: sqlite3.Connection | None = None

    def stored(self) -> int:
        if self._conn is None:
            if not self.db.exists():
                return 0
            self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, check_same_thread=False)
        try:
            # rows are numbered in commit order; readings of clean array payloads are held
            # column-wise, n per row of reading_blocks
            row = self._conn.execute("SELECT coalesce(max(id), 0) + (SELECT coalesce(sum(n), 0) FROM reading_blocks) "
                                     "FROM readings").fetchone()
        except sqlite3.OperationalError:
            return 0
        return int(row[0] or 0)

    def count(self, table: str) -> int:
        assert self._conn is not None
        return int(self._conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - fixed names

    def wait_stored(self, n: int, *, stall_s: float = 60.0, poll_s: float = 0.01) -> float:
        """Block until ``n`` readings are committed; returns the wall-clock time it happened."""
        last, last_change = -1, time.monotonic()
        while True:
            got = self.stored()
            now = time.time()
            if got >= n:
                return now
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                msg = f"consumer stalled at {got:,} of {n:,} stored readings"
                raise RuntimeError(msg)
            if self.proc.poll() is not None:
                msg = f"consumer exited with code {self.proc.returncode} after {got:,} of {n:,} readings"
                raise RuntimeError(msg)
            time.sleep(poll_s)

    def rss_parts_mb(self) -> list[float]:
        """RSS of the consumer, then of each of its child processes (intake, multiprocessing's tracker)."""
        parts: list[float] = []
        pids = [self.proc.pid]
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                continue
            parts.append(
                next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")), 0) / 1024.0
            )
        return parts

    def rss_mb(self) -> float:
        """RSS of the consumer and its children together (shared pages counted twice)."""
        return sum(self.rss_parts_mb())

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.db) + suffix).unlink(missing_ok=True)


def start_consumer(
    broker: BrokerHandle, watcher: Watcher, workdir: Path, model: Path, qos: int, name: str,
    env_extra: dict[str, str] | None = None,
) -> ConsumerProc:
    c = ConsumerProc(broker, workdir, model, qos=qos, name=name, env_extra=env_extra)
    try:
        watcher.wait_online(c.client_id)
    except RuntimeError:
        c.stop()
        raise
    return c


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "n": 0}
    s = sorted(values)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "n": len(s)}


def fault_plan(n_devices: int, onset_s: float, duration_s: float, share: float = 0.25) -> list[Fault]:
    """A fault on every ``1/share``-th device, kinds in turn (latency needs many alerts)."""
    step = max(1, round(1 / share))
    return [
        Fault(kind=FAULT_KINDS[k % len(FAULT_KINDS)], device=device_name(d + 1), onset_s=onset_s, duration_s=duration_s)
        for k, d in enumerate(range(0, n_devices, step))
    ]


# --------------------------------------------------------------------------- sections
@dataclass
class Bench:
    broker: BrokerHandle
    watcher: Watcher
    workdir: Path
    model: Path
    scale: Scale
    results: dict[str, Any] = field(default_factory=dict)

    def repeat(self, name: str, fn: Callable[[int], dict[str, float]]) -> dict[str, Any]:
        runs = []
        for i in range(self.scale.runs):
            r = fn(i)
            log(f"{name} run {i + 1}/{self.scale.runs}: " + ", ".join(f"{k}={v:,.1f}" for k, v in r.items()))
            runs.append(r)
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        self.results[name] = {"median": median, "runs": runs, "provenance": provenance()}
        return median

    # 1. ceiling
    def ceiling(self, traffic: Traffic, qos: int, protocol: int = 4, *, topic: str = "itap/telemetry/+",
                name: str | None = None) -> dict[str, Any]:
        """A bare paho subscriber's receive rate: MQTT 3.1.1 (``protocol`` 4, the ceiling the
        ratios use) or MQTT 5 (what the consumer's intake speaks by default)."""
        data = traffic.joined()
        n = len(traffic.packets)

        def once(_i: int) -> dict[str, float]:
            sink = subprocess.Popen(  # noqa: S603
                [
                    sys.executable, "-m", "bench.sink", self.broker.host, str(self.broker.port),
                    topic, str(qos), str(n), str(protocol),
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=str(ROOT),
            )
            assert sink.stdout is not None
            sink.stdout.readline()  # ready
            pub = RawPublisher(self.broker.host, self.broker.port, f"itap-bench-feed-{time.time_ns()}")
            t0 = time.time()
            pub.send(data)
            out = json.loads(sink.stdout.readline())
            sink.wait()
            pub.close()
            if out["n"] < n:
                log(f"ceiling qos{qos}: only {out['n']:,} of {n:,} messages arrived")
            return {"msgs_per_s": out["n"] / (out["last"] - t0), "received": out["n"]}

        return self.repeat(name or (f"ceiling_qos{qos}" if protocol == 4 else f"ceiling_v5_qos{qos}"), once)

    # 2. pipeline (and 3. batched: the same with array payloads)
    def pipeline(self, name: str, traffic: Traffic, qos: int, env_extra: dict[str, str] | None = None
                 ) -> dict[str, Any]:
        data = traffic.joined()

        def once(_i: int) -> dict[str, float]:
            c = start_consumer(self.broker, self.watcher, self.workdir, self.model, qos, name, env_extra)
            try:
                pub = RawPublisher(self.broker.host, self.broker.port, f"itap-bench-feed-{time.time_ns()}")
                t0 = time.time()
                pub.send(data)
                t1 = c.wait_stored(traffic.readings)
                pub.close()
                windows = c.count("windows")
                self.watcher.take_alerts()
                return {
                    "msgs_per_s": len(traffic.packets) / (t1 - t0),
                    "samples_per_s": traffic.readings / (t1 - t0),
                    "windows": windows,
                }
            finally:
                c.stop()

        return self.repeat(name, once)

    # 4. latency at a given load
    def latency(self, rate: float, qos: int) -> dict[str, Any]:
        sc = self.scale
        n_dev = sc.latency_devices
        steps = max(40, math.ceil(rate * sc.latency_s / n_dev))
        interval = 0.005

        def once(i: int) -> dict[str, float]:
            faults = fault_plan(n_dev, onset_s=steps * 0.3, duration_s=steps)
            sim = simulate(n_dev, float(steps), seed=100 + i, faults=faults)
            traffic = single_messages(sim, qos=qos)
            per_chunk = max(1, round(rate * interval))
            chunks = [b"".join(traffic.packets[k : k + per_chunk]) for k in range(0, len(traffic.packets), per_chunk)]
            index = {key: k // per_chunk for k, key in enumerate(traffic.keys)}
            c = start_consumer(self.broker, self.watcher, self.workdir, self.model, qos, "latency")
            stored_lat: list[float] = []
            sent_at: list[float] = []
            done = threading.Event()

            def poll_rows() -> None:
                conn: sqlite3.Connection | None = None
                last_id = 0
                while not done.is_set():
                    time.sleep(0.005)
                    if conn is None:
                        if not c.db.exists():
                            continue
                        conn = sqlite3.connect(f"file:{c.db}?mode=ro", uri=True)
                    try:
                        rows = conn.execute(
                            "SELECT id, device_id, ts FROM readings WHERE id > ? ORDER BY id", (last_id,)
                        ).fetchall()
                    except sqlite3.OperationalError:
                        continue
                    now = time.time()
                    for rid, dev, ts in rows:
                        k = index.get((dev, ts))
                        if k is not None and k < len(sent_at):
                            stored_lat.append(now - sent_at[k])
                        last_id = rid
                if conn is not None:
                    conn.close()

            poller = threading.Thread(target=poll_rows, daemon=True)
            try:
                self.watcher.take_alerts()
                pub = RawPublisher(self.broker.host, self.broker.port, f"itap-bench-feed-{time.time_ns()}")
                poller.start()
                t0 = time.time()
                pub.send_paced(chunks, interval, sent_at)
                t1 = c.wait_stored(traffic.readings)
                done.set()
                poller.join()
                pub.close()
                alert_lat = []
                for received, alert in self.watcher.take_alerts():
                    if alert.get("status") != "firing":
                        continue
                    k = index.get((alert["device_id"], parse_ts(alert["window_end"])))
                    if k is not None:
                        alert_lat.append(received - sent_at[k])
            finally:
                done.set()
                c.stop()
            a = percentiles(alert_lat)
            s = percentiles(stored_lat)
            return {
                "offered_msgs_per_s": len(traffic.packets) / max(1e-9, sent_at[-1] - t0),
                "alerts": a["n"],
                "alert_p50_ms": a["p50"] * 1000,
                "alert_p95_ms": a["p95"] * 1000,
                "alert_p99_ms": a["p99"] * 1000,
                "stored_p50_ms": s["p50"] * 1000,
                "stored_p95_ms": s["p95"] * 1000,
                "stored_p99_ms": s["p99"] * 1000,
                "drain_s": t1 - sent_at[-1],
            }

        return self.repeat("latency", once)

    # 5 + 7. memory and cost growth with the number of devices
    def growth(self, qos: int) -> dict[int, dict[str, Any]]:
        sc = self.scale
        w = 32
        out: dict[int, dict[str, Any]] = {}
        for n_dev in sc.growth_devices:
            per_dev = max(4, math.ceil(sc.growth_messages / n_dev))
            sim = simulate(n_dev, float(w + per_dev), seed=5)
            log(f"growth: rendering traffic for {n_dev:,} devices ...")
            warm = array_messages(sim, qos=qos, per_message=w, steps=range(w))
            measure = single_messages(sim, qos=qos, steps=range(w, w + per_dev))
            warm_data, measure_data = warm.joined(), measure.joined()
            del warm.packets[:], measure.packets[:]

            def once(
                _i: int, n_dev: int = n_dev, warm: Traffic = warm, measure: Traffic = measure,
                warm_data: bytes = warm_data, measure_data: bytes = measure_data,
            ) -> dict[str, float]:
                c = start_consumer(self.broker, self.watcher, self.workdir, self.model, qos, f"growth{n_dev}")
                try:
                    rss0 = c.rss_mb()
                    pub = RawPublisher(self.broker.host, self.broker.port, f"itap-bench-feed-{time.time_ns()}")
                    pub.send(warm_data)
                    c.wait_stored(warm.readings)
                    rss_warm = c.rss_mb()
                    t0 = time.time()
                    pub.send(measure_data)
                    t1 = c.wait_stored(warm.readings + measure.readings)
                    pub.close()
                    parts = c.rss_parts_mb()
                    rss = sum(parts)
                    self.watcher.take_alerts()
                    return {
                        "msgs_per_s": measure.readings / (t1 - t0),
                        "rss_idle_mb": rss0,
                        "rss_warm_mb": rss_warm,
                        "rss_mb": rss,
                        "rss_consumer_mb": parts[0] if parts else math.nan,
                        "rss_children_mb": sum(parts[1:]),
                        "bytes_per_device": (rss - rss0) * 1024 * 1024 / n_dev,
                    }
                finally:
                    c.stop()

            out[n_dev] = self.repeat(f"growth_{n_dev}", once)
        return out

    # 6. batch path
    def score(self) -> dict[str, Any]:
        sc = self.scale
        n_dev = 100
        steps = math.ceil(sc.score_rows / n_dev)
        csv = self.workdir / "score.csv"
        if not csv.exists():
            log(f"score: writing a {n_dev * steps:,}-row CSV ...")
            from simulator.transport import write_csv

            faults = fault_plan(n_dev, steps * 0.5, min(600.0, steps / 2))
            write_csv(simulate(n_dev, float(steps), seed=9, faults=faults), str(csv))
        rows = n_dev * steps

        def once(i: int) -> dict[str, float]:
            out_dir = self.workdir / f"score-{i}"
            t0 = time.perf_counter()
            subprocess.run(  # noqa: S603
                [sys.executable, "-m", "itap_stream.cli", "score", "--csv", str(csv), "--model", str(self.model),
                 "--out-dir", str(out_dir)],
                cwd=str(ROOT),
                check=True,
                stdout=subprocess.DEVNULL,
                env=dict(os.environ, ITAP_LOG_LEVEL="WARNING"),
            )
            dt = time.perf_counter() - t0
            shutil.rmtree(out_dir, ignore_errors=True)
            return {"rows_per_s": rows / dt, "seconds": dt}

        return self.repeat("score", once)


def stage_costs(model: Path, workdir: Path, runs: int) -> dict[str, Any]:
    """Where the time goes, in this process (no broker, no GIL contention): µs per reading
    or per window of each stage of the consumer, the median of ``runs``."""
    from bench.payloads import render_readings
    from itap_stream.adapters import artifacts
    from itap_stream.adapters.store import Store, StoreBatch, block_record, reading_rows
    from itap_stream.config import load
    from itap_stream.core.features import extract
    from itap_stream.core.pipeline import Processor
    from itap_stream.core.readings import BlockDecoder, decode
    from itap_stream.core.rules import RuleEngine
    from itap_stream.core.window import FleetWindows

    settings = load(ROOT / "configs" / "itap.yaml", environ={})
    schema = settings.schema()
    rules, resolve_after = settings.rules()
    art = artifacts.load(model)
    n_dev, steps = 100, 200
    sim = simulate(n_dev, float(steps), seed=6)
    text = render_readings(sim)
    singles = [(sim.device_ids[d], text[d][k].encode()) for k in range(steps) for d in range(n_dev)]
    arrays = [(sim.device_ids[d], ("[" + ",".join(text[d][k : k + 50]) + "]").encode())
              for k in range(0, steps, 50) for d in range(n_dev)]
    readings = [r for dev, p in singles for r in decode(p, schema, dev)[0]]
    n = len(readings)
    block_decoder = BlockDecoder(schema)
    blocks = [block_decoder.decode_block(p, dev) for dev, p in arrays]
    assert all(b is not None for b in blocks)

    def timed(fn: Callable[[], Any], per: int) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / per * 1e6

    def push_all() -> None:
        fw = FleetWindows(len(schema.names), settings.window, settings.hop)
        for r in readings:
            fw.push(r)
        fw.take_due()

    def process_all() -> None:
        proc = Processor(schema, art, RuleEngine(rules, resolve_after_s=resolve_after))
        for i in range(0, n, 500):
            proc.process(readings[i : i + 500])

    def process_blocks() -> None:
        proc = Processor(schema, art, RuleEngine(rules, resolve_after_s=resolve_after))
        for i in range(0, len(blocks), 10):  # 500 readings per micro-batch, as above
            proc.process(blocks[i : i + 10])

    values = np.stack(
        [sim.values[k : k + settings.window].transpose(1, 0, 2) for k in range(0, 64, 8)]
    ).reshape(-1, settings.window, len(schema.names))
    values = np.nan_to_num(values, nan=1.0)
    states = np.zeros(values.shape[:2], dtype=np.int8)
    X = extract(values, states)
    db = workdir / "stages.db"
    rows = reading_rows(readings)

    def store_time(batches: Callable[[], list[Any]]) -> float:
        """µs per reading to build the batches and write them (a new SQLite file; opening
        it is not counted)."""
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        store = Store(f"sqlite:///{db}", schema)
        t0 = time.perf_counter()
        for batch in batches():
            store.write(batch)
        dt = time.perf_counter() - t0
        store.dispose()
        return dt / n * 1e6

    def row_batches() -> list[Any]:  # rows built beforehand (rows_us): the insert alone
        return [StoreBatch(readings=rows[i : i + 2000]) for i in range(0, n, 2000)]

    def block_batches() -> list[Any]:  # the same readings as 50-reading blocks: records built and inserted
        return [StoreBatch(blocks=[block_record(b) for b in blocks[i : i + 40]]) for i in range(0, len(blocks), 40)]

    out: dict[str, list[float]] = {k: [] for k in (
        "decode_single_us", "decode_array50_us", "decode_array50_blocks_us", "window_push_us",
        "extract_us_per_window", "score_us_per_window", "processor_us", "processor_blocks_us", "rows_us",
        "rows_blocks_us", "sqlite_write_us", "sqlite_write_blocks_us")}
    for _ in range(runs):
        out["decode_single_us"].append(timed(lambda: [decode(p, schema, d) for d, p in singles], n))
        out["decode_array50_us"].append(timed(lambda: [decode(p, schema, d) for d, p in arrays], n))
        out["decode_array50_blocks_us"].append(
            timed(lambda: [block_decoder.decode_block(p, d) for d, p in arrays], n))
        out["window_push_us"].append(timed(push_all, n))
        out["extract_us_per_window"].append(
            timed(
                lambda: [extract(values[i : i + 256], states[i : i + 256]) for i in range(0, len(values), 256)],
                len(values),
            )
        )
        out["score_us_per_window"].append(
            timed(lambda: [art.detector.score(X[i : i + 256]) for i in range(0, len(X), 256)], len(X))
        )
        out["processor_us"].append(timed(process_all, n))
        out["processor_blocks_us"].append(timed(process_blocks, n))
        out["rows_us"].append(timed(lambda: reading_rows(readings), n))
        out["rows_blocks_us"].append(timed(lambda: reading_rows(blocks), n))
        out["sqlite_write_us"].append(store_time(row_batches))
        out["sqlite_write_blocks_us"].append(store_time(block_batches))
    return {
        "median": {k: statistics.median(v) for k, v in out.items()},
        "runs": [dict(zip(out, vals, strict=True)) for vals in zip(*out.values(), strict=True)],
    }


def train_model(workdir: Path) -> Path:
    from itap_stream.adapters import artifacts
    from itap_stream.app.offline import train_from_frame
    from itap_stream.config import load

    settings = load(ROOT / "configs" / "itap.yaml", environ={})
    normal = simulate(20, 7200.0, seed=1234).to_frame()
    art, _report = train_from_frame(normal, settings.schema(), window=settings.window, hop=settings.hop,
                                    quantile=settings.threshold_quantile, seed=0)
    path = workdir / "model.joblib"
    artifacts.save(art, path)
    return path


def provenance() -> dict[str, str]:
    """Which code on which machine, when: kept with every figure (``--merge`` mixes runs).
    ``commit`` is ``git describe``'s hash, with ``+changes`` when the tree had uncommitted ones."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=str(ROOT),  # noqa: S603,S607
                                   timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=10", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "itap_stream", "simulator", "bench", "configs"):
        commit += "+changes"
    m = machine()
    return {"commit": commit, "machine": f"{m['cpu']}, {m['cores']} cores",
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()  # noqa: S603,S607
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": mosq[0] if mosq else "unknown",
        "paho_mqtt": paho.__version__ if hasattr(paho, "__version__") else __import__("paho.mqtt").mqtt.__version__,
    }


# --------------------------------------------------------------------------- report
def summarize(results: dict[str, Any], scale: Scale) -> dict[str, Any]:
    med = {k: v["median"] for k, v in results.items()}
    s: dict[str, Any] = {}
    if "ceiling_qos0" in med and "pipeline_qos0" in med:
        s["pipeline_qos0_ratio"] = med["pipeline_qos0"]["msgs_per_s"] / med["ceiling_qos0"]["msgs_per_s"]
    if "ceiling_qos1" in med and "pipeline_qos1" in med:
        s["pipeline_qos1_ratio"] = med["pipeline_qos1"]["msgs_per_s"] / med["ceiling_qos1"]["msgs_per_s"]
    if "batched" in med:
        s["batched_samples_per_s"] = med["batched"]["samples_per_s"]
        if "ceiling_batched_qos1" in med:
            s["batched_ceiling_samples_per_s"] = med["ceiling_batched_qos1"]["msgs_per_s"] * 50
    if "sparkplug_qos1" in med and "ceiling_sparkplug_qos1" in med:
        s["sparkplug_qos1_ratio"] = med["sparkplug_qos1"]["msgs_per_s"] / med["ceiling_sparkplug_qos1"]["msgs_per_s"]
    if "sparkplug_batched" in med:
        s["sparkplug_batched_samples_per_s"] = med["sparkplug_batched"]["samples_per_s"]
    if "latency" in med:
        s["alert_latency_p99_ms"] = med["latency"]["alert_p99_ms"]
        s["stored_latency_p99_ms"] = med["latency"]["stored_p99_ms"]
    biggest = max(scale.growth_devices)
    if f"growth_{biggest}" in med and biggest >= 100_000:
        s["rss_100k_devices_mb"] = med[f"growth_{biggest}"]["rss_mb"]
    if "score" in med:
        s["score_rows_per_s"] = med["score"]["rows_per_s"]
    return s


def table(results: dict[str, Any], summary: dict[str, Any], scale: Scale) -> str:
    med = {k: v["median"] for k, v in results.items()}
    rows: list[tuple[str, str, str]] = []

    def add(what: str, value: str, target: str = "") -> None:
        rows.append((what, value, target))

    def verdict(key: str) -> str:
        if key not in summary or key not in TARGETS:
            return ""
        op, goal = TARGETS[key]
        ok = summary[key] >= goal if op == ">=" else summary[key] <= goal
        return f"{op} {goal:,g} {'met' if ok else 'NOT met'}"

    for q in (0, 1):
        if f"ceiling_qos{q}" in med:
            add(f"ceiling, bare paho subscriber, QoS {q} (msgs/s)", f"{med[f'ceiling_qos{q}']['msgs_per_s']:,.0f}")
        if f"ceiling_v5_qos{q}" in med:
            add(f"ceiling, bare paho subscriber, MQTT 5, QoS {q} (msgs/s)",
                f"{med[f'ceiling_v5_qos{q}']['msgs_per_s']:,.0f}")
        if f"pipeline_qos{q}" in med:
            add(
                f"pipeline `itap run`, 1 reading/msg, QoS {q} (msgs/s)", f"{med[f'pipeline_qos{q}']['msgs_per_s']:,.0f}"
            )
        if f"pipeline_qos{q}_ratio" in summary:
            add(
                f"pipeline / ceiling, QoS {q}",
                f"{summary[f'pipeline_qos{q}_ratio']:.2f}",
                verdict(f"pipeline_qos{q}_ratio"),
            )
    if "ceiling_batched_qos1" in med:
        add("ceiling, bare paho subscriber, 50 readings/msg, QoS 1 (samples/s)",
            f"{med['ceiling_batched_qos1']['msgs_per_s'] * 50:,.0f}")
    if "batched" in med:
        add(
            "batched payloads, 50 readings/msg (samples/s)",
            f"{med['batched']['samples_per_s']:,.0f}",
            verdict("batched_samples_per_s"),
        )
    if "ceiling_sparkplug_qos1" in med:
        add("Sparkplug B: ceiling, bare paho subscriber, 1 reading/DDATA, QoS 1 (msgs/s)",
            f"{med['ceiling_sparkplug_qos1']['msgs_per_s']:,.0f}")
    if "sparkplug_qos1" in med:
        add("Sparkplug B: `itap run`, 1 reading/DDATA, QoS 1 (readings/s)",
            f"{med['sparkplug_qos1']['samples_per_s']:,.0f}")
    if "sparkplug_batched" in med:
        add("Sparkplug B: `itap run`, 50 readings/DDATA, QoS 1 (samples/s)",
            f"{med['sparkplug_batched']['samples_per_s']:,.0f}")
    if "latency" in med:
        lat = med["latency"]
        add(f"load for latency (msgs/s offered, {lat['alerts']:.0f} alerts/run)", f"{lat['offered_msgs_per_s']:,.0f}")
        add(
            "publish → alert p50 / p95 / p99 (ms)",
            f"{lat['alert_p50_ms']:.1f} / {lat['alert_p95_ms']:.1f} / {lat['alert_p99_ms']:.1f}",
            verdict("alert_latency_p99_ms"),
        )
        add(
            "publish → stored p50 / p95 / p99 (ms)",
            f"{lat['stored_p50_ms']:.1f} / {lat['stored_p95_ms']:.1f} / {lat['stored_p99_ms']:.1f}",
            verdict("stored_latency_p99_ms"),
        )
    for n in scale.growth_devices:
        g = med.get(f"growth_{n}")
        if g is None:
            continue
        key = "rss_100k_devices_mb" if n == 100_000 else ""
        add(f"{n:,} devices: msgs/s (1 reading/msg, QoS 0)", f"{g['msgs_per_s']:,.0f}")
        add(
            f"{n:,} devices: RSS MB, consumer + intake process (bytes/device)",
            f"{g['rss_mb']:,.0f} ({g['bytes_per_device']:,.0f})",
            verdict(key) if key else "",
        )
    if "score" in med:
        add(
            f"`itap score` over a {scale.score_rows:,}-row CSV (rows/s)",
            f"{med['score']['rows_per_s']:,.0f}",
            verdict("score_rows_per_s"),
        )
    if "stages" in med:
        st = med["stages"]
        add("in-process cost: decode, 1 reading/msg (µs/reading)", f"{st['decode_single_us']:.2f}")
        add("in-process cost: decode, 50 readings/msg, one by one (µs/reading)", f"{st['decode_array50_us']:.2f}")
        if "decode_array50_blocks_us" in st:
            add("in-process cost: decode, 50 readings/msg, column-wise (µs/reading)",
                f"{st['decode_array50_blocks_us']:.2f}")
        add("in-process cost: ring buffer push (µs/reading)", f"{st['window_push_us']:.2f}")
        add("in-process cost: features (µs/window)", f"{st['extract_us_per_window']:.2f}")
        add("in-process cost: score (µs/window)", f"{st['score_us_per_window']:.2f}")
        add("in-process cost: Processor.process, all of the core (µs/reading)", f"{st['processor_us']:.2f}")
        if "processor_blocks_us" in st:
            add("in-process cost: Processor.process, 50-reading blocks (µs/reading)",
                f"{st['processor_blocks_us']:.2f}")
        add("in-process cost: store rows (µs/reading)", f"{st['rows_us']:.2f}")
        if "rows_blocks_us" in st:
            add("in-process cost: store rows from blocks (µs/reading)", f"{st['rows_blocks_us']:.2f}")
        add("in-process cost: SQLite insert, 2000/transaction (µs/reading)", f"{st['sqlite_write_us']:.2f}")
        if "sqlite_write_blocks_us" in st:
            add("in-process cost: SQLite, 50-reading blocks, record + insert (µs/reading)",
                f"{st['sqlite_write_blocks_us']:.2f}")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [
        f"| {'measure'.ljust(w0)} | {'median'.rjust(w1)} | target |",
        f"|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|--------|",
    ]
    lines += [f"| {a.ljust(w0)} | {b.rjust(w1)} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


SECTIONS = (
    "ceiling", "pipeline", "batched", "sparkplug", "latency", "growth", "score", "stages", "realnormal", "cluster",
)


def run_benchmark(
    scale: Scale, sections: Sequence[str] = SECTIONS, out: Path | None = None, *, merge: bool = False
) -> dict[str, Any]:
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="itap-bench-") as tmp:
        workdir = Path(tmp)
        log("training the model ...")
        model = train_model(workdir)
        with start_broker("mosquitto") as broker:
            log(f"mosquitto on {broker.host}:{broker.port}")
            watcher = Watcher(broker)
            b = Bench(broker, watcher, workdir, model, scale)
            try:
                n_dev = 100
                steps = math.ceil(scale.messages / n_dev)
                # faults of at most 10 minutes keep every value inside the schema's valid ranges
                sim = simulate(
                    n_dev, float(steps), seed=3, faults=fault_plan(n_dev, steps * 0.5, min(600.0, steps / 2))
                )
                traffic = {q: single_messages(sim, qos=q) for q in (0, 1)}
                for q in (0, 1):
                    if "ceiling" in sections:
                        b.ceiling(traffic[q], q)
                        b.ceiling(traffic[q], q, protocol=5)
                    if "pipeline" in sections:
                        b.pipeline(f"pipeline_qos{q}", traffic[q], q)
                del traffic
                if "batched" in sections:
                    steps = math.ceil(scale.batched_samples / n_dev)
                    bsim = simulate(n_dev, float(steps), seed=4)
                    arrays = array_messages(bsim, qos=1, per_message=50)
                    # the bare subscriber's receive rate of the same payloads (x 50: samples/s)
                    if "ceiling" in sections:
                        b.ceiling(arrays, 1, name="ceiling_batched_qos1")
                    b.pipeline("batched", arrays, 1)
                    del arrays
                if "sparkplug" in sections:
                    # a Sparkplug B edge node: one reading per DDATA, then 50 per DDATA (QoS 1)
                    spb_env = {"ITAP_SPARKPLUG_GROUPS": "bench"}
                    steps = math.ceil(scale.messages / 2 / n_dev)
                    ssim = simulate(n_dev, float(steps), seed=5)
                    single = sparkplug_messages(ssim, qos=1)
                    b.ceiling(single, 1, topic="spBv1.0/bench/#", name="ceiling_sparkplug_qos1")
                    b.pipeline("sparkplug_qos1", single, 1, spb_env)
                    del single
                    steps = math.ceil(scale.batched_samples / n_dev)
                    ssim = simulate(n_dev, float(steps), seed=6)
                    b.pipeline("sparkplug_batched", sparkplug_messages(ssim, qos=1, per_message=50), 1, spb_env)
                if "latency" in sections:
                    ref = b.results.get("pipeline_qos1", {}).get("median", {}).get("msgs_per_s")
                    rate = 0.5 * ref if ref else float(os.environ.get("ITAP_BENCH_LATENCY_RATE", 2_000.0))
                    log(f"latency at {rate:,.0f} msgs/s (half the measured QoS 1 maximum)")
                    b.latency(rate, 1)
                if "growth" in sections:
                    b.growth(0)
                if "score" in sections:
                    b.score()
                if "stages" in sections:
                    b.results["stages"] = {**stage_costs(model, workdir, scale.runs), "provenance": provenance()}
                    log("stages: " + ", ".join(f"{k}={v:.2f}" for k, v in b.results["stages"]["median"].items()))
            finally:
                watcher.close()
    if merge and out is not None and out.exists():
        previous = json.loads(out.read_text(encoding="utf-8"))
        b.results = {**previous.get("results", {}), **b.results}
    summary = summarize(b.results, scale)
    report = {
        "machine": machine(),
        "scale": scale.__dict__,
        "summary": summary,
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
        "results": b.results,
        "wall_s": time.perf_counter() - t_start,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = table(b.results, summary, scale)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
        log(f"results written to {out}")
        from bench import readme

        if out.resolve() == readme.RESULTS.resolve():
            if readme.update():
                log("README.md performance paragraph rewritten from these results")
            if readme.update_provenance():
                log("bench/README.md provenance table rewritten from these results")
    report["table"] = text
    if "realnormal" in sections and scale is not QUICK:
        # detection on a real recording of normal operation: its own table and bench/realnormal.json
        from bench.realnormal import main as realnormal

        realnormal([])
    if "cluster" in sections and scale is not QUICK:
        # scale-out on a 3-node NATS cluster: its own table and bench/cluster.json
        from bench.cluster import main as cluster
        from bench.cluster import nats_server, postgres_reachable

        if nats_server() is None or not postgres_reachable():
            log("cluster: skipped (needs nats-server and PostgreSQL at ITAP_TEST_PG)")
        else:
            cluster([])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run (the smoke test uses this)")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; the median is reported)")
    p.add_argument("--only", help=f"comma list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="JSON results file")
    p.add_argument("--merge", action="store_true", help="keep the other sections' results already in --out")
    args = p.parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.runs:
        scale = Scale(**{**scale.__dict__, "runs": args.runs})
    sections = tuple(s.strip() for s in args.only.split(",")) if args.only else SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}")
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print(
            "python -m bench: error: the benchmark needs the mosquitto binary (apt-get install mosquitto)",
            file=sys.stderr,
        )
        return 2
    run_benchmark(scale, sections, Path(args.out), merge=args.merge)
    return 0
