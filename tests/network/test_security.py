"""Broker security against a real mosquitto: the shipped mosquitto.conf and ACL, password
files written by `itap passwd`, TLS with a CA and client certificates made here with openssl.

Each "never arrives" check publishes the forbidden message first and an allowed marker
after it; mosquitto handles a client's packets in order and has routed (or dropped) the
forbidden one before it acknowledges it, so once the marker is in, the verdict is final.

The shipped config has ``use_username_as_clientid``: one account is one connection, and a
second login with the same account takes the first one over. So no test publishes as an
account while a reader of that account is connected; the consumer publishes as
``itap-consumer-out``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import _wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from itap_stream.adapters.broker import BrokerHandle, start_broker
from itap_stream.adapters.mqtt import BrokerAuth, Inbox, MqttLink, Will, connect_client
from itap_stream.app.passwd import hash_password, verify_password
from itap_stream.cli import main
from itap_stream.config import PACKAGE_CONFIGS, load, parse_broker_url
from itap_stream.errors import BrokerError

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
)
ACCOUNTS = ("itap-consumer", "itap-consumer-out", "itap-operator", "itap-engineer", "itap-simulator", "DEV-0001",
            "DEV-0002")

pytestmark = [pytest.mark.network, pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")]
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _deployment_conf(passwd: Path, acl: Path, *, tls: Path | None = None, require_certificate: bool = False) -> str:
    """mosquitto/mosquitto.conf as compose runs it, on a free port and with local paths.

    With ``tls`` (a folder holding ca.crt, server.crt, server.key) the commented TLS
    listener example of that file replaces the plain listener.
    """
    text = (ROOT / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    if tls is not None:
        text = text.replace("listener 1883\nuse_username_as_clientid true\n", "")
        text = "\n".join(
            line[1:] if line.startswith("#") and line[1:2].strip() and (
                not line.startswith("#require_certificate") or require_certificate
            ) else line
            for line in text.splitlines()
        ) + "\n"
        text = text.replace("listener 8883", "listener {port} {host}").replace("/mosquitto/config/certs/", f"{tls}/")
    else:
        text = text.replace("listener 1883", "listener {port} {host}")
    text = (
        text.replace("/mosquitto/config/passwd", str(passwd))
        .replace("/mosquitto/config/acl", str(acl))
        .replace("/mosquitto/data/", "{dir}/")
        .replace("log_dest stdout", "log_dest stderr")
    )
    active = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert not [line for line in active if "/mosquitto/config/" in line or "/mosquitto/data/" in line], active
    assert sum(line.startswith("listener ") for line in active) == 1, active
    # Started as root, mosquitto drops to the `mosquitto` user before it reads the password
    # file and keys, which are 0600 and ours here; `user root` keeps it as the test's user.
    # (In compose, the file must belong to the image's uid 1883: see mosquitto/README.md.)
    return text + "user root\n"


def _itap_passwd(path: Path, *users: str, stdin: str | None = None) -> dict[str, str]:
    """Run `itap passwd` like a shell would; returns the ``USER PASSWORD`` lines it printed."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["passwd", *(["--stdin"] if stdin is not None else []), str(path), *users]
    old_stdin = sys.stdin
    try:
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        sys.stdin = old_stdin
    assert rc == 0, err.getvalue()
    return dict(line.split(" ", 1) for line in out.getvalue().splitlines())


