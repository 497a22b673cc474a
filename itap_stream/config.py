"""Settings: one YAML file plus ``ITAP_*`` environment overrides.

Precedence, lowest first: built-in defaults, the YAML file (``--config`` /
``ITAP_CONFIG`` / ``configs/itap.yaml`` in the working directory / the copy shipped
next to the package), ``ITAP_<SETTING>`` environment variables, command-line options.
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from itap_stream.core.rootcause import fault_classes_from_dict
from itap_stream.core.rules import Rule, RuleEngine, lifecycle_from_dict, rules_from_dict
from itap_stream.core.schema import SensorSchema
from itap_stream.errors import ConfigError

__all__ = [
    "BrokerAddress", "Settings", "default_config_path", "load", "load_yaml", "not_utf8_message", "parse_broker_url",
]

PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Settings:
    """Every service setting; see ``configs/itap.yaml`` for what each means."""

    broker_url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "itap"
    client_id: str = "itap-consumer-1"
    qos: int = 1
    db_url: str = "sqlite:///itap.db"
    model_path: str = "models/current.joblib"
    sensors_file: str = str(PACKAGE_CONFIGS / "sensors.yaml")
    rules_file: str = str(PACKAGE_CONFIGS / "alert_rules.yaml")
    window: int = 32
    hop: int = 4
    batch_max: int = 2048
    batch_wait_ms: float = 5.0
    queue_max: int = 100_000
    http_addr: str = "127.0.0.1:9108"
    log_level: str = "INFO"
    max_payload_bytes: int = 1_048_576
    threshold_quantile: float = 0.999
    alarm_k: int = 3
    alarm_n: int = 4
    intake: str = "process"
    detector: str = "auto"
    drifting_families: str = "Temperature"
    recall_target: float | None = None
    drift_delta: float = 0.002
    # the mean-shift chart: a deviation that stopped changing becomes a device's new baseline
    rebaseline_after: float = 300.0  # settled this long after coming back part-way from the alarm's peak
    rebaseline_hold: float = 3600.0  # settled this long without coming back
    rebaseline_max_shift: float = 3.0  # training std, a step that never came back; 0 = off
    rebaseline_max_settled: float = 20.0  # training std, a drifting signal settled after coming back half-way
    stale_after: float = 300.0
    signal_missing_readings: int = 16
    signal_stuck_readings: int = 32
    devices_file: str = ""
    silences_file: str = ""
    silence_max: float = 604_800.0  # the longest silence an operator may add (seconds; 7 days)
    webhook_url: str = ""
    webhook_format: str = "json"
    webhook_timeout: float = 5.0
    webhook_retries: int = 3
    # broker credentials and TLS: the password only from ITAP_BROKER_PASSWORD or a file
    broker_username: str = ""
    broker_password: str = ""
    broker_password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # delivery
    mqtt_version: int = 5
    session_expiry: float = 86400.0
    receive_max: int = 10_000
    outbox_max: int = 100_000
    reorder_tolerance: float = 0.0
    max_clock_skew: float = 300.0
    # guard rails: what one device, message or operator can cost
    min_ts: float = 946_684_800.0  # 2000-01-01T00:00:00Z: older timestamps are bad_ts
    max_readings_per_message: int = 10_000
    max_devices: int = 100_000
    gap_event_readings: int = 10  # a jump in a device's seq of this many readings is a data_gap event; 0 = none
    summary_interval: float = 60.0  # seconds between `itap run`'s one-line summaries in the log; 0 = none
    stall_timeout: float = 120.0  # seconds a thread may make no progress while work waits; then the process exits
    http_allowed_hosts: str = ""  # Host header values the HTTP server answers besides its own address and localhost
    http_threads: int = 8  # connections served at once; more wait in the listen queue
    # dashboard actions (ack, silence from the page): off unless a user and a password are set
    http_username: str = ""
    http_password: str = ""  # only from ITAP_HTTP_PASSWORD, never in a config file
    http_password_file: str = ""
    models_dir: str = ""  # reload takes a model_path only inside this folder (default: model_path's folder)
    model_key_file: str = ""  # HMAC key for model signatures (or ITAP_MODEL_KEY); artifacts must be signed with it
    broker_out_username: str = ""  # account of the publishing connection (default: broker_username + "-out")
    # where telemetry comes from: "mqtt" (the broker above) or "nats" (a NATS JetStream cluster, README "Scaling out")
    source: str = "mqtt"
    nats_url: str = "nats://127.0.0.1:4222"  # comma-separated: every server of the cluster the consumer may use
    nats_stream: str = "ITAP"  # the JetStream stream over {topic_prefix}.part.> (made by the first consumer)
    nats_replicas: int = 1  # copies of the stream and the lease bucket: 3 on a 3-node cluster
    partitions: int = 8  # P of the servers' subject mapping {{partition(P,1)}}: must be the same number
    takeover_after: float = 10.0  # seconds without a lease renewal before others take a consumer's partitions
    nats_username: str = ""
    nats_password: str = ""  # only from ITAP_NATS_PASSWORD or nats_password_file, never in a config file
    nats_password_file: str = ""
    # Sparkplug B (README "Sparkplug B"): "" = off, "+" = every group, else comma-separated group ids
    sparkplug_groups: str = ""
    sparkplug_host_id: str = ""  # host application id of its spBv1.0/STATE/{id} message (default: client_id)
    sparkplug_device_id: str = "{group}:{edge}:{device}"  # device id of a Sparkplug device
    sparkplug_node_id: str = "{group}:{edge}"  # device id of an edge node's own signals
    sparkplug_rebirth_interval: float = 10.0  # least seconds between two rebirth requests to one edge node

    def __post_init__(self) -> None:
        if self.qos not in (0, 1):
            # QoS 2 cannot be acknowledged after the commit (the client answers PUBREC at once),
            # so a crash could lose a reading: QoS 1 plus the idempotent store is exactly-once in effect
            msg = (
                "qos must be 1 (at least once, acknowledged after the store commit) "
                f"or 0 (best effort), got {self.qos}"
            )
            raise ConfigError(msg)
        if self.window < 2:
            msg = f"window must be at least 2 readings, got {self.window}"
            raise ConfigError(msg)
        if not 1 <= self.hop <= self.window:
            msg = f"hop must be between 1 and window ({self.window}), got {self.hop}"
            raise ConfigError(msg)
        if self.batch_max < 1 or self.batch_wait_ms < 0 or self.queue_max < 1:
            msg = "batch_max and queue_max must be positive and batch_wait_ms not negative"
            raise ConfigError(msg)
        if not self.topic_prefix or any(c in self.topic_prefix for c in "#+"):
            msg = f"topic_prefix {self.topic_prefix!r} must be non-empty and contain no MQTT wildcard"
            raise ConfigError(msg)
        if not 0.0 < self.threshold_quantile <= 1.0:
            msg = f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}"
            raise ConfigError(msg)
        if self.recall_target is not None and not 0.0 < self.recall_target <= 1.0:
            msg = f"recall_target must be in (0, 1] or empty, got {self.recall_target}"
            raise ConfigError(msg)
        if self.webhook_format not in ("json", "slack") or self.webhook_timeout <= 0 or self.webhook_retries < 1:
            msg = "webhook_format must be json or slack, webhook_timeout positive and webhook_retries >= 1"
            raise ConfigError(msg)
        if self.stale_after <= 0 or self.signal_missing_readings < 1 or self.signal_stuck_readings < 2:
            msg = "stale_after must be positive, signal_missing_readings >= 1 and signal_stuck_readings >= 2"
            raise ConfigError(msg)
        if not 0.0 <= self.drift_delta < 1.0:
            msg = f"drift_delta must be in [0, 1) (0 turns drift detection off), got {self.drift_delta}"
            raise ConfigError(msg)
        if not 0 < self.rebaseline_after <= self.rebaseline_hold or self.rebaseline_max_shift < 0 \
                or self.rebaseline_max_settled <= 0:
            msg = ("rebaseline_after must be positive and at most rebaseline_hold, rebaseline_max_shift not "
                   "negative (0 = off) and rebaseline_max_settled positive, got "
                   f"{self.rebaseline_after}, {self.rebaseline_hold}, {self.rebaseline_max_shift}, "
                   f"{self.rebaseline_max_settled}")
            raise ConfigError(msg)
        if not 1 <= self.alarm_k <= self.alarm_n:
            msg = f"alarm smoothing needs 1 <= alarm_k <= alarm_n, got {self.alarm_k} of {self.alarm_n}"
            raise ConfigError(msg)
        if self.mqtt_version not in (4, 5):
            msg = f"mqtt_version must be 5 (MQTT 5) or 4 (MQTT 3.1.1), got {self.mqtt_version}"
            raise ConfigError(msg)
        if self.session_expiry <= 0 or not 1 <= self.receive_max <= 65535 or self.outbox_max < 1:
            msg = "session_expiry must be positive, receive_max in 1..65535 and outbox_max at least 1"
            raise ConfigError(msg)
        if self.reorder_tolerance < 0 or self.max_clock_skew <= 0:
            msg = "reorder_tolerance must not be negative and max_clock_skew must be positive"
            raise ConfigError(msg)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                msg = f"setting {f.name} must be a finite number, got {value}"
                raise ConfigError(msg)
        if self.max_readings_per_message < 1 or self.max_devices < 1 or self.http_threads < 1:
            msg = "max_readings_per_message, max_devices and http_threads must be at least 1"
            raise ConfigError(msg)
        if self.stall_timeout <= 0:
            msg = f"stall_timeout must be positive seconds, got {self.stall_timeout}"
            raise ConfigError(msg)
        if self.source not in ("mqtt", "nats"):
            msg = f"source must be 'mqtt' (one broker) or 'nats' (a NATS JetStream cluster), got {self.source!r}"
            raise ConfigError(msg)
        if not 1 <= self.partitions <= 1024 or not 1 <= self.nats_replicas <= 5 or not 2 <= self.takeover_after <= 600:
            msg = ("partitions must be in 1..1024, nats_replicas in 1..5 and takeover_after in 2..600 seconds, got "
                   f"{self.partitions}, {self.nats_replicas}, {self.takeover_after}")
            raise ConfigError(msg)
        if not self.nats_stream or any(c in self.nats_stream for c in " .*>/\\"):
            msg = f"nats_stream {self.nats_stream!r} must be a name without spaces, dots, wildcards or slashes"
            raise ConfigError(msg)
        if self.intake not in ("process", "thread"):
            msg = f"intake must be 'process' (MQTT intake in a child process) or 'thread', got {self.intake!r}"
            raise ConfigError(msg)
        self._check_sparkplug()
        from itap_stream.core.detectors import canonical_name

        # unknown names fail here, listing the known ones
        object.__setattr__(self, "detector", canonical_name(self.detector))
        parse_broker_url(self.broker_url)

    def _check_sparkplug(self) -> None:
        groups = self.sparkplug_group_list()
        if groups and self.source != "mqtt":
            msg = "sparkplug_groups needs source: mqtt (Sparkplug B comes over an MQTT broker)"
            raise ConfigError(msg)
        bad = [g for g in groups if g != "+" and (not g or any(c in g for c in "/+# "))]
        if bad or ("+" in groups and len(groups) > 1):
            msg = (f"sparkplug_groups {self.sparkplug_groups!r}: comma-separated Sparkplug group ids (no '/', '+', "
                   "'#' or spaces), or '+' alone for every group")
            raise ConfigError(msg)
        host = self.sparkplug_host_id or self.client_id
        if any(c in host for c in "/+#"):
            msg = f"sparkplug_host_id {host!r} must not contain '/', '+' or '#'"
            raise ConfigError(msg)
        for key in ("sparkplug_device_id", "sparkplug_node_id"):
            try:
                made = getattr(self, key).format(group="g", edge="e", device="d")
            except (KeyError, IndexError, ValueError) as exc:
                msg = (f"{key} {getattr(self, key)!r} is not a template over {{group}}, {{edge}} and {{device}}: "
                       f"{exc}")
                raise ConfigError(msg) from exc
            if not made:
                msg = f"{key} must not be empty"
                raise ConfigError(msg)
        if self.sparkplug_rebirth_interval < 0:
            msg = f"sparkplug_rebirth_interval must not be negative, got {self.sparkplug_rebirth_interval}"
            raise ConfigError(msg)

    def sparkplug_group_list(self) -> list[str]:
        """The Sparkplug groups the consumer subscribes to ([] = Sparkplug off)."""
        return [g.strip() for g in self.sparkplug_groups.split(",")] if self.sparkplug_groups.strip() else []

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def http_credentials(self) -> tuple[str, str] | None:
        """``(user, password)`` for the dashboard's actions, or None (actions off): the user
        from ``http_username``, the password from ``http_password`` (env) or the first line of
        ``http_password_file``."""
        if not self.http_username:
            return None
        password = _secret(self.http_password, self.http_password_file, "http_password_file") or ""
        if len(password) < 8:
            msg = ("http_username is set but the dashboard password (ITAP_HTTP_PASSWORD or http_password_file) is "
                   "missing or shorter than 8 characters")
            raise ConfigError(msg)
        return self.http_username, password

    def broker_auth(self, *, out: bool = False) -> Any:
        """Credentials and TLS files for broker connections (`BrokerAuth`); the password
        from ``broker_password`` (env) or the first line of ``broker_password_file``.

        ``out``: the consumer's publishing connection, which logs in as
        ``broker_out_username`` (default ``<broker_username>-out``, same password): with
        the shipped broker's ``use_username_as_clientid`` each account is one client id,
        so the intake and the publisher need an account each."""
        from itap_stream.adapters.mqtt import BrokerAuth

        password = _secret(self.broker_password, self.broker_password_file, "broker_password_file")
        if (self.tls_cert or self.tls_key) and not (self.tls_ca or self.broker_url.startswith(("mqtts:", "ssl:"))):
            msg = "tls_cert / tls_key are set but TLS is off: use an mqtts:// broker URL or set tls_ca"
            raise ConfigError(msg)
        username = self.broker_username or None
        if out and username:
            username = self.broker_out_username or f"{username}-out"
        return BrokerAuth(
            username=username,
            password=password,
            tls_ca=self.tls_ca or None,
            tls_cert=self.tls_cert or None,
            tls_key=self.tls_key or None,
        )

    def nats_servers(self) -> list[str]:
        """``nats_url`` as a list of server URLs."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    def nats_credentials(self) -> tuple[str | None, str | None]:
        """``(user, password)`` for the NATS connection: the password from ``nats_password``
        (env) or the first line of ``nats_password_file``."""
        return self.nats_username or None, _secret(self.nats_password, self.nats_password_file, "nats_password_file")

    def drifting_family_list(self) -> list[str]:
        """``drifting_families`` as a list (the setting is a comma-separated string)."""
        return [f.strip() for f in self.drifting_families.split(",") if f.strip()]

    def baseline_policy(self) -> Any:
        """The mean-shift chart's `BaselinePolicy`, or None when ``rebaseline_max_shift`` is 0 (off)."""
        from itap_stream.core.detectors import BaselinePolicy

        if self.rebaseline_max_shift <= 0:
            return None
        return BaselinePolicy(self.rebaseline_after, self.rebaseline_hold, self.rebaseline_max_shift,
                              self.rebaseline_max_settled)

    def schema(self) -> SensorSchema:
        return SensorSchema.from_dict(load_yaml(self.sensors_file, what="sensor schema"))

    def rules(self) -> tuple[list[Rule], float]:
        return rules_from_dict(load_yaml(self.rules_file, what="alert rules"))

    def decommissioned(self) -> frozenset[str]:
        """Devices listed under ``decommissioned`` in ``devices_file`` (none without one)."""
        if not self.devices_file:
            return frozenset()
        data = load_yaml(self.devices_file, what="device registry") or {}
        ids = data.get("decommissioned", []) if isinstance(data, Mapping) else None
        if not isinstance(ids, list):
            msg = f"device registry {self.devices_file}: 'decommissioned' must be a list of device ids"
            raise ConfigError(msg)
        return frozenset(str(d) for d in ids)

    def silences(self, now: float) -> list[Any]:
        """The silences of ``silences_file`` (``silences: [...]``; none without one)."""
        from itap_stream.core.silence import silence_from_dict

        if not self.silences_file:
            return []
        data = load_yaml(self.silences_file, what="silences") or {}
        items = data.get("silences", []) if isinstance(data, Mapping) else None
        if not isinstance(items, list):
            msg = f"silences file {self.silences_file}: 'silences' must be a list"
            raise ConfigError(msg)
        return [silence_from_dict(item, now=now) for item in items]

    def rule_engine(self, rules_file: str | None = None) -> RuleEngine:
        """A fresh rule engine from the rules file: rules, resolve_after and fault classes."""
        data = load_yaml(rules_file or self.rules_file, what="alert rules")
        rules, resolve_after_s = rules_from_dict(data)
        classes = fault_classes_from_dict(data.get("fault_classes") if isinstance(data, Mapping) else None)
        return RuleEngine(rules, resolve_after_s=resolve_after_s, fault_classes=classes,
                          lifecycle=lifecycle_from_dict(data))

    def topic(self, kind: str, *parts: str) -> str:
        return "/".join((self.topic_prefix, kind, *parts))


