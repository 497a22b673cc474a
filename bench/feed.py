"""A publisher that costs almost no CPU: MQTT PUBLISH packets encoded up front and
written straight to a socket, so the benchmark measures the subscriber, not the feeder.

Only what a benchmark feeder needs of MQTT 3.1.1 is here (CONNECT, PUBLISH at QoS 0/1,
reading and discarding the broker's PUBACKs); the product itself talks MQTT through
paho-mqtt.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Sequence

__all__ = ["RawPublisher", "encode_publish"]


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def encode_publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    """One PUBLISH packet.

    Examples
    --------
    >>> encode_publish("a/b", b"hi")
    b'0\\x07\\x00\\x03a/bhi'
    >>> encode_publish("a/b", b"hi", qos=1, packet_id=5)[:2]
    b'2\\t'
    """
    body = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _packet(0x30 | (qos << 1), body)


class RawPublisher:
    """One TCP connection to the broker that writes pre-encoded packets.

    PUBACKs (QoS 1) are read and counted by a background thread, so `wait_acked`
    can tell when the broker has taken every message.
    """

    def __init__(self, host: str, port: int, client_id: str = "itap-bench-feed") -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 600) + _utf8(client_id)
        self.sock.sendall(_packet(0x10, body))
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            msg = f"broker refused the benchmark feeder: {connack!r}"
            raise ConnectionError(msg)
        self.acked = 0
        self._closed = False
        self._reader = threading.Thread(target=self._read_acks, name="feed-acks", daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                msg = "broker closed the connection"
                raise ConnectionError(msg)
            buf += chunk
        return buf

    def _read_acks(self) -> None:
        # PUBACK is 4 bytes (0x40 0x02 id id); nothing else arrives on this connection
        pending = 0
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += len(data)
            self.acked += pending // 4
            pending %= 4

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_paced(self, chunks: Sequence[bytes], interval_s: float, sent_at: list[float] | None = None) -> None:
        """Send one chunk every ``interval_s`` (absolute schedule, no drift); record send times."""
        t0 = time.perf_counter()
        wall0 = time.time()
        for i, chunk in enumerate(chunks):
            due = t0 + i * interval_s
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if sent_at is not None:
                sent_at.append(wall0 + (time.perf_counter() - t0))
            self.sock.sendall(chunk)

    def wait_acked(self, n: int, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.acked < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()
