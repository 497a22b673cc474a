"""docker-compose.yml, the Dockerfile and the broker config agree with the service's settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

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


def test_compose_broker_gets_the_acl_and_password_file_and_services_log_in():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    mounts = dict(v.split(":", 1) for v in services["mosquitto"]["volumes"])
    conf = _directives((ROOT / "mosquitto" / "mosquitto.conf").read_text())
    assert conf["allow_anonymous"] == "false"
    for name in ("acl", "passwd"):  # mounted read-only where mosquitto.conf looks for them
        target = mounts[f"./mosquitto/{name}"]
        assert target.endswith(":ro")
        assert conf[{"acl": "acl_file", "passwd": "password_file"}[name]] == target.removesuffix(":ro")
    users = _acl(ROOT / "mosquitto" / "acl")[1]
    for service, user, variable in (("consumer", "itap-consumer", "ITAP_CONSUMER_PASSWORD"),
                                    ("simulator", "itap-simulator", "ITAP_SIMULATOR_PASSWORD")):
        env = services[service]["environment"]
        assert env["ITAP_BROKER_USERNAME"] == user and user in users
        # mosquitto.conf ties each account to one client id: the consumer publishes on its own account
        out = env.get("ITAP_BROKER_OUT_USERNAME", f"{user}-out")
        assert service != "consumer" or (out == "itap-consumer-out" and out in users)
        # the password comes from the environment or the gitignored .env, and compose stops without it
        assert re.fullmatch(r"\$\{" + variable + r":\?.*mosquitto/README\.md\}", env["ITAP_BROKER_PASSWORD"])
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "mosquitto/passwd" in ignored and ".env" in ignored
    readme = (ROOT / "mosquitto" / "README.md").read_text()
    for word in ("itap passwd mosquitto/passwd", "ITAP_CONSUMER_PASSWORD", "ITAP_SIMULATOR_PASSWORD",
                 "ITAP_BROKER_USERNAME", "ITAP_BROKER_PASSWORD_FILE", "ITAP_TLS_CA", "ITAP_TLS_CERT", "mqtts://",
                 "itap-consumer-out", "ITAP_BROKER_OUT_USERNAME", "use_username_as_clientid", "autosave_interval",
                 "--stdin mosquitto/passwd itap-consumer itap-consumer-out"):
        assert word in readme, word


def _directives(text: str) -> dict[str, str]:
    """The active ``key value`` lines of a mosquitto config (the last one of a key wins)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out[key] = value.strip()
    return out


def _acl(path: Path) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """``(patterns, {user: [(access, topic)]})`` of a mosquitto ACL file."""
    patterns: list[tuple[str, str]] = []
    users: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            current = users.setdefault(words[1], [])
            continue
        access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
        assert words[0] in ("topic", "pattern") and access in ("read", "write", "readwrite", "deny"), line
        assert words[0] == "topic" or current is None, f"{line!r}: patterns belong before the first user line"
        (patterns if words[0] == "pattern" else current).append((access, topic))
    return patterns, users


def _allowed(acl: tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]], user: str, access: str,
             topic: str) -> bool:
    """mosquitto 2's decision: the user's deny lines, then its grants, then the patterns
    (``%u`` = username) for every user (the order test_security.py checks on a real broker)."""
    patterns, users = acl
    own = users.get(user, [])
    if any(a == "deny" and topic_matches_sub(t, topic) for a, t in own):
        return False
    lines = own + [(a, t.replace("%u", user)) for a, t in patterns]
    return any(a in (access, "readwrite") and topic_matches_sub(t, topic) for a, t in lines)


@pytest.mark.parametrize(
    ("user", "access", "topic", "allowed"),
    [
        ("DEV-0001", "write", "itap/telemetry/DEV-0001", True),
        ("DEV-0001", "write", "itap/telemetry/DEV-0002", False),
        ("DEV-0001", "read", "itap/telemetry/DEV-0001", False),
        ("DEV-0001", "write", "itap/alerts/DEV-0001", False),
        ("DEV-0001", "write", "itap/commands/ack", False),
        ("itap-consumer", "read", "itap/telemetry/DEV-0001", True),
        ("itap-consumer", "read", "itap/commands/reload", True),
        ("itap-consumer", "write", "itap/alerts/DEV-0001", True),
        ("itap-consumer", "write", "itap/deadletter", True),
        ("itap-consumer", "write", "itap/status/commands", True),
        ("itap-consumer", "write", "itap/status/consumer/itap-consumer-1", True),
        ("itap-consumer", "write", "itap/telemetry/itap-consumer", False),
        ("itap-consumer", "write", "itap/commands/ack", False),
        ("itap-consumer-out", "write", "itap/alerts/DEV-0001", True),
        ("itap-consumer-out", "write", "itap/deadletter", True),
        ("itap-consumer-out", "write", "itap/status/consumer/itap-consumer-1", True),
        ("itap-consumer-out", "write", "itap/status/commands", True),
        ("itap-consumer-out", "read", "itap/telemetry/DEV-0001", False),
        ("itap-consumer-out", "read", "itap/commands/ack", False),
        ("itap-consumer-out", "write", "itap/telemetry/itap-consumer-out", False),
        ("itap-consumer-out", "write", "itap/telemetry/DEV-0001", False),
        ("itap-consumer-out", "write", "itap/commands/ack", False),
        ("itap-operator", "read", "itap/alerts/DEV-0001", True),
        ("itap-operator", "read", "itap/status/commands", True),
        ("itap-operator", "read", "itap/telemetry/DEV-0001", False),
        ("itap-operator", "write", "itap/telemetry/itap-operator", False),
        ("itap-operator", "write", "itap/alerts/DEV-0001", False),
        ("itap-operator", "write", "itap/commands/ack", False),
        ("itap-operator", "read", "itap/deadletter", False),
        ("itap-engineer", "read", "itap/alerts/DEV-0001", True),
        ("itap-engineer", "read", "itap/status/commands", True),
        ("itap-engineer", "read", "itap/deadletter", True),
        ("itap-engineer", "write", "itap/commands/silence", True),
        ("itap-engineer", "write", "itap/telemetry/itap-engineer", False),
        ("itap-engineer", "write", "itap/alerts/DEV-0001", False),
        ("itap-simulator", "write", "itap/telemetry/DEV-0042", True),
        ("itap-simulator", "write", "itap/alerts/DEV-0042", False),
        ("itap-simulator", "read", "itap/telemetry/DEV-0042", False),
    ],
)
def test_acl_grants_each_role_what_mosquitto_readme_describes(user, access, topic, allowed):
    assert _allowed(_acl(ROOT / "mosquitto" / "acl"), user, access, topic) is allowed


