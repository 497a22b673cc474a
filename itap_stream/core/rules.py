"""Alert rules from YAML and the engine that turns scored windows into alerts.

Rule types (the three of the original ITAP):

``burst``
    ``count`` anomalies of one device within ``within_s`` seconds of event time
    (an anomaly exactly ``within_s`` before the latest one still counts).
``dominant_family``
    an anomaly whose summed share of ``families`` is at least ``min_share`` percent.
``tag_route``
    an anomaly whose window carries one of ``tags`` (a fault code the device reported);
    with ``require_anomaly: false`` the tag alone is enough.

Lifecycle: one condition (rule, device) fires once and is not repeated while it holds;
it resolves at the first window of that device that ends ``resolve_after_s`` seconds
or more after the last window in which that condition held. Time is the windows' event
time, so the engine is deterministic and replayable. Each firing alert names the
likeliest fault class of its anomaly (`core.rootcause`) and is routed by the anomaly's
dominant family when the rule has ``routes``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from itap_stream.core.explain import Explanation
from itap_stream.core.rootcause import DEFAULT_FAULT_CLASSES, FaultClass, classify
from itap_stream.errors import ConfigError

__all__ = [
    "SEVERITIES",
    "Alert",
    "Lifecycle",
    "Rule",
    "RuleEngine",
    "ScoredWindow",
    "lifecycle_from_dict",
    "parse_duration",
    "rules_from_dict",
]

SEVERITIES: tuple[str, ...] = ("INFO", "WARNING", "CRITICAL")
RULE_TYPES: tuple[str, ...] = ("burst", "dominant_family", "tag_route")


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``30s``, ``10m``, ``2h``, ``1d``.

    Examples
    --------
    >>> parse_duration("10m"), parse_duration(45), parse_duration("1.5h")
    (600.0, 45.0, 5400.0)
    """
    if isinstance(value, bool):
        msg = f"duration must be a number of seconds or like '30s', '10m', '2h'; got {value!r}"
        raise ConfigError(msg)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        for suffix in ("ms", "s", "m", "h", "d"):
            if text.endswith(suffix):
                number, factor = text[: -len(suffix)], units[suffix]
                break
        else:
            number, factor = text, 1.0
        try:
            seconds = float(number) * factor
        except ValueError:
            msg = f"duration must be a number of seconds or like '30s', '10m', '2h'; got {value!r}"
            raise ConfigError(msg) from None
    if seconds < 0:
        msg = f"duration must not be negative, got {value!r}"
        raise ConfigError(msg)
    return seconds


def iso(ts: float) -> str:
    """RFC 3339 UTC text of an epoch time, to the millisecond.

    Examples
    --------
    >>> iso(0)
    '1970-01-01T00:00:00.000Z'
    """
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Rule:
    """One alert rule; ``params`` holds the type-specific settings, validated here."""

    name: str
    type: str
    severity: str
    cause: str
    route: str = "operations"
    count: int = 0
    within_s: float = 0.0
    families: tuple[str, ...] = ()
    min_share: float = 0.0
    tags: tuple[str, ...] = ()
    require_anomaly: bool = True
    #: route by the anomaly's dominant family (family -> route); ``route`` when none matches
    routes: tuple[tuple[str, str], ...] = ()
    #: burst: at this many anomalies in ``within`` (all with the same dominant family) the
    #: open alert's severity rises one level, keeping its id
    escalate_at: int = 0

    def __post_init__(self) -> None:
        where = f"rule {self.name!r}"
        if self.type not in RULE_TYPES:
            msg = f"{where}: type {self.type!r} is not one of {', '.join(RULE_TYPES)}"
            raise ConfigError(msg)
        if self.severity not in SEVERITIES:
            msg = f"{where}: severity {self.severity!r} is not one of {', '.join(SEVERITIES)}"
            raise ConfigError(msg)
        if self.type == "burst" and (self.count < 1 or self.within_s <= 0):
            msg = f"{where}: burst needs count >= 1 and a positive 'within' duration"
            raise ConfigError(msg)
        if self.type == "dominant_family" and (not self.families or not 0 < self.min_share <= 100):
            msg = f"{where}: dominant_family needs 'families' and 0 < min_share <= 100"
            raise ConfigError(msg)
        if self.escalate_at and (self.type != "burst" or self.escalate_at <= self.count):
            msg = f"{where}: escalate_at applies to burst rules and must be above count ({self.count})"
            raise ConfigError(msg)
        if self.type == "tag_route" and not self.tags:
            msg = f"{where}: tag_route needs a non-empty 'tags' list"
            raise ConfigError(msg)


