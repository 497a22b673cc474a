"""Files and numbers: a file that is not UTF-8 is one clear error (exit 2 at start-up, the old
version kept on hot reload); durations, speeds, timeouts and counts are finite and sensible;
a silence from anywhere is either valid or a `ConfigError`, never a crash."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from itap_stream.adapters.csvio import read_readings
from itap_stream.app.validate import validate_csv
from itap_stream.cli import main
from itap_stream.config import PACKAGE_CONFIGS, load, load_yaml
from itap_stream.core.rules import Alert
from itap_stream.core.silence import Silence, SilenceBook, silence_from_dict
from itap_stream.errors import ConfigError, DataError
from simulator import MAX_READINGS, Fault, check_size, simulate

ROOT = Path(__file__).resolve().parent.parent
LATIN1_COMMENT = b"\n# limit 80 \xb0C (saved as Latin-1)\n"


def _latin1_copy(src: Path, dst: Path) -> Path:
    """``src`` with a Latin-1 degree sign in a trailing comment: valid YAML, not UTF-8."""
    dst.write_bytes(src.read_bytes() + LATIN1_COMMENT)
    return dst


def _one_error_line(err: str) -> str:
    """The one error line of ``err``, the progress lines (``[  0.0s] reading ...``) aside."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- files that are not UTF-8 ----------------------------------------------------------------


def test_load_yaml_names_the_file_the_byte_and_where_it_is(tmp_path):
    bad = tmp_path / "alert_rules.yaml"
    bad.write_bytes(b"rules: []\n# 20 \xb0C\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(bad, what="alert rules")
    assert str(err.value) == (
        f"alert rules file {bad} is not UTF-8 text (byte 0xb0 at offset 15, line 2); save it as UTF-8"
    )


@pytest.mark.parametrize(
    ("setting", "source", "read"),
    [
        ("rules_file", "alert_rules.yaml", lambda s: s.rule_engine()),
        ("rules_file", "alert_rules.yaml", lambda s: s.rules()),
        ("sensors_file", "sensors.yaml", lambda s: s.schema()),
        ("devices_file", None, lambda s: s.decommissioned()),
        ("silences_file", None, lambda s: s.silences(now=0.0)),
    ],
)
def test_every_settings_file_that_is_not_utf8_is_a_config_error(tmp_path, setting, source, read):
    path = tmp_path / f"{setting}.yaml"
    if source:
        _latin1_copy(PACKAGE_CONFIGS / source, path)
    else:
        path.write_bytes(b"# caf\xe9\n")
    settings = load(PACKAGE_CONFIGS / "itap.yaml", environ={}).replace(**{setting: str(path)})
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0x(b0|e9) at offset \d+, line \d+\)"):
        read(settings)


def test_run_with_a_latin1_config_exits_2_with_one_line(tmp_path):
    config = _latin1_copy(PACKAGE_CONFIGS / "itap.yaml", tmp_path / "latin1.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITAP_")}
    for argv, extra_env in ((["--config", str(config)], {}), ([], {"ITAP_CONFIG": str(config)})):
        proc = subprocess.run(
            [sys.executable, "-m", "itap_stream.cli", "run", *argv],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env={**env, **extra_env},
        )
        assert proc.returncode == 2, proc.stderr
        line = _one_error_line(proc.stderr)
        assert line.startswith("itap run: error: configuration file") and "is not UTF-8 text" in line
        assert "save it as UTF-8" in line


