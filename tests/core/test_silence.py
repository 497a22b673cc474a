"""Silences: what they match, when they are in force, and how they are written."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from itap_stream.core.rules import Alert
from itap_stream.core.silence import SilenceBook, silence_from_dict
from itap_stream.errors import ConfigError


def _alert(device="DEV-0007", rule="overheat", severity="WARNING", families=None):
    return Alert("a1", rule, severity, device, "RUN", 0.0, 10.0, 1.0, 1.0, "x",
                 families or {"Temperature": 70.0, "RPM": 30.0}, [], "ops", "firing", 10.0)


def _ts(*args):
    return datetime(*args, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("spec", "alert", "hit"),
    [
        ({"device": "DEV-0007"}, _alert(), True),
        ({"device": "DEV-0008"}, _alert(), False),
        ({"device": "DEV-00*"}, _alert(), True),
        ({"rule": "signal_*"}, _alert(rule="signal_stuck:temp_c"), True),
        ({"rule": "signal_*"}, _alert(), False),
        ({"family": "Temperature"}, _alert(), True),
        ({"family": "Vibration"}, _alert(), False),
        ({"severity": "critical"}, _alert(), False),
        ({"severity": "WARNING", "device": "DEV-0007", "rule": "overheat"}, _alert(), True),
    ],
)
def test_a_silence_matches_by_device_rule_family_and_severity(spec, alert, hit):
    assert silence_from_dict(spec).matches(alert) is hit


def test_a_silence_is_in_force_from_start_to_end_only():
    s = silence_from_dict({"start": "2026-11-26T10:00:00Z", "duration": "2h"})
    assert not s.active(_ts(2026, 11, 26, 9, 59, 59))
    assert s.active(_ts(2026, 11, 26, 10, 0))
    assert s.active(_ts(2026, 11, 26, 11, 59, 59))
    assert not s.active(_ts(2026, 11, 26, 12, 0))


def test_a_weekly_silence_recurs_and_crosses_midnight():
    s = silence_from_dict({"weekly": ["Sat"], "at": "22:00", "hours": 8})  # Sat 22:00 .. Sun 06:00
    assert not s.active(_ts(2026, 11, 28, 21, 59)) and not s.active(_ts(2026, 12, 5, 21, 59))
    assert s.active(_ts(2026, 11, 28, 22, 0)) and s.active(_ts(2026, 11, 29, 5, 59))
    assert not s.active(_ts(2026, 11, 29, 6, 0))
    assert s.active(_ts(2026, 12, 5, 23, 0)) and not s.active(_ts(2026, 12, 2, 23, 0))  # next Saturday, not Wednesday


def test_the_book_adds_removes_and_prunes_ended_silences():
    book = SilenceBook()
    s = silence_from_dict({"id": "m1", "device": "DEV-0007", "start": 100, "end": 200})
    book.add(s)
    assert book.silenced(_alert(), 150.0) and not book.silenced(_alert(device="DEV-0001"), 150.0)
    assert book.prune(199.0) == [] and book.prune(200.0) == [s] and book.all() == []
    book.add(s)
    assert book.remove("m1") and not book.remove("m1")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"severity": "LOUD"}, "severity"),
        ({"weekly": ["someday"], "hours": 2}, "weekly days"),
        ({"weekly": ["sat"]}, "hours > 0"),
        ({"start": "yesterday"}, "not a time"),
        ({"at": "25:00", "weekly": ["sat"], "hours": 1}, "HH:MM"),
        ({"colour": "red"}, "unknown key"),
        ({"duration": "2h"}, "needs a start"),
    ],
)
def test_bad_silences_are_refused_with_the_reason(spec, message):
    with pytest.raises(ConfigError, match=message):
        silence_from_dict(spec)
