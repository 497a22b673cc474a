"""Root cause: the likeliest fault class of an anomaly, from its explanation.

An explanation says how much of a window's deviation each sensor family carries and which
features carry most. A fault class is a family signature (bearing wear shows in
vibration, overheating in temperature, power instability in voltage and current, a dead
sensor in the data-quality features) plus, optionally, the features that mark it (the
vibration spectrum for a bearing). The class whose signature carries the largest share
wins; below ``min_share`` percent it is ``unknown``. The confidence is that share, scaled
to 0-1: how much of the anomaly the named cause explains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from itap_stream.core.explain import Explanation
from itap_stream.errors import ConfigError

__all__ = ["DEFAULT_FAULT_CLASSES", "UNKNOWN", "FaultClass", "classify", "fault_classes_from_dict"]

UNKNOWN = "unknown"


@dataclass(frozen=True)
class FaultClass:
    """A fault class: the families it shows in and the features that mark it."""

    name: str
    families: tuple[str, ...]
    features: tuple[str, ...] = ()  # substrings of feature names; their top-feature share counts double


DEFAULT_FAULT_CLASSES: tuple[FaultClass, ...] = (
    FaultClass("bearing_wear", ("Vibration",), ("vibration",)),
    FaultClass("overheat", ("Temperature",)),
    FaultClass("power_instability", ("Voltage", "Current")),
    FaultClass("sensor_dropout", ("Data quality",), ("_missing", "missing_streak")),
)


def classify(
    explanation: Explanation | None, classes: Sequence[FaultClass] = DEFAULT_FAULT_CLASSES, *, min_share: float = 35.0
) -> tuple[str, float]:
    """The likeliest fault class of an explained anomaly and its confidence (0-1).

    Examples
    --------
    >>> e = Explanation({"Vibration": 70.0, "Temperature": 20.0, "Voltage": 10.0},
    ...                 [("vibration_mm_s_fft_energy", 30.0), ("temp_c_mean", 10.0)])
    >>> classify(e)
    ('bearing_wear', 0.7)
    >>> classify(Explanation({"Vibration": 30.0, "Temperature": 30.0, "Voltage": 40.0}, []))
    ('power_instability', 0.4)
    >>> classify(Explanation({"Vibration": 30.0, "Temperature": 30.0, "Pressure": 40.0}, []))
    ('unknown', 0.4)
    """
    if explanation is None or not explanation.families:
        return UNKNOWN, 0.0
    fam = explanation.families
    best, best_share, best_key = UNKNOWN, 0.0, -1.0
    for c in classes:
        share = sum(fam.get(f, 0.0) for f in c.families)
        # the marking features break ties between classes that share a family
        marks = sum(s for n, s in explanation.top_features if any(m in n for m in c.features))
        if share + marks > best_key:
            best, best_share, best_key = c.name, share, share + marks
    top = max(fam.values())
    if best_share < min_share:
        return UNKNOWN, round(top / 100.0, 4)
    return best, round(min(best_share, 100.0) / 100.0, 4)


def fault_classes_from_dict(raw: Any) -> tuple[FaultClass, ...]:
    """Parse the optional ``fault_classes`` mapping of ``alert_rules.yaml``.

    Examples
    --------
    >>> fault_classes_from_dict({"leak": {"families": ["Pressure", "Flow"]}})[0]
    FaultClass(name='leak', families=('Pressure', 'Flow'), features=())
    """
    if raw is None:
        return DEFAULT_FAULT_CLASSES
    if not isinstance(raw, Mapping) or not raw:
        msg = "fault_classes must map a class name to {families: [...], features: [...]}"
        raise ConfigError(msg)
    out = []
    for name, spec in raw.items():
        fams = spec.get("families") if isinstance(spec, Mapping) else None
        if not isinstance(fams, Iterable) or isinstance(fams, str) or not list(fams):
            msg = f"fault class {name!r} needs a non-empty 'families' list"
            raise ConfigError(msg)
        feats = spec.get("features", ()) or ()
        out.append(FaultClass(str(name), tuple(str(f) for f in fams), tuple(str(f) for f in feats)))
    return tuple(out)
