"""Sensor schema: which signals a device reports and which family each belongs to."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from itap_stream.errors import ConfigError

__all__ = ["STATES", "SensorSchema", "Signal"]

#: Operating states a reading may carry, in the order used for integer codes.
STATES: tuple[str, ...] = ("RUN", "IDLE", "MAINT")


@dataclass(frozen=True)
class Signal:
    """One sensor channel.

    Parameters
    ----------
    name
        Column / JSON key, e.g. ``voltage_v`` (unit in the name).
    family
        Sensor family used to group explanations, e.g. ``Voltage``.
    min, max
        Physically valid range; values outside it are rejected as bad input.

    Examples
    --------
    >>> Signal(name="temp_c", family="Temperature", min=-40, max=200).family
    'Temperature'
    """

    name: str
    family: str
    min: float = -math.inf
    max: float = math.inf
    unit: str = ""
    column: str = ""  # CSV column holding this signal, when it is not ``name``
    sparkplug_metric: str = ""  # Sparkplug B metric carrying this signal, when it is not ``name``

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            msg = f"signal name {self.name!r} must be a non-empty identifier (letters, digits, _)"
            raise ConfigError(msg)
        if not self.family:
            msg = f"signal {self.name!r} needs a family"
            raise ConfigError(msg)
        if not self.min < self.max:
            msg = f"signal {self.name!r}: min {self.min} must be below max {self.max}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class SensorSchema:
    """The ordered set of signals of a fleet.

    Examples
    --------
    >>> s = SensorSchema.from_dict({"signals": [
    ...     {"name": "rpm", "family": "RPM"}, {"name": "temp_c", "family": "Temperature"}]})
    >>> s.names
    ('rpm', 'temp_c')
    >>> s.families
    ('RPM', 'Temperature')
    """

    signals: tuple[Signal, ...]
    #: CSV columns of the reading fields, for files that name them otherwise
    timestamp_column: str = "ts"
    device_column: str = "device_id"
    #: CSV column with ground truth (0/1 or a fault name), read as each reading's label
    label_column: str = ""
    #: Sparkplug B String metrics carrying the operating state and the device's fault tag
    sparkplug_state_metric: str = "state"
    sparkplug_tag_metric: str = "tag"

    def __post_init__(self) -> None:
        if not self.signals:
            msg = "sensor schema has no signals"
            raise ConfigError(msg)
        names = [s.name for s in self.signals]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            msg = f"sensor schema lists signal(s) more than once: {', '.join(dupes)}"
            raise ConfigError(msg)
        reserved = {"device_id", "ts", "state", "seq", "tag", "label"} & set(names)
        if reserved:
            msg = f"signal name(s) {sorted(reserved)} are reserved reading fields"
            raise ConfigError(msg)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.signals)

    @functools.cached_property
    def bounds(self) -> tuple[tuple[str, float, float], ...]:
        """``(name, min, max)`` per signal: what decoding checks every value against."""
        return tuple((s.name, s.min, s.max) for s in self.signals)

    @property
    def families(self) -> tuple[str, ...]:
        """Families in first-seen order, without repeats."""
        return tuple(dict.fromkeys(s.family for s in self.signals))

    def family_of(self, signal: str) -> str:
        for s in self.signals:
            if s.name == signal:
                return s.family
        msg = f"unknown signal {signal!r}; schema has {', '.join(self.names)}"
        raise ConfigError(msg)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "signals": [
                {"name": s.name, "family": s.family, "min": s.min, "max": s.max, "unit": s.unit}
                | ({"column": s.column} if s.column else {})
                | ({"sparkplug_metric": s.sparkplug_metric} if s.sparkplug_metric else {})
                for s in self.signals
            ]
        }
        if self.timestamp_column != "ts":
            out["timestamp_column"] = self.timestamp_column
        if self.device_column != "device_id":
            out["device_column"] = self.device_column
        if self.label_column:
            out["label_column"] = self.label_column
        if self.sparkplug_state_metric != "state":
            out["sparkplug_state_metric"] = self.sparkplug_state_metric
        if self.sparkplug_tag_metric != "tag":
            out["sparkplug_tag_metric"] = self.sparkplug_tag_metric
        return out

    def csv_renames(self) -> dict[str, str]:
        """CSV column -> reading field, for the columns this schema names otherwise."""
        renames = {s.column: s.name for s in self.signals if s.column and s.column != s.name}
        if self.timestamp_column != "ts":
            renames[self.timestamp_column] = "ts"
        if self.device_column != "device_id":
            renames[self.device_column] = "device_id"
        return renames

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensorSchema:
        """Build a schema from the parsed ``sensors.yaml`` mapping."""
        raw = data.get("signals") if isinstance(data, Mapping) else None
        if not isinstance(raw, list):
            msg = "sensor schema must have a 'signals' list"
            raise ConfigError(msg)
        signals = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping) or "name" not in item or "family" not in item:
                msg = f"sensor schema signal #{i + 1} must be a mapping with 'name' and 'family'"
                raise ConfigError(msg)
            unknown = set(item) - {"name", "family", "min", "max", "unit", "column", "sparkplug_metric"}
            if unknown:
                msg = f"signal {item['name']!r}: unknown key(s) {sorted(unknown)}"
                raise ConfigError(msg)
            try:
                lo = float(item.get("min", -math.inf))
                hi = float(item.get("max", math.inf))
            except (TypeError, ValueError) as exc:
                msg = f"signal {item['name']!r}: min/max must be numbers"
                raise ConfigError(msg) from exc
            signals.append(
                Signal(
                    name=str(item["name"]),
                    family=str(item["family"]),
                    min=lo,
                    max=hi,
                    unit=str(item.get("unit", "")),
                    column=str(item.get("column", "")),
                    sparkplug_metric=str(item.get("sparkplug_metric", "") or ""),
                )
            )
        known = ("signals", "timestamp_column", "device_column", "label_column", "sparkplug_state_metric",
                 "sparkplug_tag_metric")
        extra = set(data) - set(known)
        if extra:
            msg = f"sensor schema: unknown key(s) {sorted(extra)}; known: {', '.join(known)}"
            raise ConfigError(msg)
        return cls(
            signals=tuple(signals),
            timestamp_column=str(data.get("timestamp_column", "ts")),
            device_column=str(data.get("device_column", "device_id")),
            label_column=str(data.get("label_column", "") or ""),
            sparkplug_state_metric=str(data.get("sparkplug_state_metric") or "state"),
            sparkplug_tag_metric=str(data.get("sparkplug_tag_metric") or "tag"),
        )