def test_a_latin1_candidate_rules_file_is_one_line_and_exit_2(tmp_path, capsys):
    rules = _latin1_copy(PACKAGE_CONFIGS / "alert_rules.yaml", tmp_path / "candidate.yaml")
    assert main(["rules", "test", "--rules", str(rules), "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "alert rules file" in _one_error_line(capsys.readouterr().err)


def _latin1_csv(tmp_path: Path) -> Path:
    frame = simulate(2, 60, seed=3, maint=False).to_frame()
    frame["tag"] = "ok"
    path = tmp_path / "fleet.csv"
    frame.to_csv(path, index=False)
    data = path.read_bytes()
    path.write_bytes(data.replace(b",ok", b",caf\xe9", 1))
    return path


def test_a_csv_that_is_not_utf8_is_one_data_error_naming_the_file(tmp_path, schema):
    path = _latin1_csv(tmp_path)
    for read in (read_readings, validate_csv):
        with pytest.raises(DataError, match=r"CSV file .*fleet\.csv is not UTF-8 text \(byte 0xe9 at offset \d+, "):
            read(path, schema)


@pytest.mark.parametrize("command", ["validate", "ingest", "score"])
def test_cli_csv_commands_exit_2_on_a_latin1_csv(tmp_path, capsys, command, model_file):
    path = _latin1_csv(tmp_path)
    argv = {
        "validate": ["validate", str(path)],
        "ingest": ["ingest", str(path), "--db", f"sqlite:///{tmp_path / 'i.db'}", "--quiet"],
        "score": ["score", "--csv", str(path), "--model", str(model_file), "--out-dir", str(tmp_path / "out")],
    }[command]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "is not UTF-8 text (byte 0xe9" in line and "save it as UTF-8" in line


# --- hot reload keeps the old version ---------------------------------------------------------


@pytest.mark.network
def test_a_latin1_rules_file_is_rejected_on_reload_and_the_consumer_keeps_going(
    settings, start_consumer, tmp_path, wait
):
    from itap_stream.adapters.metrics import Metrics
    from itap_stream.app.commands import send_command
    from simulator.transport import publish

    rules = tmp_path / "alert_rules.yaml"
    shutil.copy(PACKAGE_CONFIGS / "alert_rules.yaml", rules)
    settings = settings.replace(rules_file=str(rules))
    metrics = Metrics()
    consumer = start_consumer(settings, metrics=metrics)
    engine = consumer.processor.engine

    _latin1_copy(PACKAGE_CONFIGS / "alert_rules.yaml", rules)
    result = consumer.reload(("rules",))
    assert result["rules"].startswith("rejected: alert rules file") and "not UTF-8" in result["rules"]
    assert consumer.processor.engine is engine  # the old rules stay active
    # the file watcher's own reload, in the consumer's thread, is rejected the same way
    rules.write_bytes(rules.read_bytes() + b"# \xff\n")
    assert wait(lambda: metrics.sample("itap_reloads_total", part="rules", result="rejected") >= 2, 15)

    # silence commands that used to kill the consumer are refused with the reason
    for body in ({"action": "add", "hours": [1]}, {"action": "add", "weekly": 5}, {"action": "add", "start": 10**400}):
        answer = send_command(settings, "silence", body, timeout_s=10)
        assert answer["ok"] is False and answer["reason"].startswith("silence:"), answer

    sent = publish(simulate(1, 40, seed=9, maint=False), settings.broker_url, speed=0, qos=1, client_id="t-sim-utf8")
    assert wait(lambda: consumer.store.count("readings") >= sent, 20)
    assert consumer.fatal is None and consumer.processor.engine is engine


# --- numbers on the command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["demo", "--duration", "inf"], "--duration"),
        (["demo", "--duration", "nan"], "--duration"),
        (["demo", "--duration", "-10"], "--duration"),
        (["demo", "--speed", "0"], "--speed"),
        (["demo", "--speed", "inf"], "--speed"),
        (["demo", "--devices", "0"], "--devices"),
        (["demo", "--seed", "-1"], "--seed"),
        (["simulate", "--duration", "nan", "--out", "x.csv"], "--duration"),
        (["simulate", "--duration", "1e999", "--out", "x.csv"], "--duration"),
        (["simulate", "--duration", "0", "--out", "x.csv"], "--duration"),
        (["simulate", "--speed", "-1"], "--speed"),
        (["simulate", "--speed", "nan"], "--speed"),
        (["simulate", "--devices", "-3", "--out", "x.csv"], "--devices"),
        (["alerts", "--timeout", "nan"], "--timeout"),
        (["alerts", "--timeout", "-1"], "--timeout"),
        (["alerts", "--timeout", "inf"], "--timeout"),
        (["alerts", "--count", "0"], "--count"),
        (["ack", "abc", "--timeout", "nan"], "--timeout"),
        (["ack", "abc", "--timeout", "0"], "--timeout"),
        (["silence", "list", "--timeout", "-1"], "--timeout"),
        (["silence", "add", "--duration", "inf"], "--duration"),
        (["silence", "add", "--weekly", "sat", "--hours", "nan"], "--hours"),
        (["silence", "add", "--weekly", "sat", "--hours", "1000"], "--hours"),
    ],
)
def test_non_finite_negative_or_zero_numbers_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: " in err and "Traceback" not in err


