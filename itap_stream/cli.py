"""The ``itap`` command line. User mistakes end in one clear line and exit code 2."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from itap_stream import __version__
from itap_stream.config import Settings, load
from itap_stream.core.readings import parse_ts
from itap_stream.core.rules import iso, parse_duration
from itap_stream.errors import ConfigError, ItapError

__all__ = ["main"]

log = logging.getLogger("itap")

EPILOGS = {
    "demo": "example:\n  itap demo                      # ~1 minute, broker included\n"
    "  itap demo --duration 20 --devices 4 --broker mqtt://127.0.0.1:1883",
    "run": "example:\n"
    "  ITAP_DB_URL=sqlite:///plant.db itap run --broker mqtt://127.0.0.1:1883 --model models/current.joblib",
    "simulate": "examples:\n  itap simulate --devices 5 --duration 10m --speed 60 --broker mqtt://127.0.0.1:1883\n"
    "  itap simulate --devices 20 --duration 2h --faults bearing_wear,overheat --out data/fleet.csv",
    "alerts": "examples:\n  itap alerts                                   # every alert, as it arrives\n"
    "  itap alerts --severity CRITICAL --device DEV-0007\n"
    "  itap alerts --json --count 10 --timeout 60 | jq .rule",
    "ack": "examples:\n  itap ack 3f2c9a1b0d4e5f60 --note 'crew on the way' --by alice\n"
    "  itap ack 3f2c9a1b0d4e5f60 --broker mqtt://plant-broker:1883\n"
    "  itap ack 3f2c9a1b0d4e5f60 --rebaseline --note 'new impeller, runs 2 degC warmer'",
    "silence": "examples:\n  itap silence add --device DEV-0007 --duration 2h --comment 'bearing change'\n"
    "  itap silence add --rule 'signal_*' --weekly sat,sun --at 22:00 --hours 8\n"
    "  itap silence list\n  itap silence remove 3f2c9a1b0d",
    "rules": "examples:\n  itap rules test --rules candidate_rules.yaml --db sqlite:///plant.db\n"
    "  itap rules test --rules candidate_rules.yaml --since 2026-03-01T00:00:00Z --json reports/dry-run.json",
    "evaluate": "examples:\n  itap evaluate --db sqlite:///itap-demo/itap.db\n"
    "  itap evaluate --db sqlite:///plant.db --since 2026-01-01T00:00:00Z --out reports/live-metrics.json",
    "ingest": "examples:\n  itap ingest data/fleet.csv --db sqlite:///plant.db\n"
    "  itap ingest data/history.csv --db postgresql://postgres@127.0.0.1/itap --rejected reports/bad_rows.csv",
    "validate": "examples:\n  itap validate data/fleet.csv\n"
    "  itap validate data/plant.csv --schema configs/plant-sensors.yaml --out reports/plant-quality.json",
    "score": "examples:\n  itap score --csv data/fleet.csv --model models/current.joblib --out-dir artifacts\n"
    "  itap simulate --devices 20 --duration 2h --faults overheat --out fleet.csv && itap score --csv fleet.csv",
    "passwd": "examples:\n"
    "  itap passwd mosquitto/passwd itap-operator itap-engineer itap-simulator DEV-0001 DEV-0002\n"
    "  printf '%s\\n%s\\n' \"$CONSUMER_PW\" \"$CONSUMER_PW\" | itap passwd --stdin mosquitto/passwd "
    "itap-consumer itap-consumer-out   # your own password, one for both of the consumer's accounts",
    "train": "examples:\n"
    "  itap train --db sqlite:///itap.db --since 2026-01-01T00:00:00Z --model models/current.joblib\n"
    "  itap train --csv data/normal.csv --model models/current.joblib\n"
    "  itap train --db sqlite:///plant.db --model models/2026-11.joblib --activate"
    "   # the running consumer switches to it",
}


#: The longest run, wait or timeout an option takes, in seconds (a year): beyond any real use,
#: and within what timers take (a larger one overflows them).
MAX_SECONDS = 366 * 86400.0


def _seconds(*, zero: bool = False, most: float = MAX_SECONDS) -> Callable[[str], float]:
    """An argparse type: a duration (``90``, ``30s``, ``10m``, ``2h``) in seconds, finite,
    positive (or zero when ``zero``) and at most ``most``: nan, inf and -1 are usage errors."""

    def duration(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except (ConfigError, OverflowError):
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero) or seconds > most:
            msg = (
                f"{text!r} is not a duration {'>= 0' if zero else '> 0'} and at most {most:,.0f} s "
                "(seconds, or like 30s, 10m, 2h)"
            )
            raise argparse.ArgumentTypeError(msg)
        return seconds

    return duration


def _number(*, zero: bool = False, most: float = math.inf, integer: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (>= 0 when ``zero``), at most ``most``; an int when ``integer``."""

    def number(text: str) -> float:
        try:
            value: float = int(text) if integer else float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or value > most:
            kind = "a whole number" if integer else "a finite number"
            limit = f" and at most {most:,.0f}" if integer else f" and at most {most:,g}" if math.isfinite(most) else ""
            msg = f"{text!r} is not {kind} {'>= 0' if zero else '> 0'}{limit}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return number


