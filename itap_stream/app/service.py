"""Wiring for `itap run` and `itap train`: settings in, adapters built, core driven."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from itap_stream.adapters import artifacts
from itap_stream.adapters.csvio import read_readings
from itap_stream.adapters.metrics import Metrics, serve
from itap_stream.adapters.store import Store
from itap_stream.app.consumer import Consumer
from itap_stream.app.offline import TrainReport, train_from_frame
from itap_stream.config import Settings
from itap_stream.core.pipeline import check_compatible
from itap_stream.core.schema import SensorSchema
from itap_stream.errors import DataError, ItapError, ServiceFailed

__all__ = ["build_consumer", "run_service", "train"]

log = logging.getLogger(__name__)


def build_consumer(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    on_alert: Callable[[dict[str, Any]], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> Consumer:
    """Load schema, rules and model, open the store: everything `itap run` needs, checked."""
    schema = settings.schema()
    store = Store(settings.db_url, schema)
    settings = _activated_model(settings, store)
    key = artifacts.model_key(settings.model_key_file)
    if key is None:
        log.warning("no model key configured (ITAP_MODEL_KEY or model_key_file): model artifacts are checked by "
                    "checksum only; reload commands still take models only from %s",
                    settings.models_dir or os.path.dirname(os.path.abspath(settings.model_path)))
    artifact = artifacts.load(settings.model_path, key=key)
    check_compatible(artifact, schema, settings.window, settings.hop)
    engine = settings.rule_engine()
    return Consumer(settings, schema, artifact, engine, store, metrics, on_alert=on_alert, clock=clock)


def _activated_model(settings: Settings, store: Store) -> Settings:
    """The settings with the model `itap train --activate` last switched this store's consumer
    to, when that happened after the configured model file was written (the newer decision
    wins; replacing the configured file, or activating it, goes back to it) and the model is
    still inside the models folder."""
    stored = store.get_state("model_path")
    if stored is None or stored[0] == settings.model_path:
        return settings
    path, at = stored
    try:
        resolved = artifacts.resolve_model_path(path, settings.models_dir or os.path.dirname(
            os.path.abspath(settings.model_path)))
    except ItapError as exc:
        log.warning("the model activated last (%s) is not usable any more (%s); loading %s", path, exc,
                    settings.model_path)
        return settings
    try:
        configured = os.path.getmtime(settings.model_path)
    except OSError:
        configured = float("-inf")
    if at <= configured:
        log.info("%s was written after %s was activated: loading it", settings.model_path, path)
        return settings
    log.info("loading %s, activated by `itap train --activate` at %s (configured model_path: %s)", resolved,
             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)), settings.model_path)
    return settings.replace(model_path=str(resolved))


def run_service(settings: Settings) -> None:
    """`itap run`: serve until SIGTERM / SIGINT, then drain and stop cleanly."""
    metrics = Metrics()
    consumer = build_consumer(settings, metrics=metrics)
    server = None
    if settings.http_addr:
        hosts = tuple(h.strip() for h in settings.http_allowed_hosts.split(",") if h.strip())
        server = serve(settings.http_addr, metrics.registry, fleet=consumer.fleet.snapshot, health=consumer.health,
                       allowed_hosts=hosts, threads=settings.http_threads, actions=consumer.http_action,
                       credentials=settings.http_credentials())

    def _stop(signum: int, _frame: Any) -> None:
        log.info("received %s: draining and stopping", signal.Signals(signum).name)
        consumer.stop()

    def _reload(_signum: int, _frame: Any) -> None:
        log.info("received SIGHUP: reloading rules, sensor ranges and model")
        consumer.request_reload()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, _reload)
    try:
        consumer.run()
    except ServiceFailed as exc:
        log.critical("consumer ended: %s (exit code 3: a supervisor should start it again)", exc)
        raise SystemExit(3) from None
    finally:
        if server is not None:
            server.shutdown()
        try:
            consumer.store.dispose()
        except ItapError as exc:
            log.error("%s", exc)


def train(
    settings: Settings,
    *,
    csv: str | None = None,
    db: str | None = None,
    since: float | None = None,
    until: float | None = None,
    schema: SensorSchema | None = None,
    seed: int = 0,
    step: Callable[[str], None] | None = None,
    accept_training_anomalies: bool = False,
) -> tuple[TrainReport, dict[str, Any]]:
    """`itap train`: fit on normal operation from a CSV or the store, write the artifact.

    Training data with an outlying stretch (a fault inside it) is refused unless
    ``accept_training_anomalies``: see `train_from_frame`."""
    schema = schema or settings.schema()
    key = artifacts.model_key(settings.model_key_file)  # a bad key file fails now, not after training
    if csv:
        df = read_readings(csv, schema)
        if since is not None:
            df = df[df["ts"] >= since]
        if until is not None:
            df = df[df["ts"] < until]
        source = f"CSV {csv}"
    else:
        url = db or settings.db_url
        store = Store(url, schema, must_exist=True)
        try:
            df = store.read_frame("readings", since=since, until=until)
        finally:
            store.dispose()
        source = f"store {url}"
        if df.empty:
            msg = f"the {source} holds no readings in the chosen time range; nothing to train on"
            raise DataError(msg)
    log.info("training on %d readings from %s", len(df), source)
    artifact, report = train_from_frame(
        df, schema, window=settings.window, hop=settings.hop, quantile=settings.threshold_quantile, seed=seed,
        detector=settings.detector, alarm_k=settings.alarm_k, alarm_n=settings.alarm_n,
        recall_target=settings.recall_target, drifting_families=settings.drifting_family_list(), step=step,
        accept_training_anomalies=accept_training_anomalies,
    )
    if key is None:
        log.warning(
            "no model key configured (ITAP_MODEL_KEY or model_key_file): %s is written unsigned, and a consumer "
            "that holds a key will refuse it", settings.model_path,
        )
    manifest = artifacts.save(artifact, settings.model_path, key=key)
    return report, manifest
