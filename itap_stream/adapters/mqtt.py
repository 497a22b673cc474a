"""The MQTT adapter (paho-mqtt): connect, subscribe on every (re)connect, enqueue, publish.

Callbacks do nothing but enqueue: ``on_message`` puts ``(topic, payload, received_at,
mid, qos)`` in a bounded `Inbox` that the processing loop drains in micro-batches. When
the inbox is full, ``on_message`` blocks, which stops paho reading the socket:
back-pressure reaches the broker instead of memory growing without limit.

Delivery: the subscribing link keeps a persistent session (MQTT 5: clean start off and a
session expiry; MQTT 3.1.1: clean session off) and acknowledges a message only when the
caller says so (`MqttLink.ack`, after the store committed it). The broker sends at most
``receive_max`` unacknowledged messages, so a slow store slows intake, and whatever was
not acknowledged when the consumer died is delivered again.

Retained messages are not intake: a retained copy of a reading or a command was handled
when it was published, so the link asks the broker not to send retained messages on
subscribe (MQTT 5 Retain Handling 2), and acknowledges and drops any that still come
(MQTT 3.1.1 sends them at every subscribe), counting them in ``retained_ignored``.

Reconnecting: every ``FAST_RECONNECT_DELAY_S`` for the first ``FAST_RECONNECT_ATTEMPTS``
attempts (a restarted broker is back within a second or two, and the consumer should be
subscribed again at once), then with doubling pauses up to ``RECONNECT_MAX_DELAY_S``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from itap_stream.config import BrokerAddress, parse_broker_url
from itap_stream.errors import BrokerError

__all__ = ["BrokerAuth", "Inbox", "Message", "MqttLink", "Will", "connect_client"]

log = logging.getLogger(__name__)

# topic, payload, received at (time.time()), ack token, qos, dup (1: the broker delivers it again)
Message = tuple[str, bytes, float, int, int, int]

#: Longest pause between reconnect attempts (paho doubles it from 1 s up to this).
RECONNECT_MAX_DELAY_S = 10
#: Pause between the first reconnect attempts after a connection is lost ...
FAST_RECONNECT_DELAY_S = 0.25
#: ... for this many failed attempts (5 s), then the backoff of 1, 2, 4 ... RECONNECT_MAX_DELAY_S.
FAST_RECONNECT_ATTEMPTS = 20
#: At most one warning per topic level (``itap/telemetry``, ``itap/commands``) this often
#: about retained messages ignored.
RETAINED_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class BrokerAuth:
    """Credentials and TLS for a broker connection (secrets come from env or files, never the repo).

    ``username``/``password`` override those of the broker URL. TLS is on for
    ``mqtts://`` URLs or when ``tls_ca`` is set: the broker's certificate must chain to
    ``tls_ca`` (the system CAs when empty) and match its host name; ``tls_cert`` and
    ``tls_key`` give a client certificate.
    """

    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def apply(self, client: paho.Client, address: BrokerAddress) -> None:
        user = self.username or address.username
        if user:
            client.username_pw_set(user, self.password if self.password is not None else address.password)
        if address.tls or self.tls_ca:
            for what, path in (("tls_ca", self.tls_ca), ("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
                if path and not os.path.isfile(path):
                    msg = f"{what} file not found: {path}"
                    raise BrokerError(msg)
            try:
                client.tls_set(ca_certs=self.tls_ca or None, certfile=self.tls_cert or None,
                               keyfile=self.tls_key or None, cert_reqs=ssl.CERT_REQUIRED)
            except (ssl.SSLError, OSError, ValueError) as exc:
                msg = f"cannot set up TLS for the broker connection: {exc}"
                raise BrokerError(msg) from exc


class Inbox:
    """A bounded FIFO of messages ``(topic, payload, received_at)`` between paho's network
    thread and the processing loop.

    `queue.Queue` takes a lock and notifies a condition for every item; at tens of
    thousands of messages a second that is a measurable share of the consumer. Here
    `put` is a ``deque.append`` (atomic) and wakes the reader only when it sleeps, and
    `drain` takes a whole micro-batch at once. The bound is in messages and in payload
    bytes, so a backlog of large array payloads cannot take the memory of a small box.

    Examples
    --------
    >>> box = Inbox(maxsize=10)
    >>> for i in range(3):
    ...     box.put(("t", b"x" * i, 0.0))
    >>> [m[1] for m in box.drain(max_items=2, wait_s=0.0, linger_s=0.0)], len(box), box.pending_bytes
    ([b'', b'x'], 1, 2)
    """

    def __init__(self, maxsize: int = 100_000, max_bytes: int = 64 << 20) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._items: deque[Message] = deque()
        self._ready = threading.Event()
        self._closed = False
        self._in_bytes = 0  # written by the producer only
        self._out_bytes = 0  # written by the consumer only

    def __len__(self) -> int:
        return len(self._items)

    @property
    def pending_bytes(self) -> int:
        return self._in_bytes - self._out_bytes

    def close(self) -> None:
        """From now on `put` drops what it is given instead of blocking (shutting down)."""
        self._closed = True

    def put(self, item: Message) -> None:
        """Append; blocks (polling every millisecond) while the inbox is full, unless closed."""
        items = self._items
        while len(items) >= self.maxsize or (items and self._in_bytes - self._out_bytes >= self.max_bytes):
            if self._closed:
                return
            self._ready.set()
            time.sleep(0.001)
        items.append(item)
        self._in_bytes += len(item[1])
        if not self._ready.is_set():
            self._ready.set()

    def drain(self, max_items: int, wait_s: float, linger_s: float, max_bytes: int = 0) -> list[Message]:
        """Up to ``max_items`` messages: wait at most ``wait_s`` for the first, then at most
        ``linger_s`` more for the batch to fill. With ``max_bytes``, the batch also ends
        once its payloads reach that size (a batch of large array payloads stays small
        in memory)."""
        items = self._items
        if not items:
            self._ready.clear()
            if not items and not self._ready.wait(wait_s):
                return []
        out: list[Message] = []
        pop = items.popleft
        deadline = time.monotonic() + linger_s
        size = 0
        limit = max_bytes or 1 << 62
        try:
            while True:
                for _ in range(min(len(items), max_items - len(out))):
                    item = pop()
                    out.append(item)
                    size += len(item[1])
                    if size >= limit:
                        return out
                if len(out) >= max_items or time.monotonic() >= deadline:
                    return out
                self._ready.clear()
                if not items:
                    self._ready.wait(max(0.0, deadline - time.monotonic()))
        finally:
            self._out_bytes += size


#: Packets paho handles from the read buffer before it looks at its outgoing queue.
READ_BURST = 64


class _BufferedSocket:
    """Serves paho's many small reads (1 byte of header, then the rest) from one large
    ``recv``: a message costs no system call of its own, and paho's network thread
    gives up the GIL once per socket read instead of several times per message."""

    def __init__(self, sock: Any, chunk: int = 256 * 1024) -> None:
        self._sock = sock
        self._chunk = chunk
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        avail = len(self._buf) - self._pos
        if avail == 0:
            data = self._sock.recv(max(n, self._chunk))
            if len(data) <= n:
                return data
            self._buf, self._pos, avail = data, 0, len(data)
        take = min(n, avail)
        out = self._buf[self._pos : self._pos + take]
        self._pos += take
        return out

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def pending(self) -> int:
        # paho skips select() while this is non-zero (it is how it handles TLS buffers)
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return self.buffered() + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


#: ``(topic, payload, mid, qos, dup, retain)``: a received PUBLISH without an MQTTMessage
RawHandler = Callable[[str, bytes, int, int, bool, bool], None]


class _Client(paho.Client):
    """paho's client with buffered socket reads (see `_BufferedSocket`) and, when
    ``raw_handler`` is set, a lean path for received QoS 0/1 PUBLISH packets.

    paho builds an ``MQTTMessage`` for every message, runs it through its topic-filter
    callback table under two locks and, over MQTT 5, parses the PUBLISH properties into a
    new ``Properties`` object: measured, that doubled the intake's cost per message on
    MQTT 5 (bench/README.md). A publish without properties (what devices send) is decoded
    here in a few slices and handed to ``raw_handler``; anything else (properties, QoS 2,
    a topic that is not UTF-8) takes paho's own path.
    """

    raw_handler: RawHandler | None = None

    def _handle_publish(self) -> Any:
        handler = self.raw_handler
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if handler is None or qos == 2:
            return super()._handle_publish()
        packet = self._in_packet["packet"]
        try:
            end = 2 + ((packet[0] << 8) | packet[1])
            topic = packet[2:end].decode("utf-8")
            mid = 0
            if qos:
                mid = (packet[end] << 8) | packet[end + 1]
                end += 2
            if self._protocol == paho.MQTTv5:
                if packet[end] != 0:  # properties: paho parses them
                    return super()._handle_publish()
                end += 1
        except (IndexError, UnicodeDecodeError):
            return super()._handle_publish()  # malformed or odd: paho's checks and errors
        if not topic:
            return super()._handle_publish()
        payload = bytes(memoryview(packet)[end:])
        try:
            handler(topic, payload, mid, qos, bool(header & 0x08), bool(header & 0x01))
        except Exception:  # noqa: BLE001 - as paho does with on_message: never the network thread's end
            log.exception("handling a message on %s failed", topic[:200])
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return paho.MQTT_ERR_SUCCESS

    def _create_socket(self) -> Any:
        sock: Any = super()._create_socket()  # a socket, an SSL socket or a proxy's socket
        # OSError/AttributeError: not a TCP socket (unix socket, some proxies)
        with contextlib.suppress(OSError, AttributeError):
            # alerts are small packets that must leave now, not wait for Nagle's algorithm
            # to batch them with the next PUBACK (measured: p50 publish -> alert 20 ms -> see bench/)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _BufferedSocket(sock)

    def loop_read(self, max_packets: int = 1) -> Any:
        # up to READ_BURST packets from the buffer per call: paho's loop then runs its
        # select() (timeout 0 while data is buffered) and sends what waits, such as an
        # alert, instead of finishing a whole 256 KiB read first
        rc = super().loop_read(max_packets)
        sock = self._sock
        burst = 1
        while (
            rc == paho.MQTT_ERR_SUCCESS and burst < READ_BURST and isinstance(sock, _BufferedSocket) and sock.buffered()
        ):
            rc = super().loop_read(max_packets)
            sock = self._sock
            burst += 1
        return rc


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttLink:
    """One paho client: the single owner of the broker connection.

    Parameters
    ----------
    url
        ``mqtt://[user:pass@]host[:port]`` or ``mqtts://…``.
    client_id
        Stable id (a persistent session needs it).
    subscriptions
        ``(topic filter, qos)`` pairs, (re)subscribed in ``on_connect``.
    inbox
        Where messages go; None = no subscription handling.
    persistent
        Keep the session (subscriptions and unacknowledged or queued QoS 1 messages) on
        the broker while disconnected, for ``session_expiry_s`` (MQTT 5), and
        acknowledge received messages only through `ack`.
    protocol
        5 (MQTT 5, the default) or 4 (MQTT 3.1.1, for brokers without MQTT 5).
    receive_max
        Unacknowledged messages the broker may send at once (MQTT 5 Receive Maximum).
    outbox_max
        Publications held while the broker is away (sent on reconnect); beyond it a
        publish is refused (`publish` returns False) and counted by the caller.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        inbox: Inbox | None = None,
        will: Will | None = None,
        birth: Will | None = None,
        persistent: bool = False,
        keepalive: int = 30,
        on_connection: Callable[[bool], None] | None = None,
        auth: BrokerAuth | None = None,
        announce: bool = True,
        protocol: int = 5,
        session_expiry_s: float = 86400.0,
        receive_max: int = 10_000,
        outbox_max: int = 100_000,
        watch: dict[str, Callable[[bytes], None]] | None = None,
    ) -> None:
        self.address: BrokerAddress = parse_broker_url(url)
        self._announce = announce  # publish ``birth`` on (re)connect; False until `announce()`
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.inbox = inbox
        self.birth = birth
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._ever_connected = False
        self._on_connection = on_connection
        self.persistent = persistent
        self.protocol = protocol
        self._epoch = 0  # connection number: part of each message's ack token
        self.connect_failures = 0  # failed (re)connection attempts
        self.retained_ignored = 0  # retained copies acknowledged and dropped (written by paho's thread only)
        self._retained_logged: dict[str, float] = {}  # topic level -> when a warning last named it
        if protocol not in (4, 5):
            msg = f"MQTT protocol must be 5 or 4 (3.1.1), got {protocol}"
            raise BrokerError(msg)
        if protocol == 5:
            c = _Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                        manual_ack=persistent)
            props = Properties(PacketTypes.CONNECT)
            if persistent:
                props.SessionExpiryInterval = int(session_expiry_s)
                props.ReceiveMaximum = max(1, min(65535, receive_max))
            self._connect_kw: dict[str, Any] = {"clean_start": not persistent, "properties": props}
        else:
            c = _Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                        protocol=paho.MQTTv311, manual_ack=persistent)
            self._connect_kw = {}
        c.max_queued_messages_set(outbox_max)
        c.max_inflight_messages_set(1000)
        _reconnect_schedule(c, fast=True)
        (auth or BrokerAuth()).apply(c, self.address)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.raw_handler = self._on_publish
        self.client = c
        self.keepalive = keepalive
        self.refusal: str | None = None  # why the broker refused the connection, if it did
        #: topics read on the side (QoS 0, each (re)connect), each payload handed to its
        #: callback in paho's thread; a refused one is logged, never fatal
        self.watch = dict(watch or {})
        self._watch_mids: set[int] = set()

    # -- callbacks: no logic beyond bookkeeping and enqueueing
    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.refusal = str(rc)
            log.error("broker %s:%s refused the connection: %s", self.address.host, self.address.port, rc)
            return
        self.refusal = None
        if self.connect_failures >= FAST_RECONNECT_ATTEMPTS:
            _reconnect_schedule(client, fast=True)  # the next loss starts with fast attempts again
        self.connect_failures = 0
        self._epoch += 1  # acknowledgements of messages from an earlier connection are not sent on this one
        if self._ever_connected:
            log.warning("%s reconnected to broker %s:%s", self.client_id, self.address.host, self.address.port)
        self._ever_connected = True
        if self.subscriptions:
            # one SUBSCRIBE for all filters: `start` returns once the broker acknowledged it,
            # so nothing published after that is missed
            if self.protocol == 5:  # no retained copies on subscribe: they are no new readings or commands
                client.subscribe([(topic, SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
                                  for topic, qos in self.subscriptions])
            else:
                client.subscribe(list(self.subscriptions))
        else:
            self.subscribed.set()
        for topic in self.watch:
            _rc, mid = client.subscribe(topic, qos=0)
            if mid is not None:
                self._watch_mids.add(mid)
        if self.birth is not None and self._announce:
            client.publish(self.birth.topic, self.birth.payload, qos=self.birth.qos, retain=self.birth.retain)
        self.connected.set()
        if self._on_connection:
            self._on_connection(True)

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        bad = [str(c) for c in codes if getattr(c, "is_failure", False) or getattr(c, "value", 0) >= 0x80]
        if _mid in self._watch_mids:
            self._watch_mids.discard(_mid)
            if bad:
                log.info("%s: the broker does not let us read %s (%s); not watched", self.client_id,
                         ", ".join(self.watch), ", ".join(bad))
            return
        if bad:
            self.refusal = f"subscription refused: {', '.join(bad)}"
            log.error("broker %s:%s refused the subscription to %s: %s", self.address.host, self.address.port,
                      [t for t, _q in self.subscriptions], ", ".join(bad))
        self.subscribed.set()

    def _on_connect_fail(self, client: paho.Client, _u: Any) -> None:
        self.connect_failures += 1
        if self.connect_failures < FAST_RECONNECT_ATTEMPTS:
            _reconnect_schedule(client, fast=True)  # the next attempt after FAST_RECONNECT_DELAY_S again
        elif self.connect_failures == FAST_RECONNECT_ATTEMPTS:
            _reconnect_schedule(client, fast=False)
        if self.connect_failures in (1, 2, 5) or self.connect_failures % 10 == 0:
            log.warning("%s: broker %s:%s unreachable (attempt %d); retrying every %gs for %d attempts, then with "
                        "backoff up to %ss", self.client_id, self.address.host, self.address.port,
                        self.connect_failures, FAST_RECONNECT_DELAY_S, FAST_RECONNECT_ATTEMPTS, RECONNECT_MAX_DELAY_S)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._epoch += 1  # from now on no acknowledgement of this connection's messages goes out
        self.connected.clear()
        self.subscribed.clear()
        if self._on_connection:
            self._on_connection(False)
        if getattr(rc, "value", rc) != 0:
            log.warning("%s disconnected from broker: %s (reconnecting with backoff)", self.client_id, rc)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        # paho types the payload bytes | bytearray, but decodes it with struct.unpack: bytes
        self._on_publish(msg.topic, cast(bytes, msg.payload), msg.mid, msg.qos, msg.dup, msg.retain)

    def _on_publish(self, topic: str, payload: bytes, mid: int, qos: int, dup: bool, retain: bool) -> None:
        """A received message (paho's network thread): from `_Client`'s lean path, or from
        paho's ``on_message`` for the rest."""
        seen = self.watch.get(topic)
        if seen is not None:
            try:
                seen(payload)
            except Exception:  # noqa: BLE001 - a watched value must never stop the network thread
                log.exception("%s: handling %s failed", self.client_id, topic)
            return
        if self.inbox is not None:
            if retain:  # a retained copy sent on subscribe, not a new message
                self._drop_retained(topic, mid, qos)
                return
            # the ack token is the packet id plus the connection it came on: after a reconnect
            # the broker sends unacknowledged messages again (same ids) and may give a freed id
            # to a new message, so an acknowledgement is only valid on its own connection
            self.inbox.put((topic, payload, time.time(), (self._epoch << 16) | mid, qos, int(dup)))

    def _drop_retained(self, topic: str, mid: int, qos: int) -> None:
        """Acknowledge and count a retained copy instead of enqueueing it: the reading or
        command was handled when it was published, and a device's retained reading would
        otherwise come back as a ``duplicate`` dead letter at every restart."""
        if self.persistent and qos > 0:
            self.client.ack(mid, qos)
        self.retained_ignored += 1
        level = topic.rsplit("/", 1)[0]
        now = time.monotonic()
        if now - self._retained_logged.get(level, -RETAINED_LOG_INTERVAL_S) >= RETAINED_LOG_INTERVAL_S:
            self._retained_logged[level] = now
            log.warning("%s: ignored the retained message on %s (%d retained message(s) ignored so far); readings "
                        "and commands must be published with retain off", self.client_id, topic,
                        self.retained_ignored)

    def ack(self, acks: Sequence[tuple[int, int]]) -> None:
        """Acknowledge received messages ``(token, qos)`` in the order they arrived (after
        they were committed); QoS 0 messages need none, and messages of an earlier
        connection none either (the broker has delivered them again)."""
        if not self.persistent:
            return
        epoch = self._epoch
        for token, qos in acks:
            if qos > 0 and token >> 16 == epoch:
                self.client.ack(token & 0xFFFF, qos)

    # -- lifecycle
    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; raises `BrokerError` if unreachable."""
        try:
            self.client.connect(self.address.host, self.address.port, keepalive=self.keepalive, **self._connect_kw)
        except (OSError, ValueError) as exc:
            msg = f"cannot reach MQTT broker at {self.address.host}:{self.address.port}: {exc}"
            raise BrokerError(msg) from exc
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not (self.connected.is_set() and self.subscribed.is_set()) and self.refusal is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if self.refusal is not None or not (self.connected.is_set() and self.subscribed.is_set()):
            self.client.loop_stop()
            self.client.disconnect()
            why = self.refusal or f"did not accept the connection within {timeout_s:.0f}s" + (
                " (if it speaks only MQTT 3.1.1, set mqtt_version: 4)" if self.protocol == 5 else "")
            msg = f"MQTT broker at {self.address.host}:{self.address.port}: {why}"
            raise BrokerError(msg)

    def announce(self) -> None:
        """Publish ``birth`` now and on every reconnect from here on (for a link whose
        readiness depends on something else, such as the intake process)."""
        self._announce = True
        if self.birth is not None and self.connected.is_set():
            self.publish(self.birth.topic, self.birth.payload, qos=self.birth.qos, retain=self.birth.retain)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        """Publish now, or hold it until the broker is back (QoS 1); False when the outbox is full."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc != paho.MQTT_ERR_QUEUE_SIZE

    @property
    def outbox(self) -> int:
        """Publications not yet acknowledged by the broker (held while it is away)."""
        return len(self.client._out_messages)  # noqa: SLF001 - paho has no public accessor

    def stop(self, final: Will | None = None) -> None:
        """Publish ``final`` (e.g. the offline status), disconnect cleanly, stop the thread."""
        if final is not None and self.connected.is_set():
            info = self.client.publish(final.topic, final.payload, qos=final.qos, retain=final.retain)
            try:
                info.wait_for_publish(timeout=3)
            except (RuntimeError, ValueError):
                log.warning("could not publish %s before disconnecting", final.topic)
        self.client.disconnect()
        self.client.loop_stop()


def _reconnect_schedule(client: paho.Client, *, fast: bool) -> None:
    """Pause ``FAST_RECONNECT_DELAY_S`` before the next reconnect attempt (``fast``), or
    back off from 1 s, doubling up to ``RECONNECT_MAX_DELAY_S``. paho restarts its
    schedule from ``min_delay`` whenever it is set."""
    # paho types the delays int, but waits with float arithmetic (time.sleep): 0.25 s works
    min_delay = cast(int, FAST_RECONNECT_DELAY_S) if fast else 1
    client.reconnect_delay_set(min_delay=min_delay, max_delay=RECONNECT_MAX_DELAY_S)


def connect_client(
    url: str,
    client_id: str,
    *,
    setup: Callable[[paho.Client], None] | None = None,
    what: str = "",
    auth: BrokerAuth | None = None,
) -> paho.Client:
    """A plain paho client for short-lived tools (simulator, `itap alerts`): credentials and
    TLS from the URL and ``auth``, ``setup`` (callbacks, limits) applied before connecting,
    network thread started; `BrokerError` when the broker cannot be reached."""
    addr = parse_broker_url(url)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    (auth or BrokerAuth()).apply(client, addr)
    if setup is not None:
        setup(client)
    answered = threading.Event()
    outcome: list[Any] = []
    user_on_connect = client.on_connect

    def on_connect(c: paho.Client, *args: Any) -> None:
        rc = args[2] if len(args) > 2 else None
        outcome.append(rc)
        answered.set()
        if user_on_connect is not None and not getattr(rc, "is_failure", False):
            user_on_connect(c, *args)

    client.on_connect = on_connect
    user_on_disconnect = client.on_disconnect

    def on_disconnect(c: paho.Client, *args: Any) -> None:
        if not answered.is_set():  # closed before any CONNACK (e.g. a TLS client certificate refused)
            outcome.append("the connection was closed before the broker answered")
            answered.set()
        if user_on_disconnect is not None:
            user_on_disconnect(c, *args)

    client.on_disconnect = on_disconnect
    try:
        client.connect(addr.host, addr.port, keepalive=30)
    except OSError as exc:
        msg = f"{what + ' ' if what else ''}cannot reach MQTT broker at {addr.host}:{addr.port}: {exc}"
        raise BrokerError(msg) from exc
    client.loop_start()
    refused = None
    if not answered.wait(10):
        refused = "no answer within 10 s"
    elif isinstance(outcome[0], str) or getattr(outcome[0], "is_failure", False):
        refused = str(outcome[0])
    if refused is not None:
        client.loop_stop()
        client.disconnect()
        msg = f"{what + ' ' if what else ''}MQTT broker at {addr.host}:{addr.port} refused the connection: {refused}"
        raise BrokerError(msg)
    return client
