"""The HTTP server's guards, over real loopback sockets: the Host check (DNS rebinding), the
bounded worker pool with its request timeout, /healthz, and the paged /api/fleet."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest
from conftest import _wait_for
from prometheus_client import CollectorRegistry

from itap_stream.adapters.metrics import Metrics, serve
from itap_stream.app.fleetview import FleetView
from itap_stream.core.rules import Alert

pytestmark = pytest.mark.network


def _request(port: int, raw: bytes, *, host: str = "127.0.0.1", timeout: float = 30.0) -> tuple[int, bytes]:
    """Send ``raw`` as it is, read the answer until the server closes; (status, body)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _workers(port: int) -> int:
    """Live pool threads of the server on ``port`` (named ``itap-http-PORT_N``)."""
    return sum(1 for t in threading.enumerate() if t.name.startswith(f"itap-http-{port}_"))


def _get(port: int, path: str, host_header: str | None = None, **kw) -> tuple[int, bytes]:
    host_line = f"Host: {host_header}\r\n" if host_header is not None else ""
    return _request(port, f"GET {path} HTTP/1.1\r\n{host_line}Connection: close\r\n\r\n".encode(), **kw)


@pytest.fixture()
def served():
    """``served(**serve_kwargs)``: a server on a free loopback port (port 0), shut down after the test."""
    servers = []

    def start(addr: str = "127.0.0.1:0", **kw):
        server = serve(addr, kw.pop("registry", None) or Metrics().registry, **kw)
        servers.append(server)
        return server, server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()


def test_a_foreign_host_header_is_refused_with_421(served):
    _server, port = served(allowed_hosts="itap.internal, Dash.Example.ORG:443,")  # as in settings
    for foreign in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "itap.internal.evil"):
        status, body = _get(port, "/metrics", foreign)
        assert status == 421, foreign
        assert b"Host" in body and b"itap_" not in body
    status, _ = _request(port, b"GET /metrics HTTP/1.0\r\n\r\n")  # no Host header at all
    assert status == 421
    for ours in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "localhost.", f"[::1]:{port}",
                 "itap.internal", f"itap.internal:{port}", "dash.example.org"):
        status, body = _get(port, "/metrics", ours)
        assert status == 200, ours
        assert b"itap_readings_processed_total" in body


def test_a_wildcard_bind_accepts_the_machine_names_and_ip_literals_but_not_foreign_names(served):
    _server, port = served("0.0.0.0:0")
    for ours in (socket.gethostname(), f"{socket.getfqdn()}:{port}", f"127.0.0.1:{port}", "10.1.2.3:9108", "[fe80::1]"):
        assert _get(port, "/healthz", ours)[0] == 200, ours
    assert _get(port, "/healthz", "evil.example")[0] == 421


def test_healthz_answers_200_or_503_from_the_health_check(served):
    _server, port = served()
    status, body = _get(port, "/healthz", f"127.0.0.1:{port}")
    assert (status, json.loads(body)) == (200, {"status": "ok"})  # no check: the server itself is up

    state = {"ok": True}

    def health():
        return state["ok"], {"broker": "connected" if state["ok"] else "gone", "status": "ignored"}

    _server, port = served(health=health)
    status, body = _get(port, "/healthz", f"localhost:{port}")
    assert (status, json.loads(body)) == (200, {"status": "ok", "broker": "connected"})
    state["ok"] = False
    status, body = _get(port, "/healthz", f"localhost:{port}")
    assert (status, json.loads(body)) == (503, {"status": "failing", "broker": "gone"})

    def broken():
        raise RuntimeError("store unreachable")

    _server, port = served(health=broken)
    status, body = _get(port, "/healthz", f"localhost:{port}")
    assert status == 503 and json.loads(body) == {"status": "failing", "error": "RuntimeError: store unreachable"}


def test_300_idle_half_sent_connections_neither_make_300_threads_nor_block_a_scrape(served):
    threads = 4
    baseline = threading.active_count()
    _server, port = served(threads=threads, request_timeout=1.0)
    peak = [threading.active_count()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    idle = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"GET /metr")  # half a request line, never finished
            idle.append(s)
        # a scrape from another socket is answered once the idle ones ran out of time
        status, body = _get(port, "/metrics", f"127.0.0.1:{port}", timeout=60)
        assert status == 200 and b"itap_readings_processed_total" in body
        # all 300 were accepted before the scrape (one queue, in order): the pool, serve_forever and
        # this test's sampler run, nowhere near 300 threads
        peak[0] = max(peak[0], threading.active_count())
        assert peak[0] <= baseline + threads + 20, peak[0]
        assert _workers(port) == threads
        # the server dropped every idle connection (EOF), by its request timeout
        for s in idle:
            s.settimeout(60)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1024) == b""
    finally:
        done.set()
        sampler.join(5)
        for s in idle:
            s.close()
    assert peak[0] <= baseline + threads + 20, peak[0]


