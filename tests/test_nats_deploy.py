"""Issue 17, point 7: the `cluster` profile of docker-compose.yml and its nats-server configs.

The compose file keeps the plain services as they are and adds three nats-server nodes,
PostgreSQL and two consumers under the profile; every node config of nats/ passes
``nats-server -t``; and one real nats-server, started the way compose starts a node
(nats/start.sh, nats/common.conf included by a node file written here with free loopback
ports), shows what each account may do.

Each "never arrives" check publishes the forbidden message first and an allowed marker
after it on the same connection: nats-server handles a connection's packets in order, so
once the marker is in the stream the forbidden one was dropped, not late.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml

from itap_stream.adapters.broker import free_ports

ROOT = Path(__file__).resolve().parent.parent
NATS = ROOT / "nats"
PLAIN = {"mosquitto", "consumer", "simulator", "prometheus"}
NODES = ("nats-1", "nats-2", "nats-3")
CLUSTER = {*NODES, "postgres", "consumer-a", "consumer-b"}


def _nats_server() -> str | None:
    found = shutil.which("nats-server") or "/usr/sbin/nats-server"
    return found if os.access(found, os.X_OK) else None


NATS_SERVER = _nats_server()
needs_nats = pytest.mark.skipif(NATS_SERVER is None,
                                reason="nats-server is not installed (apt-get install nats-server)")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _conf_text(name: str) -> str:
    """A config of nats/ without its comment lines."""
    text = (NATS / name).read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _password_vars() -> list[str]:
    """The environment variables the configs read passwords from (``password: $VAR``)."""
    found = set()
    for path in sorted(NATS.glob("*.conf")):
        found |= set(re.findall(r"password:\s*\$([A-Za-z_][A-Za-z0-9_]*)", _conf_text(path.name)))
    return sorted(found)


ODD_PASSWORD = "dev 1;pw,with}odd#chars$"


def _passwords(*, odd: bool = True) -> dict[str, str]:
    """A test password per variable; with ``odd``, DEV-0001's holds characters nats-server's
    config language stops a bare value at (start.sh hands every value over quoted)."""
    out = {var: f"pw-{var.lower()}-x7" for var in _password_vars()}
    if odd:
        out["ITAP_DEV_0001_PASSWORD"] = ODD_PASSWORD
    return out


def _partitions() -> int:
    """P of the mapping ``{{partition(P,1)}}`` in nats/common.conf."""
    found = re.findall(r'"itap\.telemetry\.\*"\s*:\s*"itap\.part\.\{\{partition\((\d+),1\)\}\}\.\{\{wildcard\(1\)\}\}"',
                       _conf_text("common.conf"))
    assert len(found) == 1, "one mapping itap.telemetry.* -> itap.part.{{partition(P,1)}}.{{wildcard(1)}}"
    return int(found[0])


def _partition_of(device: str, partitions: int) -> int:
    """nats-server's partition(P,1): FNV-1a (32 bit) of the token, modulo P."""
    h = 0x811C9DC5
    for b in device.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def _users() -> dict[str, str]:
    """``{user: its text up to the next user}`` of nats/common.conf."""
    text = _conf_text("common.conf")
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\{\s*user:\s*([\w-]+)", text)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {name: text[start:end] for (start, name), end in zip(starts, ends, strict=True)}


def _publish_grants(block: str) -> list[str]:
    m = re.search(r"publish:\s*\{\s*allow:\s*\[([^\]]*)\]", block)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def _required(value: object) -> set[str]:
    """Variables a compose value requires (``${VAR:?message}``), anywhere inside it."""
    return set(re.findall(r"\$\{(\w+):\?", yaml.safe_dump(value)))


def _var(value: str) -> str:
    """The variable of a ``${VAR...}`` value."""
    m = re.search(r"\$\{(\w+)", value)
    assert m, value
    return m.group(1)


# -- the compose file and the configs, read


def test_compose_cluster_profile_adds_nodes_postgres_and_two_consumers_and_leaves_the_rest():
    services = _compose()["services"]
    plain = {name for name, s in services.items() if not s.get("profiles")}
    assert plain == PLAIN  # `docker compose up` starts exactly these, as before
    assert set(services) - plain == CLUSTER
    for name in CLUSTER:
        assert services[name]["profiles"] == ["cluster"], name
    # compose fills in every service's variables before it looks at profiles: only those
    # the plain services require already may be required (`:?`) by the cluster's
    assert _required({n: services[n] for n in CLUSTER}) <= _required({n: services[n] for n in PLAIN})

    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))
    nats_ports = {n: services[n].get("ports", []) for n in NODES}
    assert sum(bool(p) for p in nats_ports.values()) == 1  # one node takes the devices of this host
    assert [p for ports in nats_ports.values() for p in ports] == ["127.0.0.1:1884:1883"]  # 1883 is mosquitto's
    assert "127.0.0.1:1883:1883" in services["mosquitto"]["ports"]

    partitions, consumers = _partitions(), [services["consumer-a"], services["consumer-b"]]
    envs = [c["environment"] for c in consumers]
    assert len({e["ITAP_CLIENT_ID"] for e in envs}) == 2
    for consumer, env in zip(consumers, envs, strict=True):
        assert env["ITAP_SOURCE"] == "nats"
        assert env["ITAP_NATS_URL"].split(",") == [f"nats://{n}:4222" for n in NODES]
        assert int(env["ITAP_PARTITIONS"]) == partitions  # the servers' mapping
        assert int(env["ITAP_NATS_REPLICAS"]) == len(NODES)
        assert float(env["ITAP_TAKEOVER_AFTER"]) > 0
        assert env["ITAP_NATS_USERNAME"] == "itap-consumer" and "itap-consumer" in _users()
        assert consumer["depends_on"] == {n: {"condition": "service_healthy"} for n in (*NODES, "postgres")}
        assert consumer["command"] == ["run"] and consumer["restart"] == "unless-stopped"
        # the same model volume and configs as the single consumer; PostgreSQL is the store
        assert {"itap-models:/models", "./configs:/app/configs:ro"} <= set(consumer["volumes"])
        assert "itap-models:/models" in services["consumer"]["volumes"]
        assert env["ITAP_MODEL_PATH"] == services["consumer"]["environment"]["ITAP_MODEL_PATH"]
        assert re.fullmatch(r"postgresql://itap:\$\{ITAP_DB_PASSWORD:-\}@postgres:5432/itap", env["ITAP_DB_URL"])
        port = env["ITAP_HTTP_ADDR"].rsplit(":", 1)[1]
        assert f"http://127.0.0.1:{port}/healthz" in " ".join(consumer["healthcheck"]["test"])
    from itap_stream.config import Settings

    known = {f"ITAP_{name.upper()}" for name in Settings.__dataclass_fields__}
    for env in envs:
        assert set(env) <= known, f"unknown settings {set(env) - known}"

    pg = services["postgres"]
    assert pg["image"] == "postgres:16"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_USER"] == "itap" and pg["environment"]["POSTGRES_DB"] == "itap"
    assert pg["environment"]["POSTGRES_PASSWORD"] == "${ITAP_DB_PASSWORD:-}"
    assert pg["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert "postgres-data" in _compose()["volumes"]


def test_compose_nats_nodes_run_their_config_with_every_password_and_their_own_store():
    compose = _compose()
    services, secrets = compose["services"], _password_vars()
    assert {"ITAP_CONSUMER_PASSWORD", "ITAP_SIMULATOR_PASSWORD", "ITAP_OPERATOR_PASSWORD",
            "ITAP_DEV_0001_PASSWORD"} <= set(secrets)
    stores = set()
    for name in NODES:
        node = services[name]
        assert re.fullmatch(r"nats:\d+\.\d+\.\d+-alpine[\d.]*", node["image"])  # a pinned version, with a shell
        assert node["entrypoint"] == ["sh", "/etc/nats/start.sh"]
        assert node["command"] == [f"/etc/nats/{name}.conf"] and (NATS / f"{name}.conf").is_file()
        assert "./nats:/etc/nats:ro" in node["volumes"]
        store = next(v.split(":")[0] for v in node["volumes"] if v.endswith(":/data"))
        assert store in compose["volumes"]
        stores.add(store)
        assert node["restart"] == "unless-stopped"
        assert "http://127.0.0.1:8222/healthz" in node["healthcheck"]["test"]
        env = node["environment"]
        assert set(env) == set(secrets), f"{name}: the config's passwords and the environment differ"
        for var, value in env.items():
            assert _var(value) == var  # the same name in .env
        # the consumer logs in with the password the node knows it by
        for consumer in ("consumer-a", "consumer-b"):
            assert _var(services[consumer]["environment"]["ITAP_NATS_PASSWORD"]) == _var(env["ITAP_CONSUMER_PASSWORD"])
        # the node file: its name, common.conf, routes to the two others
        text = _conf_text(f"{name}.conf")
        assert re.search(rf"^server_name:\s*{name}\s*$", text, re.M)
        assert re.search(r"^include\s+\./common\.conf\s*$", text, re.M)
        cluster = re.search(r"cluster\s*\{(.*?)\n\}", text, re.S)
        assert cluster and re.search(r"name:\s*itap\b", cluster.group(1))
        routes = re.findall(r"nats-route://([\w-]+):6222", cluster.group(1))
        assert sorted(routes) == sorted(set(NODES) - {name})
    assert len(stores) == len(NODES)
    common = _conf_text("common.conf")
    assert re.search(r"^port:\s*4222\s*$", common, re.M) and re.search(r"mqtt\s*\{\s*port:\s*1883\s", common)
    # MQTT sessions in 3 copies: with the default (the nodes known at the first MQTT connection,
    # maybe 2) a node's loss stalls every session (tests/network/test_cluster.py)
    assert re.search(r"mqtt\s*\{[^}]*stream_replicas:\s*3\s", common)
    assert re.search(r"^http:\s*8222\s*$", common, re.M)
    assert re.search(r"store_dir:\s*/data\b", common)


def test_every_device_account_may_publish_only_its_own_telemetry_in_its_partition():
    """nats-server 2.9.10 checks an MQTT publish against the subject after the mapping, so a
    device's grant names its partition: FNV-1a of its id modulo the mapping's P."""
    partitions = _partitions()
    devices = {name: block for name, block in _users().items() if not name.startswith("itap-")}
    assert {"DEV-0001", "DEV-0002"} <= set(devices)
    for name, block in devices.items():
        assert _publish_grants(block) == [f"itap.part.{_partition_of(name, partitions)}.{name}"], name
        assert re.search(r'subscribe:\s*\{\s*deny:\s*">"\s*\}', block), name
        assert 'allowed_connection_types: ["MQTT"]' in block, name
    users = _users()
    assert _publish_grants(users["itap-simulator"]) == ["itap.part.*.*"]
    assert _publish_grants(users["itap-operator"]) == ["itap.commands.>"]
    assert not any(g.startswith(("itap.telemetry", "itap.part", "itap.commands", ">"))
                   for g in _publish_grants(users["itap-consumer"]))


@needs_nats
def test_every_node_config_passes_nats_server_check():
    nodes = sorted(p for p in NATS.glob("*.conf") if re.search(r"^server_name:", _conf_text(p.name), re.M))
    assert [p.name for p in nodes] == [f"{n}.conf" for n in NODES]
    binary = str(NATS_SERVER)

    def check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, "-t", "-c", str(path)], capture_output=True, text=True,  # noqa: S603
                              env=os.environ | env, timeout=30, check=False)

    def start_sh(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        search = f"{Path(binary).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return subprocess.run(["sh", str(NATS / "start.sh"), str(path), "-t"],  # noqa: S603,S607
                              capture_output=True, text=True, env=os.environ | env | {"PATH": search}, timeout=30,
                              check=False)

    for path in nodes:
        done = check(path, _passwords(odd=False))
        assert done.returncode == 0, f"{path.name}: {done.stdout}{done.stderr}"
        done = start_sh(path, _passwords())  # as compose starts a node: start.sh quotes the passwords
        assert done.returncode == 0, f"{path.name}: {done.stdout}{done.stderr}"
    # the passwords come from the environment: without one the config is refused
    missing = {k: v for k, v in _passwords(odd=False).items() if k != "ITAP_OPERATOR_PASSWORD"}
    done = check(nodes[0], missing)
    assert done.returncode != 0 and "ITAP_OPERATOR_PASSWORD" in done.stdout + done.stderr
    # a bare value is read as config language (why start.sh quotes): this one does not parse
    done = check(nodes[0], _passwords())
    assert done.returncode != 0 and "ITAP_DEV_0001_PASSWORD" in done.stdout + done.stderr
    # start.sh refuses what nats-server would take wrongly: an empty value ("" is a login
    # without password) and one it cannot quote
    for value in ("", 'has"quote', "back\\slash"):
        done = start_sh(nodes[0], _passwords() | {"ITAP_OPERATOR_PASSWORD": value})
        assert done.returncode != 0 and "ITAP_OPERATOR_PASSWORD" in done.stderr, (value, done)


