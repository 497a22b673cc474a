"""`itap demo`: broker, model, simulator and consumer together on one machine."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as paho

from itap_stream.adapters import artifacts
from itap_stream.adapters.broker import BrokerHandle, start_broker
from itap_stream.adapters.metrics import Metrics, serve
from itap_stream.adapters.mqtt import connect_client
from itap_stream.app.offline import train_from_frame
from itap_stream.app.render import format_alert, format_summary
from itap_stream.app.service import build_consumer
from itap_stream.config import Settings, parse_broker_url
from itap_stream.core.aggregate import summarize
from itap_stream.errors import BrokerError, ConfigError
from simulator import check_size, default_faults, simulate
from simulator.transport import publish

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def run_demo(
    settings: Settings,
    *,
    duration_s: float = 45.0,
    devices: int = 10,
    seed: int = 7,
    speed: float = 60.0,
    broker_url: str | None = None,
    broker_kind: str = "auto",
    workdir: str = "itap-demo",
    out: TextIO = sys.stdout,
    keep_open: bool = False,
    wait_open: Callable[[], None] | None = None,
    fmt: str = "json",
    group: str = "itap",
    edge: str = "simulator",
) -> dict[str, Any]:
    """Run the whole pipeline for ``duration_s`` seconds of wall time; returns the summary.

    The dashboard and ``/metrics`` are served on ``settings.http_addr`` (another free port on
    the same host when that one is taken; none when it is empty) from the start, their URL
    printed; with ``keep_open`` they stay up after the summary until ``wait_open`` returns
    (default: until Ctrl-C). ``fmt="sparkplug"``: the simulator is Sparkplug B edge node
    ``group``/``edge`` and the consumer its primary host application (device ids are the
    Sparkplug device ids, as in the JSON demo)."""
    if not (math.isfinite(duration_s) and duration_s > 0) or not (math.isfinite(speed) and speed > 0):
        msg = f"the demo needs a positive, finite duration and speed, got {duration_s} s at {speed}x"
        raise ConfigError(msg)
    work = Path(workdir)
    model_path = Path(settings.model_path) if settings.model_path != Settings.model_path else work / "model.joblib"
    try:  # before a broker starts: a run that cannot fit in memory is refused at once
        check_size(devices, max(duration_s * speed, 120.0))
        if not model_path.exists():
            check_size(devices, 7200.0)  # the training run
    except ValueError as exc:
        msg = f"{exc} (--duration x --speed is the simulated time)"
        raise ConfigError(msg) from None
    work.mkdir(parents=True, exist_ok=True)
    db_path = work / "itap.db"
    broker: BrokerHandle | None = None
    if broker_url is None:
        broker = start_broker(broker_kind)
        broker_url = broker.url
        _say(out, f"[demo] started {broker.kind} broker on {broker.host}:{broker.port}")
    else:
        parse_broker_url(broker_url)
        _say(out, f"[demo] using broker {broker_url}")
    try:
        if db_path.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(str(db_path) + suffix).unlink(missing_ok=True)
        cfg = settings.replace(
            broker_url=broker_url,
            db_url=f"sqlite:///{db_path}",
            model_path=str(model_path),
            client_id=f"itap-demo-{int(time.time())}",
            # the embedded broker (amqtt) speaks MQTT 3.1.1 only
            mqtt_version=4 if broker is not None and broker.kind == "embedded" else None,
        )
        if fmt == "sparkplug":
            cfg = cfg.replace(sparkplug_groups=group, sparkplug_device_id="{device}")
        schema = cfg.schema()
        if not model_path.exists():
            _say(out, f"[demo] no model at {model_path}: training on 2 h of simulated normal operation ...")
            t0 = time.perf_counter()
            normal = simulate(devices, 7200.0, seed=seed + 1000).to_frame()
            _say(out, f"[demo]   simulated {len(normal):,} normal readings; fitting Isolation Forest ...")
            art, report = train_from_frame(
                normal, schema, window=cfg.window, hop=cfg.hop, quantile=cfg.threshold_quantile, seed=seed
            )
            artifacts.save(art, model_path)
            _say(
                out,
                f"[demo]   trained on {report.train_windows:,} windows of {report.devices} devices, calibrated on "
                f"{report.calibration_windows:,}; threshold {report.threshold:.4f} ({time.perf_counter() - t0:.1f}s)",
            )
        else:
            _say(out, f"[demo] using existing model {model_path}")

        sim_seconds = max(duration_s * speed, 120.0)
        faults = default_faults(devices, sim_seconds)
        sim = simulate(devices, sim_seconds, seed=seed, faults=faults)
        _say(
            out,
            f"[demo] simulating {devices} devices"
            + (f" (Sparkplug B edge node {group}/{edge})" if fmt == "sparkplug" else "")
            + f" for {sim_seconds / 60:.0f} simulated minutes at {speed:g}x "
            f"({sim.n_readings:,} readings); faults: "
            + (", ".join(f"{f.kind}@{f.device}" for f in faults) or "none"),
        )
        printed = threading.Lock()
        alerts: list[dict[str, Any]] = []

        def on_alert_msg(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            alert = json.loads(msg.payload)
            alerts.append(alert)
            with printed:
                _say(out, format_alert(alert))

        watcher = _alert_watcher(broker_url, cfg.topic("alerts", "#"), on_alert_msg, cfg.broker_auth())
        metrics = Metrics()
        consumer = build_consumer(cfg, metrics=metrics)
        server = _serve_dashboard(cfg, metrics, consumer, out)
        ready = threading.Event()
        runner = threading.Thread(target=consumer.run, kwargs={"ready": ready}, name="itap-consumer", daemon=True)
        runner.start()
        if not ready.wait(15):
            msg = "consumer did not connect to the broker"
            raise BrokerError(msg)
        last_report = [0.0]

        def progress(step: int, steps: int) -> None:
            now = time.monotonic()
            if now - last_report[0] >= 5 or step == steps:
                last_report[0] = now
                with printed:
                    _say(
                        out,
                        f"[demo] {step / steps:6.1%} simulated | readings stored/received "
                        f"{int(metrics.sample('itap_readings_processed_total')):,} | "
                        f"windows {int(metrics.sample('itap_windows_scored_total')):,} "
                        f"| alerts {len(alerts)}",
                    )

        t0 = time.perf_counter()
        sent = publish(sim, broker_url, topic_prefix=cfg.topic_prefix, speed=speed, qos=1, progress=progress,
                       auth=cfg.broker_auth(), fmt=fmt, group=group, edge=edge, schema=schema)
        _wait_drained(consumer, sent, lambda: int(metrics.sample("itap_readings_received_total")))
        time.sleep(0.5)  # let the last alerts reach the watcher
        consumer.stop()
        runner.join(timeout=30)
        watcher.disconnect()
        watcher.loop_stop()
        elapsed = time.perf_counter() - t0

        store = consumer.store
        win = store.read_frame("windows")
        anom = store.read_frame("anomalies")
        summary = summarize(
            win["device_id"].tolist(),
            win["score"].to_numpy(),
            win["is_anomaly"].to_numpy(dtype=bool),
            anom["device_id"].tolist(),
            anom["dominant_family"].tolist(),
        )
        summary["alerts"] = len(alerts)
        fired = [a for a in alerts if a.get("status") in ("firing", "flapping")]
        summary["alerts_fired"] = len(fired)
        summary["incidents"] = len({a.get("incident") or a["id"] for a in fired})
        summary["readings_published"] = sent
        summary["readings_stored"] = store.count("readings")
        summary["seconds"] = round(elapsed, 1)
        summary["faults"] = [{"kind": f.kind, "device": f.device} for f in faults]
        store.dispose()
        summary_path = work / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        _say(out, "")
        _say(out, format_summary(summary))
        _say(
            out,
            f"[demo] {sent:,} readings published, {summary['readings_stored']:,} stored, {len(alerts)} alert "
            f"transition(s) in {elapsed:.1f}s: {summary['alerts_fired']} alert(s) fired in {summary['incidents']} "
            f"incident(s) for {len(faults)} injected fault(s)",
        )
        _say(out, f"[demo] database: {db_path.resolve()}")
        _say(out, f"[demo] model:    {model_path.resolve()}")
        _say(out, f"[demo] summary:  {summary_path.resolve()}")
        if server is not None:
            where = _url(server)
            if keep_open:
                _say(out, f"[demo] the dashboard stays up at {where}/ until Ctrl-C")
                with contextlib.suppress(KeyboardInterrupt):
                    (wait_open or _wait_for_ctrl_c)()
            server.shutdown()
            server.server_close()
        return summary
    finally:
        if broker is not None:
            broker.stop()


def _url(server: Any) -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _serve_dashboard(cfg: Settings, metrics: Metrics, consumer: Any, out: TextIO) -> Any:
    """Serve the dashboard and /metrics for the demo and print where; None when http_addr is empty."""
    if not cfg.http_addr:
        return None
    hosts = tuple(h.strip() for h in cfg.http_allowed_hosts.split(",") if h.strip())
    kwargs = {"fleet": consumer.fleet.snapshot, "health": consumer.health, "allowed_hosts": hosts,
              "actions": consumer.http_action, "credentials": cfg.http_credentials()}
    try:
        server = serve(cfg.http_addr, metrics.registry, **kwargs)
    except ConfigError as exc:  # taken (an `itap run` on this machine): any free port on that host
        host = cfg.http_addr.rsplit(":", 1)[0]
        server = serve(f"{host}:0", metrics.registry, **kwargs)
        _say(out, f"[demo] {exc}; serving on another port")
    where = _url(server)
    _say(out, f"[demo] dashboard: {where}/   metrics: {where}/metrics")
    return server


def _wait_for_ctrl_c() -> None:
    while True:
        time.sleep(3600)


def _alert_watcher(url: str, topic: str, on_message: Callable[..., None], auth: Any = None) -> paho.Client:
    subscribed = threading.Event()

    def setup(c: paho.Client) -> None:
        c.on_connect = lambda cl, _u, _f, _rc, _p: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *_a: subscribed.set()
        c.on_message = on_message

    c = connect_client(url, f"itap-demo-watch-{int(time.time() * 1000)}", setup=setup, auth=auth)
    subscribed.wait(10)
    return c


def _wait_drained(consumer: Any, sent: int, received: Callable[[], int], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if received() >= sent and not len(consumer.inbox):
            break
        time.sleep(0.05)
    consumer.writer.flush()
