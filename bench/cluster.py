"""Scale-out on NATS JetStream: a 3-node nats-server cluster on loopback ports, consumers as
``itap run --source nats`` processes, PostgreSQL as the shared store.

``python -m bench.cluster`` runs the scenarios the tests (tests/network/test_cluster.py)
assert on and prints their table: a clean run against a single consumer on the same
readings, ``kill -9`` of a consumer, ``kill -9`` of a server node, a consumer joining
mid-stream; then the throughput of 1 and 2 consumers with their CPU, the MQTT-to-stored
latency and the takeover time (``python -m bench`` includes it as its cluster section).

Devices publish MQTT (QoS 1, MQTT 3.1.1) to the MQTT listener of node 0; the servers map
``itap.telemetry.*`` to ``itap.part.{{partition(P,1)}}.*`` and a work-queue stream with
3 replicas keeps it until a consumer acknowledged it after its store commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.chaos import ConsumerProc, SeqPublisher, wait_count
from itap_stream.adapters.broker import free_port, free_ports

__all__ = ["NatsCluster", "Run", "fresh_database", "nats_server", "run_cluster", "stored_rows"]

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 8
PG_ADMIN = os.environ.get("ITAP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def nats_server() -> str | None:
    """The nats-server binary, or None."""
    found = shutil.which("nats-server")
    if found:
        return found
    return "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None


class NatsCluster:
    """``nodes`` nats-servers with JetStream, routes between them, an MQTT listener each and
    the partition mapping, on free loopback ports under ``workdir``."""

    def __init__(self, workdir: Path, nodes: int = 3, partitions: int = PARTITIONS, prefix: str = "itap") -> None:
        binary = nats_server()
        if binary is None:
            raise RuntimeError("nats-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.n = nodes
        self.partitions = partitions
        self.prefix = prefix
        ports = free_ports(3 * nodes)
        self.client_ports, self.route_ports = ports[:nodes], ports[nodes : 2 * nodes]
        self.mqtt_ports = ports[2 * nodes :]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes

    @property
    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def mqtt_url(self, node: int = 0) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_ports[node]}"

    def config(self, i: int) -> str:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for j, p in enumerate(self.route_ports) if j != i)
        store = self.workdir / f"js-{i}"
        return (
            f'server_name: "n{i}"\n'
            f"listen: 127.0.0.1:{self.client_ports[i]}\n"
            f'jetstream {{ store_dir: "{store}" }}\n'
            f'cluster {{ name: "itap", listen: 127.0.0.1:{self.route_ports[i]}, routes: [{routes}] }}\n'
            # R3 like the stream: MQTT sessions must survive the loss of a node (the default counts
            # the nodes known when the first MQTT client comes, which may be 2)
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[i]}, stream_replicas: {min(3, self.n)} }}\n"
            # the consumers' `partitions` must equal P here
            f'mappings {{ "{self.prefix}.telemetry.*": '
            f'"{self.prefix}.part.{{{{partition({self.partitions},1)}}}}.{{{{wildcard(1)}}}}" }}\n'
        )

    def start(self, timeout_s: float = 60.0) -> NatsCluster:
        for i in range(self.n):
            self.start_node(i)
        self.wait_ready(timeout_s)
        return self

    def start_node(self, i: int) -> None:
        conf = self.workdir / f"nats-{i}.conf"
        conf.write_text(self.config(i), encoding="utf-8")
        log = open(self.workdir / f"nats-{i}.log", "ab")  # noqa: SIM115 - the process writes it
        self.procs[i] = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log)  # noqa: S603
        log.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until JetStream answers on the cluster (a meta leader is elected)."""
        import asyncio

        import nats

        async def probe() -> bool:
            try:
                nc = await nats.connect(self.urls.split(","), connect_timeout=1, max_reconnect_attempts=0,
                                        allow_reconnect=False)
            except Exception:  # noqa: BLE001 - not up yet
                return False
            try:
                await nc.jetstream().account_info()
                return True
            except Exception:  # noqa: BLE001 - no meta leader yet
                return False
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if asyncio.run(probe()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the NATS cluster did not become ready: {self.log_tail()}")

    def stream_leader(self, stream: str = "ITAP") -> int:
        """The node that leads ``stream`` now (its index)."""
        import asyncio

        import nats

        async def ask() -> str:
            nc = await nats.connect(self.urls.split(","))
            try:
                info = await nc.jetstream().stream_info(stream)
                return str(info.cluster.leader if info.cluster else "")
            finally:
                await nc.close()

        name = asyncio.run(ask())
        return int(name.removeprefix("n")) if name.startswith("n") else -1

    def kill9(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def log_tail(self, chars: int = 1500) -> str:
        return " | ".join((self.workdir / f"nats-{i}.log").read_text(errors="replace")[-chars:]
                          for i in range(self.n) if (self.workdir / f"nats-{i}.log").exists())

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``ITAP_TEST_PG``; dropped afterwards."""
    import psycopg2

    url = sa.engine.make_url(PG_ADMIN)
    admin = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                             dbname=url.database, connect_timeout=3)
    admin.autocommit = True
    name = f"itap_cluster_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_reachable() -> bool:
    try:
        with fresh_database():
            return True
    except Exception:  # noqa: BLE001 - any failure: no PostgreSQL here
        return False


def stored_rows(db_url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1) if
                              db_url.startswith("postgresql://") else db_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql).all()]
    finally:
        engine.dispose()


def fault_payloads(devices: int, seconds: int, seed: int = 5) -> tuple[list[str], list[tuple[str, bytes]]]:
    """Simulated readings with faults (so alerts fire), one message each, ending now:
    ``(device ids, [(topic, payload)])`` in time order."""
    from simulator.generator import default_faults, simulate

    start = time.time() - seconds - 5
    sim = simulate(devices, float(seconds), seed=seed, faults=default_faults(devices, float(seconds)),
                   start_ts=start, maint=False)
    out = [(f"itap/telemetry/{r['device_id']}", json.dumps(r).encode()) for r in sim.iter_readings()]
    return list(sim.device_ids), out


@dataclass
class Run:
    """What one cluster run stored and measured."""

    scenario: str
    sent: int
    stored: int
    distinct: int
    lost: int
    duplicated: int
    dead_lettered: int
    dead_copies: int = 0
    dead_reasons: list[str] = field(default_factory=list)
    gap_missing: int = 0  # readings the consumers reported missing (seq gaps)
    windows: list[tuple[Any, ...]] = field(default_factory=list)
    alerts: list[tuple[Any, ...]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    logs: str = ""


def consumer_env(cluster: NatsCluster | None, db_url: str, model: Path, client_id: str,
                 takeover_after: float = 10.0, **extra: str) -> dict[str, str]:
    env = os.environ | {
        "ITAP_DB_URL": db_url,
        "ITAP_MODEL_PATH": str(model),
        "ITAP_CLIENT_ID": client_id,
        "ITAP_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "ITAP_LOG_LEVEL": "INFO",
        "ITAP_SUMMARY_INTERVAL": "0",
    }
    if cluster is not None:
        env |= {"ITAP_SOURCE": "nats", "ITAP_NATS_URL": cluster.urls, "ITAP_NATS_REPLICAS": "3",
                "ITAP_PARTITIONS": str(cluster.partitions), "ITAP_TAKEOVER_AFTER": str(takeover_after)}
    return env | extra


def results(db_url: str, sent: int, devices: list[str], per_device: int) -> dict[str, Any]:
    """Counts of what the store holds against what was sent (every device's ``seq`` 0..per_device-1 once)."""
    rows = stored_rows(db_url, "SELECT device_id, seq FROM readings")
    dead = stored_rows(db_url, "SELECT reason, payload FROM deadletters")
    have = {(d, int(s)) for d, s in rows}
    want = {(d, s) for d in devices for s in range(per_device)}
    copies = 0  # dead letters that are copies of stored readings (sent again by a publisher)
    for _reason, payload in dead:
        try:
            obj = json.loads(payload)
            copies += (obj.get("device_id"), obj.get("seq")) in have
        except (ValueError, AttributeError):
            pass
    gaps = stored_rows(db_url, "SELECT COALESCE(SUM(missing), 0) FROM gaps")[0][0]
    return {"sent": sent, "stored": len(rows), "distinct": len(have), "lost": len(want - have),
            "duplicated": len(rows) - len(have), "dead_lettered": len(dead), "dead_copies": copies,
            "dead_reasons": sorted({r for r, _p in dead}), "gap_missing": int(gaps)}


def windows_and_alerts(db_url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    windows = stored_rows(db_url, "SELECT device_id, window_start, window_end, round(CAST(score AS numeric), 9), "
                                  "is_anomaly FROM windows ORDER BY device_id, window_end")
    alerts = stored_rows(db_url, "SELECT device_id, rule, status, window_start, window_end FROM alerts "
                                 "WHERE status <> 'event' ORDER BY device_id, window_end, rule, status")
    return [(d, float(s), float(e), float(sc), bool(a)) for d, s, e, sc, a in windows], \
        [(d, r, st, float(ws), float(we)) for d, r, st, ws, we in alerts]


def wait_stored(db_url: str, expected: int, timeout_s: float = 180.0, quiet_s: float = 20.0) -> None:
    """Until every reading is stored, or nothing new was stored for ``quiet_s``."""
    wait_count(lambda: int(stored_rows(db_url, "SELECT COUNT(DISTINCT (device_id, seq)) FROM readings")[0][0]),
               expected, timeout_s, quiet_s, poll_s=0.2)


class AlertListener:
    """An MQTT subscriber to ``itap/alerts/#`` (as `itap alerts` is), on a node's MQTT listener."""

    def __init__(self, url: str) -> None:
        import threading

        import paho.mqtt.client as paho

        host, port = url.removeprefix("mqtt://").split(":")
        self.count = 0
        self._ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"alerts-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)

        def on_message(*_a: Any) -> None:
            self.count += 1

        self.client.on_connect = lambda c, *_a: c.subscribe("itap/alerts/#", qos=1)
        self.client.on_subscribe = lambda *_a: self._ready.set()
        self.client.on_message = on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError(f"could not subscribe to alerts on {url}")

    def wait(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> int:
        self.client.disconnect()
        self.client.loop_stop()
        return self.count


def owned(proc: ConsumerProc) -> list[int] | None:
    """The partitions a running consumer reads (its ``/healthz``), None when it does not answer."""
    import urllib.error
    import urllib.request

    url = f"http://{proc.env['ITAP_HTTP_ADDR']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
            return list(json.loads(resp.read())["partitions"])
    except urllib.error.HTTPError as exc:
        return list(json.loads(exc.read()).get("partitions", []))
    except (OSError, ValueError, KeyError):
        return None


def wait_balanced(procs: list[ConsumerProc], partitions: int, timeout_s: float = 60.0) -> float:
    """Seconds until the running consumers read every partition between them, evenly."""
    t0 = time.monotonic()
    live = [p for p in procs if p.alive()]
    share = -(-partitions // len(live))
    while time.monotonic() - t0 < timeout_s:
        got = [owned(p) for p in live]
        if all(g is not None for g in got):
            flat = sorted(x for g in got if g is not None for x in g)
            if flat == list(range(partitions)) and all(len(g or []) <= share for g in got):
                return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"partitions not balanced within {timeout_s:.0f}s: {[owned(p) for p in live]}")


def wait_log(path: Path, pattern: str, after: int, timeout_s: float) -> float | None:
    """Seconds until ``pattern`` appears in ``path`` after byte ``after``; None on timeout."""
    t0 = time.monotonic()
    rx = re.compile(pattern)
    while time.monotonic() - t0 < timeout_s:
        if rx.search(path.read_bytes()[after:].decode(errors="replace")):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def run_cluster(scenario: str, model: Path, workdir: Path, *, consumers: int = 2, devices: int = 8,
                seconds: int = 300, rate: float = 1500.0, payloads: list[tuple[str, bytes]] | None = None,
                device_ids: list[str] | None = None, takeover_after: float = 10.0, kill: str = "follower",
                kill_at: float = 0.4,
                after: Callable[[NatsCluster, list[ConsumerProc], str], dict[str, Any]] | None = None) -> Run:
    """One scenario on a fresh cluster and database: ``clean``, ``consumer kill -9``,
    ``consumer SIGTERM``, ``node kill -9``, ``consumer joins`` or ``single`` (one consumer,
    the reference).
    An MQTT client of node 1 counts the alerts published (``notes["alerts_received"]``);
    ``after`` runs once everything is stored, before the consumers stop (its result goes
    to the notes)."""
    if payloads is None:
        device_ids, payloads = fault_payloads(devices, seconds)
    assert device_ids is not None
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = NatsCluster(workdir).start()
    procs: list[ConsumerProc] = []
    notes: dict[str, Any] = {}
    try:
        with fresh_database() as db_url:
            def consumer(k: int) -> ConsumerProc:
                env = consumer_env(cluster, db_url, model, f"itap-c{k}", takeover_after)
                return ConsumerProc(env, workdir / f"consumer-{k}.log")

            n_first = 1 if scenario in ("single", "consumer joins") else consumers
            for k in range(n_first):
                procs.append(consumer(k))
                procs[-1].start()
            wait_balanced(procs, cluster.partitions)  # every partition owned before the devices start
            listener = AlertListener(cluster.mqtt_url(1))
            victim, leader, entry = -1, cluster.stream_leader(), 0
            if scenario == "node kill -9":
                # the node leading the stream, or one that only holds a replica; the devices
                # publish to the MQTT listener of another node
                victim = leader if kill == "leader" else next(i for i in (2, 1, 0) if i != leader)
                entry = next(i for i in range(cluster.n) if i != victim)
            pub = SeqPublisher(cluster.mqtt_url(entry), device_ids, seconds, rate=rate, payloads=payloads).start()
            if scenario == "consumer kill -9":
                pub.wait_until(0.4)
                procs[0].kill9()
                notes["sent_at_kill"] = pub.sent
                # from the kill until the survivors read every partition again
                notes["takeover_s"] = round(wait_balanced(procs, cluster.partitions, 120.0), 2)
            elif scenario == "consumer SIGTERM":
                pub.wait_until(0.4)
                t0 = time.monotonic()
                procs[0].sigterm()
                notes["exit_s"] = round(time.monotonic() - t0, 2)
                # it deleted its leases on the way out: no waiting for them to expire
                notes["takeover_s"] = round(wait_balanced(procs, cluster.partitions, 120.0), 2)
            elif scenario == "node kill -9":
                pub.wait_until(kill_at)
                cluster.kill9(victim)
                notes["killed_node"] = f"n{victim} ({'stream leader' if victim == leader else 'replica'})"
                notes["sent_at_kill"] = pub.sent
            elif scenario == "consumer joins":
                pub.wait_until(0.4)
                mark = procs[0].log_path.stat().st_size
                procs.append(consumer(1))
                procs[-1].start()
                notes["rebalanced_s"] = round(wait_balanced(procs, cluster.partitions, 120.0), 2)
                notes["released"] = wait_log(procs[0].log_path, r"released partition", mark, 1.0) is not None
            pub.finish()
            pub.close()
            # after a server's loss the cluster elects new leaders (stream, consumers, leases, MQTT
            # sessions) before the consumers go on: on 2 busy cores that can take half a minute
            wait_stored(db_url, len(payloads), quiet_s=60.0 if scenario == "node kill -9" else 20.0)
            if after is not None:
                notes.update(after(cluster, procs, db_url))
            rows = stored_rows(db_url, "SELECT payload FROM alerts")
            published = sum(not json.loads(r[0]).get("silenced") for r in rows)
            listener.wait(published, timeout_s=10.0)
            notes["alerts_published"] = published
            notes["alerts_received"] = listener.close()
            for p in procs:
                if p.alive():
                    p.sigterm()
            counts = results(db_url, len(payloads), device_ids, seconds)
            windows, alerts = windows_and_alerts(db_url)
            logs = "\n".join(f"== {p.log_path.name}\n" + p.log_path.read_text(errors="replace")[-3000:]
                             for p in procs)
            return Run(scenario, windows=windows, alerts=alerts, notes=notes, logs=logs, **counts)
    finally:
        for p in procs:
            if p.alive():
                p.kill9()
        cluster.stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def preload(cluster: NatsCluster, devices: list[str], per_device: int) -> int:
    """Publish readings straight to the servers (core NATS, the mapping applies) until the
    stream holds them all; returns how many it holds."""
    import asyncio

    import nats

    from bench.chaos import reading

    t0 = time.time() - per_device - 5

    async def go() -> int:
        nc = await nats.connect(cluster.urls.split(","), pending_size=256 << 20)
        js = nc.jetstream()
        for i in range(per_device):
            for d in devices:
                await nc.publish(f"itap.telemetry.{d}", json.dumps(reading(d, i, t0 + i)).encode())
            if i % 20 == 19:
                await nc.flush()
        await nc.flush()
        want = len(devices) * per_device
        for _ in range(200):
            n = int((await js.stream_info("ITAP")).state.messages)
            if n >= want:
                break
            await asyncio.sleep(0.05)
        await nc.close()
        return n

    return asyncio.run(go())


def throughput(model: Path, workdir: Path, consumers: int, devices: int = 200, per_device: int = 300) -> dict[str, Any]:
    """Readings/s stored by ``consumers`` consumers draining a stream preloaded with
    ``devices * per_device`` readings (one per message), and their CPU: the consumers
    are started, balanced, paused (SIGSTOP) while the stream fills, then let go."""
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = NatsCluster(workdir).start()
    procs: list[ConsumerProc] = []
    ids = [f"DEV-{i:05d}" for i in range(devices)]
    try:
        with fresh_database() as db_url:
            for k in range(consumers):
                procs.append(ConsumerProc(consumer_env(cluster, db_url, model, f"itap-t{k}", 120.0),
                                          workdir / f"consumer-{k}.log"))
                procs[-1].start()
            wait_balanced(procs, cluster.partitions)
            pids = [p.proc.pid for p in procs if p.proc is not None]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            n = preload(cluster, ids, per_device)
            servers = [proc.pid for proc in cluster.procs if proc is not None]
            cpu0 = [_cpu_s(pid) for pid in pids]
            server0 = sum(_cpu_s(pid) for pid in servers)
            t0 = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1))
            stored = 0
            while time.monotonic() - t0 < 300:
                with engine.connect() as conn:
                    stored = int(conn.exec_driver_sql("SELECT COUNT(*) FROM readings").scalar_one())
                if stored >= n:
                    break
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            engine.dispose()
            cpu = [_cpu_s(pid) - c for pid, c in zip(pids, cpu0, strict=True)]
            server_cpu = sum(_cpu_s(pid) for pid in servers) - server0
            for p in procs:
                p.sigterm()
            return {"consumers": consumers, "readings": n, "stored": stored, "seconds": round(elapsed, 2),
                    "readings_per_s": round(stored / elapsed, 1),
                    "cpu_cores_per_consumer": [round(c / elapsed, 2) for c in cpu],
                    "cpu_us_per_reading": round(sum(cpu) / max(1, stored) * 1e6, 1),
                    "nats_servers_cpu_cores": round(server_cpu / elapsed, 2),
                    "nats_servers_cpu_us_per_reading": round(server_cpu / max(1, stored) * 1e6, 1)}
    finally:
        for p in procs:
            if p.alive():
                p.kill9()
        cluster.stop()


class _TimedPublisher(SeqPublisher):
    """`SeqPublisher` that notes when each message was handed to paho."""

    def _run(self) -> None:
        self.sent_at: list[float] = []
        t0 = time.monotonic()
        for i, (topic, payload) in enumerate(self.payloads):
            self.sent_at.append(time.time())
            self.client.publish(topic, payload, qos=1)
            self.sent = i + 1
            ahead = (i + 1) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)


def latency(model: Path, workdir: Path, rate: float = 1000.0, seconds: float = 15.0, devices: int = 100,
            consumers: int = 2) -> dict[str, Any]:
    """MQTT publish (node 0) to committed in PostgreSQL, through the cluster, at ``rate`` msgs/s."""
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = NatsCluster(workdir).start()
    procs: list[ConsumerProc] = []
    ids = [f"DEV-{i:05d}" for i in range(devices)]
    per_device = max(40, int(rate * seconds / devices))
    try:
        with fresh_database() as db_url:
            for k in range(consumers):
                procs.append(ConsumerProc(consumer_env(cluster, db_url, model, f"itap-l{k}"),
                                          workdir / f"consumer-{k}.log"))
                procs[-1].start()
            wait_balanced(procs, cluster.partitions)
            # the servers make their MQTT session streams (3 replicas) when the first MQTT client
            # comes, and a client's session when it connects: seconds on this machine, paid once;
            # the figure is the steady state after both
            warm = AlertListener(cluster.mqtt_url(0))
            # 1,000 in flight: nats-server acknowledges an MQTT QoS 1 publish in some 100 ms here,
            # so paho's default window of 100 would itself hold the devices back to ~1,000 msgs/s
            pub = _TimedPublisher(cluster.mqtt_url(0), ids, per_device, rate=rate, inflight=1000)
            until = time.monotonic() + 30
            while not pub.client.is_connected() and time.monotonic() < until:
                time.sleep(0.01)
            index = {(d, i): k for k, (d, i) in enumerate((d, i) for i in range(per_device) for d in ids)}
            engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1))
            lat: list[float] = []
            seen: set[int] = set()
            by_second: dict[int, list[float]] = {}  # second of the run -> latencies of what was sent then
            last = 0
            pub.start()
            deadline = time.monotonic() + seconds * 3 + 60
            while len(lat) < len(index) and time.monotonic() < deadline:
                time.sleep(0.01)
                # two consumers commit concurrently: ids do not become visible in order, so look
                # back a little and count each reading once
                with engine.connect() as conn:
                    rows = conn.exec_driver_sql(f"SELECT id, device_id, seq FROM readings WHERE id > {last - 20_000} "
                                                "ORDER BY id").all()
                now = time.time()
                for _rid, dev, seq in rows:
                    k = index.get((dev, int(seq)))
                    if k is not None and k not in seen and k < len(pub.sent_at):
                        seen.add(k)
                        lat.append(now - pub.sent_at[k])
                        by_second.setdefault(int(pub.sent_at[k] - pub.sent_at[0]), []).append(lat[-1])
                if rows:
                    last = max(last, int(rows[-1][0]))
            engine.dispose()
            pub.close()
            warm.close()
            for p in procs:
                p.sigterm()
            lat.sort()

            def q(x: float) -> float:
                return round(lat[min(len(lat) - 1, int(x * len(lat)))] * 1000, 1) if lat else float("nan")

            worst = {s: round(max(v) * 1000) for s, v in sorted(by_second.items())}
            return {"rate_msgs_per_s": rate, "consumers": consumers, "readings": len(lat),
                    "stored_p50_ms": q(0.5), "stored_p95_ms": q(0.95), "stored_p99_ms": q(0.99),
                    "worst_ms_by_second": worst}
    finally:
        for p in procs:
            if p.alive():
                p.kill9()
        cluster.stop()