_count = _number(integer=True)
_seed = _number(zero=True, most=2**32 - 1, integer=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="settings YAML (env ITAP_CONFIG; default configs/itap.yaml)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (env ITAP_LOG_LEVEL)")


def _service_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="broker URL, e.g. mqtt://user:pass@127.0.0.1:1883 (env ITAP_BROKER_URL)")
    p.add_argument("--db", help="SQLAlchemy URL, e.g. sqlite:///itap.db (env ITAP_DB_URL)")
    p.add_argument("--model", help="model artifact path (env ITAP_MODEL_PATH)")
    p.add_argument("--client-id", help="MQTT client id (env ITAP_CLIENT_ID)")
    p.add_argument("--topic-prefix", help="topic prefix (env ITAP_TOPIC_PREFIX)")
    p.add_argument("--http", help="metrics address host:port, '' to disable (env ITAP_HTTP_ADDR)")
    p.add_argument("--source", choices=("mqtt", "nats"),
                   help="mqtt: one broker; nats: a NATS JetStream cluster, partitions shared among consumers "
                        "(env ITAP_SOURCE; README: Scaling out)")
    p.add_argument("--nats", help="NATS server URLs, comma-separated (env ITAP_NATS_URL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itap", description="ITAP Stream: industrial telemetry in over MQTT, explained alerts out."
    )
    parser.add_argument("--version", action="version", version=f"itap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "demo", help="broker + simulator + consumer on this machine", epilog=EPILOGS["demo"], formatter_class=fmt
    )
    _common(p)
    p.add_argument(
        "--duration", type=_seconds(), default="45s", help="wall-clock length of the simulated run (default 45s)"
    )
    p.add_argument("--devices", type=_count, default=10, help="simulated devices (default 10)")
    p.add_argument("--seed", type=_seed, default=7, help="simulation seed (default 7)")
    p.add_argument("--speed", type=_number(), default=60.0, help="event-time acceleration (default 60x)")
    p.add_argument("--broker", help="use this broker instead of starting one")
    p.add_argument("--embedded-broker", action="store_true", help="force the pure-Python broker")
    p.add_argument("--workdir", default="itap-demo", help="where the database, model and summary go")
    p.add_argument("--model", help="model artifact to use (trained there when missing)")
    p.add_argument("--keep-open", action="store_true",
                   help="keep serving the dashboard and /metrics after the summary, until Ctrl-C")
    _format_options(p)

    p = sub.add_parser("run", help="the long-running consumer service", epilog=EPILOGS["run"], formatter_class=fmt)
    _common(p)
    _service_opts(p)

    p = sub.add_parser(
        "simulate", help="simulated telemetry to MQTT or CSV", epilog=EPILOGS["simulate"], formatter_class=fmt
    )
    _common(p)
    p.add_argument("--devices", type=_count, default=10)
    p.add_argument("--duration", type=_seconds(), default="10m", help="simulated event time, e.g. 600, 10m, 2h")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument(
        "--speed", type=_number(zero=True), default=1.0, help="1 = real time, 60 = a minute per second, 0 = flat out"
    )
    p.add_argument(
        "--faults",
        default="",
        help="comma list of bearing_wear, overheat, power_instability, sensor_dropout; each may carry "
        "settings, e.g. overheat:onset=10m:duration=20m:rate=4 or sensor_dropout:signal=rpm:rate=0.3",
    )
    p.add_argument("--fault-onset", default="40%", help="default onset: seconds/duration or a percentage of the run")
    p.add_argument("--out", help="write a CSV here instead of publishing")
    p.add_argument("--start", help="event time of the first reading: RFC 3339, epoch seconds or `now`; default: "
                                   "2026-01-01T00:00:00Z with --out (reproducible files), else now (ending now when "
                                   "faster than real time, so no reading lies in the future)")
    _broker_options(p)
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    _format_options(p)

    p = sub.add_parser(
        "train", help="retrain the model from the store or a CSV", epilog=EPILOGS["train"], formatter_class=fmt
    )
    _common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", help="train from this store (default: configured db_url)")
    src.add_argument("--csv", help="train from a readings CSV")
    p.add_argument("--since", help="only readings at or after this time (RFC 3339 or epoch s)")
    p.add_argument("--until", help="only readings before this time")
    p.add_argument("--model", help="where to write the artifact (default: configured model_path)")
    p.add_argument("--schema", help="sensor schema YAML (default: configured sensors_file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--detector", help="auto (default: isolation_forest, or a mean-shift chart for a short recording), "
        "isolation_forest, pca (Hotelling T² + SPE chart), hst (river Half-Space Trees) or ensemble "
        "(env ITAP_DETECTOR, config detector)",
    )
    p.add_argument(
        "--quantile", type=float, help="threshold: this quantile of held-out normal scores (config threshold_quantile)"
    )
    p.add_argument(
        "--accept-training-anomalies", action="store_true",
        help="train even when the training data holds an outlying stretch (a fault or a change point inside it); "
        "by default that is refused, naming where and which signals",
    )
    p.add_argument(
        "--activate", action="store_true",
        help="then have the running consumer load it (itap/commands/reload; same --config / --broker as `itap run`)",
    )
    _broker_options(p)
    p.add_argument(
        "--recall-target", type=float,
        help=(
            "when the data has labelled faults: the threshold with the best precision at this recall "
            "(default: best F1)"
        ),
    )

    p = sub.add_parser(
        "alerts", help="print alerts live from the broker", epilog=EPILOGS["alerts"], formatter_class=fmt
    )
    _common(p)
    _broker_options(p)
    p.add_argument("--device", action="append", default=[], help="only this device (repeat for more)")
    p.add_argument(
        "--severity", action="append", default=[], help="only this severity: INFO, WARNING, CRITICAL (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="one JSON alert per line, for machines")
    p.add_argument("--count", type=_count, help="exit after this many alerts")
    p.add_argument(
        "--timeout", type=_seconds(zero=True), help="exit after this long, e.g. 60 or 10m (default: run until Ctrl-C)"
    )
    p.add_argument("--no-colour", action="store_true", help="no ANSI colours even on a terminal")

    p = sub.add_parser(
        "evaluate", help="detection quality of a stored live run (labels from the simulator)",
        epilog=EPILOGS["evaluate"], formatter_class=fmt,
    )
    _common(p)
    _window_range_options(p)
    p.add_argument("--out", help="write metrics.json here")

    p = sub.add_parser(
        "ack", help="acknowledge an open alert on the running consumer (no reminders until it resolves)",
        epilog=EPILOGS["ack"], formatter_class=fmt,
    )
    _common(p)
    p.add_argument("alert_id", help="the alert's id, or its first 8 characters (`itap alerts`, the dashboard)")
    p.add_argument("--note", default="", help="why / what is being done, stored and published with the acknowledgement")
    p.add_argument("--by", default=os.environ.get("USER", ""), help="who acknowledges (default: $USER)")
    p.add_argument("--rebaseline", action="store_true",
                   help="also accept the device's current state as its new normal (a baseline_shift event; the "
                        "mean-shift chart's alarm on it ends): for a change that is known and fine")
    _broker_options(p)
    p.add_argument("--timeout", type=_seconds(), default=10.0, help="seconds to wait for the consumer's answer")

    p = sub.add_parser(
        "silence", help="maintenance windows on the running consumer: alerts are stored, not published",
        epilog=EPILOGS["silence"], formatter_class=fmt,
    )
    ssub = p.add_subparsers(dest="silence_command", metavar="SUBCOMMAND", required=True)
    for sname, shelp in (("add", "add a silence"), ("remove", "remove a silence by id"), ("list", "list the silences")):
        sp = ssub.add_parser(sname, help=shelp, epilog=EPILOGS["silence"], formatter_class=fmt)
        _common(sp)
        _broker_options(sp)
        sp.add_argument("--timeout", type=_seconds(), default=10.0, help="seconds to wait for the consumer's answer")
        if sname == "remove":
            sp.add_argument("silence_id", help="the id `itap silence add` or `list` printed")
        if sname == "add":
            sp.add_argument("--device", help="device id or shell pattern (DEV-00*)")
            sp.add_argument("--rule", help="rule name or pattern (signal_*)")
            sp.add_argument("--family", help="only alerts whose dominant family is this")
            sp.add_argument("--severity", help="only this severity (INFO, WARNING, CRITICAL)")
            sp.add_argument("--duration", type=_seconds(), help="from now (or --start) for this long, e.g. 2h")
            sp.add_argument("--start", help="RFC 3339 or epoch seconds (default now)")
            sp.add_argument("--end", help="RFC 3339 or epoch seconds")
            sp.add_argument("--weekly", help="recurring on these days, e.g. sat,sun (with --at and --hours)")
            sp.add_argument("--at", default="00:00", help="weekly start, HH:MM UTC")
            sp.add_argument("--hours", type=_number(most=168), default=0.0, help="weekly length in hours (up to 168)")
            sp.add_argument("--comment", default="", help="why (stored with the silence)")
            sp.add_argument("--all", action="store_true",
                            help="silence every device and rule (needed when no --device/--rule/--family/--severity)")

    p = sub.add_parser("rules", help="alert rules tools: `itap rules test` (dry-run a candidate rules file)",
                       epilog=EPILOGS["rules"], formatter_class=fmt)
    rsub = p.add_subparsers(dest="rules_command", metavar="SUBCOMMAND", required=True)
    t = rsub.add_parser(
        "test", help="replay stored anomalies through the current and a candidate rules file; nothing is published",
        epilog=EPILOGS["rules"], formatter_class=fmt,
    )
    _common(t)
    t.add_argument("--rules", required=True, help="the candidate alert rules YAML")
    _window_range_options(t)
    t.add_argument("--json", dest="json_out", help="also write the counts as JSON here")

    p = sub.add_parser(
        "ingest", help="load a readings CSV into the store (idempotent; bad rows to a report)",
        epilog=EPILOGS["ingest"], formatter_class=fmt,
    )
    _common(p)
    p.add_argument("csv", help="readings CSV")
    p.add_argument("--db", help="store URL (default: configured db_url)")
    p.add_argument("--schema", help="sensor schema YAML (default: configured sensors_file)")
    p.add_argument("--rejected", help="CSV for rejected rows with their reason (default: FILE.rejected.csv)")
    p.add_argument("--quiet", action="store_true", help="no progress line")

    p = sub.add_parser(
        "validate", help="data-quality report of a readings CSV (exit 1 when unusable)",
        epilog=EPILOGS["validate"], formatter_class=fmt,
    )
    _common(p)
    p.add_argument("csv", help="readings CSV")
    p.add_argument("--schema", help="sensor schema YAML (default: configured sensors_file)")
    p.add_argument("--out", help="write the full report as JSON here")

    p = sub.add_parser(
        "score", help="score a readings CSV in batch (same features, model and rules as the stream)",
        epilog=EPILOGS["score"], formatter_class=fmt,
    )
    _common(p)
    p.add_argument("--csv", required=True, help="readings CSV (device_id, ts, state, one column per signal)")
    p.add_argument("--model", help="model artifact (default: configured model_path)")
    p.add_argument("--schema", help="sensor schema YAML (default: configured sensors_file)")
    p.add_argument("--out-dir", default="artifacts", help="where alerts.json and aggregate_summaries.json go")
    p.add_argument("--windows-out", help="also write every scored window (score, flag, family) to this CSV")
    p.add_argument(
        "--rows-out",
        help="also write one row per input reading, in input order: score and anomaly (0/1) as a live run "
        "would have decided at that reading; warmup=1 before a device's first full window",
    )

    p = sub.add_parser(
        "passwd", help="add or replace users in a mosquitto password file (random passwords, printed once)",
        epilog=EPILOGS["passwd"], formatter_class=fmt,
    )
    p.set_defaults(log_level=None)
    p.add_argument("file", help="mosquitto password file, created (mode 0600) when missing; other users are kept")
    p.add_argument("users", nargs="+", metavar="USER",
                   help="usernames: a device's id, itap-consumer, itap-operator, ...")
    p.add_argument("--stdin", action="store_true",
                   help="read one password per line from stdin, in USER order, instead of generating them")
    return parser


def _broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="broker URL (env ITAP_BROKER_URL)")
    p.add_argument("--topic-prefix", help="topic prefix (env ITAP_TOPIC_PREFIX)")