# -- one real nats-server from nats/common.conf


@dataclass
class Server:
    nats_url: str
    mqtt_port: int
    passwords: dict[str, str]
    log: Path


@pytest.fixture
def server(tmp_path):
    """One node as compose runs it (start.sh, common.conf), alone, on free loopback ports."""
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed")
    port, mqtt_port, http_port = free_ports(3)
    node = tmp_path / "node.conf"
    # include paths are relative to the including file (an absolute one is joined to it)
    common = os.path.relpath(NATS / "common.conf", tmp_path)
    # the same keys again after the include: the last one wins
    node.write_text(f"""server_name: itap-test
include "{common}"
host: 127.0.0.1
port: {port}
http: "127.0.0.1:{http_port}"
mqtt {{ host: 127.0.0.1, port: {mqtt_port} }}
jetstream {{ store_dir: "{tmp_path / 'store'}" }}
""", encoding="utf-8")
    passwords = _passwords()
    env = os.environ | passwords | {"PATH": f"{Path(NATS_SERVER).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "nats.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["sh", str(NATS / "start.sh"), str(node)], env=env, stdout=out,  # noqa: S603,S607
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:  # /healthz answers 200 once JetStream works
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            assert time.monotonic() < deadline, "nats-server did not become healthy: " + log.read_text(errors="replace")
            time.sleep(0.05)
        yield Server(f"nats://127.0.0.1:{port}", mqtt_port, passwords, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Mqtt:
    """An MQTT 3.1.1 client (nats-server 2.9 speaks no MQTT 5) whose events can be awaited."""

    def __init__(self, server: Server, user: str, password: str | None = None, client_id: str | None = None):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[list[paho.ReasonCode]] = queue.Queue()
        self.disconnects: list[str] = []
        connacks: queue.Queue[paho.ReasonCode] = queue.Queue()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=paho.MQTTv311,
                        reconnect_on_failure=False)
        c.username_pw_set(user, server.passwords[_secret(user)] if password is None else password)
        c.on_connect = lambda _c, _u, _f, rc, _p: connacks.put(rc)
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.append(str(rc))
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.put(rcs)
        c.connect("127.0.0.1", server.mqtt_port, keepalive=30)
        c.loop_start()
        self.client = c
        self.connack = connacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=10)  # QoS 1: the PUBACK came
        assert info.is_published(), topic

    def subscribe(self, *topics: str, qos: int = 1) -> list[paho.ReasonCode]:
        self.client.subscribe([(t, qos) for t in topics])
        return self.subacks.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _secret(user: str) -> str:
    """The password variable of a user of nats/common.conf."""
    m = re.search(r"password:\s*\$(\w+)", _users()[user])
    assert m, user
    return m.group(1)


