"""Prometheus metrics of the consumer, on an injected registry (tests use a fresh one)."""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from itap_stream.errors import ConfigError

__all__ = ["Metrics", "serve"]

log = logging.getLogger(__name__)


class Metrics:
    """Every metric the consumer exports; names follow Prometheus conventions."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.received = Counter("itap_readings_received", "Readings decoded from MQTT payloads", registry=r)
        self.messages = Counter("itap_messages_received", "MQTT messages received on telemetry topics", registry=r)
        self.processed = Counter("itap_readings_processed", "Readings accepted into device windows", registry=r)
        self.rejected = Counter(
            "itap_readings_rejected", "Readings or payloads rejected, by reason", ["reason"], registry=r
        )
        self.sparkplug_rebirths = Counter(
            "itap_sparkplug_rebirth_requests", "Sparkplug B rebirth requests (NCMD) sent to edge nodes", registry=r
        )
        self.redelivered = Counter(
            "itap_readings_redelivered",
            "Readings the broker delivered again after a reconnect that were already in "
            "(stored once, not dead-lettered)",
            registry=r,
        )
        self.windows = Counter("itap_windows_scored", "Windows featured and scored", registry=r)
        self.anomalies = Counter("itap_anomalies", "Anomalous windows, by dominant family", ["family"], registry=r)
        self.alerts = Counter(
            "itap_alerts", "Alert transitions, by rule, severity and status", ["rule", "severity", "status"], registry=r
        )
        self.webhook_failures = Counter(
            "itap_webhook_failures", "Alerts the webhook could not deliver (dead-lettered)", registry=r
        )
        self.reloads = Counter(
            "itap_reloads", "Hot reloads of rules, sensor ranges and model, by part and result", ["part", "result"],
            registry=r,
        )
        self.silenced = Counter(
            "itap_alerts_silenced", "Alert transitions stored but not published (a silence was in force), by rule",
            ["rule"], registry=r,
        )
        self.commands = Counter(
            "itap_commands", "Commands received on the command topic, by command and result", ["command", "result"],
            registry=r,
        )
        self.gaps = Counter(
            "itap_readings_gap", "readings devices numbered (seq) that never arrived (jumps in seq)", registry=r,
        )
        self.broker_dropped = Gauge(
            "itap_broker_dropped_messages", "the broker's own count of messages it dropped "
            "($SYS/broker/publish/messages/dropped on mosquitto; -1 until the broker reports it)", registry=r,
        )
        self.broker_dropped.set(-1)
        self.baseline_shifts = Counter(
            "itap_baseline_shifts", "baseline_shift events (a settled deviation became a device's normal), by how: "
            "settled, held or operator", ["how"], registry=r,
        )
        self.model_drift = Counter(
            "itap_model_drift", "model_drift events (normal scores shifted: retrain), by scope", ["scope"], registry=r
        )
        self.latency = Histogram(
            "itap_processing_latency_seconds",
            "Time from receiving a message to its readings being stored",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "itap_batch_size_messages",
            "Messages per micro-batch",
            buckets=(1, 4, 16, 64, 256, 1024, 4096),
            registry=r,
        )
        self.queue_depth = Gauge("itap_queue_depth_messages", "Messages waiting for processing", registry=r)
        self.active_devices = Gauge("itap_active_devices", "Devices with a window buffer", registry=r)
        self.store_latency = Histogram(
            "itap_store_write_seconds", "Duration of one store transaction", registry=r
        )
        self.connected = Gauge("itap_mqtt_connected", "1 while connected to the broker", registry=r)
        self.partitions = Gauge("itap_partitions_owned", "Partitions of the NATS stream this consumer reads "
                                "(source: nats)", registry=r)
        self.reconnects = Counter("itap_mqtt_reconnects", "Reconnections to the broker", registry=r)
        self.unacked = Gauge(
            "itap_mqtt_unacked_messages",
            "Messages received but not yet acknowledged (acknowledged after the store commit)",
            registry=r,
        )
        self.outbox = Gauge(
            "itap_mqtt_outbox_messages",
            "Alerts, dead letters and replies waiting for the broker (held while it is away)",
            registry=r,
        )
        self.publish_refused = Counter(
            "itap_mqtt_publish_refused", "Publications refused because the outbox was full (alerts stay in the store)",
            registry=r,
        )
        self.retained_ignored = Counter(
            "itap_mqtt_retained_ignored",
            "Retained messages on subscribed topics acknowledged and ignored (a retained copy is no new reading)",
            registry=r,
        )
        self.model = Info("itap_model", "The model in use", registry=r)

    def sample(self, name: str, **labels: str) -> float:
        """Current value of a sample, e.g. ``sample("itap_readings_processed_total")``."""
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def total(self, name: str) -> float:
        """The sum of a metric's samples over all its labels (``itap_anomalies_total`` of every family)."""
        return float(sum(s.value for m in self.registry.collect() for s in m.samples if s.name == name))

    def set_model(self, info: dict[str, Any]) -> None:
        self.model.info({k: str(v) for k, v in info.items()})