def _window_range_options(p: argparse.ArgumentParser) -> None:
    """``--db``, ``--since``, ``--until``: which stored windows a command reads."""
    p.add_argument("--db", help="store URL (default: configured db_url)")
    p.add_argument("--since", help="only windows ending at or after this time (RFC 3339 or epoch s)")
    p.add_argument("--until", help="only windows ending before this time")


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    over = {
        "broker_url": getattr(args, "broker", None),
        "db_url": getattr(args, "db", None),
        "model_path": getattr(args, "model", None),
        "client_id": getattr(args, "client_id", None),
        "topic_prefix": getattr(args, "topic_prefix", None),
        "http_addr": getattr(args, "http", None),
        "source": getattr(args, "source", None),
        "nats_url": getattr(args, "nats", None),
        "log_level": getattr(args, "log_level", None),
        "detector": getattr(args, "detector", None),
        "threshold_quantile": getattr(args, "quantile", None),
        "recall_target": getattr(args, "recall_target", None),
    }
    over.update(extra)
    return load(args.config, os.environ, **over)


def _schema_option(args: argparse.Namespace, settings: Settings) -> Any:
    """The sensor schema from ``--schema`` when given, else the configured one."""
    from itap_stream.config import load_yaml
    from itap_stream.core.schema import SensorSchema

    if getattr(args, "schema", None):
        return SensorSchema.from_dict(load_yaml(args.schema, what="sensor schema"))
    return settings.schema()