def _fmt(run: Run) -> str:
    return (f"| {run.scenario} | {run.sent:,} | {run.stored:,} | {run.lost} | {run.gap_missing} | "
            f"{run.duplicated} | {run.dead_lettered} | {len(run.windows):,} | {len(run.alerts)} | "
            f"{json.dumps(run.notes)} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=300, help="readings per device (one a second of event time)")
    ap.add_argument("--scenarios", action="store_true", help="only the scenarios (no throughput and latency)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "cluster.json"))
    args = ap.parse_args(argv)
    from bench.chaos import _train_model

    with tempfile.TemporaryDirectory(prefix="itap-cluster-") as tmp:
        work = Path(tmp)
        model = _train_model(work / "model.joblib")
        ids, payloads = fault_payloads(args.devices, args.seconds)
        print("| scenario | sent | stored | lost | reported missing (seq gaps) | stored twice | dead letters | windows "
              "| alerts | notes |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        runs: dict[str, Run] = {}
        plan = [("single", "single", "follower"), ("clean", "clean", "follower"),
                ("consumer kill -9", "consumer kill -9", "follower"),
                ("node kill -9 (a replica)", "node kill -9", "follower"),
                ("node kill -9 (the stream leader)", "node kill -9", "leader"),
                ("consumer joins", "consumer joins", "")]
        for label, name, kill in plan:
            run = run_cluster(name, model, work / label.replace(" ", "_"), payloads=payloads, device_ids=ids,
                              seconds=args.seconds, kill=kill)
            run.scenario = label
            runs[label] = run
            print(_fmt(run), flush=True)
        ref = runs["single"]
        for name, run in runs.items():
            print(f"{name}: windows equal to the single consumer's: {run.windows == ref.windows}; alerts equal: "
                  f"{run.alerts == ref.alerts}")
        report: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "nats_server": subprocess.run(
                [nats_server() or "nats-server", "--version"], capture_output=True, text=True).stdout.strip()},
            "scenarios": {name: {"sent": r.sent, "stored": r.stored, "lost": r.lost, "gap_missing": r.gap_missing,
                                 "duplicated": r.duplicated,
                                 "dead_lettered": r.dead_lettered, "windows_equal": r.windows == ref.windows,
                                 "alerts_equal": r.alerts == ref.alerts, **r.notes} for name, r in runs.items()},
        }
        if not args.scenarios:
            tp = [throughput(model, work / f"tp{n}", n) for n in (1, 2)]
            lat = latency(model, work / "latency")
            report |= {"throughput": tp, "latency": lat}
            print("\n| consumers | readings/s stored | CPU cores per consumer | consumers' CPU µs per reading | "
                  "3 nats-servers: CPU cores (µs per reading) |")
            print("|---:|---:|---|---:|---:|")
            for t in tp:
                print(f"| {t['consumers']} | {t['readings_per_s']:,.0f} | {t['cpu_cores_per_consumer']} | "
                      f"{t['cpu_us_per_reading']} | {t['nats_servers_cpu_cores']} "
                      f"({t['nats_servers_cpu_us_per_reading']}) |")
            print(f"\nMQTT-to-stored latency at {lat['rate_msgs_per_s']:,.0f} msgs/s, {lat['consumers']} consumers: "
                  f"p50 {lat['stored_p50_ms']} ms, p95 {lat['stored_p95_ms']} ms, p99 {lat['stored_p99_ms']} ms")
        report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