async def _consumer(server: Server, errors: list[str] | None = None):
    """A NATS connection as the consumer's account, with the consumer's stream ITAP."""
    import nats
    from nats.js.api import RetentionPolicy, StreamConfig

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    nc = await nats.connect(server.nats_url, user="itap-consumer", password=server.passwords["ITAP_CONSUMER_PASSWORD"],
                            allow_reconnect=False, error_cb=on_error)
    js = nc.jetstream(timeout=5)
    await js.add_stream(StreamConfig(name="ITAP", subjects=["itap.part.>"], retention=RetentionPolicy.WORK_QUEUE))
    return nc, js


async def _fetch_until(sub, marker: bytes, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """Messages of a pull subscription (acknowledged) until the one holding ``marker`` is in.

    Each ack waits for the server's confirmation (``ack_sync``): a plain ``ack`` is fire and
    forget, so a check of the stream right after could still see the message.
    """
    from nats.errors import TimeoutError as NatsTimeout

    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while marker not in [data for _, data in got]:
        assert time.monotonic() < deadline, f"{marker!r} did not arrive; got {got}"
        try:
            msgs = await sub.fetch(10, timeout=1)
        except (TimeoutError, NatsTimeout):
            continue
        for m in msgs:
            got.append((m.subject, m.data))
            await m.ack_sync(timeout=10)
    return got


@pytest.mark.network
def test_device_publishes_only_its_own_telemetry_and_it_lands_in_one_fixed_partition(server):
    partitions = _partitions()
    own = _partition_of("DEV-0001", partitions)
    elsewhere = (own + 1) % partitions

    async def main() -> None:
        nc, js = await _consumer(server)
        try:
            sub = await js.pull_subscribe("itap.part.>", durable="test-all", stream="ITAP")
            device = Mqtt(server, "DEV-0001")
            try:
                assert not device.connack.is_failure  # its password went through start.sh's quoting intact
                device.publish("itap/telemetry/DEV-0001", b"own-1")
                device.publish("itap/telemetry/DEV-0002", b"forged")  # another device's topic
                device.publish(f"itap/part/{elsewhere}/DEV-0001", b"wrong-partition")  # around the mapping
                device.publish("itap/telemetry/DEV-0001", b"own-2", qos=0)
                device.publish("itap/telemetry/DEV-0001", b"own-3")
                got = await _fetch_until(sub, b"own-3")
                # all of its own readings in its partition, nothing else; the refused ones got
                # their PUBACK all the same (MQTT 3.1.1 has no refusal) and the connection stays
                assert got == [(f"itap.part.{own}.DEV-0001", p) for p in (b"own-1", b"own-2", b"own-3")]
                assert device.disconnects == []
                assert [rc.is_failure for rc in device.subscribe("itap/#")] == [True]  # a device reads nothing
            finally:
                device.close()
            # the mapping is FNV-1a of the device id modulo P, for every id (the consumers'
            # partition_of computes the same); a gateway publishes for all of them
            ids = [f"DEV-{i:04d}" for i in range(1, 13)]
            gateway = Mqtt(server, "itap-simulator")
            try:
                for dev in ids:
                    gateway.publish(f"itap/telemetry/{dev}", dev.encode())
                gateway.publish("itap/alerts/DEV-0001", b"fake alert")  # no gateway business
                gateway.publish("itap/telemetry/DEV-0012", b"marker")
            finally:
                gateway.close()
            got = await _fetch_until(sub, b"marker")
            assert got == [(f"itap.part.{_partition_of(d, partitions)}.{d}", d.encode()) for d in ids] + [
                (f"itap.part.{_partition_of('DEV-0012', partitions)}.DEV-0012", b"marker")]
            assert len({s.split(".")[2] for s, _ in got}) > 1  # spread over partitions
        finally:
            await nc.close()

    asyncio.run(main())
    log = server.log.read_text(errors="replace")
    other = _partition_of("DEV-0002", partitions)
    assert f'Publish Violation - User "DEV-0001", Subject "itap.part.{other}.DEV-0002"' in log
    assert f'Publish Violation - User "DEV-0001", Subject "itap.part.{elsewhere}.DEV-0001"' in log


@pytest.mark.network
def test_logins_wrong_password_anonymous_and_devices_over_nats_are_refused(server):
    for user, password in (("DEV-0001", "not-its-password"), ("DEV-0001", ""), ("nobody", "x")):
        client = Mqtt(server, user, password)
        try:
            assert client.connack.is_failure, (user, password)
        finally:
            client.close()
    anonymous = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="anon", protocol=paho.MQTTv311,
                            reconnect_on_failure=False)
    connacks: queue.Queue[paho.ReasonCode] = queue.Queue()
    anonymous.on_connect = lambda _c, _u, _f, rc, _p: connacks.put(rc)
    anonymous.connect("127.0.0.1", server.mqtt_port)
    anonymous.loop_start()
    try:
        assert connacks.get(timeout=10).is_failure
    finally:
        anonymous.disconnect()
        anonymous.loop_stop()

    async def over_nats() -> None:
        import nats
        from nats.errors import Error as NatsError

        for user in ("DEV-0001", "itap-operator"):  # MQTT-only accounts
            with pytest.raises(NatsError, match="Authorization Violation"):
                await nats.connect(server.nats_url, user=user, password=server.passwords[_secret(user)],
                                   allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)

    asyncio.run(over_nats())


