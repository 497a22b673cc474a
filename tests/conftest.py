"""Shared fixtures: a real broker per test session, small real models, temp SQLite files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from itap_stream.adapters import artifacts
from itap_stream.adapters.broker import BrokerHandle, start_broker
from itap_stream.app.offline import train_from_frame
from itap_stream.config import PACKAGE_CONFIGS, load, load_yaml
from itap_stream.core.model import Artifact
from itap_stream.core.rules import rules_from_dict
from itap_stream.core.schema import SensorSchema
from simulator import simulate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def schema() -> SensorSchema:
    return SensorSchema.from_dict(load_yaml(PACKAGE_CONFIGS / "sensors.yaml"))


@pytest.fixture(scope="session")
def default_rules():
    return rules_from_dict(load_yaml(PACKAGE_CONFIGS / "alert_rules.yaml"))


@pytest.fixture(scope="session")
def normal_frame():
    """Two simulated hours of six healthy devices (no MAINT), the training data of most tests."""
    return simulate(6, 7200.0, seed=101, maint=False).to_frame()


@pytest.fixture(scope="session")
def trained(schema, normal_frame) -> Artifact:
    art, _report = train_from_frame(normal_frame, schema, window=32, hop=4, quantile=0.999, seed=0)
    return art


@pytest.fixture(scope="session")
def model_file(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.joblib"
    artifacts.save(trained, path)
    return path


@pytest.fixture(scope="session")
def broker() -> BrokerHandle:
    """mosquitto on a free port when installed, else the embedded broker (ITAP_TEST_BROKER forces one)."""
    handle = start_broker(os.environ.get("ITAP_TEST_BROKER", "auto"))
    yield handle
    handle.stop()


@pytest.fixture()
def settings(tmp_path, broker, model_file):
    """Settings for one consumer: its own client id, SQLite file and the session broker."""
    return load(
        PACKAGE_CONFIGS / "itap.yaml",
        environ={},
        broker_url=broker.url,
        db_url=f"sqlite:///{tmp_path / 'itap.db'}",
        model_path=str(model_file),
        client_id=f"itap-test-{tmp_path.name}",
        http_addr="",
        batch_wait_ms=2,
    )