def test_fault_settings_must_be_finite(tmp_path, capsys):
    for fault in ("overheat:rate=nan", "overheat:onset=inf", "overheat:duration=-5", "overheat:onset=abc%"):
        out = tmp_path / "f.csv"
        assert main(["simulate", "--devices", "2", "--duration", "60", "--faults", fault, "--out", str(out)]) == 2
        assert fault.split(":")[1].split("=")[1] in _one_error_line(capsys.readouterr().err)
        assert not out.exists()
    with pytest.raises(ValueError, match="finite"):
        Fault("overheat", "DEV-0001", math.nan, 60.0)


def test_a_simulation_that_would_not_fit_in_memory_is_refused_up_front(tmp_path, capsys):
    assert check_size(10, 600) == 6000
    with pytest.raises(ValueError, match=f"more than the {MAX_READINGS:,}"):
        simulate(1_000_000, 1e12)
    out = tmp_path / "huge.csv"
    assert main(["simulate", "--devices", "1000000", "--duration", "1e7", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"more than the {MAX_READINGS:,} a simulation may hold in memory" in line
    assert not out.exists()


def test_the_demo_refuses_impossible_runs_before_starting_anything(tmp_path):
    from itap_stream.app.demo import run_demo

    settings = load(PACKAGE_CONFIGS / "itap.yaml", environ={})
    for kwargs in ({"duration_s": math.inf}, {"duration_s": math.nan}, {"speed": -1.0}, {"duration_s": 1e9}):
        with pytest.raises(ConfigError):
            run_demo(settings, broker_url="mqtt://127.0.0.1:1", workdir=str(tmp_path / "demo"), **kwargs)
    assert not (tmp_path / "demo").exists()


# --- silences: valid or a ConfigError, whatever comes in ---------------------------------------

NAIVE_2026 = datetime.fromisoformat("2026-01-01T00:00:00")  # YAML gives naive datetimes: read as UTC
NAIVE_YEAR_1 = datetime.fromisoformat("0001-01-01T00:00:00")
_KEYS = ("id", "device", "rule", "family", "severity", "start", "end", "duration", "weekly", "at", "hours", "comment")
_HOSTILE = [
    None, True, False, 0, -1, 1, 5, 10**400, -(10**400), 10**5000, 1e308, -1e308, 1e-308, math.nan, math.inf, -math.inf,
    "", " ", "nan", "inf", "-inf", "1e999", "9" * 400, "2h", "-2h", "0", "1e308d", "sat", "sat,sun", "Saturday",
    "25:00", "22:00", "7:5", "99:99", "1:2:3", "\u0663:\u0660\u0660", "22:00\n", "2026-11-26T10:00:00Z",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-23:59", "1767225600", "x" * 5000, "DEV-*", "WARNING",
    [1], [], ["sat"], ["sat", 5], ["sat"] * 9, [[1]], {"a": 1}, {}, (1,), b"bytes", 3.5, 168, 169, 1e9,
    datetime(2026, 1, 1, tzinfo=UTC), NAIVE_2026, date(2026, 1, 1), NAIVE_YEAR_1, object(),
]
_HOSTILE_SILENCES = [
    None, [], "add", 5, {5: 1}, {None: "x"}, {("a",): 1}, {"colour": "red"},
    {"hours": [1]}, {"weekly": 5}, {"start": 10**400}, {"start": "9" * 400}, {"end": math.nan}, {"end": math.inf},
    {"duration": 10**400}, {"duration": "1e999"}, {"duration": "nan"}, {"duration": [1]}, {"duration": "2h"},
    {"duration": "2h", "start": 1e308}, {"id": 5}, {"id": ["a"]}, {"id": {"a": 1}}, {"device": 7}, {"rule": ["x"]},
    {"weekly": ["sat"], "hours": math.inf}, {"weekly": ["sat"], "hours": math.nan}, {"weekly": ["sat"], "hours": -1},
    {"weekly": ["sat"], "hours": 10**400}, {"weekly": "sat,sun", "hours": 2, "at": 1320}, {"at": ["22:00"]},
    {"start": 200, "end": 100}, {"severity": 3}, {"comment": 10**5000}, {"start": NAIVE_YEAR_1},
]


def _check_silence(spec, now=1_767_225_600.0):
    """Parse ``spec``: a `ConfigError` is fine; a `Silence` must be sane and usable."""
    try:
        s = silence_from_dict(spec, now=now)
    except ConfigError as exc:
        assert str(exc) and len(str(exc)) < 2000
        return None
    assert isinstance(s, Silence) and isinstance(s.id, str) and s.id
    for t in (s.start, s.end):
        assert t is None or (math.isfinite(t) and 0 <= t < 253_402_300_800)
    assert math.isfinite(s.hours) and 0 <= s.hours <= 168
    assert len(s.at) == 5 and s.at[2] == ":" and set(s.weekly) <= {"mon", "tue", "wed", "thu", "fri", "sat", "sun"}
    assert all(isinstance(v, str) for v in (s.device, s.rule, s.family, s.severity, s.comment))
    json.dumps(s.to_dict(), allow_nan=False)
    alert = Alert("a1", "overheat", "WARNING", "DEV-0007", "RUN", 0.0, 10.0, 1.0, 1.0, "x",
                  {"Temperature": 1.0}, [], "ops", "firing", 10.0)
    book = SilenceBook([s])
    for t in (0.0, now, now + 86400 * 3.5):
        book.silenced(alert, t)
    book.prune(now)
    return s


@pytest.mark.parametrize("spec", _HOSTILE_SILENCES, ids=range(len(_HOSTILE_SILENCES)))
def test_a_hostile_silence_is_a_config_error_or_a_valid_silence(spec):
    _check_silence(spec)


def test_the_silences_of_the_issue_are_refused_with_the_reason():
    for spec, words in (
        ({"hours": [1]}, "'hours' must be a finite number"),
        ({"weekly": 5}, "'weekly' must be a list of days"),
        ({"start": 10**400}, "start must be RFC 3339 text or epoch seconds"),
        ({"start": math.nan}, "between 1970 and 9999"),
        ({"id": 5}, "'id' must be text"),
        ({"duration": "inf", "start": 0}, "duration must be"),
    ):
        with pytest.raises(ConfigError, match=words):
            silence_from_dict(spec)


def test_valid_silences_still_parse_as_before():
    assert silence_from_dict({"start": "1767225600", "duration": 3600.0}).end == 1_767_229_200.0
    s = silence_from_dict({"weekly": "sat,sun", "at": "7:05", "hours": "8", "start": date(2026, 1, 1)})
    assert (s.weekly, s.at, s.hours, s.start) == (("sat", "sun"), "07:05", 8.0, 1_767_225_600.0)


def test_random_silences_never_crash():
    rng = random.Random(20261126)
    alphabet = "0123456789:.-+eEhmsdTZ ,satunwdfriomx*?[]"
    for _ in range(3000):
        spec = {}
        for key in rng.sample(_KEYS, rng.randint(0, 6)):
            kind = rng.random()
            if kind < 0.5:
                value = rng.choice(_HOSTILE)
            elif kind < 0.65:
                value = rng.uniform(-1e12, 1e12)
            elif kind < 0.8:
                value = rng.randint(-(2**80), 2**80)
            elif kind < 0.95:
                value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            else:
                value = [rng.choice(_HOSTILE) for _ in range(rng.randint(0, 3))]
            spec[key] = value
        if rng.random() < 0.05:
            spec[rng.choice([5, None, "colour", 1.5])] = 1
        _check_silence(spec, now=rng.choice([None, 1_767_225_600.0, 0.0]) or 1_767_225_600.0)