@pytest.mark.network
def test_consumer_does_its_jetstream_work_and_operators_get_alerts_and_send_commands(server):
    """What `itap run --source nats` does, with its account's rights: the stream, the lease
    bucket, a partition's durable (made, read, acknowledged, deleted), alerts and status
    out, commands in; an operator over MQTT QoS 1 reads alerts and status and sends commands."""
    from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig

    partitions = _partitions()
    p = _partition_of("DEV-0001", partitions)

    async def main() -> None:
        errors: list[str] = []
        nc, js = await _consumer(server, errors)
        operator = Mqtt(server, "itap-operator")
        device = Mqtt(server, "DEV-0001")
        try:
            kv = await js.create_key_value(KeyValueConfig(bucket="itap-leases", history=1, ttl=10))
            rev = await kv.create(f"part.{p}", b"itap-consumer-a")
            rev = await kv.update(f"part.{p}", b"itap-consumer-a", last=rev)
            await kv.put("member.itap-consumer-a", b"itap-consumer-a")
            assert (await kv.get(f"part.{p}")).value == b"itap-consumer-a"
            assert sorted(await kv.keys()) == ["member.itap-consumer-a", f"part.{p}"]
            await kv.delete(f"part.{p}", last=rev)

            durable = f"ITAP-p{p}"
            await js.add_consumer("ITAP", ConsumerConfig(durable_name=durable, filter_subject=f"itap.part.{p}.>",
                                                         ack_policy=AckPolicy.EXPLICIT))
            assert (await js.consumer_info("ITAP", durable)).num_pending == 0
            sub = await js.pull_subscribe_bind(durable=durable, stream="ITAP")
            operator.publish("itap/telemetry/DEV-0001", b"operator's fake")  # refused
            device.publish("itap/telemetry/DEV-0001", b"reading")
            assert await _fetch_until(sub, b"reading") == [(f"itap.part.{p}.DEV-0001", b"reading")]
            await nc.flush()
            # acknowledged: gone from the work queue (the removal follows the ack; wait on it)
            deadline = time.monotonic() + 10
            while (left := (await js.stream_info("ITAP")).state.messages) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert left == 0
            await js.delete_consumer("ITAP", durable)

            commands: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

            async def on_command(msg) -> None:
                await commands.put((msg.subject, msg.data))

            await nc.subscribe("itap.commands.>", cb=on_command)
            await nc.flush()
            granted = operator.subscribe("itap/alerts/#", "itap/status/#", "itap/telemetry/#", "itap/deadletter")
            assert [rc.is_failure for rc in granted] == [False, False, True, True]
            await nc.publish("itap.alerts.DEV-0001", b"alert")
            await nc.publish("itap.status.consumer.itap-consumer-a", b"online")
            await nc.flush()
            got = {operator.messages.get(timeout=10), operator.messages.get(timeout=10)}
            assert got == {("itap/alerts/DEV-0001", b"alert"), ("itap/status/consumer/itap-consumer-a", b"online")}
            operator.publish("itap/commands/ack", b"3f2c9a1b0d4e5f60")
            assert await asyncio.wait_for(commands.get(), 10) == ("itap.commands.ack", b"3f2c9a1b0d4e5f60")
            assert errors == []

            # what the consumer's account may not do: telemetry, or the MQTT sessions' streams
            await nc.publish("itap.telemetry.DEV-0001", b"fake")
            with pytest.raises(Exception):  # noqa: B017 - refused: no answer (timeout or no responders)
                await nc.request("$JS.API.STREAM.DELETE.$MQTT_sess", b"", timeout=2)
            await nc.flush()
            deadline = time.monotonic() + 10
            while len(errors) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            # (nats-py lowercases the server's message; the check is on the subject after the mapping)
            errors = [e.lower() for e in errors]
            assert f'permissions violation for publish to "itap.part.{p}.dev-0001"' in " ".join(errors), errors
            assert 'publish to "$js.api.stream.delete.$mqtt_sess"' in " ".join(errors), errors
        finally:
            operator.close()
            device.close()
            await nc.close()

    asyncio.run(main())
    log = server.log.read_text(errors="replace")
    assert f'Publish Violation - User "itap-operator", Subject "itap.part.{p}.DEV-0001"' in log
