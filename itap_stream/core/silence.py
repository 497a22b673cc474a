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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from itap_stream.core.rules import SEVERITIES, Alert, parse_duration
from itap_stream.errors import ConfigError

__all__ = ["Silence", "SilenceBook", "silence_from_dict"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


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
    known = {"id", "device", "rule", "family", "severity", "start", "end", "duration", "weekly", "at", "hours", "comment"}
    unknown = set(raw) - known
    if unknown:
        msg = f"silence: unknown key(s) {sorted(unknown)}; known: {sorted(known)}"
        raise ConfigError(msg)
    sev = str(raw.get("severity") or "").upper()
    if sev and sev not in SEVERITIES:
        msg = f"silence: severity {raw['severity']!r} is not one of {', '.join(SEVERITIES)}"
        raise ConfigError(msg)
    start = _time(raw.get("start"))
    end = _time(raw.get("end"))
    if raw.get("duration") is not None:
        base = start if start is not None else now
        if base is None:
            msg = "silence: a duration needs a start"
            raise ConfigError(msg)
        start = base
        end = base + parse_duration(raw["duration"])
    weekly = tuple(str(d).strip().lower()[:3] for d in (raw.get("weekly") or ()))
    if any(d not in _DAYS for d in weekly):
        msg = f"silence: weekly days must be among {', '.join(_DAYS)}, got {list(raw.get('weekly') or ())}"
        raise ConfigError(msg)
    at = str(raw.get("at", "00:00"))
    try:
        hh, mm = (int(x) for x in at.split(":"))
        if not (0 <= hh < 24 and 0 <= mm < 60):
            raise ValueError
        hours = float(raw.get("hours", 0.0))
    except ValueError:
        msg = f"silence: 'at' must be HH:MM and 'hours' a number, got {at!r} / {raw.get('hours')!r}"
        raise ConfigError(msg) from None
    if weekly and hours <= 0:
        msg = "silence: a weekly silence needs hours > 0"
        raise ConfigError(msg)
    fields = {
        "device": str(raw.get("device") or "*"), "rule": str(raw.get("rule") or "*"),
        "family": str(raw.get("family") or ""), "severity": sev, "start": start, "end": end, "weekly": weekly,
        "at": at, "hours": hours, "comment": str(raw.get("comment") or ""),
    }  # fmt: skip
    sid = str(raw.get("id") or hashlib.sha1(repr(sorted(fields.items())).encode(), usedforsecurity=False).hexdigest()[:10])
    return Silence(id=sid, **fields)


def _time(v: Any) -> float | None:
    if v is None or v == "":
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, datetime):
        dt = v
    else:
        try:
            dt = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        except ValueError:
            msg = f"silence: {v!r} is not a time (RFC 3339 or epoch seconds)"
            raise ConfigError(msg) from None
    return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()


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
