"""The exception tree of ITAP Stream.

Adapters translate the errors of their libraries into these, so the CLI can print
one clear line and exit non-zero instead of a traceback::

    ItapError
    ├── ConfigError          bad YAML, unknown setting, invalid value
    ├── SchemaMismatch       model artifact vs. configured sensor schema / features
    ├── ArtifactError        model file missing, unreadable or failing its checksum
    ├── StoreError           database unreachable or incompatible
    ├── BrokerError          MQTT broker unreachable or refusing us
    └── DataError            an input file that cannot be used (CSV columns, types)

Bad telemetry is *not* an exception: `core.readings.decode` returns a `Rejection`.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BrokerError",
    "ConfigError",
    "DataError",
    "ItapError",
    "SchemaMismatch",
    "ServiceFailed",
    "StoreError",
]


class ItapError(Exception):
    """Root of every error ITAP Stream raises on purpose."""


class ConfigError(ItapError):
    """A configuration file or value is invalid."""


class SchemaMismatch(ItapError):
    """The model was trained for another sensor schema or feature set."""


class ArtifactError(ItapError):
    """A model artifact is missing, unreadable or fails verification."""


class StoreError(ItapError):
    """The SQL store cannot be used."""


class BrokerError(ItapError):
    """The MQTT broker cannot be reached or refused the connection."""


class DataError(ItapError):
    """An input data file cannot be used."""


class ServiceFailed(ItapError):
    """A thread of the running service died or stopped making progress: the process must
    end (non-zero) so that its supervisor starts it again."""
