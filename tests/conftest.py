"""Shared fixtures: a real broker per test session, small real models, temp SQLite files."""

from __future__ import annotations

import os
import threading
import time
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


PG_ADMIN = os.environ.get("ITAP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_admin():
    """A psycopg2 connection to the PostgreSQL server of ITAP_TEST_PG, or None when unreachable."""
    try:
        import psycopg2
        import sqlalchemy as sa

        url = sa.engine.make_url(PG_ADMIN)
        conn = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                                dbname=url.database, connect_timeout=3)
    except Exception:  # noqa: BLE001 - any failure means: no PostgreSQL here
        return None
    conn.autocommit = True
    return conn


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty store URL: a SQLite file, and a new PostgreSQL database when a server is reachable."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'itap.db'}"
        return
    admin = _pg_admin()
    if admin is None:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN} (set ITAP_TEST_PG)")
    import uuid

    import sqlalchemy as sa

    name = f"itap_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sa.engine.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _wait_for(pred, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture()
def wait():
    """``wait(pred, timeout=30)``: poll until ``pred()`` is true; False on timeout."""
    return _wait_for


@pytest.fixture()
def start_consumer():
    """``start_consumer(settings, metrics=None, clock=time.time)``: a consumer running in a
    thread, ready (subscribed); stopped and joined when the test ends."""
    from itap_stream.adapters.metrics import Metrics
    from itap_stream.app.service import build_consumer

    running = []

    def start(settings, metrics=None, clock=time.time):
        consumer = build_consumer(settings, metrics=metrics or Metrics(), clock=clock)
        ready = threading.Event()
        thread = threading.Thread(target=consumer.run, kwargs={"ready": ready}, daemon=True)
        thread.start()
        assert ready.wait(15)
        running.append((consumer, thread))
        return consumer

    yield start
    for consumer, thread in running:
        consumer.stop()
        thread.join(20)
