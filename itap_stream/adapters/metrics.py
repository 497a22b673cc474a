"""Prometheus metrics of the consumer, on an injected registry (tests use a fresh one)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
        self.redelivered = Counter(
            "itap_readings_redelivered",
            "Readings the broker delivered again after a reconnect that were already in (stored once, not dead-lettered)",
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
        self.reconnects = Counter("itap_mqtt_reconnects", "Reconnections to the broker", registry=r)
        self.unacked = Gauge(
            "itap_mqtt_unacked_messages", "Messages received but not yet acknowledged (acknowledged after the store commit)",
            registry=r,
        )
        self.outbox = Gauge(
            "itap_mqtt_outbox_messages", "Alerts, dead letters and replies waiting for the broker (held while it is away)",
            registry=r,
        )
        self.publish_refused = Counter(
            "itap_mqtt_publish_refused", "Publications refused because the outbox was full (alerts stay in the store)",
            registry=r,
        )
        self.model = Info("itap_model", "The model in use", registry=r)

    def sample(self, name: str, **labels: str) -> float:
        """Current value of a sample, e.g. ``sample("itap_readings_processed_total")``."""
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def set_model(self, info: dict[str, Any]) -> None:
        self.model.info({k: str(v) for k, v in info.items()})


def serve(
    addr: str, registry: CollectorRegistry, *, fleet: Callable[[], dict[str, Any]] | None = None
) -> Any:
    """Serve ``/metrics`` on ``host:port`` and, with ``fleet``, the dashboard (``/``) and its
    data (``/api/fleet``); returns the server (``.shutdown()`` to stop)."""
    host, _, port = addr.rpartition(":")
    page = _dashboard_page() if fleet is not None else b""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
            elif fleet is not None and path in ("/", "/index.html"):
                body, ctype = page, "text/html; charset=utf-8"
            elif fleet is not None and path == "/api/fleet":
                body, ctype = json.dumps(fleet()).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    except (ValueError, OSError) as exc:
        msg = f"cannot serve metrics on {addr!r}: {exc}"
        raise ConfigError(msg) from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="itap-http", daemon=True).start()
    log.info("metrics on http://%s/metrics%s", addr, f", dashboard on http://{addr}/" if fleet is not None else "")
    return server


def _dashboard_page() -> bytes:
    from importlib.resources import files

    return files("itap_stream.app").joinpath("static/dashboard.html").read_bytes()
