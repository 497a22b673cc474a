"""docker-compose.yml, the Dockerfile and the broker config agree with the service's settings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from itap_stream.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_and_environment_match_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"mosquitto", "consumer", "simulator"} <= set(services)
    known = {f"ITAP_{name.upper()}" for name in Settings.__dataclass_fields__}
    for name in ("consumer", "simulator"):
        env = services[name].get("environment", {})
        assert set(env) <= known, f"{name}: unknown settings {set(env) - known}"
        assert env["ITAP_BROKER_URL"] == "mqtt://mosquitto:1883"
    consumer = services["consumer"]
    port = consumer["environment"]["ITAP_HTTP_ADDR"].rsplit(":", 1)[1]
    assert any(p.endswith(f":{port}") for p in consumer["ports"])
    mounts = {v.split(":")[1] for v in consumer["volumes"]}
    assert consumer["environment"]["ITAP_DB_URL"].removeprefix("sqlite:///").rsplit("/", 1)[0] in mounts
    assert consumer["environment"]["ITAP_MODEL_PATH"].rsplit("/", 1)[0] in mounts
    broker_mounts = services["mosquitto"]["volumes"]
    assert any(v.startswith("./mosquitto/mosquitto.conf:") for v in broker_mounts)
    assert (ROOT / "mosquitto" / "mosquitto.conf").is_file()


def test_prometheus_in_compose_scrapes_the_consumers_metrics_port():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prom = compose["services"]["prometheus"]
    assert any(v.startswith("./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml") for v in prom["volumes"])
    assert any(v.split(":")[0] in compose["volumes"] for v in prom["volumes"] if not v.startswith("./"))
    scrape = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    port = compose["services"]["consumer"]["environment"]["ITAP_HTTP_ADDR"].rsplit(":", 1)[1]
    assert targets == [f"consumer:{port}"]
    if shutil.which("promtool"):  # Debian's prometheus package brings it
        check = subprocess.run(["promtool", "check", "config", str(ROOT / "prometheus" / "prometheus.yml")],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER " in text and "USER root" not in text
    assert "HEALTHCHECK" in text and "/metrics" in text
    for path in ("itap_stream", "simulator", "configs"):
        assert f"COPY {path}" in text


def test_broker_config_keeps_a_slow_consumers_backlog():
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text()
    assert "max_queued_messages 1000000" in conf and "persistence true" in conf


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_validates_the_file():
    proc = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)  # noqa: S603,S607
    assert proc.returncode == 0, proc.stderr