def _time_arg(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_ts(float(value) if value.replace(".", "", 1).isdigit() else value)
    except ValueError:
        msg = f"{name} {value!r} is not an RFC 3339 time or epoch seconds"
        raise ConfigError(msg) from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from itap_stream.app.demo import run_demo

    settings = _settings(args)
    run_demo(
        settings,
        duration_s=args.duration,
        devices=args.devices,
        seed=args.seed,
        speed=args.speed,
        broker_url=args.broker,
        broker_kind="embedded" if args.embedded_broker else "auto",
        workdir=args.workdir,
        keep_open=args.keep_open,
        fmt=args.format,
        group=_sparkplug_id(args.sparkplug_group, "--sparkplug-group"),
        edge=_sparkplug_id(args.sparkplug_edge, "--sparkplug-edge"),
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from itap_stream.app.service import run_service

    run_service(_settings(args))
    return 0


def _format_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("json", "sparkplug"), default="json",
                   help="json: one reading object per message on <prefix>/telemetry/<device>; sparkplug: a Sparkplug "
                        "B edge node (NBIRTH, DBIRTH, DDATA by alias on spBv1.0/<group>/...)")
    p.add_argument("--sparkplug-group", default="itap", help="Sparkplug group id (default itap)")
    p.add_argument("--sparkplug-edge", default="simulator", help="Sparkplug edge node id (default simulator)")


def _sparkplug_id(value: str, what: str) -> str:
    if not value or any(c in value for c in "/+# "):
        msg = f"{what} {value!r} must be non-empty without '/', '+', '#' or spaces"
        raise ConfigError(msg)
    return value


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulator import FAULT_KINDS, Fault, check_size, simulate
    from simulator.generator import device_name
    from simulator.transport import publish, write_csv

    settings = _settings(args)
    duration = args.duration
    try:  # a simulation is generated in memory, whole: one that does not fit is refused up front
        check_size(args.devices, duration)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    specs = [k.strip() for k in args.faults.split(",") if k.strip()]

    def when(text: str) -> float:
        """Seconds into the run from a duration or a percentage of the run."""
        try:
            seconds = duration * float(text[:-1]) / 100.0 if text.endswith("%") else parse_duration(text)
        except (ValueError, OverflowError, ConfigError):
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            msg = f"fault time {text!r} must be a duration (600, 10m, 2h) or a percentage of the run (40%)"
            raise ConfigError(msg)
        return seconds

    default_onset = when(args.fault_onset)
    faults = []
    for k, spec in enumerate(specs):
        kind, *opts = spec.split(":")
        if kind not in FAULT_KINDS:
            msg = f"unknown fault kind {kind!r}; choose from {', '.join(FAULT_KINDS)}"
            raise ConfigError(msg)
        dev = args.devices - k
        if dev < 1:
            msg = f"{len(specs)} faults need at least {len(specs)} devices (fault k goes to the k-th last device)"
            raise ConfigError(msg)
        kv = dict(o.split("=", 1) for o in opts if "=" in o)
        bad = set(kv) - {"onset", "duration", "rate", "signal", "device"} or {o for o in opts if "=" not in o}
        if bad:
            msg = f"fault {spec!r}: unknown setting(s) {sorted(bad)}; use onset=, duration=, rate=, signal=, device="
            raise ConfigError(msg)
        onset = when(kv["onset"]) if "onset" in kv else default_onset
        try:
            faults.append(
                Fault(
                    kind=kind,
                    device=kv.get("device", device_name(dev)),
                    onset_s=onset,
                    duration_s=when(kv["duration"]) if "duration" in kv else max(duration - onset, 1.0),
                    rate=float(kv["rate"]) if "rate" in kv else None,
                    signal=kv.get("signal", "temp_c"),
                )
            )
        except ValueError as exc:
            msg = f"fault {spec!r}: {exc}"
            raise ConfigError(msg) from None
    from simulator.generator import DEFAULT_START_TS

    if args.start is None:
        # a file is reproducible from its seed; live readings carry the time they are sent at
        start_ts = DEFAULT_START_TS if args.out else float(math.floor(time.time()))
        if not args.out and (args.speed == 0 or args.speed > 1):
            start_ts -= duration  # faster than real time: the run ends now instead of in the future
    elif args.start.strip().lower() == "now":
        start_ts = float(math.floor(time.time()))
    else:
        start_ts = _time_arg(args.start, "--start") or 0.0
    t0 = time.perf_counter()
    if args.out:
        print(f"[{0.0:6.1f}s] simulating {args.devices} devices for {duration:,.0f} s ...", file=sys.stderr, flush=True)
    try:
        sim = simulate(args.devices, duration, seed=args.seed, faults=faults, start_ts=start_ts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    desc = ", ".join(f"{f.kind}@{f.device}" for f in faults) or "no faults"
    if args.out:
        print(f"[{time.perf_counter() - t0:6.1f}s] writing {sim.n_readings:,} readings to {args.out} ...",
              file=sys.stderr, flush=True)
        n = write_csv(sim, args.out)
        print(f"wrote {n:,} readings of {args.devices} devices ({desc}) to {args.out}")
        return 0
    steps = len(sim.ts)

    tty = sys.stderr.isatty()  # in a log, one line per step instead of carriage returns
    print(f"publishing {args.devices} devices from {iso(start_ts)} ({duration:,.0f} s of event time) to "
          f"{settings.broker_url}", file=sys.stderr, flush=True)

    def progress(step: int, total: int) -> None:
        if step == total or step % max(1, total // 20) == 0:
            print(f"\rpublished {step}/{steps} steps" if tty else f"published {step}/{steps} steps",
                  end="" if tty else "\n", file=sys.stderr, flush=True)

    n = publish(sim, settings.broker_url, topic_prefix=settings.topic_prefix, speed=args.speed, qos=args.qos,
                progress=progress, auth=settings.broker_auth(), fmt=args.format,
                group=_sparkplug_id(args.sparkplug_group, "--sparkplug-group"),
                edge=_sparkplug_id(args.sparkplug_edge, "--sparkplug-edge"), schema=settings.schema())
    print(("\n" if tty else "")
          + f"published {n:,} readings of {args.devices} devices ({desc}) to {settings.broker_url}"
          + (f" as Sparkplug B edge node {args.sparkplug_group}/{args.sparkplug_edge}" if args.format == "sparkplug"
             else ""))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from itap_stream.app.service import train
    from itap_stream.config import load_yaml
    from itap_stream.core.schema import SensorSchema

    settings = _settings(args)
    schema = SensorSchema.from_dict(load_yaml(args.schema, what="sensor schema")) if args.schema else None
    print(f"training from {'CSV ' + args.csv if args.csv else 'store ' + (args.db or settings.db_url)} ...", flush=True)
    t0 = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    report, manifest = train(
        settings,
        csv=args.csv,
        db=args.db,
        since=_time_arg(args.since, "--since"),
        until=_time_arg(args.until, "--until"),
        schema=schema,
        seed=args.seed,
        step=step,
        accept_training_anomalies=args.accept_training_anomalies,
    )
    print(
        f"trained on {report.devices} device(s), {report.rows:,} rows, {report.windows:,} normal windows "
        f"({report.train_windows:,} fit, {report.calibration_windows:,} calibration), {report.start} .. {report.end}\n"
        f"detector {manifest['detector']}"
        + (
            f" on {report.features_used} of {report.features} features (short training: "
            + ("the level of each signal, one operating state)" if manifest["detector"] == "meanshift"
               else "level, spread and dropouts of each signal)")
            if report.features_used < report.features else ""
        )
        + (f"; against their recent level (drifting family): {', '.join(report.drifting_signals)}"
           if report.drifting_signals else "")
        + (f"; left out of the chart (never changed while training): {', '.join(report.constant_signals)}"
           if report.constant_signals else "")
        + f"; threshold {report.threshold:.4f} ({report.threshold_by}); "
        f"model written to {settings.model_path} (sha256 {manifest['sha256'][:12]}…)"
    )
    if report.sweep:
        print("  sweep over the labelled windows (threshold: precision / recall / F1, smoothed):")
        every = max(1, len(report.sweep) // 10)
        shown = [r for i, r in enumerate(report.sweep) if i % every == 0 or r["threshold"] == report.threshold]
        for r in shown:
            mark = "  <- chosen" if r["threshold"] == report.threshold else ""
            print(f"    {r['threshold']:.4f}: {r['precision']:.3f} / {r['recall']:.3f} / {r['f1']:.3f}{mark}")
    if args.activate:
        from pathlib import Path

        from itap_stream.app.commands import send_command

        answer = send_command(settings, "reload",
                              {"parts": ["model"], "model_path": str(Path(settings.model_path).resolve())})
        if not answer.get("ok"):
            print(f"itap train: model written but not activated: {answer.get('reason', 'refused')}", file=sys.stderr)
            return 1
        print(f"activated on the running consumer ({settings.broker_url})")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from itap_stream.adapters import artifacts
    from itap_stream.adapters.csvio import read_readings
    from itap_stream.app.offline import score_frame, write_score_outputs
    from itap_stream.config import load_yaml
    from itap_stream.core.schema import SensorSchema

    settings = _settings(args)
    rules, resolve_after_s = settings.rules()
    t0 = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    artifact = artifacts.load(settings.model_path)
    # the model knows the sensor set it was trained on; --schema overrides (and is checked)
    schema = SensorSchema.from_dict(
        load_yaml(args.schema, what="sensor schema") if args.schema else artifact.schema
    )
    step(f"reading {args.csv} ...")
    df = read_readings(args.csv, schema)
    step(f"read {len(df):,} readings; windowing, featuring and scoring ...")
    longest = int(df.groupby("device_id").size().max())
    if longest < settings.window:
        from itap_stream.errors import DataError

        msg = (f"CSV {args.csv}: no device has the {settings.window} readings one window needs (window: "
               f"{settings.window}); the longest has {longest}")
        raise DataError(msg)
    result = score_frame(
        df, schema, artifact, settings.rule_engine(),
        window=settings.window, hop=settings.hop, alarm_k=settings.alarm_k, alarm_n=settings.alarm_n,
        drift_delta=settings.drift_delta, baseline=settings.baseline_policy(),
    )
    step(f"scored {len(result.windows):,} windows; writing results to {args.out_dir} ...")
    rep = write_score_outputs(df, result, args.out_dir, windows_out=args.windows_out, threshold=artifact.threshold)
    if args.rows_out:
        from itap_stream.app.offline import row_decisions

        Path(args.rows_out).parent.mkdir(parents=True, exist_ok=True)
        row_decisions(df, result).to_csv(args.rows_out, index=False)
        rep.files["rows"] = args.rows_out
    dt = time.perf_counter() - t0
    print(
        f"scored {rep.rows:,} readings of {rep.devices} device(s) in {dt:.1f}s "
        f"({rep.rows / max(dt, 1e-9):,.0f} rows/s): "
        f"{rep.windows:,} windows, {rep.anomalies:,} anomalous, {rep.alerts} alert(s) fired"
        + (f", {rep.drift_events} model_drift event(s): retraining suggested" if rep.drift_events else "")
        + (
            f"; {rep.duplicates:,} duplicate and {rep.out_of_order:,} out-of-order readings skipped"
            if rep.duplicates or rep.out_of_order
            else ""
        )
        + "\n" + "\n".join(f"  {k}: {v}" for k, v in rep.files.items())
    )
    if "metrics" in rep.files:
        import json

        m = json.loads(Path(rep.files["metrics"]).read_text(encoding="utf-8"))
        print(
            f"quality at the model threshold {m['threshold']:.4f} (smoothed): precision {m['precision']:.3f} "
            f"recall {m['recall']:.3f} F1 {m['f1']:.3f} "
            f"ROC AUC {m['roc_auc'] if m['roc_auc'] is None else round(m['roc_auc'], 3)}; "
            f"median detection delay {m['detection_delay_windows_median']} windows; "
            f"false alerts per healthy device-day {m['false_alerts_per_healthy_device_day']}"
        )
        print("  recall by fault: " + (", ".join(f"{k} {v:.2f}" for k, v in m["recall_by_fault"].items()) or "-"))
        print("  raw-score sweep (threshold: precision / recall / F1):")
        for r in m["sweep"][:: max(1, len(m["sweep"]) // 8)]:
            print(f"    {r['threshold']:.4f}: {r['precision']:.3f} / {r['recall']:.3f} / {r['f1']:.3f}")
    return 0


def _cmd_alerts(args: argparse.Namespace) -> int:
    from itap_stream.app.watch import watch_alerts

    settings = _settings(args)
    bad = {s.upper() for s in args.severity} - {"INFO", "WARNING", "CRITICAL"}
    if bad:
        msg = f"unknown severity {sorted(bad)}; use INFO, WARNING or CRITICAL"
        raise ConfigError(msg)
    if args.count is not None and args.count < 1:
        msg = "--count must be at least 1"
        raise ConfigError(msg)
    what = ", ".join(args.device) or "all devices"

    def ready() -> None:  # once subscribed: an unreachable broker is the only line otherwise
        if not args.json:
            print(
                f"listening for alerts of {what} on {settings.broker_url} (Ctrl-C to stop)", file=sys.stderr, flush=True
            )

    watch_alerts(
        settings,
        sys.stdout,
        devices=args.device,
        severities=args.severity,
        as_json=args.json,
        colour=sys.stdout.isatty() and not args.no_colour and not os.environ.get("NO_COLOR"),
        count=args.count,
        timeout_s=args.timeout,
        on_ready=ready,
    )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from itap_stream.app.validate import format_report, validate_csv

    settings = _settings(args)
    schema = _schema_option(args, settings)
    report = validate_csv(args.csv, schema, window=settings.window)
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"report written to {args.out}")
    return 0 if report["usable"] else 1


def _cmd_ingest(args: argparse.Namespace) -> int:
    from itap_stream.adapters.store import Store
    from itap_stream.app.ingest import ingest_csv, print_progress

    settings = _settings(args)
    schema = _schema_option(args, settings)
    store = Store(settings.db_url, schema)
    try:
        rep = ingest_csv(args.csv, store, report_path=args.rejected, progress=None if args.quiet else print_progress)
    finally:
        store.dispose()
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(rep.reasons.items()))
    print(
        f"read {rep.rows:,} rows: inserted {rep.inserted:,}, already stored {rep.already_stored:,}, "
        f"rejected {rep.rejected:,}" + (f" ({reasons}; rows and reasons in {rep.report_path})" if rep.rejected else "")
        + f"\nstore: {settings.db_url}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from itap_stream.adapters.store import Store
    from itap_stream.core.quality import quality_report
    from itap_stream.errors import DataError

    settings = _settings(args)
    store = Store(settings.db_url, settings.schema(), must_exist=True)
    since, until = _time_arg(args.since, "--since"), _time_arg(args.until, "--until")
    try:
        w = store.read_frame("windows", since=since, until=until)
        alerts = store.read_frame("alerts", since=since, until=until)
    finally:
        store.dispose()
    if w.empty:
        msg = (
            f"the store {settings.db_url} holds no scored windows in that time range; "
            "run `itap run` (or `itap demo`) first"
        )
        raise DataError(msg)
    labels = [x if isinstance(x, str) else None for x in w["label"].tolist()]
    if not any(labels):
        msg = (
            "the stored windows carry no labels (only simulator or replayed data has them): "
            "nothing to evaluate against"
        )
        raise DataError(msg)
    report = quality_report(
        w["device_id"].tolist(), w["window_end"], labels, w["score"], w["is_anomaly"].astype(bool),
        float("nan"), [json.loads(p) for p in alerts["payload"]] if len(alerts) else [],
    )
    report.pop("threshold")
    print(
        f"{report['windows']:,} stored windows of {w['device_id'].nunique()} device(s): "
        f"precision {report['precision']:.3f} "
        f"recall {report['recall']:.3f} F1 {report['f1']:.3f} "
        f"ROC AUC {report['roc_auc'] if report['roc_auc'] is None else round(report['roc_auc'], 3)}\n"
        f"  recall by fault: " + (", ".join(f"{k} {v:.2f}" for k, v in report["recall_by_fault"].items()) or "-") + "\n"
        f"  median detection delay {report['detection_delay_windows_median']} windows "
        f"({report['detection_delay_s_median']} s); "
        f"faults detected {report['faults_detected']}, missed {report['faults_missed']}\n"
        f"  false alerts on healthy devices {report['false_alerts_on_healthy_devices']} "
        f"({report['false_alerts_per_healthy_device_day']} per device-day)\n"
        f"  model_drift events: {report['model_drift_events']}"
        + "".join(f"\n    {d['at']} {d['device_id']}: {d['detail']}" for d in report["model_drift"][:10])
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"metrics written to {args.out}")
    return 0


def _cmd_ack(args: argparse.Namespace) -> int:
    from itap_stream.app.commands import send_command

    settings = _settings(args)
    body = {"alert_id": args.alert_id, "note": args.note, "by": args.by}
    if args.rebaseline:
        body["rebaseline"] = True
    answer = send_command(settings, "ack", body, timeout_s=args.timeout)
    if not answer.get("ok"):
        print(f"itap ack: {answer.get('reason', 'refused')}", file=sys.stderr)
        return 1
    print(f"alert {args.alert_id} acknowledged" + (f": {args.note}" if args.note else ""))
    if answer.get("baseline_shift"):
        print(f"the device's current state is its new normal (baseline_shift event {answer['baseline_shift']})")
    return 0


def _cmd_silence(args: argparse.Namespace) -> int:
    from itap_stream.app.commands import send_command

    settings = _settings(args)
    if args.silence_command == "add":
        body: dict[str, Any] = {"action": "add"}
        for key in ("device", "rule", "family", "severity", "duration", "start", "end", "comment"):
            if getattr(args, key):
                body[key] = getattr(args, key)
        if args.weekly:
            body.update(weekly=[d.strip() for d in args.weekly.split(",") if d.strip()], at=args.at, hours=args.hours)
        if args.all:
            body["all"] = True
    elif args.silence_command == "remove":
        body = {"action": "remove", "id": args.silence_id}
    else:
        body = {"action": "list"}
    answer = send_command(settings, "silence", body, timeout_s=args.timeout)
    if not answer.get("ok"):
        print(f"itap silence {args.silence_command}: {answer.get('reason', 'refused')}", file=sys.stderr)
        return 1
    from itap_stream.core.silence import describe

    if args.silence_command == "add":
        s = answer["silence"]
        print(f"silence {s['id']} added: {describe(s)}")
    elif args.silence_command == "remove":
        print(f"silence {args.silence_id} removed")
    else:
        items = answer.get("silences", [])
        print("\n".join(f"{s['id']}  {describe(s)}" for s in items) or "no silences")
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from itap_stream.adapters.store import Store
    from itap_stream.app.rulestest import dry_run, format_dry_run, stored_windows
    from itap_stream.errors import DataError

    settings = _settings(args)
    candidate = settings.rule_engine(args.rules)  # a bad file fails here, before the store is read
    current = settings.rule_engine()
    store = Store(settings.db_url, settings.schema(), must_exist=True)
    since, until = _time_arg(args.since, "--since"), _time_arg(args.until, "--until")
    try:
        w = store.read_frame("windows", since=since, until=until)
        an = store.read_frame("anomalies", since=since, until=until)
    finally:
        store.dispose()
    if w.empty:
        msg = (
            f"the store {settings.db_url} holds no scored windows in that time range; "
            "run `itap run` (or `itap demo`) first"
        )
        raise DataError(msg)
    windows, labels = stored_windows(w, an)
    res = dry_run(windows, labels, current, candidate)
    print(f"current: {settings.rules_file}\ncandidate: {args.rules}\n" + format_dry_run(res))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(res.to_dict(), indent=1) + "\n", encoding="utf-8")
    return 0


def _cmd_passwd(args: argparse.Namespace) -> int:
    from itap_stream.app.passwd import new_password, update_password_file

    twice = sorted({u for u in args.users if args.users.count(u) > 1})
    if twice:
        msg = f"user(s) named more than once: {', '.join(twice)}"
        raise ConfigError(msg)
    if args.stdin:
        lines = sys.stdin.read().splitlines()
        if len(lines) != len(args.users):
            msg = f"--stdin: {len(args.users)} user(s) need {len(args.users)} password line(s), got {len(lines)}"
            raise ConfigError(msg)
        passwords = dict(zip(args.users, lines, strict=True))
    else:
        passwords = {user: new_password() for user in args.users}
    update_password_file(args.file, passwords)
    if not args.stdin:  # shown once: the file only keeps their hashes
        print("\n".join(f"{user} {password}" for user, password in passwords.items()))
    print(f"{args.file}: set the password of {', '.join(args.users)}", file=sys.stderr)
    return 0


COMMANDS = {
    "passwd": _cmd_passwd,
    "silence": _cmd_silence,
    "ack": _cmd_ack,
    "rules": _cmd_rules,
    "evaluate": _cmd_evaluate,
    "ingest": _cmd_ingest,
    "validate": _cmd_validate,
    "alerts": _cmd_alerts,
    "demo": _cmd_demo,
    "run": _cmd_run,
    "simulate": _cmd_simulate,
    "train": _cmd_train,
    "score": _cmd_score,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or os.environ.get("ITAP_LOG_LEVEL") or ("WARNING" if args.command == "demo" else "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ItapError as exc:
        print(f"itap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"itap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
