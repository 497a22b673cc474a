"""Silences (maintenance windows): which alerts are held back from publishing, and when.

A silence matches alerts by device (shell pattern, ``PUMP-*``), rule (pattern), dominant
family and severity; a field left out matches everything. It is active between ``start``
and ``end`` (epoch seconds, either open), or every week on ``weekly`` days from ``at``
(``HH:MM`` UTC) for ``hours``. Alerts that match an active silence are stored but not
published; when the silence ends, the caller publishes those whose condition still holds.
Time is whatever clock the caller passes: the core reads none.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from fnmatch import fnmatchcase
from typing import Any

from itap_stream.core.rules import SEVERITIES, Alert, parse_duration
from itap_stream.errors import ConfigError

__all__ = ["Silence", "SilenceBook", "check_bounded", "describe", "silence_from_dict"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: A silence's start and end lie in 1970-01-01 .. 9999-12-31 (UTC), as epoch seconds.
_MAX_TS = 253_402_300_800.0
#: A weekly silence lasts at most a week.
_MAX_WEEKLY_HOURS = 168.0
#: The longest text a silence field may hold (id, patterns, comment).
_MAX_TEXT = 1000


@dataclass(frozen=True)
class Silence:
    id: str
    device: str = "*"
    rule: str = "*"
    family: str = ""
    severity: str = ""
    start: float | None = None
    end: float | None = None
    weekly: tuple[str, ...] = ()  # days, e.g. ("sat", "sun")
    at: str = "00:00"  # HH:MM UTC, with weekly
    hours: float = 0.0  # with weekly
    comment: str = ""

    def matches(self, alert: Alert) -> bool:
        if not fnmatchcase(alert.device_id, self.device) or not fnmatchcase(alert.rule, self.rule):
            return False
        if self.severity and alert.severity != self.severity:
            return False
        if self.family:
            fam = max(alert.families.items(), key=lambda kv: kv[1])[0] if alert.families else ""
            if fam != self.family:
                return False
        return True

    def active(self, now: float) -> bool:
        """Is the silence in force at ``now``?

        Examples
        --------
        >>> s = Silence("s", weekly=("sat",), at="22:00", hours=8)  # Sat 22:00 to Sun 06:00
        >>> sat_23 = datetime(2026, 11, 28, 23, 0, tzinfo=UTC).timestamp()
        >>> sun_07 = datetime(2026, 11, 29, 7, 0, tzinfo=UTC).timestamp()
        >>> s.active(sat_23), s.active(sun_07)
        (True, False)
        """
        if self.start is not None and now < self.start:
            return False
        if self.end is not None and now >= self.end:
            return False
        if not self.weekly:
            return True
        hh, mm = (int(x) for x in self.at.split(":"))
        t = datetime.fromtimestamp(now, tz=UTC)
        for back in range(8):  # the window may have opened on one of the last seven days
            day = t.date().toordinal() - back
            d = datetime.fromordinal(day).replace(hour=hh, minute=mm, tzinfo=UTC)
            if _DAYS[d.weekday()] in self.weekly and d.timestamp() <= now < d.timestamp() + self.hours * 3600:
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weekly"] = list(self.weekly)
        return {k: v for k, v in d.items() if v not in ("", None, [], 0.0) or k == "id"}


def silence_from_dict(raw: Mapping[str, Any], *, now: float | None = None) -> Silence:
    """Parse a silence (YAML entry, command payload or CLI options).

    ``duration`` (e.g. ``2h``) sets ``end`` from ``start`` or ``now``.

    Examples
    --------
    >>> silence_from_dict({"device": "DEV-0007", "duration": "2h"}, now=1000.0).end
    8200.0
    >>> silence_from_dict({"severity": "LOUD"})
    Traceback (most recent call last):
    ...
    itap_stream.errors.ConfigError: silence: severity 'LOUD' is not one of INFO, WARNING, CRITICAL
    """
    if not isinstance(raw, Mapping):
        msg = "a silence must be a mapping (device, rule, family, severity, start, end, duration, weekly, at, hours)"
        raise ConfigError(msg)
    known = {
        "id", "device", "rule", "family", "severity", "start", "end", "duration", "weekly", "at", "hours", "comment"
    }
    unknown = [k for k in raw if k not in known]
    if unknown:
        msg = f"silence: unknown key(s) {sorted(_show(k) for k in unknown)}; known: {sorted(known)}"
        raise ConfigError(msg)
    sev = _text(raw, "severity").upper()
    if sev and sev not in SEVERITIES:
        msg = f"silence: severity {raw['severity']!r} is not one of {', '.join(SEVERITIES)}"
        raise ConfigError(msg)
    start = _time(raw.get("start"), "start")
    end = _time(raw.get("end"), "end")
    if raw.get("duration") is not None:
        base = start if start is not None else now
        if base is None:
            msg = "silence: a duration needs a start"
            raise ConfigError(msg)
        start = _time(base, "start")
        end = _time((start or 0.0) + _duration(raw["duration"]), "end (start + duration)")
    if start is not None and end is not None and end < start:
        msg = f"silence: end ({end:g}) is before start ({start:g})"
        raise ConfigError(msg)
    weekly = _days(raw.get("weekly"))
    at = _at("00:00" if raw.get("at") is None else raw["at"])
    hours = _number(0.0 if raw.get("hours") is None else raw["hours"], "hours")
    if not 0.0 <= hours <= _MAX_WEEKLY_HOURS:
        msg = f"silence: 'hours' must be between 0 and {_MAX_WEEKLY_HOURS:g} (a week), got {hours:g}"
        raise ConfigError(msg)
    if weekly and hours <= 0:
        msg = "silence: a weekly silence needs hours > 0"
        raise ConfigError(msg)
    fields: dict[str, Any] = {
        "device": _text(raw, "device") or "*", "rule": _text(raw, "rule") or "*",
        "family": _text(raw, "family"), "severity": sev, "start": start, "end": end, "weekly": weekly,
        "at": at, "hours": hours, "comment": _text(raw, "comment"),
    }  # fmt: skip
    digest = hashlib.sha1(repr(sorted(fields.items())).encode(), usedforsecurity=False).hexdigest()
    sid = _text(raw, "id") or digest[:10]
    return Silence(id=sid, **fields)


_DAY_NAMES = {"mon": "Monday", "tue": "Tuesday", "wed": "Wednesday", "thu": "Thursday", "fri": "Friday",
              "sat": "Saturday", "sun": "Sunday"}


def check_bounded(s: Silence, *, everything: bool, max_s: float, now: float) -> None:
    """Refuse a silence an operator adds (command or CLI) that would hide too much:
    `ConfigError` unless it names at least one matcher (device, rule, family, severity) or
    ``everything`` says all alerts on purpose, and unless it ends (an end, or a weekly
    schedule whose every occurrence ends) no more than ``max_s`` seconds after it starts.

    Examples
    --------
    >>> check_bounded(silence_from_dict({"duration": "1h"}, now=0.0), everything=False, max_s=86400, now=0.0)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    itap_stream.errors.ConfigError: a silence needs at least one of device, rule, family, severity (or --all ...)
    >>> check_bounded(silence_from_dict({"device": "P-1"}), everything=False, max_s=86400, now=0.0)
    Traceback (most recent call last):
    ...
    itap_stream.errors.ConfigError: a silence needs an end: --duration or --end (at most 1d), or a weekly schedule
    """
    if not everything and s.device == "*" and s.rule == "*" and not s.family and not s.severity:
        msg = ("a silence needs at least one of device, rule, family, severity "
               '(or --all / "all": true to silence every alert on purpose)')
        raise ConfigError(msg)
    if s.weekly:
        return  # each occurrence lasts `hours` (at most a week); it may recur without an end
    if s.end is None:
        msg = f"a silence needs an end: --duration or --end (at most {_span(max_s)}), or a weekly schedule"
        raise ConfigError(msg)
    length = s.end - (s.start if s.start is not None else now)
    if length > max_s:
        msg = f"a silence may last at most {_span(max_s)} (silence_max); this one lasts {_span(length)}"
        raise ConfigError(msg)


def describe(d: Mapping[str, Any]) -> str:
    """A silence (`Silence.to_dict`) for people: RFC 3339 UTC times, weekdays as words.

    Examples
    --------
    >>> describe({"id": "a1", "device": "DEV-7", "start": 0.0, "end": 7200.0, "comment": "swap"})
    'device=DEV-7, from 1970-01-01T00:00:00Z to 1970-01-01T02:00:00Z, comment=swap'
    >>> describe({"id": "b2", "rule": "signal_*", "weekly": ["sat", "sun"], "at": "22:00", "hours": 8.0})
    'rule=signal_*, every Saturday and Sunday from 22:00 UTC for 8 h'
    """
    parts = [f"{k}={d[k]}" for k in ("device", "rule", "family", "severity") if d.get(k) not in (None, "", "*")]
    if not parts:
        parts.append("all alerts")
    start, end = d.get("start"), d.get("end")
    if start is not None or end is not None:
        parts.append(("from " + _iso(start) if start is not None else "until") + (
            f" to {_iso(end)}" if start is not None and end is not None else f" {_iso(end)}" if end is not None else
            " on"))
    if d.get("weekly"):
        days = [_DAY_NAMES.get(x, str(x)) for x in d["weekly"]]
        named = days[0] if len(days) == 1 else ", ".join(days[:-1]) + " and " + days[-1]
        parts.append(f"every {named} from {d.get('at', '00:00')} UTC for {float(d.get('hours', 0)):g} h")
    if d.get("comment"):
        parts.append(f"comment={d['comment']}")
    return ", ".join(parts)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    """``90000`` -> ``'25h'``; ``604800`` -> ``'7d'``."""
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:g}d"
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    return f"{seconds / 60:g}min"


def _show(v: Any) -> str:
    """A short repr of a value for a message, whatever it is (a 5,000-digit int has no repr)."""
    try:
        text = repr(v)
    except ValueError:
        text = f"<{type(v).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _text(raw: Mapping[str, Any], key: str) -> str:
    """A text field ("" when absent)."""
    v = raw.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        msg = f"silence: {key!r} must be text, got {type(v).__name__} {_show(v)} (quote it in YAML)"
        raise ConfigError(msg)
    if len(v) > _MAX_TEXT:
        msg = f"silence: {key!r} is {len(v):,} characters long; at most {_MAX_TEXT:,}"
        raise ConfigError(msg)
    return v


def _finite(v: Any, convert: Callable[[Any], float], msg: str) -> float:
    """``convert(v)`` for a number or text, when finite; else `ConfigError(msg)`."""
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise TypeError
        x = convert(v)
    except (TypeError, ValueError, OverflowError):
        x = math.nan
    if not math.isfinite(x):
        raise ConfigError(msg)
    return x


def _number(v: Any, name: str) -> float:
    """A finite number (a number or numeric text)."""
    return _finite(v, float, f"silence: {name!r} must be a finite number, got {_show(v)}")


def _duration(v: Any) -> float:
    """Seconds from a duration such as ``2h`` or a number of seconds; finite and not negative."""
    return _finite(v, parse_duration, f"silence: duration must be a number of seconds or like '30m', '2h'; "
                                      f"got {_show(v)}")


def _days(v: Any) -> tuple[str, ...]:
    """Weekdays from a list (``[sat, sun]``) or comma-separated text (``sat,sun``)."""
    if v is None or (isinstance(v, (str, list, tuple)) and not v):
        return ()
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(d, str) for d in items):
        msg = f"silence: 'weekly' must be a list of days ({', '.join(_DAYS)}) or text like 'sat,sun', got {_show(v)}"
        raise ConfigError(msg)
    days = tuple(d.strip().lower()[:3] for d in items)
    if any(d not in _DAYS for d in days) or len(days) > len(_DAYS):
        msg = f"silence: weekly days must be among {', '.join(_DAYS)}, got {_show(v)}"
        raise ConfigError(msg)
    return days


def _at(v: Any) -> str:
    """``HH:MM`` (UTC) text, normalised to two digits each."""
    parts = v.split(":") if isinstance(v, str) else []
    ok = len(parts) == 2 and all(p.isascii() and p.isdigit() and len(p) <= 2 for p in parts)
    if not ok or not (0 <= int(parts[0]) < 24 and 0 <= int(parts[1]) < 60):
        msg = f"silence: 'at' must be HH:MM text (UTC, 00:00 to 23:59; quote it in YAML), got {_show(v)}"
        raise ConfigError(msg)
    return f"{int(parts[0]):02d}:{int(parts[1]):02d}"


def _time(v: Any, name: str) -> float | None:
    """Epoch seconds from epoch seconds (a number or numeric text), RFC 3339 text or a
    datetime; None when absent. Within 1970 .. 9999."""
    if v is None or (isinstance(v, str) and not v):
        return None
    bad = f"silence: {name} must be RFC 3339 text or epoch seconds, got {_show(v)}"
    try:
        if isinstance(v, bool):
            raise TypeError
        if isinstance(v, (int, float)):
            t = float(v)
        elif isinstance(v, str):
            try:
                t = float(v)
            except ValueError:
                dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
                t = (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
        elif isinstance(v, datetime):
            t = (v if v.tzinfo is not None else v.replace(tzinfo=UTC)).timestamp()
        elif isinstance(v, date):
            t = datetime(v.year, v.month, v.day, tzinfo=UTC).timestamp()
        else:
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        msg = f"{bad}: not a time"
        raise ConfigError(msg) from None
    if not 0.0 <= t < _MAX_TS:  # also nan and inf
        msg = f"{bad}: not a time between 1970 and 9999"
        raise ConfigError(msg)
    return t


class SilenceBook:
    """The silences in force: from YAML at start, added and removed at runtime.

    Examples
    --------
    >>> book = SilenceBook([silence_from_dict({"id": "m1", "device": "DEV-0007", "start": 100, "end": 200})])
    >>> a = Alert("a1", "overheat", "WARNING", "DEV-0007", "RUN", 0, 150, 1.0, 1.0, "x", {}, [], "ops", "firing", 150)
    >>> book.silenced(a, now=150.0), book.silenced(a, now=250.0)
    (True, False)
    """

    def __init__(self, silences: Iterable[Silence] = ()) -> None:
        self._by_id: dict[str, Silence] = {s.id: s for s in silences}

    def add(self, silence: Silence) -> None:
        self._by_id[silence.id] = silence

    def remove(self, silence_id: str) -> bool:
        return self._by_id.pop(silence_id, None) is not None

    def all(self) -> list[Silence]:
        return list(self._by_id.values())

    def silenced(self, alert: Alert, now: float) -> bool:
        return any(s.active(now) and s.matches(alert) for s in self._by_id.values())

    def prune(self, now: float) -> list[Silence]:
        """Drop silences whose end has passed; returns them."""
        gone = [s for s in self._by_id.values() if s.end is not None and now >= s.end and not s.weekly]
        for s in gone:
            del self._by_id[s.id]
        return gone
