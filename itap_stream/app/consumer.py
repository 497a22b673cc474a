"""The live consumer: MQTT in, the core in micro-batches, MQTT alerts and SQL out.

Threads and owners:

* paho's network thread runs the callbacks, which only enqueue raw messages;
* the processing loop (`Consumer.run`) drains the queue in micro-batches (at most
  ``batch_max`` messages, at most ``batch_wait_ms`` after the first), decodes, runs
  the core's `Processor` once per batch, publishes alerts and dead letters, and hands
  the rows to
* the store writer thread, one transaction per micro-batch.

Stopping (SIGTERM / Ctrl-C / `stop`) unsubscribes, drains what was received,
commits it, publishes ``offline`` on the status topic and disconnects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from itap_stream.adapters import artifacts
from itap_stream.adapters.jetstream import NatsSource, partition_of
from itap_stream.adapters.metrics import Metrics
from itap_stream.adapters.mqtt import Inbox, Message, MqttLink, Will
from itap_stream.adapters.receiver import Receiver
from itap_stream.adapters.store import (
    BLOCK_COLUMNS,
    DEADLETTER_TOPIC_CHARS,
    Store,
    StoreBatch,
    StoreWriter,
    anomaly_row,
    block_record,
    block_rows,
    clean_text,
    reading_rows,
)
from itap_stream.adapters.webhook import WebhookSink
from itap_stream.app.fleetview import FleetView
from itap_stream.config import Settings
from itap_stream.core.drift import FLEET, DriftMonitor
from itap_stream.core.health import HealthSettings, SensorHealth
from itap_stream.core.model import Artifact, typical_score
from itap_stream.core.pipeline import BatchResult, Processor, check_compatible
from itap_stream.core.readings import MAX_ID_CHARS, Block, BlockDecoder, Reading, Rejection, decode
from itap_stream.core.rules import Alert, RuleEngine
from itap_stream.core.schema import SensorSchema
from itap_stream.core.silence import SilenceBook, check_bounded, silence_from_dict
from itap_stream.core.sparkplug import NAMESPACE, SparkplugHost, rebirth_request, state_payload
from itap_stream.errors import ArtifactError, BrokerError, ConfigError, ItapError, ServiceFailed, StoreError

__all__ = ["Consumer"]

#: What a dead letter says about a reading the windows could not take.
_DROP_DETAIL = {
    "duplicate": "a reading with this timestamp was already received; stored once, counted once",
    "late": "older than every reading in the device's window; stored, not used for features",
    "out_of_order": (
        "earlier than the device's newest reading (beyond the reorder tolerance); stored, not used for features"
    ),
    "future": "timestamp beyond the clock-skew bound (max_clock_skew) ahead of the service clock; not stored",
}


def _reading_json(r: Reading, schema: SensorSchema) -> str:
    """A reading as the JSON object a device would have sent (for its dead letter)."""
    obj: dict[str, Any] = {"device_id": r.device_id, "ts": r.ts, "state": r.state}
    obj.update({n: (None if v != v else v) for n, v in zip(schema.names, r.values, strict=True)})
    for key in ("seq", "tag", "label"):
        if getattr(r, key) is not None:
            obj[key] = getattr(r, key)
    return json.dumps(obj)

log = logging.getLogger(__name__)

#: At most one log line per rejection reason in this many seconds.
LOG_EVERY_S = 10.0
#: A micro-batch ends once its payloads reach this size (array payloads carry many readings).
BATCH_MAX_BYTES = 1 << 20
#: At stop, seconds spent processing what intake had handed over (the rest is delivered again).
STOP_BUDGET_S = 4.0
#: Pause before a crashed intake process is replaced.
INTAKE_RESTART_DELAY_S = 1.0
#: The broker's count of messages it dropped (mosquitto publishes it every sys_interval).
BROKER_DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
#: Seq gaps are logged at most once per this many seconds (they are all counted and stored).
GAP_LOG_INTERVAL_S = 10.0
#: At stop, seconds to wait for the store to commit what was handed to it (the rest stays unacknowledged).
STOP_FLUSH_S = 10.0
#: At a stop the watchdog asked for, the same waits are this short (the store is failing anyway).
FATAL_FLUSH_S = 3.0
#: After the watchdog asked the loop to stop, seconds before the process is ended regardless
#: (more than the stop path's own bounded waits: hand-over, flush, intake close, final publish).
WATCHDOG_GRACE_S = 45.0
#: Details of a poisoned command reply or dead letter are cut to this length.
DETAIL_CHARS = 500


def model_info(artifact: Artifact) -> dict[str, Any]:
    """What ``itap_model_info`` shows: version, detector, training time, threshold, schema hash."""
    schema_hash = hashlib.sha256(json.dumps(artifact.schema, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "version": artifact.versions.get("itap_stream", ""),
        "detector": getattr(artifact.detector, "name", type(artifact.detector).__name__),
        "trained_at": artifact.trained_at,
        "threshold": artifact.threshold,
        "features": len(artifact.feature_names),
        "schema_hash": schema_hash,
    }


class Consumer:
    """Owns the processing state of one consumer process.

    Parameters
    ----------
    settings
        Service settings (topics, batching, broker URL).
    schema, artifact, engine
        The sensor schema, the trained model and the alert rule engine.
    store
        The SQL store; writes go through a `StoreWriter` thread.
    metrics
        Prometheus metrics (a fresh registry in tests).
    on_alert
        Optional callback for every alert transition (the demo prints them).
    """

    def __init__(
        self,
        settings: Settings,
        schema: SensorSchema,
        artifact: Artifact,
        engine: RuleEngine,
        store: Store,
        metrics: Metrics | None = None,
        *,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock  # the service clock (stale devices, acknowledgements); tests inject one
        self.schema = schema
        self.processor = Processor(
            schema,
            artifact,
            engine,
            window=settings.window,
            hop=settings.hop,
            alarm_k=settings.alarm_k,
            alarm_n=settings.alarm_n,
            drift=DriftMonitor(delta=settings.drift_delta) if settings.drift_delta > 0 else None,
            health=SensorHealth(
                schema.names,
                HealthSettings(
                    missing_readings=settings.signal_missing_readings, stuck_readings=settings.signal_stuck_readings,
                    stale_after_s=settings.stale_after, decommissioned=settings.decommissioned(),
                ),
            ),
            reorder_tolerance_s=settings.reorder_tolerance,
            max_clock_skew_s=settings.max_clock_skew,
            baseline=settings.baseline_policy(),
            gap_event_readings=settings.gap_event_readings,
        )
        self.blocks = self._block_decoder(schema)
        self._stale_checked = 0.0
        self.silences = SilenceBook(settings.silences(self.clock()))
        self._held: dict[str, Alert] = {}  # alert id -> latest transition held back by a silence
        self.fleet = FleetView(artifact.threshold, typical_score(artifact.stats.calibration_scores, artifact.threshold))
        self._reload_requested = threading.Event()
        self._mtimes = self._watched()
        self._watch_checked = time.monotonic()
        self.webhook = (
            WebhookSink(settings.webhook_url, fmt=settings.webhook_format, timeout_s=settings.webhook_timeout,
                        retries=settings.webhook_retries, on_give_up=self._webhook_gave_up)
            if settings.webhook_url else None
        )
        self.metrics = metrics or Metrics()
        self.metrics.set_model(model_info(artifact))
        self.store = store
        self.writer = StoreWriter(store, on_written=lambda _b, dt: self.metrics.store_latency.observe(dt),
                                  on_rejected=self._store_rejected)
        self.model_key = artifacts.model_key(settings.model_key_file)
        self.models_dir = settings.models_dir or os.path.dirname(os.path.abspath(settings.model_path))
        self._beat = time.monotonic()  # the processing loop's heartbeat (each step)
        self._summary_at = time.monotonic()  # when the last one-line summary was logged
        self._summary_seen: dict[str, float] = {}
        self.fatal: str | None = None  # why the service must end (a dead or stalled thread)
        self.on_alert = on_alert
        self._stop = threading.Event()
        self._prefix_len = len(settings.topic_prefix) + len("/telemetry/")
        status = settings.topic("status", "consumer", settings.client_id)
        self._offline = Will(status, b"offline", qos=1, retain=True)
        #: Sparkplug B (``sparkplug_groups``): births, aliases, seq and deaths of the edge nodes
        self.sparkplug = self._sparkplug_host(schema)
        self._spb_prefix = NAMESPACE + "/"
        # Sparkplug 3.0 primary host application: a retained STATE message, online while we
        # are subscribed; the intake connection's will says offline (same timestamp)
        self._spb_state: tuple[Will, Will] | None = None
        if self.sparkplug is not None:
            host_topic = f"{NAMESPACE}/STATE/{settings.sparkplug_host_id or settings.client_id}"
            born = int(time.time() * 1000)
            self._spb_state = (Will(host_topic, state_payload(True, born), qos=1, retain=True),
                               Will(host_topic, state_payload(False, born), qos=1, retain=True))
        # commands (acknowledgements) come through the intake too, in order with the data
        subscriptions = self._subscriptions()
        self._cmd_prefix = settings.topic("commands") + "/"
        self.inbox: Inbox | Receiver | NatsSource
        self.link: MqttLink | NatsSource
        self.auth = settings.broker_auth()
        #: with ``source: nats``: the cluster's partitions, leases, commands and publishing
        self.cluster: NatsSource | None = None
        if settings.source == "nats":
            user, password = settings.nats_credentials()
            self.cluster = NatsSource(
                settings.nats_servers(), prefix=settings.topic_prefix, stream=settings.nats_stream,
                partitions=settings.partitions, client_id=settings.client_id, takeover_after=settings.takeover_after,
                replicas=settings.nats_replicas, user=user, password=password, queue_max=settings.queue_max,
                outbox_max=settings.outbox_max, birth=Will(status, b"online", qos=1, retain=False),
                on_connection=self._on_connection,
            )
            self.inbox = self.link = self.cluster
        elif settings.intake == "process":
            # the child holds the subscription (and the persistent session under client_id);
            # this process publishes alerts, dead letters and status on its own connection
            self.inbox = self._new_receiver()
            link_id, link_subs, link_inbox, on_link = f"{settings.client_id}-out", [], None, None
        else:
            self.inbox = Inbox(maxsize=settings.queue_max)
            link_id, link_subs, link_inbox, on_link = settings.client_id, subscriptions, self.inbox, self._on_connection
        if self.cluster is None:
            self.link = self._mqtt_link(status, link_id, link_subs, link_inbox, on_link)
        self._broker_dropped: int | None = None  # the broker's count, written by paho's thread
        self._broker_dropped_seen: int | None = None  # as last exported and logged
        self._gap_logged = 0.0
        self._gap_pending: list[str] = []  # the first few gaps not logged yet
        self._gap_more = 0  # and how many more
        # the service's own state for the next batch to store: (key, value), (silence id, body or None)
        self._state_rows: list[tuple[str, str]] = []
        self._silence_rows: list[tuple[str, str | None]] = []
        # dashboard actions: commands from the HTTP threads, run by the loop like MQTT ones
        self._http_cmds: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._http_waiting: dict[str, tuple[threading.Event, dict[str, Any]]] = {}
        self._http_lock = threading.Lock()
        # messages handed to the store / acknowledged after its commit: each counter has one
        # writer (this loop / the store writer thread), the gauge is their difference
        self._to_ack = 0
        self._acked = 0
        self._was_connected = False
        self._reject_log: dict[str, tuple[float, int]] = {}  # reason -> (last logged, suppressed since)
        self._running = threading.Event()  # `run` is in its loop
        self._finished = threading.Event()  # `run` has returned
        self._intake_down_since: float | None = None
        self._retained_seen = 0  # the intake's count of ignored retained messages, as last exported
        self.batches = 0
        self.intake_restarts = 0

    def _mqtt_link(self, status: str, link_id: str, link_subs: list[tuple[str, int]], link_inbox: Inbox | None,
                   on_link: Callable[[bool], None] | None) -> MqttLink:
        """The MQTT connection that publishes alerts, dead letters and status (and with
        ``intake: thread`` also receives the telemetry)."""
        settings = self.settings
        return MqttLink(
            settings.broker_url,
            link_id,
            subscriptions=link_subs,
            inbox=link_inbox,
            will=self._offline,
            birth=Will(status, b"online", qos=1, retain=True),
            persistent=link_inbox is not None,
            on_connection=on_link,
            announce=link_inbox is not None,  # "online" only once the intake process is subscribed
            # with a child intake this is a second connection: its own account (use_username_as_clientid)
            auth=settings.broker_auth(out=True) if settings.intake == "process" else self.auth,
            protocol=settings.mqtt_version,
            session_expiry_s=settings.session_expiry,
            receive_max=settings.receive_max,
            outbox_max=settings.outbox_max,
            watch={BROKER_DROPPED_TOPIC: self._on_broker_dropped},
        )

    def _block_decoder(self, schema: SensorSchema) -> BlockDecoder | None:
        """Column-wise decoding of array payloads (`BlockDecoder`); off with a reorder buffer,
        which takes readings one by one anyway."""
        if self.settings.reorder_tolerance > 0:
            return None
        return BlockDecoder(schema, min_ts=self.settings.min_ts)

    def _sparkplug_host(self, schema: SensorSchema) -> SparkplugHost | None:
        st = self.settings
        if not st.sparkplug_group_list():
            return None
        return SparkplugHost(schema, device_id=st.sparkplug_device_id, node_id=st.sparkplug_node_id, min_ts=st.min_ts,
                             rebirth_interval_s=st.sparkplug_rebirth_interval, max_devices=st.max_devices)

    def _subscriptions(self) -> list[tuple[str, int]]:
        st = self.settings
        subs = [(st.topic("telemetry", "+"), st.qos), (st.topic("commands", "#"), 1)]
        groups = st.sparkplug_group_list()
        if groups == ["+"]:
            subs.append((f"{NAMESPACE}/#", st.qos))
        else:
            subs.extend((f"{NAMESPACE}/{g}/#", st.qos) for g in groups)
        return subs

    def _new_receiver(self) -> Receiver:
        st = self.settings
        return Receiver(
            st.broker_url,
            st.client_id,
            self._subscriptions(),
            on_connection=self._on_connection,
            queue_max=st.queue_max,
            log_level=st.log_level,
            auth=self.auth,
            protocol=st.mqtt_version,
            session_expiry_s=st.session_expiry,
            receive_max=st.receive_max,
            birth=self._spb_state[0] if self._spb_state else None,
            will=self._spb_state[1] if self._spb_state else None,
        )

    def _restart_intake(self) -> None:
        """The intake process died (killed, out of memory): start a new one. Its persistent
        session makes the broker keep what arrived meanwhile (QoS 1)."""
        self._on_connection(False)
        log.error("MQTT intake process ended unexpectedly; starting a new one")
        time.sleep(INTAKE_RESTART_DELAY_S)
        old = self.inbox
        assert isinstance(old, Receiver)
        rest = old.stop(timeout_s=1.0)
        if rest:
            self.process_messages(rest)  # not acknowledged (the old connection is gone): delivered again, stored once
        old.close(timeout_s=1.0)
        receiver = self._new_receiver()
        try:
            receiver.start()
        except BrokerError as exc:
            log.error("cannot restart MQTT intake: %s; retrying", exc)
            receiver.close(timeout_s=1.0)
            receiver.stopped = True  # the loop tries again
            self.inbox = receiver
            return
        self.inbox = receiver
        self.intake_restarts += 1

    def _on_connection(self, up: bool) -> None:
        self.metrics.connected.set(1 if up else 0)
        if up and self._was_connected:
            self.metrics.reconnects.inc()
        self._was_connected = self._was_connected or up

    # -- control
    def stop(self) -> None:
        """Ask the loop to finish: drain, commit, go offline. Safe from any thread or signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _devices_of(self, partitions: set[int]) -> Callable[[str], bool]:
        """Whether a device falls in one of ``partitions`` (``source: nats``)."""
        n = self.settings.partitions
        return lambda device: partition_of(device, n) in partitions

    def restore_windows(self, partitions: set[int] | None = None) -> int:
        """Refill every device's window from the store (a restart loses no context and
        recognises readings the broker delivers again); returns the devices restored.
        With ``source: nats`` only the devices of ``partitions``, taken over just now
        (none at start: the consumer owns no partition yet)."""
        if self.cluster is not None and partitions is None:
            return 0
        keep = self._devices_of(partitions) if partitions is not None else None
        t0 = time.perf_counter()
        try:
            rebaselines = self.store.operator_rebaselines()
            n = self.processor.restore(
                self.store.recent_readings(self.processor.restore_depth(), max_devices=self.settings.max_devices,
                                           keep=keep),
                {d: r for d, r in rebaselines.items() if keep is None or keep(d)},
            )
        except ItapError as exc:
            log.warning("could not refill device windows from the store, starting empty: %s", exc)
            return 0
        if n:
            log.info("refilled the windows of %d device(s) from the store in %.2fs", n, time.perf_counter() - t0)
        return n

    def restore_state(self, partitions: set[int] | None = None) -> dict[str, int]:
        """After a restart: the alerts that were open (they resolve, remind and take acks as
        before), the silences added at runtime, and the dashboard's devices and alerts, from
        the store. Alerts whose rule is gone resolve now. Returns what was restored.
        With ``source: nats``: the silences at start, the alerts and dashboard of the devices
        of ``partitions`` when they are taken over."""
        now = self.clock()
        cluster = self.cluster is not None
        keep = self._devices_of(partitions) if partitions is not None else None
        try:
            open_alerts = self.store.open_alerts() if not cluster or keep is not None else []
            silences = self.store.stored_silences() if keep is None else []
            recent = self.store.latest_windows(min(self.settings.max_devices, 10_000)) \
                if not cluster or keep is not None else {}
        except ItapError as exc:
            log.warning("could not restore alerts, silences and the dashboard from the store: %s", exc)
            return {}
        if keep is not None:
            open_alerts = [a for a in open_alerts if keep(a.device_id)]
            recent = {d: rows for d, rows in recent.items() if keep(d)}
        rest = self.processor.engine.restore(open_alerts)
        if self.processor.health is not None:
            rest = self.processor.health.restore(rest)
        gone = [dataclasses.replace(a, status="resolved", resolved_at=a.window_end, changed_at=a.window_end,
                                    note="resolved at restart: its rule is no longer configured") for a in rest]
        kept = 0
        for item in silences:
            try:
                s = silence_from_dict(item, now=now)
            except ConfigError as exc:
                log.warning("a stored silence cannot be read back (%s); dropped", exc)
                continue
            if s.end is not None and s.end <= now and not s.weekly:
                self._silence_rows.append((s.id, None))  # over while the service was down
                continue
            self.silences.add(s)
            kept += 1
        for dev, rows in recent.items():
            self.fleet.update([dev] * len(rows), np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                              [r[2] for r in rows], [])
        self.fleet.update([], np.zeros(0), np.zeros(0, dtype=bool), [], open_alerts)
        if gone:
            batch = StoreBatch()
            self._emit(gone, batch)
            self.fleet.update([], np.zeros(0), np.zeros(0, dtype=bool), [], gone)
            self.writer.submit(batch)
        counts = {"alerts": len(open_alerts) - len(gone), "resolved": len(gone), "silences": kept,
                  "devices": len(recent)}
        if any(counts.values()):
            log.info("restored from the store: %d open alert(s), %d silence(s), %d device(s) on the dashboard; "
                     "%d alert(s) of rules no longer configured resolved", counts["alerts"], kept, len(recent),
                     len(gone))
        return counts

    # -- health
    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(ok, detail)`` for ``/healthz`` and the watchdog: not ok once the store writer
        died or has not committed for ``stall_timeout`` seconds with work waiting, the
        processing loop made no step for that long, or the intake stayed dead that long."""
        now = time.monotonic()
        limit = self.settings.stall_timeout
        problems: list[str] = []
        if self.fatal is not None:
            problems.append(self.fatal)
        if not self.writer.alive:
            problems.append(f"the store writer thread has stopped ({self.writer.error!r})")
        else:
            stalled = self.writer.stalled_for(now)
            if stalled > limit:
                problems.append(f"the store has not committed a batch for {stalled:.0f}s (store failing?)")
        loop_age = now - self._beat
        if self._running.is_set() and loop_age > limit:
            problems.append(f"the processing loop has made no step for {loop_age:.0f}s")
        if self._intake_down_since is not None and now - self._intake_down_since > limit:
            problems.append(f"the MQTT intake process has been down for {now - self._intake_down_since:.0f}s")
        detail = {
            "problems": problems,
            "loop_step_age_s": round(loop_age, 3),
            "store_pending_batches": self.writer.pending,
            "store_stalled_s": round(self.writer.stalled_for(now), 3),
            "store_failures": self.writer.failures,
            "store_rejected_rows": self.writer.rejected_rows,
            "mqtt_connected": bool(self.metrics.sample("itap_mqtt_connected")),
            "devices": len(self.processor.windows),
            "intake_restarts": self.intake_restarts,
        }
        if self.cluster is not None:
            detail["partitions"] = sorted(self.cluster.owned())
            detail["cluster_members"] = list(self.cluster.members)
        return not problems, detail

    def _watchdog(self) -> None:
        """Ends the service when `health` fails: asks the loop to stop, and ends the process
        (exit 3) if even that does not finish in time (a hung thread)."""
        while not self._finished.wait(1.0):
            ok, detail = self.health()
            if ok:
                continue
            self.fatal = "; ".join(detail["problems"])
            log.critical("service unhealthy, stopping so that a supervisor restarts it: %s", self.fatal)
            self.stop()
            if not self._finished.wait(WATCHDOG_GRACE_S):
                log.critical("the service did not stop within %.0fs; exiting now (code 3). Unacknowledged "
                             "messages stay with the broker", WATCHDOG_GRACE_S)
                logging.shutdown()
                os._exit(3)
            return

    def run(self, ready: threading.Event | None = None) -> None:
        """Connect and process until `stop` is called; everything received is stored.

        Raises `ServiceFailed` when a thread of the service died or stalled (the
        watchdog stopped it): the process must then end non-zero."""
        self._finished.clear()
        self._beat = time.monotonic()
        self._running.set()
        watchdog = threading.Thread(target=self._watchdog, name="itap-watchdog", daemon=True)
        watchdog.start()
        try:
            self._run(ready)
        except StoreError as exc:
            if self.writer.alive:
                raise
            self.fatal = self.fatal or str(exc)  # the writer died under a submit
        finally:
            self._running.clear()
            self._finished.set()
        if self.fatal is not None:
            raise ServiceFailed(self.fatal)

    def _run(self, ready: threading.Event | None) -> None:
        self.restore_windows()
        self.restore_state()
        self.link.start()
        if isinstance(self.inbox, Receiver):
            try:
                self.inbox.start()
            except BrokerError:
                self.link.stop()
                self.writer.close()
                raise
            self.link.announce()
        elif self._spb_state is not None:
            # intake: thread: the one connection's will is the consumer's status, so STATE
            # offline is published on a clean stop only (README "Sparkplug B")
            self.link.publish(self._spb_state[0].topic, self._spb_state[0].payload, qos=1, retain=True)
        what = self.settings.topic("telemetry", "+") if self.cluster is None else \
            f"{self.settings.topic_prefix}.part.> (stream {self.settings.nats_stream}, {self.settings.partitions} " \
            "partitions shared with the other consumers)"
        log.info("consumer %s subscribed to %s on %s:%s", self.settings.client_id, what, self.link.address.host,
                 self.link.address.port)
        if ready is not None:
            ready.set()
        flushed = False
        try:
            every = self.settings.summary_interval
            while not self._stop.is_set():
                self._beat = time.monotonic()
                self._step(timeout_s=0.1)
                if every > 0 and self._beat - self._summary_at >= every:
                    self.log_summary()
                if not self.writer.alive:
                    self.fatal = f"the store writer thread has stopped ({self.writer.error!r})"
                    log.critical("%s: stopping", self.fatal)
                    break
                if isinstance(self.inbox, Receiver) and self.inbox.stopped and not self._stop.is_set():
                    if self._intake_down_since is None:
                        self._intake_down_since = time.monotonic()
                    self._restart_intake()
                    if not self.inbox.stopped:
                        self._intake_down_since = None
            # stop intake (the subscription stays in our session, so the broker keeps
            # queueing for us), process and commit what was handed over, acknowledge it
            if isinstance(self.inbox, Receiver):
                rest = self.inbox.stop()
            else:
                n = len(self.inbox)  # what arrived so far; later messages stay unacknowledged
                rest = self.inbox.drain(n, wait_s=0.0, linger_s=0.0) if n else []
            # what does not fit in the budget stays unacknowledged: the broker delivers it
            # again to the next start, so a large hand-over cannot hold up the exit
            deadline = time.monotonic() + STOP_BUDGET_S
            for i in range(0, len(rest), self.settings.batch_max):
                if time.monotonic() > deadline or not self.writer.alive or self.fatal:
                    log.info("stopping: %d handed-over messages left to the broker's session", len(rest) - i)
                    break
                self._process_guarded(rest[i : i + self.settings.batch_max])
            if self.processor.held and self.writer.alive:
                self._process_guarded([], flush=True)
            flushed = self.writer.flush(timeout_s=FATAL_FLUSH_S if self.fatal else STOP_FLUSH_S)
            if not flushed:
                log.error("stopping: %d batch(es) not committed (store failing or writer stopped); their messages "
                          "stay unacknowledged and the broker delivers them again", self.writer.pending)
        finally:
            if isinstance(self.inbox, Receiver):
                self.inbox.close(timeout_s=5.0)
            else:
                self.inbox.close()  # paho's thread must not block on a full inbox while it disconnects
            if self.webhook is not None:
                self.webhook.close()
            if self._spb_state is not None and not isinstance(self.inbox, Receiver):
                self.link.publish(self._spb_state[1].topic, self._spb_state[1].payload, qos=1, retain=True)
            self.link.stop(final=self._offline)
            self.writer.close(timeout_s=STOP_FLUSH_S if flushed and not self.fatal else 1.0)
            log.info("consumer stopped after %d micro-batches", self.batches)

    def _log_gaps(self) -> None:
        """One warning line per `GAP_LOG_INTERVAL_S` for the seq gaps found since the last one
        (every gap is counted and stored regardless); called per batch and per loop step, so
        the last gaps of a burst are logged too."""
        if not self._gap_pending:
            return
        now = time.monotonic()
        if now - self._gap_logged < GAP_LOG_INTERVAL_S:
            return
        more = f"; and {self._gap_more} more" if self._gap_more else ""
        log.warning("readings never arrived (jumps in seq): %s%s", "; ".join(self._gap_pending), more)
        self._gap_logged, self._gap_pending, self._gap_more = now, [], 0

    def _on_broker_dropped(self, payload: bytes) -> None:
        """``$SYS/broker/publish/messages/dropped`` (paho's thread): keep the count."""
        try:
            self._broker_dropped = int(payload.strip())
        except ValueError:
            return

    def _check_broker_dropped(self) -> None:
        """Export the broker's dropped-message count and warn when it rose."""
        now = self._broker_dropped
        if now is None or now == self._broker_dropped_seen:
            return
        before, self._broker_dropped_seen = self._broker_dropped_seen, now
        self.metrics.broker_dropped.set(now)
        if before is not None and now > before:
            log.warning("the broker dropped %d more message(s) (%d in all, %s): a client's queue overflowed "
                        "(mosquitto max_queued_messages); if it is this consumer's, readings were lost - see the "
                        "seq gaps (itap_readings_gap_total)", now - before, now, BROKER_DROPPED_TOPIC)

    def log_summary(self) -> str:
        """Log (INFO) and return one line on the time since the last one: readings/s, devices,
        windows, anomalies, rejected readings, open alerts, store lag, unacknowledged messages."""
        now = time.monotonic()
        m = self.metrics
        seen = {
            "readings": m.sample("itap_readings_processed_total"),
            "windows": m.sample("itap_windows_scored_total"),
            "anomalies": m.total("itap_anomalies_total"),
            "rejected": m.total("itap_readings_rejected_total"),
        }
        d = {k: v - self._summary_seen.get(k, 0.0) for k, v in seen.items()}
        span = max(now - self._summary_at, 1e-9)
        self._summary_at, self._summary_seen = now, seen
        line = (
            f"last {span:.0f}s: {d['readings'] / span:,.1f} readings/s stored, {len(self.processor.windows):,} "
            f"devices, {int(d['windows']):,} windows, {int(d['anomalies']):,} anomalies, {int(d['rejected']):,} "
            f"rejected, {len(self.processor.engine.open_alerts()):,} open alerts, store lag "
            f"{self.writer.pending} batch(es) / {self.writer.stalled_for(now):.1f}s, "
            f"{self._to_ack - self._acked:,} unacknowledged"
        )
        log.info("%s", line)
        return line

    # -- the loop
    def http_action(self, name: str, body: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        """A command from the dashboard (an HTTP thread): handed to the processing loop, which runs
        it exactly as one from ``{prefix}/commands/{name}`` (`_command`); returns its reply."""
        request_id = f"http-{uuid.uuid4().hex}"
        done = threading.Event()
        reply: dict[str, Any] = {}
        with self._http_lock:
            self._http_waiting[request_id] = (done, reply)
        payload = json.dumps(body | {"request_id": request_id}).encode()
        self._http_cmds.put((self._cmd_prefix + name, payload, time.time(), 0, 0, 0))
        try:
            if not done.wait(timeout_s):
                return {"ok": False, "reason": f"the consumer did not answer within {timeout_s:g} s"}
        finally:
            with self._http_lock:
                self._http_waiting.pop(request_id, None)
        return reply

    def _rebalance(self) -> None:
        """``source: nats``: forget the devices of partitions given up, restore those of
        partitions taken (before any of their readings is processed), tell the source."""
        assert self.cluster is not None
        gained, lost = self.cluster.changes()
        if lost:
            gone = self._devices_of(set(lost))
            devices = {d for d in self.processor.known_devices() if gone(d)}
            self.processor.forget(devices)
            self.fleet.forget(devices)
            for alert_id in [k for k, a in self._held.items() if a.device_id in devices]:
                del self._held[alert_id]
            log.info("gave up partition(s) %s: %d device(s) now with another consumer", sorted(lost), len(devices))
        if gained:
            t0 = time.perf_counter()
            n = self.restore_windows(set(gained))
            self.restore_state(set(gained))
            log.info("took partition(s) %s: %d device(s) restored from the store in %.2fs", sorted(gained), n,
                     time.perf_counter() - t0)
        if gained or lost:
            self.cluster.done(gained, lost)
            self.metrics.partitions.set(len(self.cluster.owned()))

    def _step(self, timeout_s: float) -> int:
        if self.cluster is not None:
            self._rebalance()
        msgs = self.inbox.drain(
            self.settings.batch_max, timeout_s, self.settings.batch_wait_ms / 1000.0, max_bytes=BATCH_MAX_BYTES
        )
        if not self._http_cmds.empty():
            http: list[Message] = []
            with contextlib.suppress(queue.Empty):
                while True:
                    http.append(self._http_cmds.get_nowait())
            msgs = http + msgs
        if msgs or (self.processor.held and not self._stop.is_set()):
            self._process_guarded(msgs)  # an empty batch releases readings the reorder buffer held long enough
        self.check_stale()
        self._maybe_reload()
        self._check_broker_dropped()
        self._log_gaps()
        self.metrics.outbox.set(self.link.outbox)
        self.metrics.unacked.set(self._to_ack - self._acked)  # set here only: one writer
        retained = self.inbox.retained_ignored if isinstance(self.inbox, Receiver) else self.link.retained_ignored
        if retained > self._retained_seen:  # a restarted intake starts again from 0
            self.metrics.retained_ignored.inc(retained - self._retained_seen)
        self._retained_seen = retained
        return len(msgs)

    # -- hot reload
    def _watched(self) -> dict[str, float]:
        """Modification times of the files a reload reads (0 for a missing one)."""
        out = {}
        for part, path in (("rules", self.settings.rules_file), ("sensors", self.settings.sensors_file),
                           ("model", self.settings.model_path)):
            try:
                out[part] = os.stat(path).st_mtime
            except OSError:
                out[part] = 0.0
        return out

    def request_reload(self) -> None:
        """Ask the loop to reload rules, sensor ranges and model (e.g. from a SIGHUP handler)."""
        self._reload_requested.set()

    def reload(self, parts: tuple[str, ...] = ("rules", "sensors", "model")) -> dict[str, str]:
        """Reload parts from their files without a restart. A file that fails to load or
        does not fit keeps the old one active; returns ``part -> "reloaded" | "rejected: why"``."""
        results: dict[str, str] = {}
        proc = self.processor
        for part in parts:
            try:
                if part == "rules":
                    engine = self.settings.rule_engine()
                    engine._devices = proc.engine._devices  # noqa: SLF001 - open alerts carry over
                    proc.engine = engine
                elif part == "sensors":
                    schema = self.settings.schema()
                    new_sig = [(s.name, s.family) for s in schema.signals]
                    if new_sig != [(s.name, s.family) for s in self.schema.signals]:
                        msg = (
                            "its signals or families differ from the running ones; "
                            "that needs a retrained model and a restart"
                        )
                        raise ConfigError(msg)
                    self.schema = proc.schema = schema
                    self.blocks = self._block_decoder(schema)  # new bounds
                    if self.sparkplug is not None:
                        # new metric names: the edge nodes are asked for their births again
                        self.sparkplug = self._sparkplug_host(schema)
                elif part == "model":
                    artifact = artifacts.load(self.settings.model_path, key=self.model_key)
                    check_compatible(artifact, self.schema, self.settings.window, self.settings.hop)
                    proc.artifact = artifact
                    if proc.restore_depth() > self.settings.window:
                        # a detector with a per-device history: replay it from the store
                        try:
                            owned = self.cluster.owned() if self.cluster is not None else None
                            proc.restore(self.store.recent_readings(
                                proc.restore_depth(), max_devices=self.settings.max_devices,
                                keep=self._devices_of(owned) if owned is not None else None))
                        except ItapError as exc:
                            log.warning("model reloaded, but its per-device history could not be replayed: %s", exc)
                    self.fleet.threshold = artifact.threshold
                    self.fleet.typical = typical_score(artifact.stats.calibration_scores, artifact.threshold)
                    if proc.drift is not None:
                        proc.drift = DriftMonitor(delta=self.settings.drift_delta)
                    self.metrics.set_model(model_info(artifact))
                results[part] = "reloaded"
                log.info("reloaded %s", part)
            except ItapError as exc:
                results[part] = f"rejected: {exc}"
                log.error("reload of %s rejected, the old one stays active: %s", part, exc)
            self.metrics.reloads.labels(part, "ok" if results[part] == "reloaded" else "rejected").inc()
        self._mtimes = self._watched()
        return results

    def _maybe_reload(self) -> None:
        """Reload on request (SIGHUP) or when a watched file changed (checked every 2 s)."""
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.reload()
            return
        now = time.monotonic()
        if now - self._watch_checked < 2.0:
            return
        self._watch_checked = now
        current = self._watched()
        changed = tuple(p for p, t in current.items() if t != self._mtimes.get(p))
        if changed:
            log.info("file change: reloading %s", ", ".join(changed))
            self.reload(changed)

    @property
    def stale_checked_at(self) -> float:
        """Service-clock time of the last stale-device check."""
        return self._stale_checked

    def check_stale(self, *, force: bool = False) -> list[Alert]:
        """``device_stale`` alerts for silent devices (at most once a second unless forced)."""
        now = self.clock()
        health = self.processor.health
        if health is None or (not force and now - self._stale_checked < 1.0):
            return []
        self._stale_checked = now
        alerts = health.check_stale(now)
        alerts.extend(self._silences_ended(now))
        if alerts:
            self.fleet.update([], np.zeros(0), np.zeros(0, dtype=bool), [], alerts)
            batch = StoreBatch()
            self._emit(alerts, batch)
            self.writer.submit(batch)
        return alerts

    def _silences_ended(self, now: float) -> list[Alert]:
        """Alerts held back by a silence that has ended and whose condition still holds:
        published now, same id, with a note."""
        self.silences.prune(now)
        if not self._held:
            return []
        still_open = {a.id for a in self.processor.engine.open_alerts()}
        if self.processor.health is not None:
            still_open |= self.processor.health.open_ids()
        out = []
        for alert_id, alert in list(self._held.items()):
            if self.silences.silenced(alert, now):
                continue
            del self._held[alert_id]
            if alert_id in still_open:
                out.append(dataclasses.replace(alert, status="firing", changed_at=now,
                                               note="published at the end of a silence; the condition still holds"))
        return out

    def _process_guarded(self, msgs: list[Message], *, flush: bool = False) -> None:
        """`process_messages`, and if that fails on a bug, the messages one by one: the one
        that fails alone is dead-lettered (reason ``invalid``) and acknowledged, so no
        message can crash the consumer, or crash it again after every restart."""
        try:
            self.process_messages(msgs, flush=flush)
            return
        except StoreError:
            raise  # the writer is gone: the loop ends the service
        except Exception:  # noqa: BLE001 - a poison message must not stop the fleet
            log.exception("processing a micro-batch of %d message(s) failed; retrying them one by one", len(msgs))
        for msg in msgs:
            try:
                self.process_messages([msg])
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.exception("message on %s could not be processed; dead-lettered", msg[0][:DEADLETTER_TOPIC_CHARS])
                device = msg[0][self._prefix_len :] if msg[0].startswith(self.settings.topic("telemetry")) else None
                body = self._dead_letter(msg[0], msg[1], Rejection(
                    "invalid", f"processing failed: {type(exc).__name__}: {clean_text(exc, DETAIL_CHARS)}",
                    device if device and len(device) <= MAX_ID_CHARS else None))
                batch = StoreBatch(deadletters=[body])
                if msg[4] > 0:
                    acks = [(msg[3], msg[4])]
                    ack = self.inbox.ack if isinstance(self.inbox, Receiver) else self.link.ack
                    batch.on_commit.append(lambda acks=acks, ack=ack: ack(acks))
                self.writer.submit(batch)

    def _store_rejected(self, part: str, rows: list[Any], why: str) -> list[dict[str, Any]]:
        """Rows the store refused (called by the writer thread): readings become dead letters
        with reason ``store_rejected``; other rows are only logged (they follow from readings)."""
        if part not in ("readings", "late", "blocks", "new_blocks"):
            return []
        cols = self.store.reading_columns if part not in ("blocks", "new_blocks") else BLOCK_COLUMNS
        out = []
        for row in rows:
            obj = dict(row) if isinstance(row, dict) else dict(zip(cols, row, strict=False))
            device = obj.get("device_id")
            topic = self.settings.topic("telemetry", str(device))
            rej = Rejection("store_rejected", f"the store refused the reading: {clean_text(why, DETAIL_CHARS)}",
                            device if isinstance(device, str) else None)
            out.append(self._dead_letter(topic, json.dumps(obj, default=str), rej))
        return out

    def process_messages(self, msgs: list[Message], *, flush: bool = False) -> BatchResult:
        """Decode, process, publish and hand to the store one micro-batch of messages;
        they are acknowledged to the broker once the store committed them."""
        m = self.metrics
        if msgs:
            m.messages.inc(len(msgs))
            m.batch_size.observe(len(msgs))
        m.queue_depth.set(len(self.inbox))
        readings: list[Reading | Block] = []
        n_readings = 0
        blocks = self.blocks
        now = self.clock()
        # a block holds no reading beyond the clock-skew bound: those are taken one by one
        future_limit = now + self.settings.max_clock_skew
        plen = self._prefix_len
        max_bytes = self.settings.max_payload_bytes
        max_readings = self.settings.max_readings_per_message
        min_ts = self.settings.min_ts
        schema = self.schema
        cmd_prefix = self._cmd_prefix
        transitions: list[Alert] = []
        dead: list[dict[str, Any]] = []
        again: set[int] = set()  # readings of messages the broker marked as delivered again
        new_devices: set[str] = set()  # devices first seen in this batch
        spb = self.sparkplug
        gone: list[tuple[int, str, str]] = []  # Sparkplug deaths: (message index, device, why)
        back: dict[str, int] = {}  # a Sparkplug device's last message with readings in this batch
        for i, (topic, payload, _t, _token, _qos, dup) in enumerate(msgs):
            if topic.startswith(cmd_prefix):
                transitions.extend(self._command(topic[len(cmd_prefix) :], payload))
                continue
            if spb is not None and topic.startswith(self._spb_prefix):
                good, bad = self._sparkplug_message(spb, topic, payload, gone, i)
                device = good[0].device_id if good else ""
                if good:
                    back[device] = i
            else:
                device = topic[plen:]
                # an array payload goes column-wise when it is clean; a copy delivered again
                # (dup) goes one by one, so that its readings already taken count as redelivered
                if blocks is not None and not dup and payload[:1] == b"[" and len(payload) <= max_bytes:
                    block = blocks.decode_block(payload, device, max_readings=max_readings)
                    # (a refused new device: decoded one by one below, for its dead letter)
                    if block is not None and block.ts[-1] <= future_limit and (
                            device in self.processor.windows or device in new_devices
                            or self._admit(device, len(block), [], new_devices)):
                        readings.append(block)
                        n_readings += len(block)
                        continue
                good, bad = decode(payload, schema, device, max_bytes=max_bytes, max_readings=max_readings,
                                   min_ts=min_ts)
            if good and device not in self.processor.windows and device not in new_devices and not self._admit(
                    device, len(good), bad, new_devices):
                good = []
            if len(good) > 1 and blocks is not None and not dup and good[-1].ts <= future_limit:
                # a Sparkplug DDATA of many readings: into the windows and the store as one block
                block = Block.of(good)
                if block is not None:
                    readings.append(block)
                    n_readings += len(block)
                    good = []
            if good:
                readings.extend(good)
                n_readings += len(good)
                if dup:
                    again.update(map(id, good))
            for rej in bad:
                dead.append(self._dead_letter(topic, payload, rej))
        m.received.inc(n_readings)
        result = self.processor.process(readings, now=now, flush=flush)
        if gone:
            transitions.extend(self._offline_alerts(gone, back))
        m.processed.inc(result.n_accepted)
        future: set[int] = set()
        for r, reason in result.dropped:
            if reason != "future" and id(r) in again:
                # at least once: a copy of a reading this consumer already took, sent again by the
                # broker after a reconnect; stored once, counted here, no dead letter
                m.redelivered.inc()
                continue
            dead.append(self._dead_letter(self.settings.topic("telemetry", r.device_id), _reading_json(r, schema),
                                          Rejection(reason, _DROP_DETAIL[reason], r.device_id)))
            if reason == "future":
                future.add(id(r))
        if future:
            # not stored: it would sit ahead of every real reading
            readings = [r for r in readings if id(r) not in future]
        n_win = result.n_windows
        if n_win:
            m.windows.inc(n_win)
        m.active_devices.set(len(self.processor.windows))
        batch = self._rows(result, readings, new_devices)
        batch.deadletters = dead
        if self._state_rows or self._silence_rows:
            batch.state, batch.silences = self._state_rows, self._silence_rows
            self._state_rows, self._silence_rows = [], []
        self._emit([*transitions, *result.alerts], batch)
        if n_win and result.windows is not None and result.scores is not None and result.is_anomaly is not None:
            self.fleet.update(result.windows.device_ids, result.scores, result.is_anomaly, result.states,
                              [*transitions, *result.alerts])
        elif transitions or result.alerts:
            self.fleet.update([], np.zeros(0), np.zeros(0, dtype=bool), [], [*transitions, *result.alerts])
        if msgs:
            oldest = min(msg[2] for msg in msgs)
            acks = [(msg[3], msg[4]) for msg in msgs if msg[4] > 0]
            # acknowledged to the connection that delivered them, and only after the commit:
            # a crash before it means the broker delivers them again (stored once)
            ack = self.inbox.ack if isinstance(self.inbox, Receiver) else self.link.ack
            self._to_ack += len(acks)

            def committed() -> None:
                m.latency.observe(max(0.0, time.time() - oldest))
                ack(acks)
                self._acked += len(acks)

            batch.on_commit.append(committed)
        m.outbox.set(self.link.outbox)
        self.writer.submit(batch)
        self.batches += 1
        return result

    def _sparkplug_message(self, spb: SparkplugHost, topic: str, payload: bytes, gone: list[tuple[int, str, str]],
                           index: int) -> tuple[list[Reading], list[Rejection]]:
        """One Sparkplug B message: its readings (all of one device) and rejections; deaths
        are noted in ``gone`` (`_offline_alerts` raises them once the batch's readings are
        in), and nodes that lost track are asked for a rebirth (``NCMD``, QoS 0 as the
        specification says)."""
        if len(payload) > self.settings.max_payload_bytes:
            return [], [Rejection("oversized", f"payload of {len(payload)} bytes exceeds "
                                  f"{self.settings.max_payload_bytes}")]
        res = spb.handle(topic, payload, self.clock())
        gone.extend((index, device, why) for device, why in res.offline)
        for group, edge in res.rebirth:
            self.metrics.sparkplug_rebirths.inc()
            log.info("asking Sparkplug edge node %s/%s for a rebirth", group, edge)
            self.link.publish(f"{NAMESPACE}/{group}/NCMD/{edge}", rebirth_request(int(time.time() * 1000)), qos=0)
        return res.readings, res.rejections

    def _offline_alerts(self, gone: list[tuple[int, str, str]], back: dict[str, int]) -> list[Alert]:
        """``device_offline`` for the Sparkplug deaths of a micro-batch, raised after its
        readings: a device's readings from before its death (same batch) must not resolve
        it, and a device that reported again after its death in the batch stays online."""
        health = self.processor.health
        if health is None:
            return []
        now = self.clock()
        out = []
        for index, device, why in gone:
            if back.get(device, -1) > index:
                continue
            alert = health.offline(device, now, why)
            if alert is not None:
                out.append(alert)
        return out

    def _admit(self, device: str, n: int, bad: list[Rejection], new_devices: set[str]) -> bool:
        """Whether the ``n`` readings of a device not tracked yet are kept: yes while fewer
        than ``max_devices`` are tracked, else refused (``too_many_devices``, added to ``bad``)
        so that a flood of new ids cannot take the memory of the service."""
        if len(self.processor.windows) + len(new_devices) < self.settings.max_devices:
            new_devices.add(device)
            return True
        bad.append(Rejection("too_many_devices", f"{n} reading(s) of new device {device!r} refused: "
                             f"max_devices ({self.settings.max_devices}) devices are tracked already", device,
                             counts={"too_many_devices": n}))
        return False

    def _emit(self, alerts: list[Alert], batch: StoreBatch) -> None:
        """Publish alert transitions and add them to ``batch`` for the store."""
        m = self.metrics
        alert_topic = self.settings.topic
        silences = self.silences if self.silences.all() else None
        now = self.clock() if silences is not None else 0.0
        for alert in alerts:
            d = alert.to_dict()
            silenced = silences is not None and silences.silenced(alert, now)
            if silenced:
                # stored, not published; published when the silence ends if still holding
                d["silenced"] = True
                if alert.status == "resolved":
                    self._held.pop(alert.id, None)
                else:
                    self._held[alert.id] = alert
                m.silenced.labels(alert.rule).inc()
            payload = json.dumps(d)
            if not silenced:
                self._publish(alert_topic("alerts", alert.device_id), payload)
                if self.webhook is not None:
                    self.webhook.submit(d)
            m.alerts.labels(alert.rule, alert.severity, alert.status).inc()
            if alert.rule == "model_drift":
                m.model_drift.labels("fleet" if alert.device_id == FLEET else "device").inc()
            elif alert.rule == "baseline_shift":
                m.baseline_shifts.labels("operator" if alert.note.startswith("operator") else alert.note).inc()
            log.info("alert %s %s: %s %s on %s%s: %s", alert.id, alert.status, alert.severity, alert.rule,
                     alert.device_id, " (silenced: stored, not published)" if silenced else "",
                     alert.note or alert.root_cause)
            batch.alerts.append(
                {
                    "alert_id": alert.id,
                    "status": alert.status,
                    "rule": alert.rule,
                    "severity": alert.severity,
                    "device_id": alert.device_id,
                    "route": alert.route,
                    "root_cause": alert.root_cause,
                    "score": alert.score,
                    "confidence": alert.confidence,
                    "window_start": alert.window_start,
                    "window_end": alert.window_end,
                    "changed_at": alert.changed_at if alert.changed_at is not None else alert.fired_at,
                    "payload": payload,
                }
            )
            if self.on_alert is not None:
                self.on_alert(d)
        if alerts:
            # paho's network thread sends them; give it the GIL now rather than after the
            # rest of this batch (otherwise an alert waits up to a 5 ms switch interval or more)
            time.sleep(0.0005)

    def _rows(self, result: BatchResult, readings: list[Reading | Block], new_devices: set[str]) -> StoreBatch:
        if not result.accepted_blocks and not result.dropped:
            batch = StoreBatch(readings=reading_rows(readings))
        else:
            # blocks taken whole are stored column-wise; readings the windows turned away
            # (repeated, late, out of order) may repeat one a stored block holds
            batch = StoreBatch()
            taken = {id(b) for b in result.accepted_blocks}
            dropped = {id(r) for r, _why in result.dropped}
            for r in readings:
                if isinstance(r, Block):
                    if id(r) in taken:
                        # a device first heard now may have history this consumer did not restore
                        (batch.new_blocks if r.device_id in new_devices else batch.blocks).append(block_record(r))
                    else:
                        batch.late.extend(block_rows(r))
                elif id(r) in dropped:
                    batch.late.extend(reading_rows([r]))
                else:
                    batch.readings.extend(reading_rows([r]))
        span: dict[str, list[float]] = {}  # device -> [first, last] ts in this batch
        get = span.get
        for r in readings:
            if isinstance(r, Block):
                device_id, first, ts = r.device_id, float(r.ts[0]), float(r.ts[-1])  # (rising)
            else:
                device_id, ts = r[0], r[1]
                first = ts
            seen = get(device_id)
            if seen is None:
                span[device_id] = [first, ts]
                continue
            if ts > seen[1]:
                seen[1] = ts
            if first < seen[0]:
                seen[0] = first
        batch.devices = {d: (f, last) for d, (f, last) in span.items()}
        if result.gaps:
            batch.gaps = [{"device_id": g.device_id, "seq_before": g.seq_before, "seq_after": g.seq_after,
                           "missing": g.missing, "ts_before": g.ts_before, "ts_after": g.ts_after}
                          for g in result.gaps]
            self.metrics.gaps.inc(sum(g.missing for g in result.gaps))
            room = max(0, 5 - len(self._gap_pending))
            self._gap_pending.extend(f"{g.device_id} seq {g.seq_before + 1}..{g.seq_after - 1}"
                                     for g in result.gaps[:room])
            self._gap_more += len(result.gaps) - min(room, len(result.gaps))
            self._log_gaps()
        w = result.windows
        if w is not None and len(w) and result.scores is not None and result.is_anomaly is not None:
            states = w.last_states
            scores = result.scores.tolist()
            flags = result.is_anomaly.tolist()
            starts, ends = w.start_ts.tolist(), w.end_ts.tolist()
            batch.windows = list(zip(w.device_ids, starts, ends, states, scores, flags, w.labels, strict=True))
            conf = result.confidence.tolist() if result.confidence is not None else [0.0] * len(w)
            for i, exp in result.explanations.items():
                batch.anomalies.append(
                    anomaly_row(
                        w.device_ids[i], starts[i], ends[i], states[i], scores[i], conf[i], exp, w.tags[i], w.labels[i]
                    )
                )
                self.metrics.anomalies.labels(exp.dominant_family).inc()
        return batch

    def _command(self, name: str, payload: bytes) -> list[Alert]:
        """One command from ``{prefix}/commands/{name}``; the answer goes to
        ``{prefix}/status/commands``. Returns the alert transitions it caused."""
        reply: dict[str, Any] = {"command": clean_text(name, 64), "ok": False}
        out: list[Alert] = []
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("a command is a JSON object")
        except (ValueError, RecursionError) as exc:
            reply["reason"] = f"not a JSON object: {clean_text(exc, DETAIL_CHARS)}"
            body = {}
        request_id = body.get("request_id")
        reply["request_id"] = request_id if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) \
            and len(str(request_id)) <= 128 else None
        answer = True
        if self.cluster is not None and not str(reply["request_id"]).startswith("http-"):
            act, answer = self._cluster_role(name, body)
            if not act:
                return []  # the consumer that owns its device answers
        try:
            out = self._run_command(name, body, reply)
        except Exception as exc:  # noqa: BLE001 - no command may stop the service
            log.exception("command %s failed", reply["command"])
            reply["ok"] = False
            reply["reason"] = f"command failed: {type(exc).__name__}: {clean_text(exc, DETAIL_CHARS)}"
            out = []
        known = ("ack", "rebaseline", "silence", "reload")
        self.metrics.commands.labels(name if name in known else "unknown", "ok" if reply["ok"] else "refused").inc()
        if not reply["ok"]:
            log.warning("command %s refused: %s", reply["command"], reply["reason"])
        if answer:
            self._publish(self.settings.topic("status", "commands"), json.dumps(reply))
        waiting = self._http_waiting.get(str(reply.get("request_id")))
        if waiting is not None:  # a dashboard action: its HTTP thread waits for this reply
            waiting[1].update(reply)
            waiting[0].set()
        return out

    def _cluster_role(self, name: str, body: dict[str, Any]) -> tuple[bool, bool]:
        """``source: nats``: every consumer receives every command; ``(act, answer)`` for this
        one. An ack or rebaseline is run and answered by the owner of its device (an alert's
        device comes from the shared store when it is not open here); silences and reloads
        are run by all and answered by the owner of partition 0, as is anything no device
        owner can answer (an unknown alert id, a malformed command)."""
        assert self.cluster is not None
        owned = self.cluster.owned()
        first = 0 in owned
        device: str | None = None
        if name == "ack":
            alert_id = body.get("alert_id")
            if isinstance(alert_id, str) and alert_id:
                if self.processor.engine.find_open(alert_id) is not None:
                    return True, True
                try:
                    device = self.store.alert_device(alert_id)
                except ItapError:
                    device = None
        elif name == "rebaseline":
            dev = body.get("device_id")
            device = dev if isinstance(dev, str) and dev else None
        elif name in ("silence", "reload"):
            return True, first
        if device is None:
            return first, first
        mine = partition_of(device, self.settings.partitions) in owned
        return mine, mine

    def _run_command(self, name: str, body: dict[str, Any], reply: dict[str, Any]) -> list[Alert]:
        out: list[Alert] = []
        if "reason" in reply:
            pass  # not a JSON object: answered as refused below
        elif name == "ack":
            out.extend(self._ack_command(body, reply))
        elif name == "rebaseline":
            out.extend(self._rebaseline_command(body, reply))
        elif name == "silence":
            self._silence_command(body, reply)
        elif name == "reload":
            before = self.settings
            model_path = body.get("model_path")
            if model_path is not None:
                # `itap train --activate`: the model it just wrote becomes this consumer's model,
                # if it lies in the models folder the operator configured (never any path a
                # message names: unpickling runs code)
                try:
                    if not isinstance(model_path, str) or not model_path:
                        raise ArtifactError("model_path must be a non-empty string")
                    resolved = artifacts.resolve_model_path(model_path, self.models_dir)
                except ArtifactError as exc:
                    reply["reason"] = clean_text(exc, DETAIL_CHARS)
                    return out
                self.settings = self.settings.replace(model_path=str(resolved))
            wanted = body.get("parts") or ["rules", "sensors", "model"]
            if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted) \
                    or set(wanted) - {"rules", "sensors", "model"}:
                reply["reason"] = "reload parts must be a list of rules, sensors, model"
                wanted = []
            results = self.reload(tuple(wanted)) if wanted else {}
            if "model" in results and results["model"] != "reloaded":
                self.settings = before
                self._mtimes = self._watched()
            reply.update(ok=bool(results) and all(v == "reloaded" for v in results.values()), results=results)
            if model_path is not None and results.get("model") == "reloaded":
                # `itap train --activate` outlives a restart: the next start loads this model
                self._state_rows.append(("model_path", self.settings.model_path))
            if not reply["ok"] and "reason" not in reply:
                reply["reason"] = "; ".join(
                    f"{k}: {v}" for k, v in results.items() if v not in ("reloaded", "unchanged")
                )
        else:
            reply["reason"] = f"unknown command {reply['command']!r}; known: ack, rebaseline, silence, reload"
        return out

    def _ack_command(self, body: dict[str, Any], reply: dict[str, Any]) -> list[Alert]:
        """``{"alert_id", "note", "by", "rebaseline"}``: acknowledge an open alert; with
        ``"rebaseline": true`` also accept its device's current state as its new normal
        (`Processor.rebaseline`, a ``baseline_shift`` event), even when already acknowledged."""
        alert_id = body.get("alert_id")
        if not isinstance(alert_id, str) or not alert_id:
            reply["reason"] = "ack needs an alert_id"
            return []
        rebase = body.get("rebaseline", False)
        if not isinstance(rebase, bool):
            reply["reason"] = "rebaseline must be true or false"
            return []
        note, by = clean_text(body.get("note") or "", 500), clean_text(body.get("by") or "", 64)
        reply["alert_id"] = alert_id
        engine = self.processor.engine
        alert = engine.find_open(alert_id)  # the full id or the short one people see
        if alert is not None:
            alert_id = reply["alert_id"] = alert.id
        if alert is None or (alert.acknowledged and not rebase):
            reply["reason"] = (
                f"no open, unacknowledged alert with id {alert_id} (unknown, resolved or already acknowledged)"
            )
            return []
        out: list[Alert] = []
        if rebase:
            shifted = self._rebaseline(alert.device_id, by, note, reply)
            if shifted is None:
                return []
            out.append(shifted)
        done = engine.acknowledge(alert_id, at=self.clock(), note=f"{by}: {note}" if by else note)
        if done is not None:
            out.append(done)
        reply["ok"] = True
        return out

    def _rebaseline(self, device_id: str, by: str, note: str, reply: dict[str, Any]) -> Alert | None:
        """The operator's baseline shift of one device, or None with the reason in ``reply``."""
        got = self.processor.rebaseline(device_id, self.clock())
        if isinstance(got, str):
            reply["reason"] = got
            return None
        who = f"operator {by}" if by else "operator"
        got = dataclasses.replace(got, note=f"{who}: {note}" if note else who)
        reply["baseline_shift"] = got.id
        return got

    def _rebaseline_command(self, body: dict[str, Any], reply: dict[str, Any]) -> list[Alert]:
        """``{"device_id", "note", "by"}``: accept a device's current state as its new normal."""
        device_id = body.get("device_id")
        if not isinstance(device_id, str) or not device_id:
            reply["reason"] = "rebaseline needs a device_id"
            return []
        reply["device_id"] = clean_text(device_id, 128)
        got = self._rebaseline(device_id, clean_text(body.get("by") or "", 64), clean_text(body.get("note") or "", 500),
                               reply)
        if got is None:
            return []
        reply["ok"] = True
        return [got]

    def _silence_command(self, body: dict[str, Any], reply: dict[str, Any]) -> None:
        """``{"action": "add", ...silence}``, ``{"action": "remove", "id"}`` or ``{"action": "list"}``."""
        action = body.get("action")
        if action == "add":
            spec = {k: v for k, v in body.items() if k not in ("action", "request_id", "all", "by")}
            if self.cluster is not None and "id" not in spec:
                # every consumer of the cluster adds it: the same id everywhere, from the request
                spec["id"] = hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode(),
                                          usedforsecurity=False).hexdigest()[:10]
            if body.get("by"):  # who added it (the dashboard's user), kept with the comment
                spec["comment"] = f"{spec.get('comment') or ''} (by {clean_text(body['by'], 64)})".strip()
            everything = body.get("all", False)
            try:
                if not isinstance(everything, bool):
                    raise ConfigError('"all" must be true or false')
                s = silence_from_dict(spec, now=self.clock())
                check_bounded(s, everything=everything, max_s=self.settings.silence_max, now=self.clock())
            except ConfigError as exc:
                reply["reason"] = str(exc)
                return
            self.silences.add(s)
            self._silence_rows.append((s.id, json.dumps(s.to_dict())))  # kept across restarts
            log.info("silence %s added: %s", s.id, s.to_dict())
            reply.update(ok=True, silence=s.to_dict())
        elif action == "remove":
            sid = str(body.get("id") or "")
            if self.silences.remove(sid):
                self._silence_rows.append((sid, None))
                log.info("silence %s removed", sid)
                reply.update(ok=True, id=sid)
            else:
                reply["reason"] = f"no silence with id {sid!r}"
        elif action == "list":
            reply.update(ok=True, silences=[s.to_dict() for s in self.silences.all()])
        else:
            reply["reason"] = "silence needs action add, remove or list"

    def _webhook_gave_up(self, alert: dict[str, Any], reason: str) -> None:
        """The webhook worker could not deliver an alert: dead-letter it (called from its thread)."""
        self.metrics.webhook_failures.inc()
        body = {
            "topic": self.settings.webhook_url,
            "reason": "webhook_failed",
            "detail": reason,
            "payload": json.dumps(alert)[:1024],
            "received_at": time.time(),
        }
        self._publish(self.settings.topic("deadletter"), json.dumps(body))

    def _publish(self, topic: str, payload: str | bytes) -> None:
        """QoS 1 publish; held while the broker is away; counted when the outbox is full."""
        if not self.link.publish(topic, payload, qos=1):
            self.metrics.publish_refused.inc()
            now = time.monotonic()
            last, quiet = self._reject_log.get("_outbox", (-LOG_EVERY_S, 0))
            if now - last >= LOG_EVERY_S:
                log.error("outbox full (%d messages waiting for the broker): %s not published (%d more since the "
                          "last report); alerts stay in the store", self.settings.outbox_max, topic, quiet)
                self._reject_log["_outbox"] = (now, 0)
            else:
                self._reject_log["_outbox"] = (last, quiet + 1)

    def _dead_letter(self, topic: str, payload: bytes | str, rej: Rejection) -> dict[str, Any]:
        """Publish a refused payload or reading on the dead-letter topic; returns its store row.
        An array payload's bad elements share one dead letter (``counts``: per reason)."""
        if rej.counts:
            for reason, n in rej.counts.items():
                self.metrics.rejected.labels(reason).inc(n)
        else:
            self.metrics.rejected.labels(rej.reason).inc()
        # one log line per reason every LOG_EVERY_S: a device spewing bad data must not
        # flood the log (every rejection still goes to the dead-letter topic and metric)
        now = time.monotonic()
        last, quiet = self._reject_log.get(rej.reason, (-LOG_EVERY_S, 0))
        if now - last >= LOG_EVERY_S:
            more = f" ({quiet} more '{rej.reason}' since the last report)" if quiet else ""
            log.warning("rejected reading on %s: %s (%s)%s", topic, rej.reason, rej.detail, more)
            self._reject_log[rej.reason] = (now, 0)
        else:
            self._reject_log[rej.reason] = (last, quiet + 1)
        if rej.element is not None:
            text = rej.element  # the bad element of an array payload
        elif isinstance(payload, bytes):
            text = payload[:1024].decode("utf-8", errors="replace")
        else:
            text = payload[:1024]
        body: dict[str, Any] = {
            "topic": clean_text(topic, DEADLETTER_TOPIC_CHARS),
            "reason": rej.reason,
            "detail": rej.detail,
            "device_id": rej.device_id,
            "payload": text,
            "received_at": time.time(),
        }
        if rej.counts and rej.n > 1:
            body["count"] = rej.n
            body["reasons"] = rej.counts
        self._publish(self.settings.topic("deadletter"), json.dumps(body))
        return body