@pytest.fixture(scope="module")
def accounts(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A password file made by `itap passwd` for every role, and the passwords it printed;
    the consumer's two accounts share one password, as mosquitto/README.md makes them."""
    path = tmp_path_factory.mktemp("auth") / "passwd"
    passwords = _itap_passwd(path, *ACCOUNTS)
    shared = passwords["itap-consumer"]
    _itap_passwd(path, "itap-consumer", "itap-consumer-out", stdin=f"{shared}\n{shared}\n")
    return path, passwords | {"itap-consumer-out": shared}


@pytest.fixture(scope="module")
def secured(accounts) -> tuple[BrokerHandle, dict[str, str]]:
    """mosquitto with the shipped config and ACL (mosquitto/acl) and the `itap passwd` file."""
    passwd, passwords = accounts
    handle = start_broker(conf=_deployment_conf(passwd, ROOT / "mosquitto" / "acl"))
    yield handle, passwords
    handle.stop()


def _auth(user: str, passwords: dict[str, str], **tls: str) -> BrokerAuth:
    return BrokerAuth(username=user, password=passwords[user], **tls)


class Collector:
    """A client logged in as one account, recording every message on its topic filters."""

    def __init__(self, url: str, auth: BrokerAuth, *topics: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        ready = threading.Event()

        def setup(c):
            c.on_connect = lambda cl, *_a: cl.subscribe([(t, 1) for t in topics])
            c.on_subscribe = lambda *_a: ready.set()
            c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))

        self.client = connect_client(url, f"t-sub-{auth.username}-{time.monotonic_ns()}", setup=setup, auth=auth)
        assert ready.wait(10)

    def payloads(self) -> list[bytes]:
        return [p for _t, p in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Session:
    """A consumer-like session of one account: MQTT 5, clean start off, kept an hour, QoS 1
    subscriptions. `disconnect` keeps the session, and the broker queues for it meanwhile.
    ``kicked`` holds the reason codes of connections the broker closed (no reconnect)."""

    def __init__(self, url: str, auth: BrokerAuth, client_id: str, *topics: str) -> None:
        self.url, self.auth, self.client_id, self.topics = url, auth, client_id, topics
        self.messages: list[tuple[str, bytes]] = []
        self.kicked: list[str] = []
        self.client: paho.Client | None = None

    def connect(self) -> None:
        ready = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5,
                        reconnect_on_failure=False)
        address = parse_broker_url(self.url)
        self.auth.apply(c, address)
        c.on_connect = lambda cl, *_a: cl.subscribe([(t, 1) for t in self.topics])
        c.on_subscribe = lambda *_a: ready.set()
        c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.kicked.append(str(rc)) if c is self.client else None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client = c
        c.connect(address.host, address.port, clean_start=False, properties=props)
        c.loop_start()
        assert ready.wait(10), f"{self.auth.username} did not get its subscription"

    def payloads(self) -> list[bytes]:
        return [p for _t, p in self.messages]

    def disconnect(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            c.disconnect()
            c.loop_stop()

    def end(self) -> None:
        """Disconnect and drop the session (a clean MQTT 3.1.1 login of the account)."""
        self.disconnect()
        connect_client(self.url, self.client_id, auth=self.auth).disconnect()


def _publish(url: str, auth: BrokerAuth, *messages: tuple[str, str]) -> None:
    """Publish at QoS 1 and wait for every PUBACK (a refused publish is acknowledged too)."""
    client = connect_client(url, f"t-pub-{auth.username}-{time.monotonic_ns()}", auth=auth)
    try:
        for topic, payload in messages:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(5)
            assert info.is_published(), f"no PUBACK for {topic}"
    finally:
        client.disconnect()
        client.loop_stop()


_wait = _wait_for  # the polling helper of tests/conftest.py


def test_anonymous_unknown_and_wrong_password_are_refused_the_right_one_connects(secured):
    broker, passwords = secured
    for auth in (None, BrokerAuth(username="DEV-0001", password="guess"), BrokerAuth(username="DEV-9999", password="x"),
                 BrokerAuth(username="itap-consumer", password=passwords["itap-operator"])):
        with pytest.raises(BrokerError, match="refused the connection"):
            connect_client(broker.url, "t-refused", auth=auth)
    for user in ACCOUNTS:
        client = connect_client(broker.url, f"t-ok-{user}", auth=_auth(user, passwords))
        assert client.is_connected()
        client.disconnect()
        client.loop_stop()


def test_a_device_publishes_only_to_its_own_topic(secured):
    broker, passwords = secured
    consumer = Collector(broker.url, _auth("itap-consumer", passwords), "itap/telemetry/+")
    try:
        _publish(broker.url, _auth("DEV-0001", passwords),
                 ("itap/telemetry/DEV-0002", "forged"), ("itap/telemetry/DEV-0001", "own"))
        assert _wait(lambda: b"own" in consumer.payloads())
        assert consumer.messages == [("itap/telemetry/DEV-0001", b"own")]
    finally:
        consumer.close()


def test_the_operator_reads_alerts_but_publishes_nothing(secured):
    broker, passwords = secured
    engineer = Collector(broker.url, _auth("itap-engineer", passwords), "itap/alerts/#")  # alerts, while
    consumer = Collector(broker.url, _auth("itap-consumer", passwords), "itap/telemetry/+")  # the operator publishes
    operator = None
    try:
        # itap/telemetry/itap-operator is what `pattern write itap/telemetry/%u` grants every user:
        # the operator's `topic deny itap/telemetry/#` must win over it
        _publish(broker.url, _auth("itap-operator", passwords),
                 ("itap/telemetry/DEV-0001", "forged"), ("itap/telemetry/itap-operator", "forged own"),
                 ("itap/alerts/DEV-0001", "forged alert"))
        operator = Collector(broker.url, _auth("itap-operator", passwords), "itap/alerts/#", "itap/telemetry/+")
        _publish(broker.url, _auth("DEV-0001", passwords), ("itap/alerts/DEV-0001", "forged by a device"))
        _publish(broker.url, _auth("itap-consumer-out", passwords), ("itap/alerts/DEV-0001", "real alert"))
        _publish(broker.url, _auth("DEV-0001", passwords), ("itap/telemetry/DEV-0001", "marker"))
        assert _wait(lambda: b"marker" in consumer.payloads() and b"real alert" in operator.payloads()
                     and b"real alert" in engineer.payloads())
        assert operator.messages == [("itap/alerts/DEV-0001", b"real alert")]  # and no telemetry to read
        assert engineer.payloads() == [b"real alert"]
        assert consumer.payloads() == [b"marker"]
    finally:
        for reader in (operator, engineer, consumer):
            if reader is not None:
                reader.close()


def test_service_accounts_are_no_devices_and_the_gateway_writes_for_every_device(secured):
    broker, passwords = secured
    consumer = Session(broker.url, _auth("itap-consumer", passwords), "itap-consumer-1", "itap/telemetry/+",
                       "itap/commands/#")
    consumer.connect()
    try:
        # the consumer account publishes on its reader's connection (one account, one
        # connection), which would get its own messages back if the broker routed them
        assert consumer.client is not None
        for topic in ("itap/telemetry/itap-consumer", "itap/telemetry/DEV-0001"):
            consumer.client.publish(topic, "forged by the consumer", qos=1).wait_for_publish(5)
        for user in ("itap-consumer-out", "itap-engineer"):
            _publish(broker.url, _auth(user, passwords), (f"itap/telemetry/{user}", "forged own"),
                     ("itap/telemetry/DEV-0001", "forged"))
        _publish(broker.url, _auth("itap-simulator", passwords),
                 ("itap/telemetry/DEV-0001", "gateway 1"), ("itap/telemetry/DEV-0777", "gateway 777"))
        assert _wait(lambda: b"gateway 777" in consumer.payloads())
        assert consumer.messages == [("itap/telemetry/DEV-0001", b"gateway 1"),
                                     ("itap/telemetry/DEV-0777", b"gateway 777")]
    finally:
        consumer.end()


def test_the_engineer_sends_commands_and_reads_dead_letters_devices_and_operators_cannot(secured):
    broker, passwords = secured
    consumer = Collector(broker.url, _auth("itap-consumer", passwords), "itap/commands/#")
    engineer = None
    try:
        for user in ("itap-operator", "DEV-0001", "itap-simulator", "itap-consumer-out"):
            _publish(broker.url, _auth(user, passwords), ("itap/commands/ack", f"from {user}"))
        _publish(broker.url, _auth("itap-engineer", passwords), ("itap/commands/ack", "from engineer"))
        # the engineer's reader logs in once its command is out (one account, one connection)
        engineer = Collector(broker.url, _auth("itap-engineer", passwords), "itap/deadletter", "itap/status/#")
        _publish(broker.url, _auth("itap-consumer-out", passwords),
                 ("itap/deadletter", "dead"), ("itap/status/commands", "answer"))
        assert _wait(lambda: b"from engineer" in consumer.payloads() and b"answer" in engineer.payloads())
        assert consumer.payloads() == [b"from engineer"]
        assert engineer.payloads() == [b"dead", b"answer"]
    finally:
        consumer.close()
        if engineer is not None:
            engineer.close()


def test_sparkplug_rights_the_gateway_is_an_edge_node_the_consumer_its_host(secured):
    broker, passwords = secured
    consumer = Collector(broker.url, _auth("itap-consumer", passwords), "spBv1.0/#")
    gateway = None
    try:
        # nobody but the gateway writes edge-node messages; nobody but the consumer a host's STATE
        for user in ("DEV-0001", "itap-operator", "itap-engineer", "itap-consumer-out"):
            _publish(broker.url, _auth(user, passwords), ("spBv1.0/G/DDATA/E/D1", f"forged by {user}"),
                     ("spBv1.0/STATE/itap-consumer-1", f"forged by {user}"))
        _publish(broker.url, _auth("itap-simulator", passwords), ("spBv1.0/STATE/itap-consumer-1", "forged state"),
                 ("spBv1.0/G/NCMD/E", "forged command"), ("spBv1.0/G/NBIRTH/E", "birth"),
                 ("spBv1.0/G/DDATA/E/D1", "data"))
        # the consumer's publisher asks for rebirths; the gateway reads them
        gateway = Collector(broker.url, _auth("itap-simulator", passwords), "spBv1.0/G/NCMD/E", "spBv1.0/STATE/#")
        _publish(broker.url, _auth("itap-consumer-out", passwords), ("spBv1.0/G/NCMD/E", "rebirth"))
        assert _wait(lambda: b"data" in consumer.payloads() and b"rebirth" in gateway.payloads())
        assert consumer.payloads() == [b"birth", b"data", b"rebirth"]
        assert gateway.payloads() == [b"rebirth"]
    finally:
        consumer.close()
        if gateway is not None:
            gateway.close()


def test_without_its_deny_line_the_device_pattern_would_let_the_operator_publish(accounts, tmp_path):
    """Why mosquitto/acl has `topic deny` lines: a `pattern` applies to every user, and only
    a deny of the user itself (checked before any grant) takes it back (mosquitto 2.0)."""
    passwd, passwords = accounts
    acl = ROOT / "mosquitto" / "acl"
    assert "topic deny itap/telemetry/#" in acl.read_text(encoding="utf-8")
    lax = tmp_path / "acl"
    lax.write_text("".join(line for line in acl.read_text(encoding="utf-8").splitlines(keepends=True)
                           if not line.startswith("topic deny")), encoding="utf-8")
    with start_broker(conf=_deployment_conf(passwd, lax)) as broker:
        consumer = Collector(broker.url, _auth("itap-consumer", passwords), "itap/telemetry/+")
        try:
            _publish(broker.url, _auth("itap-operator", passwords), ("itap/telemetry/itap-operator", "via pattern"))
            assert _wait(lambda: b"via pattern" in consumer.payloads())
        finally:
            consumer.close()


def test_itap_passwd_keeps_other_users_replaces_named_ones_and_mosquitto_accepts_it(tmp_path):
    path = tmp_path / "passwd"
    first = _itap_passwd(path, "itap-consumer", "DEV-0001")
    assert set(first) == {"itap-consumer", "DEV-0001"} and len(set(first.values())) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    _itap_passwd(path, "DEV-0001", "DEV-0002", stdin="chosen one\nchosen two\n")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["itap-consumer", "DEV-0001", "DEV-0002"]
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in lines)
    acl = tmp_path / "acl"
    acl.write_text("pattern write itap/telemetry/%u\n", encoding="utf-8")
    with start_broker(conf=_deployment_conf(path, acl)) as broker:
        for user, password in (("itap-consumer", first["itap-consumer"]), ("DEV-0001", "chosen one"),
                               ("DEV-0002", "chosen two")):
            client = connect_client(broker.url, f"t-{user}", auth=BrokerAuth(username=user, password=password))
            assert client.is_connected()
            client.disconnect()
            client.loop_stop()
        with pytest.raises(BrokerError, match="refused"):  # the replaced password no longer works
            connect_client(broker.url, "t-old", auth=BrokerAuth(username="DEV-0001", password=first["DEV-0001"]))