def serve(
    addr: str,
    registry: CollectorRegistry,
    *,
    fleet: Callable[..., dict[str, Any]] | None = None,
    health: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
    allowed_hosts: Iterable[str] | str = (),
    threads: int = 8,
    request_timeout: float = 10.0,
    actions: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
    credentials: tuple[str, str] | None = None,
) -> Any:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` and, with ``fleet``, the dashboard (``/``)
    and its data (``/api/fleet?limit=&offset=``); returns the server (``.shutdown()`` to stop).

    Parameters
    ----------
    fleet
        Called as ``fleet(limit=..., offset=...)`` for one page of ``/api/fleet`` (``FleetView.snapshot``).
    health
        Returns ``(ok, detail)``: ``/healthz`` answers 200 ``{"status": "ok", **detail}`` when ``ok``,
        else 503 ``{"status": "failing", **detail}``. Without it ``/healthz`` answers 200 (the server is up).
    allowed_hosts
        ``Host`` header names answered besides the bound address and ``localhost`` (a string is split
        on commas); any other is refused with 421 (DNS rebinding: the fleet JSON is unauthenticated).
    threads
        Connections served at once; the others wait in a queue (at most ``_MAX_PENDING``).
    request_timeout
        Seconds a connection gets, from its accept, to send its request (and per write of the answer).
    actions
        With ``fleet``: ``POST /api/ack`` and ``POST /api/silence`` (a JSON object) call
        ``actions(name, body)`` (the consumer's command path: the same as ``itap ack`` and
        ``itap silence add``) and answer its reply. Refused (403) unless ``credentials``
        ``(user, password)`` are set; each request then needs them as HTTP Basic auth (401 otherwise).
    """
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if threads < 1 or request_timeout <= 0:
        msg = f"cannot serve metrics on {addr!r}: threads must be >= 1 and request_timeout > 0; " \
              f"got threads={threads}, request_timeout={request_timeout}"
        raise ConfigError(msg)
    if isinstance(allowed_hosts, str):
        allowed_hosts = allowed_hosts.split(",")
    accepts = _host_check(host, allowed_hosts)
    page = _dashboard_page() if fleet is not None else b""

    class Handler(BaseHTTPRequestHandler):
        timeout = request_timeout

        def setup(self) -> None:
            super().setup()
            # the request must arrive within request_timeout of the accept, however long it queued
            accepted = getattr(self.server, "accepted_at", {}).get(self.request) or time.monotonic()
            self.connection.settimeout(max(_MIN_READ_S, accepted + request_timeout - time.monotonic()))

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.connection.settimeout(request_timeout)  # the request is in: the answer gets the full timeout
            if not accepts(self.headers.get("Host")):
                self._send(421, b"421 Misdirected Request: this Host is not served here\n", "text/plain; charset=utf-8")
                return
            path, _, query = self.path.partition("?")
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._healthz()
            elif fleet is not None and path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            elif fleet is not None and path == "/api/fleet":
                try:
                    limit, offset = _page_params(query)
                except ValueError as exc:
                    self._send(400, f"400 Bad Request: {exc}\n".encode(), "text/plain; charset=utf-8")
                    return
                data = fleet(limit=limit, offset=offset)
                data["actions"] = {"enabled": actions is not None and credentials is not None}
                self._send(200, json.dumps(data, default=str).encode(), "application/json")
            else:
                self.send_error(404)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.connection.settimeout(request_timeout)
            if not accepts(self.headers.get("Host")):
                self._send(421, b"421 Misdirected Request: this Host is not served here\n", "text/plain; charset=utf-8")
                return
            path = self.path.partition("?")[0]
            name = {"/api/ack": "ack", "/api/silence": "silence"}.get(path)
            if fleet is None or actions is None or name is None:
                self.send_error(404)
                return
            if credentials is None:
                self._json(403, {"ok": False, "reason": "actions from the dashboard are off: set http_username and "
                                                        "ITAP_HTTP_PASSWORD (or http_password_file) to turn them on"})
                return
            if not _authorised(self.headers.get("Authorization"), credentials):
                self._json(401, {"ok": False, "reason": "wrong or missing user name and password"})
                return
            try:
                size = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                size = -1
            if not 0 < size <= _MAX_ACTION_BYTES or "json" not in (self.headers.get("Content-Type") or ""):
                self._json(400, {"ok": False, "reason": f"send a JSON object of at most {_MAX_ACTION_BYTES} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(size))
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                self._json(400, {"ok": False, "reason": "the body is not a JSON object"})
                return
            user = credentials[0]
            body = {k: v for k, v in body.items() if k != "request_id"} | {"by": f"{user} (dashboard)"}
            try:
                reply = actions(name, body)
            except Exception as exc:  # noqa: BLE001 - an action that fails is an answer, never a dead thread
                log.exception("dashboard action %s failed", name)
                reply = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
            self._json(200 if reply.get("ok") else 409, reply)

        def _json(self, code: int, body: dict[str, Any]) -> None:
            self._send(code, json.dumps(body, default=str).encode(), "application/json")

        def _healthz(self) -> None:
            ok = True
            detail: dict[str, Any] = {}
            if health is not None:
                try:
                    ok, detail = health()
                except Exception as exc:  # noqa: BLE001 - a broken check is a failing service, not a 500
                    log.exception("health check failed")
                    ok, detail = False, {"error": f"{type(exc).__name__}: {exc}"}
            body = {"status": "ok" if ok else "failing"} | {k: v for k, v in detail.items() if k != "status"}
            self._send(200 if ok else 503, json.dumps(body, default=str).encode(), "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    try:
        server = _PooledHTTPServer((host, int(port)), Handler, threads=threads)
    except (ValueError, OSError) as exc:
        msg = f"cannot serve metrics on {addr!r}: {exc}"
        raise ConfigError(msg) from exc
    threading.Thread(target=server.serve_forever, name="itap-http", daemon=True).start()
    bound = f"[{host}]" if ":" in host else host
    where = f"{bound}:{server.server_address[1]}"  # the real port when asked for port 0
    log.info(
        "metrics on http://%s/metrics, health on http://%s/healthz%s (%d threads)",
        where, where, f", dashboard on http://{where}/" if fleet is not None else "", threads,
    )
    return server


#: The largest dashboard action (POST) body.
_MAX_ACTION_BYTES = 16_384


def _authorised(header: str | None, credentials: tuple[str, str]) -> bool:
    """HTTP Basic credentials in ``header`` equal ``credentials`` (compared in constant time).

    Examples
    --------
    >>> import base64
    >>> _authorised("Basic " + base64.b64encode(b"op:s3cret").decode(), ("op", "s3cret"))
    True
    >>> _authorised("Basic " + base64.b64encode(b"op:guess").decode(), ("op", "s3cret")), _authorised(None, ("a", "b"))
    (False, False)
    """
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    ok_user = hmac.compare_digest(user.encode(), credentials[0].encode())
    return hmac.compare_digest(password.encode(), credentials[1].encode()) and ok_user


#: Accepted connections waiting for a worker at most; more are closed at once (file descriptors are finite).
_MAX_PENDING = 512
#: Least time a queued connection gets to deliver a request it has already sent.
_MIN_READ_S = 0.05
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_WILDCARD = ("0.0.0.0", "::")  # noqa: S104 - names of the wildcard bind, compared, not bound


class _PooledHTTPServer(HTTPServer):
    """An HTTP server whose connections are served by a fixed pool of ``threads`` workers
    (``ThreadingHTTPServer`` starts a thread per connection, unbounded)."""

    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, threads: int) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.accepted_at: dict[Any, float] = {}
        self._pending_lock = threading.Lock()
        self._closing = False
        super().__init__(address, handler)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"itap-http-{self.server_address[1]}")

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._pending_lock:
            refuse = self._closing or len(self.accepted_at) >= _MAX_PENDING
            if not refuse:
                self.accepted_at[request] = time.monotonic()
        if refuse:
            self.shutdown_request(request)
            return
        try:
            self._pool.submit(self._serve_one, request, client_address)
        except RuntimeError:  # the interpreter is exiting: socketserver closes the connection
            with self._pending_lock:
                self.accepted_at.pop(request, None)
            raise

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            if not self._closing:
                self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - socketserver's own policy: report and go on
            self.handle_error(request, client_address)
        finally:
            with self._pending_lock:
                self.accepted_at.pop(request, None)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)

    def shutdown(self) -> None:
        """Stop accepting, end the connections in service or waiting, stop the workers; does not block on clients."""
        super().shutdown()
        with self._pending_lock:
            self._closing = True
            waiting = list(self.accepted_at)
        for sock in waiting:  # wakes a worker blocked reading an idle client
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock in waiting:
            with contextlib.suppress(OSError):
                sock.close()
        self.server_close()


def _host_check(bound: str, allowed_hosts: Iterable[str]) -> Callable[[str | None], bool]:
    """``accepts(host_header)``: True for the bound address, localhost and ``allowed_hosts``; with a
    wildcard bind, also the machine's names and any IP literal (an IP cannot be rebound by DNS)."""
    names = {_host_name(h) for h in (bound, *_LOOPBACK, *allowed_hosts) if h.strip()}
    wildcard = bound in _WILDCARD
    if wildcard:
        names |= {_host_name(socket.gethostname()), _host_name(socket.getfqdn())}

    def accepts(header: str | None) -> bool:
        if not header or not header.strip():
            return False
        name = _host_name(header)
        return name in names or (wildcard and _is_ip(name))

    return accepts


def _host_name(host: str) -> str:
    """The name of a ``Host`` header, port and IPv6 brackets stripped, e.g. ``[::1]:9108`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _page_params(query: str) -> tuple[int, int]:
    """``limit`` and ``offset`` of an ``/api/fleet`` query string; ValueError with what was expected."""
    params = parse_qs(query, keep_blank_values=True)
    out = []
    for name, default, most in (("limit", _FLEET_LIMIT, _FLEET_LIMIT_MAX), ("offset", 0, None)):
        values = params.get(name)
        if not values:
            out.append(default)
            continue
        raw = values[-1]
        value = int(raw) if raw.strip().isdigit() else -1
        if value < 0 or (most is not None and value > most):
            bound = f"from 0 to {most}" if most is not None else "of 0 or more"
            msg = f"/api/fleet: {name} must be an integer {bound}; got {raw!r}"
            raise ValueError(msg)
        out.append(value)
    return out[0], out[1]


_FLEET_LIMIT = 200
_FLEET_LIMIT_MAX = 1000


def _dashboard_page() -> bytes:
    from importlib.resources import files

    return files("itap_stream.app").joinpath("static/dashboard.html").read_bytes()
