"""The MQTT adapter (paho-mqtt): connect, subscribe on every (re)connect, enqueue, publish.

Callbacks do nothing but enqueue: ``on_message`` puts ``(topic, payload, received_at)``
in a bounded `Inbox` that the processing loop drains in micro-batches. When the inbox is
full, ``on_message`` blocks, which stops paho reading the socket: back-pressure reaches
the broker instead of memory growing without limit.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from itap_stream.config import BrokerAddress, parse_broker_url
from itap_stream.errors import BrokerError

__all__ = ["Inbox", "Message", "MqttLink", "Will", "connect_client"]

log = logging.getLogger(__name__)

Message = tuple[str, bytes, float]  # topic, payload, received at (time.time())


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
        self._in_bytes = 0  # written by the producer only
        self._out_bytes = 0  # written by the consumer only

    def __len__(self) -> int:
        return len(self._items)

    @property
    def pending_bytes(self) -> int:
        return self._in_bytes - self._out_bytes

    def put(self, item: Message) -> None:
        """Append; blocks (polling every millisecond) while the inbox is full."""
        items = self._items
        while len(items) >= self.maxsize or (items and self._in_bytes - self._out_bytes >= self.max_bytes):
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


class _Client(paho.Client):
    """paho's client with buffered socket reads (see `_BufferedSocket`)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        try:
            # alerts are small packets that must leave now, not wait for Nagle's algorithm
            # to batch them with the next PUBACK (measured: p50 publish -> alert 20 ms -> see bench/)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not a TCP socket (unix socket, some proxies)
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
        clean_session: bool = True,
        keepalive: int = 30,
        on_connection: Callable[[bool], None] | None = None,
        tls_ca: str | None = None,
        announce: bool = True,
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
        c = _Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(1000)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        if self.address.username:
            c.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            c.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *_a: self.subscribed.set()
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self.keepalive = keepalive

    # -- callbacks: no logic beyond bookkeeping and enqueueing
    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error("broker %s:%s refused the connection: %s", self.address.host, self.address.port, rc)
            return
        if self._ever_connected:
            log.warning("reconnected to broker %s:%s", self.address.host, self.address.port)
        self._ever_connected = True
        if self.subscriptions:
            # one SUBSCRIBE for all filters: `start` returns once the broker acknowledged it,
            # so nothing published after that is missed
            client.subscribe(list(self.subscriptions))
        else:
            self.subscribed.set()
        if self.birth is not None and self._announce:
            client.publish(self.birth.topic, self.birth.payload, qos=self.birth.qos, retain=self.birth.retain)
        self.connected.set()
        if self._on_connection:
            self._on_connection(True)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected.clear()
        if self._on_connection:
            self._on_connection(False)
        if getattr(rc, "value", rc) != 0:
            log.warning("disconnected from broker: %s (reconnecting with backoff)", rc)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self.inbox is not None:
            self.inbox.put((msg.topic, msg.payload, time.time()))

    # -- lifecycle
    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; raises `BrokerError` if unreachable."""
        try:
            self.client.connect(self.address.host, self.address.port, keepalive=self.keepalive)
        except (OSError, ValueError) as exc:
            msg = f"cannot reach MQTT broker at {self.address.host}:{self.address.port}: {exc}"
            raise BrokerError(msg) from exc
        self.client.loop_start()
        if not self.connected.wait(timeout_s) or not self.subscribed.wait(timeout_s):
            self.client.loop_stop()
            msg = f"MQTT broker at {self.address.host}:{self.address.port} did not accept the connection within {timeout_s:.0f}s"
            raise BrokerError(msg)

    def announce(self) -> None:
        """Publish ``birth`` now and on every reconnect from here on (for a link whose
        readiness depends on something else, such as the intake process)."""
        self._announce = True
        if self.birth is not None and self.connected.is_set():
            self.publish(self.birth.topic, self.birth.payload, qos=self.birth.qos, retain=self.birth.retain)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def unsubscribe_all(self) -> None:
        for topic, _qos in self.subscriptions:
            self.client.unsubscribe(topic)
        self.subscriptions = []

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


def connect_client(
    url: str, client_id: str, *, setup: Callable[[paho.Client], None] | None = None, what: str = ""
) -> paho.Client:
    """A plain paho client for short-lived tools (simulator, `itap alerts`): credentials and
    TLS from the URL, ``setup`` (callbacks, limits) applied before connecting, network
    thread started; `BrokerError` when the broker cannot be reached."""
    addr = parse_broker_url(url)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    if addr.username:
        client.username_pw_set(addr.username, addr.password)
    if addr.tls:
        client.tls_set()
    if setup is not None:
        setup(client)
    try:
        client.connect(addr.host, addr.port, keepalive=30)
    except OSError as exc:
        msg = f"{what + ' ' if what else ''}cannot reach MQTT broker at {addr.host}:{addr.port}: {exc}"
        raise BrokerError(msg) from exc
    client.loop_start()
    return client