def test_shutdown_ends_idle_connections_and_the_pool_without_waiting_for_clients(served):
    server, port = served(threads=3, request_timeout=120.0)
    idle = []
    for _ in range(5):  # three with a worker each, two queued
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHo")
        idle.append(s)
    assert _wait_for(lambda: _workers(port) == 3, 30)  # three busy workers, the pool's bound
    stopper = threading.Thread(target=server.shutdown, daemon=True)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "shutdown() hung on idle clients"
    try:
        for s in idle:
            s.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1024) == b""  # closed by shutdown, long before the 120 s request timeout
        assert _wait_for(lambda: _workers(port) == 0, 30), threading.enumerate()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        for s in idle:
            s.close()


def _alert(i: int, severity: str, fired_at: float) -> Alert:
    return Alert(
        id=f"A{i:04d}", rule="r", severity=severity, device_id=f"DEV-{i:04d}", state="RUN", window_start=0.0,
        window_end=1.0, score=1.0, confidence=1.0, root_cause="x", families={"vibration": 100.0}, top_features=[],
        route="default", status="firing", fired_at=fired_at,
    )


@pytest.fixture(scope="module")
def big_fleet() -> FleetView:
    """500 devices with shuffled scores (every 7th anomalous) and 90 open alerts of mixed severity."""
    rng = np.random.default_rng(5)
    ids = [f"DEV-{i:04d}" for i in range(500)]
    scores = rng.permutation(np.linspace(0.01, 3.0, 500))
    flags = np.array([i % 7 == 0 for i in range(500)])
    severities = ["INFO", "WARNING", "CRITICAL", "NOTICE", "warning"]
    alerts = [_alert(i, severities[i % 5], fired_at=float(rng.integers(0, 10_000))) for i in range(90)]
    view = FleetView(threshold=1.0)
    view.update(ids, scores, flags, ["RUN"] * 500, alerts)
    return view


def test_api_fleet_pages_devices_worst_first_and_alerts_most_severe_first(served, big_fleet):
    _server, port = served(fleet=big_fleet.snapshot)

    def fleet(query: str = "") -> dict:
        status, body = _get(port, f"/api/fleet{query}", f"localhost:{port}")
        assert status == 200, body
        return json.loads(body)

    first = fleet()
    assert len(first["devices"]) == 200 and len(first["alerts"]) == 90  # the default page: 200
    assert first["totals"]["devices"] == 500 and first["totals"]["open_alerts"] == 90
    assert first["totals"]["unhealthy"] == sum(1 for i in range(500) if i % 7 == 0)
    assert first["page"] == {"limit": 200, "offset": 0, "devices_returned": 200, "alerts_returned": 90,
                             "incidents_returned": 90}

    pages = [fleet(f"?limit=200&offset={off}")["devices"] for off in (0, 200, 400)]
    devices = [d for p in pages for d in p]
    assert len(devices) == 500 and len({d["device_id"] for d in devices}) == 500
    ranks = [(not d["anomalous"], -d["score"]) for d in devices]
    assert ranks == sorted(ranks)  # anomalous first, then the highest score
    assert devices[0]["anomalous"] and not devices[-1]["anomalous"]

    order = {"CRITICAL": 0, "WARNING": 1, "INFO": 2}
    alerts = first["alerts"]
    keys = [(order.get(a["severity"].upper(), 3), -a["fired_at"]) for a in alerts]
    assert keys == sorted(keys)  # CRITICAL, WARNING (either case), INFO, the rest; newest first within each
    assert alerts[0]["severity"] == "CRITICAL" and alerts[-1]["severity"] == "NOTICE"

    tail = fleet("?limit=50&offset=480")
    assert [d["device_id"] for d in tail["devices"]] == [d["device_id"] for d in devices[480:]]
    assert tail["page"] == {"limit": 50, "offset": 480, "devices_returned": 20, "alerts_returned": 0,
                            "incidents_returned": 0}
    assert tail["totals"]["devices"] == 500 and tail["totals"]["open_alerts"] == 90
    assert len(fleet("?limit=1000")["devices"]) == 500
    assert fleet("?limit=0")["devices"] == []

    for bad in ("?limit=abc", "?limit=-1", "?limit=1001", "?limit=", "?offset=-5", "?offset=1.5"):
        status, body = _get(port, f"/api/fleet{bad}", f"localhost:{port}")
        assert status == 400, bad
        assert b"must be an integer" in body and (b"limit" in body or b"offset" in body), body


def test_fleet_snapshot_refuses_a_negative_page():
    with pytest.raises(ValueError, match="non-negative"):
        FleetView(threshold=1.0).snapshot(limit=-1)


def test_an_ipv6_loopback_bind_answers_its_bracketed_host(served):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    _server, port = served("[::1]:0", registry=CollectorRegistry())
    assert _get(port, "/healthz", f"[::1]:{port}", host="::1")[0] == 200
    assert _get(port, "/healthz", "evil.example", host="::1")[0] == 421