def load_yaml(path: str | Path, *, what: str = "configuration") -> Any:
    """Parse a YAML file safely, turning every failure into one clear `ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"{what} file not found: {p}"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"cannot read {what} file {p}: {exc.strerror}"
        raise ConfigError(msg) from exc
    except UnicodeDecodeError:
        raise ConfigError(not_utf8_message(what, p)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        msg = f"{what} file {p} is not valid YAML{where}: {problem}"
        raise ConfigError(msg) from None


def not_utf8_message(what: str, path: str | Path) -> str:
    """One line saying that ``path`` is not UTF-8 text, with the first bad byte and where it is.

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as fh:
    ...     _ = fh.write(b"a: 1\\n# 20 \\xb0C\\n")  # a Latin-1 degree sign
    >>> not_utf8_message("alert rules", fh.name).split(" is ")[1]
    'not UTF-8 text (byte 0xb0 at offset 10, line 2); save it as UTF-8'
    >>> os.unlink(fh.name)
    """
    p = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    where, offset, line = "", 0, 1  # bytes and lines before the block being decoded
    try:
        with p.open("rb") as fh:
            for block in itertools.chain(iter(lambda: fh.read(1 << 20), b""), [b""]):
                pending = len(decoder.getstate()[0])  # the start of a character split between blocks
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as exc:
                    bad = exc.object[exc.start]
                    line += bytes(exc.object).count(b"\n", 0, exc.start)
                    where = f" (byte 0x{bad:02x} at offset {offset - pending + exc.start}, line {line})"
                    break
                offset += len(block)
                line += block.count(b"\n")
    except OSError:
        pass  # the caller's error stands without a position
    return f"{what} file {p} is not UTF-8 text{where}; save it as UTF-8"


def default_config_path(environ: Mapping[str, str]) -> Path:
    if environ.get("ITAP_CONFIG"):
        return Path(environ["ITAP_CONFIG"])
    local = Path("configs/itap.yaml")
    return local if local.exists() else PACKAGE_CONFIGS / "itap.yaml"


def _coerce(name: str, raw: Any, kind: type) -> Any:
    try:
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        msg = f"setting {name!r} must be {kind.__name__}, got {raw!r}"
        raise ConfigError(msg) from None


def _secret(value: str, path: str, setting: str) -> str | None:
    """A password: the first line of the file ``path`` when set, else ``value`` (None when empty)."""
    if not path:
        return value or None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        msg = f"cannot read {setting} {path}: {getattr(exc, 'strerror', None) or exc}"
        raise ConfigError(msg) from exc
    return lines[0].strip() if lines else ""


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (or the default location), then env, then ``overrides``."""
    env = os.environ if environ is None else environ
    cfg_path = Path(path) if path else default_config_path(env)
    data = load_yaml(cfg_path, what="configuration") or {}
    if not isinstance(data, Mapping):
        msg = f"configuration file {cfg_path} must be a mapping of settings"
        raise ConfigError(msg)
    types = {
        f.name: (int if f.type == "int" else float if f.type in ("float", "float | None") else str)
        for f in fields(Settings)
    }
    unknown = sorted(set(data) - set(types))
    if unknown:
        msg = f"configuration file {cfg_path}: unknown setting(s) {unknown}; known: {sorted(types)}"
        raise ConfigError(msg)
    # a config file is committed and shared: secrets belong in the environment or in files outside the repo
    if data.get("http_password"):
        msg = (f"configuration file {cfg_path} holds http_password; set ITAP_HTTP_PASSWORD or http_password_file "
               "(a file outside the repository) instead")
        raise ConfigError(msg)
    if data.get("nats_password"):
        msg = (f"configuration file {cfg_path} holds nats_password; set ITAP_NATS_PASSWORD or nats_password_file "
               "(a file outside the repository) instead")
        raise ConfigError(msg)
    if data.get("broker_password") or (
        isinstance(data.get("broker_url"), str) and urlsplit(data["broker_url"]).password
    ):
        msg = (
            f"configuration file {cfg_path} holds a broker password; set ITAP_BROKER_PASSWORD or "
            "broker_password_file (a file outside the repository) instead"
        )
        raise ConfigError(msg)
    values: dict[str, Any] = {}
    for name, raw in data.items():
        if raw is None:
            continue
        if isinstance(raw, list) and types[name] is str:  # a YAML list for a comma-separated setting
            raw = ",".join(str(x) for x in raw)
        values[name] = _coerce(name, raw, types[name])
        if name in ("sensors_file", "rules_file", "devices_file", "silences_file", "broker_password_file",
                    "http_password_file", "nats_password_file",
                    "model_key_file", "tls_ca", "tls_cert", "tls_key") and values[name]:
            values[name] = str((cfg_path.parent / values[name]).resolve())
    for name, kind in types.items():
        key = f"ITAP_{name.upper()}"
        if key in env and env[key] != "":
            values[name] = _coerce(key, env[key], kind)
    for name, raw in overrides.items():
        if raw is None:
            continue
        if name not in types:
            msg = f"unknown setting {name!r}"
            raise ConfigError(msg)
        values[name] = _coerce(name, raw, types[name])
    return Settings(**values)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """Split ``mqtt://user:pass@host:port`` (or ``mqtts://``).

    Examples
    --------
    >>> parse_broker_url("mqtt://127.0.0.1:18830")
    BrokerAddress(host='127.0.0.1', port=18830, tls=False, username=None, password=None)
    >>> parse_broker_url("mqtts://ops:s3cret@broker.plant").port
    8883
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        msg = f"broker URL {url!r} must look like mqtt://host:1883 or mqtts://user:pass@host:8883"
        raise ConfigError(msg)
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        msg = f"broker URL {url!r} has an invalid port"
        raise ConfigError(msg) from None
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