def test_prometheus_in_compose_scrapes_the_consumers_metrics_port():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prom = compose["services"]["prometheus"]
    assert any(v.startswith("./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml") for v in prom["volumes"])
    assert any(v.split(":")[0] in compose["volumes"] for v in prom["volumes"] if not v.startswith("./"))
    scrape = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    port = compose["services"]["consumer"]["environment"]["ITAP_HTTP_ADDR"].rsplit(":", 1)[1]
    assert targets == [f"consumer:{port}"]
    # the consumer answers only Host names it knows (DNS rebinding): the scrape target's must be one
    allowed = compose["services"]["consumer"]["environment"]["ITAP_HTTP_ALLOWED_HOSTS"].split(",")
    assert "consumer" in [h.strip() for h in allowed]
    if shutil.which("promtool"):  # Debian's prometheus package brings it
        check = subprocess.run(["promtool", "check", "config", str(ROOT / "prometheus" / "prometheus.yml")],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert "\nUSER " in text and "USER root" not in text
    assert "HEALTHCHECK" in text and "http://127.0.0.1:9108/healthz" in text
    for path in ("itap_stream", "simulator", "configs"):
        assert f"COPY {path}" in text


def test_broker_config_keeps_a_slow_consumers_backlog():
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text()
    assert "max_queued_messages 1000000" in conf and "persistence true" in conf


def test_broker_config_saves_while_running_and_ties_client_ids_to_accounts():
    text = (ROOT / "mosquitto" / "mosquitto.conf").read_text()
    conf = _directives(text)
    # a kill -9 loses at most the last autosave interval (2 s with mosquitto 2.0), not the whole state
    assert conf["persistence"] == "true" and conf.get("autosave_on_changes", "false") == "false"
    assert 0 < int(conf["autosave_interval"]) <= 2
    # a listener setting: every listener, the commented TLS one too, is followed by it
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line.lstrip("#").startswith("listener "):
            assert lines[i + 1] == ("#" if line.startswith("#") else "") + "use_username_as_clientid true", line


def test_compose_restarts_services_and_starts_them_once_the_broker_is_healthy():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    broker, consumer, simulator = services["mosquitto"], services["consumer"], services["simulator"]
    for service in (broker, consumer):
        assert service["restart"] == "unless-stopped"
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    listener = _directives((ROOT / "mosquitto" / "mosquitto.conf").read_text())["listener"]
    assert " ".join(broker["healthcheck"]["test"][1:]).endswith(f" {listener}")  # the port it listens on
    port = consumer["environment"]["ITAP_HTTP_ADDR"].rsplit(":", 1)[1]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(consumer["healthcheck"]["test"])
    for service in (consumer, simulator):
        assert service["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}
    # the image's HEALTHCHECK asks the consumer's HTTP port: the simulator has none
    assert simulator["healthcheck"] == {"disable": True}


def test_broker_config_tls_example_is_complete_and_commented_out():
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text()
    for line in ("#listener 8883", "#cafile /mosquitto/config/certs/", "#certfile /mosquitto/config/certs/",
                 "#keyfile /mosquitto/config/certs/", "#require_certificate true"):
        assert line in conf, line
    assert "mosquitto/certs/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_validates_the_file():
    env = os.environ | {"ITAP_CONSUMER_PASSWORD": "x", "ITAP_SIMULATOR_PASSWORD": "y"}  # normally from .env
    proc = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],  # noqa: S603,S607
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_compose_mounts_configs_publishes_the_broker_on_loopback_and_the_image_reaches_postgresql():
    """Issue 16, point 10: rules hot-reload from the checkout (configs/ mounted), the plain
    MQTT port is not exposed beyond this host, the build context leaves secrets and data out,
    and the image carries the PostgreSQL driver."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "./configs:/app/configs:ro" in services["consumer"]["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ITAP_CONFIG=/app/configs/itap.yaml" in dockerfile
    assert 'pip install --no-cache-dir ".[postgres]"' in dockerfile
    assert all(str(p).startswith("127.0.0.1:") for p in services["mosquitto"]["ports"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".env", "*.db", "tests", "mosquitto"):
        assert entry in ignored
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("psycopg2") for dep in extras["postgres"])
    readme = (ROOT / "README.md").read_text()
    containers = readme.split("\n## Containers", 1)[1].split("\n## ", 1)[0]
    assert "chown 1883:1883 mosquitto/passwd" in containers and "docker compose up" in containers