def test_itap_passwd_edits_in_place_and_a_sighup_makes_mosquitto_reload_it(tmp_path):
    """Mode, owner and inode stay (a single-file docker bind mount sees the change), and
    mosquitto takes new users on SIGHUP (`docker compose kill -s HUP mosquitto`)."""
    path = tmp_path / "passwd"
    first = _itap_passwd(path, "DEV-0001")
    path.chmod(0o640)
    inode = path.stat().st_ino
    acl = tmp_path / "acl"
    acl.write_text("pattern write itap/telemetry/%u\n", encoding="utf-8")
    with start_broker(conf=_deployment_conf(path, acl)) as broker:
        later = _itap_passwd(path, "DEV-0003")
        assert path.stat().st_ino == inode and path.stat().st_mode & 0o777 == 0o640
        with pytest.raises(BrokerError, match="refused"):  # not before the reload
            connect_client(broker.url, "t-new", auth=BrokerAuth(username="DEV-0003", password=later["DEV-0003"]))
        os.kill(broker._proc.pid, signal.SIGHUP)  # noqa: SLF001 - the test's own broker process

        def logs_in(user: str, password: str) -> bool:
            try:
                client = connect_client(broker.url, f"t-{user}", auth=BrokerAuth(username=user, password=password))
            except BrokerError:
                return False
            client.disconnect()
            client.loop_stop()
            return True

        assert _wait(lambda: logs_in("DEV-0003", later["DEV-0003"]))
        assert logs_in("DEV-0001", first["DEV-0001"])


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["DEV-0001", "DEV-0001"], None, "named more than once: DEV-0001"),
        (["a:b"], None, "username 'a:b' cannot be used"),
        (["DEV/1"], None, "username 'DEV/1' cannot be used"),
        (["a", "b"], "only one\n", "2 user(s) need 2 password line(s), got 1"),
        (["a"], "\n", "the password of 'a' must be a non-empty single line"),
    ],
)
def test_itap_passwd_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, stdin, message):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    path = tmp_path / "passwd"
    assert main(["passwd", *(["--stdin"] if stdin is not None else []), str(path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not path.exists()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_hash_format_is_the_one_mosquitto_passwd_writes(tmp_path):
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "s3cret:é"], check=True,  # noqa: S603,S607
                   capture_output=True)
    user, encoded = path.read_text(encoding="utf-8").strip().split(":", 1)
    assert user == "alice" and encoded.startswith("$7$101$")
    assert verify_password("s3cret:é", encoded) and not verify_password("s3cret", encoded)
    import base64

    salt = base64.b64decode(encoded.split("$")[3])
    assert hash_password("s3cret:é", salt=salt) == encoded  # same salt, same bytes: the same scheme


def test_cli_tools_log_in_with_the_settings_credentials(secured):
    """`itap alerts`, `itap ack`/`silence` and `itap simulate` take ITAP_BROKER_USERNAME and
    ITAP_BROKER_PASSWORD (or _FILE): the operator watches, the engineer commands, the gateway publishes."""
    from itap_stream.app.commands import send_command
    from itap_stream.app.watch import watch_alerts
    from simulator import simulate
    from simulator.transport import publish

    broker, passwords = secured

    def settings(user: str):
        return load(PACKAGE_CONFIGS / "itap.yaml", environ={"ITAP_BROKER_URL": broker.url,
                    "ITAP_BROKER_USERNAME": user, "ITAP_BROKER_PASSWORD": passwords[user]})

    alert = {"device_id": "DEV-0001", "rule": "anomaly", "severity": "WARNING", "status": "FIRING", "ts": 1.0}
    out = io.StringIO()
    shown = watch_alerts(settings("itap-operator"), out, as_json=True, count=1, timeout_s=10, on_ready=lambda: _publish(
        broker.url, _auth("itap-consumer-out", passwords), ("itap/alerts/DEV-0001", json.dumps(alert))))
    assert shown == 1 and json.loads(out.getvalue())["device_id"] == "DEV-0001"

    # a stand-in for the consumer answering commands, as the consumer account
    def answer(_c, _u, m):
        body = json.loads(m.payload)
        reply = {"request_id": body["request_id"], "ok": True}
        responder.client.publish("itap/status/commands", json.dumps(reply), qos=1)

    responder = Collector(broker.url, _auth("itap-consumer", passwords), "itap/commands/#")
    responder.client.on_message = answer
    try:
        assert send_command(settings("itap-engineer"), "ack", {"alert_id": "x"}, timeout_s=5)["ok"] is True
        with pytest.raises(BrokerError, match="May broker user 'itap-operator' publish to itap/commands/#"):
            send_command(settings("itap-operator"), "ack", {"alert_id": "x"}, timeout_s=1)
    finally:
        responder.close()

    consumer = Collector(broker.url, _auth("itap-consumer", passwords), "itap/telemetry/+")
    try:
        sim = simulate(3, 3.0, seed=1)
        sent = publish(sim, broker.url, speed=0, client_id="t-sim", auth=settings("itap-simulator").broker_auth())
        assert sent == sim.n_readings and _wait(lambda: len(consumer.messages) == sent)
        assert {t for t, _p in consumer.messages} == {"itap/telemetry/DEV-0001", "itap/telemetry/DEV-0002",
                                                       "itap/telemetry/DEV-0003"}
    finally:
        consumer.close()


@pytest.mark.parametrize("intake", ["process", "thread"])
def test_the_consumer_logs_in_and_stores_a_devices_own_telemetry_not_a_forged_one(
    secured, settings, start_consumer, wait, intake
):
    """With the intake process the consumer has two connections, itap-consumer (the session)
    and itap-consumer-out (alerts, status); with the thread intake one, itap-consumer."""
    broker, passwords = secured
    settings = settings.replace(broker_url=broker.url, broker_username="itap-consumer",
                                broker_password=passwords["itap-consumer"], intake=intake)
    consumer = start_consumer(settings)
    now = time.time()

    def reading(device: str) -> str:
        return json.dumps({"device_id": device, "ts": now, "state": "RUN", "rpm": 1500.0, "temp_c": 60.0,
                           "voltage_v": 230.0, "current_a": 10.0, "vibration_mm_s": 2.0})

    _publish(broker.url, _auth("DEV-0001", passwords),
             ("itap/telemetry/DEV-0002", reading("DEV-0002")), ("itap/telemetry/DEV-0001", reading("DEV-0001")))
    assert wait(lambda: consumer.store.count("readings") >= 1, 15)
    assert consumer.store.count("readings", device_id="DEV-0001") == 1  # the forged one came first, and never
    assert consumer.store.count("readings") == 1
    assert consumer.metrics.sample("itap_readings_received_total") == 1
    assert consumer.metrics.sample("itap_mqtt_reconnects_total") == 0  # its connections did not take each other over


# --- Identity: use_username_as_clientid -------------------------------------------------

READINGS = 50


def _takeover_attempt(broker: BrokerHandle, passwords: dict[str, str], consumer: Session) -> None:
    """DEV-0001 logs in with the consumer's client ids, clean start: the id the consumer is
    configured with and the one the broker gives it (its username)."""
    for client_id in (consumer.client_id, consumer.auth.username or ""):
        device = connect_client(broker.url, client_id, auth=_auth("DEV-0001", passwords))  # MQTT 3.1.1, clean
        device.publish("itap/telemetry/DEV-0001", f"as {client_id}", qos=1).wait_for_publish(5)
        device.disconnect()
        device.loop_stop()


def test_a_device_cannot_take_over_the_consumers_session_with_its_client_id(secured):
    """The consumer's connection stays up while a device logs in with its client id, and its
    queued messages survive the device's clean start (use_username_as_clientid)."""
    broker, passwords = secured
    consumer = Session(broker.url, _auth("itap-consumer", passwords), "itap-consumer-1", "itap/telemetry/+")
    consumer.connect()
    try:
        _takeover_attempt(broker, passwords, consumer)
        assert _wait(lambda: len(consumer.messages) == 2)  # still connected, still subscribed
        assert consumer.payloads() == [b"as itap-consumer-1", b"as itap-consumer"] and consumer.kicked == []
        consumer.disconnect()  # the session stays, and queues for it
        _publish(broker.url, _auth("DEV-0001", passwords),
                 *[("itap/telemetry/DEV-0001", f"reading {i}") for i in range(READINGS)])
        _takeover_attempt(broker, passwords, consumer)
        consumer.messages.clear()
        consumer.connect()
        assert _wait(lambda: len(consumer.messages) >= READINGS + 2)
        assert consumer.payloads() == [f"reading {i}".encode() for i in range(READINGS)] + [
            b"as itap-consumer-1", b"as itap-consumer"]
        assert consumer.kicked == []
    finally:
        consumer.end()


def test_without_use_username_as_clientid_the_device_takes_the_session_over(accounts, tmp_path):
    """What the conf line prevents: the same steps, on the shipped config without it."""
    passwd, passwords = accounts
    line = "\nuse_username_as_clientid true\n"
    conf = _deployment_conf(passwd, ROOT / "mosquitto" / "acl")
    assert line in conf
    with start_broker(conf=conf.replace(line, "\n")) as broker:
        consumer = Session(broker.url, _auth("itap-consumer", passwords), "itap-consumer-1", "itap/telemetry/+")
        consumer.connect()
        device = connect_client(broker.url, "itap-consumer-1", auth=_auth("DEV-0001", passwords))
        assert _wait(lambda: consumer.kicked != [])  # "Session taken over"
        device.disconnect()
        device.loop_stop()
        consumer.connect()
        consumer.disconnect()
        _publish(broker.url, _auth("DEV-0001", passwords),
                 *[("itap/telemetry/DEV-0001", f"reading {i}") for i in range(READINGS)])
        device = connect_client(broker.url, "itap-consumer-1", auth=_auth("DEV-0001", passwords))
        device.disconnect()
        device.loop_stop()
        consumer.connect()
        _publish(broker.url, _auth("DEV-0001", passwords), ("itap/telemetry/DEV-0001", "marker"))
        assert _wait(lambda: b"marker" in consumer.payloads())
        assert consumer.payloads() == [b"marker"]  # the 50 queued readings were wiped with the session
        consumer.disconnect()


def test_the_consumers_two_accounts_are_connected_at_once(secured):
    """The intake session as itap-consumer and the publishing link as itap-consumer-out
    (`Settings.broker_auth(out=True)`), with the consumer's client ids, status and will."""
    broker, passwords = secured
    settings = load(PACKAGE_CONFIGS / "itap.yaml", environ={
        "ITAP_BROKER_URL": broker.url, "ITAP_BROKER_USERNAME": "itap-consumer",
        "ITAP_BROKER_PASSWORD": passwords["itap-consumer"]})
    assert settings.broker_auth(out=True).username == "itap-consumer-out"
    status = settings.topic("status", "consumer", settings.client_id)
    operator = Collector(broker.url, _auth("itap-operator", passwords), "itap/alerts/#", status)
    events: dict[str, list[bool]] = {"in": [], "out": []}
    inbox = Inbox()
    intake = MqttLink(broker.url, settings.client_id, subscriptions=[("itap/telemetry/+", 1)], inbox=inbox,
                      persistent=True, auth=settings.broker_auth(), on_connection=events["in"].append)
    out = MqttLink(broker.url, f"{settings.client_id}-out", auth=settings.broker_auth(out=True),
                   will=Will(status, b"offline"), birth=Will(status, b"online"), on_connection=events["out"].append)
    try:
        intake.start()
        out.start()
        assert out.publish("itap/alerts/DEV-0001", "alert")
        _publish(broker.url, _auth("DEV-0001", passwords), ("itap/telemetry/DEV-0001", "reading"))
        assert _wait(lambda: len(inbox) == 1 and b"alert" in operator.payloads())
        assert operator.messages[:2] == [(status, b"online"), ("itap/alerts/DEV-0001", b"alert")]
        assert events == {"in": [True], "out": [True]}  # neither took the other over
    finally:
        out.stop(final=Will(status, b"offline"))
        intake.stop()
        operator.close()
        connect_client(broker.url, "t-end", auth=_auth("itap-consumer", passwords)).disconnect()  # drop the session
    assert _wait(lambda: operator.payloads()[-1:] == [b"offline"])


# --- TLS ---------------------------------------------------------------------------------

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = itap-test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)  # noqa: S603,S607
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.crt/key, server.crt/key (SAN 127.0.0.1, localhost) and client.crt/key signed by it,
    and other-ca.crt, a CA that signed none of them."""
    d = tmp_path_factory.mktemp("pki")
    cnf = d / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF, encoding="utf-8")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-config", cnf, "-extensions", "ca", *ec, "-keyout", d / f"{ca}.key",
                 "-out", d / f"{ca}.crt", "-days", "2", "-subj", f"/CN=itap test {ca}")
    for who in ("server", "client"):
        _openssl("req", "-new", "-config", cnf, *ec, "-keyout", d / f"{who}.key", "-out", d / f"{who}.csr",
                 "-subj", f"/CN=itap test {who}")
        _openssl("x509", "-req", "-in", d / f"{who}.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
                 "-extfile", cnf, "-extensions", who, "-out", d / f"{who}.crt")
    return d


@needs_openssl
def test_tls_client_trusting_the_ca_connects_one_trusting_another_ca_does_not(accounts, pki):
    passwd, passwords = accounts
    with start_broker(conf=_deployment_conf(passwd, ROOT / "mosquitto" / "acl", tls=pki), scheme="mqtts") as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):
            connect_client(broker.url, "t-wrong-ca",
                           auth=_auth("DEV-0001", passwords, tls_ca=str(pki / "other-ca.crt")))
        with pytest.raises(BrokerError):  # the system CAs do not know our test CA either
            connect_client(broker.url, "t-system-ca", auth=_auth("DEV-0001", passwords))
        with pytest.raises(BrokerError, match="refused"):  # TLS does not replace the password
            connect_client(broker.url, "t-tls-nopw", auth=BrokerAuth(tls_ca=str(pki / "ca.crt")))
        ca = str(pki / "ca.crt")
        consumer = Collector(broker.url, _auth("itap-consumer", passwords, tls_ca=ca), "itap/telemetry/+")
        try:
            _publish(broker.url, _auth("DEV-0001", passwords, tls_ca=ca), ("itap/telemetry/DEV-0001", "tls"))
            assert _wait(lambda: consumer.messages == [("itap/telemetry/DEV-0001", b"tls")])
        finally:
            consumer.close()


@needs_openssl
def test_require_certificate_lets_in_a_client_certificate_only(accounts, pki):
    passwd, passwords = accounts
    conf = _deployment_conf(passwd, ROOT / "mosquitto" / "acl", tls=pki, require_certificate=True)
    assert "\nrequire_certificate true\n" in conf
    ca = str(pki / "ca.crt")
    with start_broker(conf=conf, scheme="mqtts") as broker:
        client = connect_client(broker.url, "t-cert", auth=_auth(
            "DEV-0001", passwords, tls_ca=ca, tls_cert=str(pki / "client.crt"), tls_key=str(pki / "client.key")))
        assert client.is_connected()
        client.disconnect()
        client.loop_stop()
        # without a certificate: with TLS 1.3 the client finishes its handshake before the
        # broker checks for a certificate and hangs up, so the refusal comes as a disconnect
        with pytest.raises(BrokerError, match="refused the connection"):
            connect_client(broker.url, "t-no-cert", auth=_auth("DEV-0001", passwords, tls_ca=ca))


@needs_openssl
def test_a_server_certificate_for_another_host_name_is_refused(accounts, pki, tmp_path):
    """The CA is right but the broker's certificate names another host: the host name check fails."""
    passwd, passwords = accounts
    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    cnf = d / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF.replace("IP:127.0.0.1, DNS:localhost", "DNS:broker.elsewhere.invalid"),
                   encoding="utf-8")
    _openssl("req", "-new", "-config", cnf, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", d / "server.key", "-out", d / "server.csr", "-subj", "/CN=broker.elsewhere.invalid")
    _openssl("x509", "-req", "-in", d / "server.csr", "-CA", pki / "ca.crt", "-CAkey", pki / "ca.key",
             "-set_serial", "4242", "-days", "2", "-extfile", cnf, "-extensions", "server", "-out", d / "server.crt")
    conf = _deployment_conf(passwd, ROOT / "mosquitto" / "acl", tls=d)
    # "IP address mismatch, certificate is not valid for …"
    with start_broker(conf=conf, scheme="mqtts") as broker, pytest.raises(BrokerError, match="mismatch"):
        connect_client(broker.url, "t-wrong-host", auth=_auth("DEV-0001", passwords, tls_ca=str(d / "ca.crt")))