def rules_from_dict(data: Mapping[str, Any]) -> tuple[list[Rule], float]:
    """Parse ``alert_rules.yaml``: returns the rules and ``resolve_after_s``.

    Examples
    --------
    >>> rules, resolve = rules_from_dict({"resolve_after": "2m", "rules": [
    ...     {"name": "b", "type": "burst", "count": 3, "within": "5m",
    ...      "severity": "WARNING", "cause": "Repeated anomalies"}]})
    >>> rules[0].within_s, resolve
    (300.0, 120.0)
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("rules"), list):
        msg = "alert rules file must be a mapping with a 'rules' list"
        raise ConfigError(msg)
    resolve_after_s = parse_duration(data.get("resolve_after", "5m"))
    known = {
        "name", "type", "severity", "cause", "route", "count", "within", "families",
        "min_share", "tags", "require_anomaly", "routes", "escalate_at",
    }  # fmt: skip
    rules: list[Rule] = []
    for i, raw in enumerate(data["rules"]):
        if not isinstance(raw, Mapping) or "name" not in raw or "type" not in raw:
            msg = f"alert rule #{i + 1} must be a mapping with at least 'name' and 'type'"
            raise ConfigError(msg)
        unknown = set(raw) - known
        if unknown:
            msg = f"rule {raw['name']!r}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}"
            raise ConfigError(msg)
        try:
            rule = Rule(
                name=str(raw["name"]),
                type=str(raw["type"]),
                severity=str(raw.get("severity", "WARNING")).upper(),
                cause=str(raw.get("cause", raw["name"])),
                route=str(raw.get("route", "operations")),
                count=int(raw.get("count", 0)),
                within_s=parse_duration(raw.get("within", 0)),
                families=tuple(str(f) for f in raw.get("families", ())),
                min_share=float(raw.get("min_share", 0.0)),
                tags=tuple(str(t) for t in raw.get("tags", ())),
                require_anomaly=bool(raw.get("require_anomaly", True)),
                routes=_routes(raw.get("routes")),
                escalate_at=int(raw.get("escalate_at", 0)),
            )
        except (TypeError, ValueError) as exc:
            msg = f"rule {raw['name']!r}: {exc}"
            raise ConfigError(msg) from exc
        rules.append(rule)
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        msg = f"rule name(s) used more than once: {', '.join(dupes)}"
        raise ConfigError(msg)
    return rules, resolve_after_s


@dataclass(frozen=True)
class Lifecycle:
    """How open alerts behave over time (top-level settings of ``alert_rules.yaml``).

    ``resolve_after_s`` / ``resolve_after_windows``: an alert resolves once its condition
    has not held for that long *and* for that many consecutive windows (hysteresis).
    ``repeat_interval_s``: while a condition holds and nobody acknowledged it, a
    ``reminder`` is sent this often (0: never). ``flap_count`` / ``flap_period_s``: a
    condition that fired that many times within the period is held as one ``flapping``
    alert, which resolves only after a whole quiet period. ``group_interval_s``: alerts of
    one device with the same likely fault that fire within this long of the first one form
    one incident (Alertmanager's ``group_by: [device, likely_fault]``); 0: no grouping.
    """

    resolve_after_s: float = 300.0
    resolve_after_windows: int = 0
    repeat_interval_s: float = 3600.0
    flap_count: int = 4
    flap_period_s: float = 1800.0
    group_interval_s: float = 300.0


def lifecycle_from_dict(data: Mapping[str, Any]) -> Lifecycle:
    """The lifecycle settings of a parsed rules file (defaults for what it omits).

    Examples
    --------
    >>> lifecycle_from_dict({"resolve_after": "2m", "repeat_interval": "30m", "flap_count": 3})
    Lifecycle(resolve_after_s=120.0, resolve_after_windows=0, repeat_interval_s=1800.0, flap_count=3,
              flap_period_s=1800.0, group_interval_s=300.0)
    """
    try:
        lc = Lifecycle(
            resolve_after_s=parse_duration(data.get("resolve_after", "5m")),
            resolve_after_windows=int(data.get("resolve_after_windows", 0)),
            repeat_interval_s=parse_duration(data.get("repeat_interval", "1h")),
            flap_count=int(data.get("flap_count", 4)),
            flap_period_s=parse_duration(data.get("flap_period", "30m")),
            group_interval_s=parse_duration(data.get("group_interval", "5m")),
        )
    except (TypeError, ValueError) as exc:
        msg = f"alert rules lifecycle settings: {exc}"
        raise ConfigError(msg) from exc
    if lc.resolve_after_windows < 0 or lc.flap_count < 2:
        msg = "resolve_after_windows must be >= 0 and flap_count >= 2"
        raise ConfigError(msg)
    return lc


def _routes(raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        msg = "routes must map a family to a route, e.g. {Vibration: maintenance, Voltage: electrical}"
        raise ValueError(msg)
    return tuple((str(k), str(v)) for k, v in raw.items())


class ScoredWindow(NamedTuple):
    """A scored window as the rule engine sees it (a named tuple: one is made per window)."""

    device_id: str
    start_ts: float
    end_ts: float
    state: str
    score: float
    is_anomaly: bool
    confidence: float = 0.0
    explanation: Explanation | None = None
    tags: tuple[str, ...] = ()


@dataclass
class Alert:
    """An alert transition (``firing`` or ``resolved``), as published and stored."""

    id: str
    rule: str
    severity: str
    device_id: str
    state: str
    window_start: float
    window_end: float
    score: float
    confidence: float
    root_cause: str
    families: dict[str, float]
    top_features: list[tuple[str, float]]
    route: str
    status: str
    fired_at: float
    resolved_at: float | None = None
    anomalies: int = 1
    likely_fault: str = "unknown"
    likely_fault_confidence: float = 0.0
    changed_at: float | None = None  # when this transition happened (event time)
    acknowledged: bool = False
    note: str = ""
    incident: str = ""  # the id of the incident (group of one device's alerts of one fault) it belongs to

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "severity": self.severity,
            "device_id": self.device_id,
            "state": self.state,
            "window_start": iso(self.window_start),
            "window_end": iso(self.window_end),
            "score": round(self.score, 6),
            "confidence": round(self.confidence, 4),
            "root_cause": self.root_cause,
            "families": self.families,
            "top_features": [[n, s] for n, s in self.top_features],
            "route": self.route,
            "status": self.status,
            "fired_at": iso(self.fired_at),
            "resolved_at": None if self.resolved_at is None else iso(self.resolved_at),
            "anomalies": self.anomalies,
            "likely_fault": {"class": self.likely_fault, "confidence": round(self.likely_fault_confidence, 4)},
            "changed_at": iso(self.changed_at if self.changed_at is not None else self.fired_at),
            "acknowledged": self.acknowledged,
            "note": self.note,
            "incident": self.incident or self.id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        """The alert `to_dict` made (a stored or published transition).

        Examples
        --------
        >>> a = Alert("a1", "burst", "WARNING", "D1", "RUN", 0.0, 4.0, 0.7, 0.9, "x", {"Voltage": 1.0},
        ...           [("voltage_v_std", 0.5)], "maintenance", "firing", 4.0, acknowledged=True, note="n")
        >>> Alert.from_dict(a.to_dict()) == dataclasses.replace(a, changed_at=4.0, incident="a1")
        True
        """
        def ts(v: Any) -> float | None:
            return None if v is None else datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()

        likely = d.get("likely_fault") or {}
        return cls(
            id=str(d["id"]), rule=str(d["rule"]), severity=str(d["severity"]), device_id=str(d["device_id"]),
            state=str(d.get("state") or ""), window_start=ts(d["window_start"]) or 0.0,
            window_end=ts(d["window_end"]) or 0.0, score=float(d.get("score") or 0.0),
            confidence=float(d.get("confidence") or 0.0), root_cause=str(d.get("root_cause") or ""),
            families={str(k): float(v) for k, v in (d.get("families") or {}).items()},
            top_features=[(str(n), float(s)) for n, s in d.get("top_features") or []], route=str(d.get("route") or ""),
            status=str(d["status"]), fired_at=ts(d["fired_at"]) or 0.0, resolved_at=ts(d.get("resolved_at")),
            anomalies=int(d.get("anomalies") or 1), likely_fault=str(likely.get("class", "unknown")),
            likely_fault_confidence=float(likely.get("confidence", 0.0)), changed_at=ts(d.get("changed_at")),
            acknowledged=bool(d.get("acknowledged")), note=str(d.get("note") or ""),
            incident=str(d.get("incident") or ""),
        )


def event_alert(
    key: str,
    rule: str,
    severity: str,
    device_id: str,
    start: float,
    end: float,
    *,
    score: float,
    root_cause: str,
    route: str,
    state: str = "",
    confidence: float = 0.0,
    families: dict[str, float] | None = None,
    top_features: list[tuple[str, float]] | None = None,
    anomalies: int = 1,
    note: str = "",
) -> Alert:
    """An event as an alert record (``model_drift``, ``baseline_shift``, ``data_gap``): status
    ``event``, so it neither fires nor resolves; its id is derived from ``key``.

    Examples
    --------
    >>> a = event_alert("D1|x|1.0", "x", "INFO", "D1", 0.0, 1.0, score=0.5, root_cause="why", route="ops")
    >>> a.status, a.fired_at, a.changed_at, len(a.id)
    ('event', 1.0, 1.0, 16)
    """
    return Alert(
        id=hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16], rule=rule, severity=severity,
        device_id=device_id, state=state, window_start=start, window_end=end, score=score, confidence=confidence,
        root_cause=root_cause, families=families or {}, top_features=top_features or [], route=route,
        status="event", fired_at=end, changed_at=end, anomalies=anomalies, note=note,
    )


@dataclass
class _DeviceState:
    anomaly_ts: deque[float] = field(default_factory=deque)
    last_anomaly_ts: float = float("-inf")
    anomaly_fam: deque[str] = field(default_factory=deque)  # dominant family of each anomaly in anomaly_ts
    open: dict[str, Alert] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)  # rule -> end of the last window it held in
    clear: dict[str, int] = field(default_factory=dict)  # rule -> windows in a row it has not held
    fires: dict[str, deque[float]] = field(default_factory=dict)  # rule -> recent firing times (flapping)
    sent: dict[str, float] = field(default_factory=dict)  # rule -> last time the open alert was sent
    incident_start: dict[str, float] = field(default_factory=dict)  # incident id -> when its first alert fired


class RuleEngine:
    """Applies rules to scored windows in event-time order and tracks open alerts.

    Examples
    --------
    >>> rules, _ = rules_from_dict({"rules": [{"name": "b", "type": "burst", "count": 2,
    ...     "within": 60, "severity": "WARNING", "cause": "x"}]})
    >>> eng = RuleEngine(rules, resolve_after_s=30)
    >>> w = lambda t, a: ScoredWindow("D1", t - 4, t, "RUN", 0.7 if a else 0.4, a)
    >>> [a.status for a in eng.evaluate([w(10, True), w(20, True), w(30, True)])]
    ['firing']
    >>> [a.status for a in eng.evaluate([w(55, False), w(60, False)])]
    ['resolved']
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        resolve_after_s: float = 300.0,
        fault_classes: Sequence[FaultClass] = DEFAULT_FAULT_CLASSES,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.rules = list(rules)
        self.lifecycle = lifecycle or Lifecycle(
            resolve_after_s=resolve_after_s, repeat_interval_s=0.0, flap_count=10**9
        )
        self.resolve_after_s = self.lifecycle.resolve_after_s
        self.fault_classes = tuple(fault_classes)
        self._max_within = max((r.within_s for r in self.rules if r.type == "burst"), default=0.0)
        self._devices: dict[str, _DeviceState] = {}

    def open_alerts(self) -> list[Alert]:
        return [a for d in self._devices.values() for a in d.open.values()]

    def restore(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Take over alerts that were open when the service stopped (their latest stored
        transition), so they resolve, remind and take acknowledgements as if it had not
        stopped; the condition counts as last held at their window's end. Returns those
        whose rule is not in this engine (a sensor-health alert, or a rule since removed)."""
        names = {r.name for r in self.rules}
        rest = []
        for a in alerts:
            if a.rule not in names:
                rest.append(a)
                continue
            dev = self._devices.setdefault(a.device_id, _DeviceState())
            dev.open[a.rule] = dataclasses.replace(a, status="flapping" if a.status == "flapping" else "firing",
                                                   note="")
            dev.held[a.rule] = a.window_end
            dev.sent[a.rule] = a.changed_at if a.changed_at is not None else a.window_end
            dev.clear[a.rule] = 0
            inc = a.incident or a.id
            dev.incident_start[inc] = min(dev.incident_start.get(inc, a.fired_at), a.fired_at)
        return rest

    def devices(self) -> set[str]:
        """Devices with rule state (windows seen, open alerts)."""
        return set(self._devices)

    def forget(self, devices: set[str]) -> None:
        """Drop the state and open alerts of ``devices``: their partition moved to another
        consumer, which restores them from the store."""
        for device in devices & self._devices.keys():
            del self._devices[device]

    def _holds(self, rule: Rule, w: ScoredWindow, dev: _DeviceState) -> bool:
        if rule.type == "burst":
            if not w.is_anomaly:
                return False
            cutoff = w.end_ts - rule.within_s
            return sum(1 for t in dev.anomaly_ts if t >= cutoff) >= rule.count
        if rule.type == "dominant_family":
            if not w.is_anomaly or w.explanation is None:
                return False
            share = sum(w.explanation.families.get(f, 0.0) for f in rule.families)
            return share >= rule.min_share
        # tag_route
        if rule.require_anomaly and not w.is_anomaly:
            return False
        return any(t in rule.tags for t in w.tags)

    def evaluate(self, windows: Iterable[ScoredWindow]) -> list[Alert]:
        """Feed windows (event-time order per device); return the alert transitions they cause."""
        changes: list[Alert] = []
        devices = self._devices
        for w in windows:
            dev = devices.get(w.device_id)
            if not w.is_anomaly and not w.tags and (dev is None or not dev.open):
                continue  # every rule needs an anomaly or a tag, and nothing is open to resolve
            if dev is None:
                dev = devices[w.device_id] = _DeviceState()
            if w.is_anomaly:
                dev.anomaly_ts.append(w.end_ts)
                dev.anomaly_fam.append(w.explanation.dominant_family if w.explanation else "")
                dev.last_anomaly_ts = w.end_ts
                cutoff = w.end_ts - self._max_within
                while dev.anomaly_ts and dev.anomaly_ts[0] < cutoff:
                    dev.anomaly_ts.popleft()
                    dev.anomaly_fam.popleft()
            for rule in self.rules:
                self._step(rule, w, dev, changes)
        return changes

    def _step(self, rule: Rule, w: ScoredWindow, dev: _DeviceState, changes: list[Alert]) -> None:
        """One window, one rule: fire, remind, escalate, note a family shift, or resolve."""
        lc = self.lifecycle
        name, t = rule.name, w.end_ts
        open_alert = dev.open.get(name)
        if self._holds(rule, w, dev):
            dev.held[name] = t
            dev.clear[name] = 0
            if open_alert is None:
                alert = self._fire(rule, w, dev)
                if rule.type == "burst" and self._reported(alert, dev):
                    return  # the fault is already reported by a specific rule: no second alert for it
                fires = dev.fires.setdefault(name, deque())
                while fires and fires[0] < t - lc.flap_period_s:
                    fires.popleft()
                alert.incident = self._incident(alert, dev)
                if len(fires) >= lc.flap_count - 1:
                    # fired and resolved again and again: hold it as one flapping alert
                    alert.status = "flapping"
                    alert.note = (
                        f"fired {len(fires) + 1} times within {lc.flap_period_s:g} s; held until quiet that long"
                    )
                fires.append(t)
                dev.open[name] = alert
                dev.sent[name] = t
                changes.append(dataclasses.replace(alert))  # a snapshot: the open one keeps counting
                return
            open_alert.anomalies += 1
            if rule.escalate_at and w.is_anomaly and open_alert.severity == rule.severity:
                recent = [f for ts, f in zip(dev.anomaly_ts, dev.anomaly_fam, strict=True) if ts >= t - rule.within_s]
                if len(recent) >= rule.escalate_at and len(set(recent)) == 1:
                    up = SEVERITIES[min(SEVERITIES.index(open_alert.severity) + 1, len(SEVERITIES) - 1)]
                    if up != open_alert.severity:
                        open_alert.severity = up
                        dev.sent[name] = t
                        changes.append(
                            self._snapshot(
                                open_alert, "escalated", t, w,
                                f"{len(recent)} anomalies in {rule.within_s:g} s, all {recent[0]}",
                            )
                        )
            if w.explanation is not None and open_alert.families:
                fam, was = w.explanation.dominant_family, max(open_alert.families.items(), key=lambda kv: kv[1])[0]
                if fam != was and len(dev.anomaly_fam) >= 2 and list(dev.anomaly_fam)[-2:] == [fam, fam]:
                    # two anomalies in a row dominated by another family: the fault has moved
                    open_alert.families = dict(w.explanation.families)
                    open_alert.top_features = list(w.explanation.top_features)
                    changes.append(
                        self._snapshot(open_alert, "updated", t, w, f"dominant family shifted from {was} to {fam}")
                    )
            if (
                lc.repeat_interval_s > 0
                and not open_alert.acknowledged
                and t - dev.sent.get(name, t) >= lc.repeat_interval_s
            ):
                dev.sent[name] = t
                changes.append(self._snapshot(open_alert, "reminder", t, w, "still holding"))
            return
        if open_alert is None:
            return
        dev.clear[name] = dev.clear.get(name, 0) + 1
        hold = lc.flap_period_s if open_alert.status == "flapping" else lc.resolve_after_s
        if t - dev.held.get(name, t) >= hold and dev.clear[name] >= lc.resolve_after_windows:
            # its own condition has not held for the hold time (a tag alert on a device
            # without anomalies stays open while the tag keeps coming)
            del dev.open[name]
            incident = open_alert.incident or open_alert.id
            if not any((o.incident or o.id) == incident for o in dev.open.values()):
                dev.incident_start.pop(incident, None)
            resolved = dataclasses.replace(open_alert, status="resolved", resolved_at=t, changed_at=t, note="")
            changes.append(resolved)

    def _reported(self, alert: Alert, dev: _DeviceState) -> bool:
        """Whether a specific (not burst) rule's alert is open on the device: its anomalies are
        being reported already, and a burst of them would tell the same fault twice."""
        bursts = {r.name for r in self.rules if r.type == "burst"}
        return any(o.rule not in bursts for o in dev.open.values())

    def _incident(self, alert: Alert, dev: _DeviceState) -> str:
        """The incident a new alert joins: that of an open alert of the device with the same
        likely fault whose incident began within ``group_interval_s``; else its own."""
        gi = self.lifecycle.group_interval_s
        if gi > 0:
            for o in dev.open.values():
                if o.likely_fault == alert.likely_fault and alert.fired_at - dev.incident_start.get(
                        o.incident or o.id, o.fired_at) <= gi:
                    return o.incident or o.id
        dev.incident_start[alert.id] = alert.fired_at
        return alert.id

    @staticmethod
    def _snapshot(alert: Alert, status: str, t: float, w: ScoredWindow, note: str) -> Alert:
        return dataclasses.replace(alert, status=status, changed_at=t, window_start=w.start_ts, window_end=w.end_ts,
                                   score=w.score, note=note)

    def find_open(self, alert_id: str) -> Alert | None:
        """The open alert with this id, or with this unique prefix of at least 6 characters
        (the short id people see); None when there is none or the prefix is ambiguous."""
        found = [a for dev in self._devices.values() for a in dev.open.values()
                 if a.id == alert_id or (len(alert_id) >= 6 and a.id.startswith(alert_id))]
        exact = [a for a in found if a.id == alert_id]
        return exact[0] if exact else found[0] if len(found) == 1 else None

    def acknowledge(self, alert_id: str, at: float, note: str = "") -> Alert | None:
        """Acknowledge an open alert: no reminders until it resolves. Returns the
        ``acknowledged`` transition, or None when no open alert has that id."""
        for dev in self._devices.values():
            for alert in dev.open.values():
                if alert.id == alert_id:
                    if alert.acknowledged:
                        return None
                    alert.acknowledged = True
                    return dataclasses.replace(alert, status="acknowledged", changed_at=at, note=note)
        return None

    def _fire(self, rule: Rule, w: ScoredWindow, dev: _DeviceState) -> Alert:
        key = f"{w.device_id}|{rule.name}|{w.end_ts!r}".encode()
        exp = w.explanation
        count = 1
        if rule.type == "burst":
            count = sum(1 for t in dev.anomaly_ts if t >= w.end_ts - rule.within_s)
        fault, fault_conf = classify(exp, self.fault_classes)
        route = dict(rule.routes).get(exp.dominant_family, rule.route) if exp and rule.routes else rule.route
        return Alert(
            id=hashlib.sha1(key, usedforsecurity=False).hexdigest()[:16],
            rule=rule.name,
            severity=rule.severity,
            device_id=w.device_id,
            state=w.state,
            window_start=w.start_ts,
            window_end=w.end_ts,
            score=w.score,
            confidence=w.confidence,
            root_cause=rule.cause,
            families=dict(exp.families) if exp else {},
            top_features=list(exp.top_features) if exp else [],
            route=route,
            status="firing",
            fired_at=w.end_ts,
            anomalies=count,
            likely_fault=fault,
            likely_fault_confidence=fault_conf,
            changed_at=w.end_ts,
        )
