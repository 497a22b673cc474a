"""Telemetry intake in a child process: paho's per-message Python work off the GIL.

paho-mqtt spends about 25 µs of Python per received message (packet parsing, message
objects, callbacks). In the consumer process that time competes for the GIL with
decoding, scoring and the store writer, and the benchmark showed the consumer at half
the bare subscriber's rate. Here a child process owns the subscribing connection (stable
client id, persistent session, manual acknowledgement) and hands micro-batches of raw
messages ``(topic, payload, received_at, mid, qos)`` to the consumer over a pipe; the
consumer sends back the ``(mid, qos)`` of messages once their readings are committed,
and only then does the child acknowledge them to the broker. The consumer keeps its own
connection for publishing alerts, dead letters and status.

Protocol (child -> consumer): ``ready``, ``error``, ``conn`` (up/down), ``batch``,
``retained`` (retained messages ignored so far), ``stopped``. (consumer -> child): ``ack``,
``stop`` (forward nothing more), ``close`` (acknowledgements are done: disconnect, keeping
the session). A reader thread in the child takes the consumer's messages, so
acknowledgements never wait behind a full pipe.
The child also exits when the pipe closes (the consumer died): what it did not
acknowledge stays with the broker and is delivered again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from itap_stream.adapters.mqtt import BrokerAuth, Inbox, Message, MqttLink, Will
from itap_stream.errors import BrokerError

__all__ = ["Receiver"]

log = logging.getLogger(__name__)

#: Payload bytes the intake process holds before paho stops reading the socket.
CHILD_INBOX_BYTES = 4 << 20


class Receiver:
    """The consumer's side of the intake process; `drain` has the `Inbox` signature.

    Parameters
    ----------
    url, client_id, subscriptions
        As for `MqttLink`; the child keeps a persistent session under ``client_id``.
    on_connection
        Called in the consumer (from `drain`) when the intake connection goes up or down.
    auth, protocol, session_expiry_s, receive_max
        Passed to the child's `MqttLink`.
    birth, will
        Published by the intake connection on every connect / by the broker when it is
        lost (the Sparkplug host application's ``STATE``); ``will`` is also published on
        a clean close.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        *,
        on_connection: Callable[[bool], None] | None = None,
        queue_max: int = 100_000,
        log_level: str = "INFO",
        auth: BrokerAuth | None = None,
        protocol: int = 5,
        session_expiry_s: float = 86400.0,
        receive_max: int = 10_000,
        birth: Will | None = None,
        will: Will | None = None,
    ) -> None:
        self._on_connection = on_connection
        ctx = multiprocessing.get_context("spawn")  # no inherited threads or sockets
        self._conn, child_end = ctx.Pipe(duplex=True)
        params = {
            "url": url,
            "client_id": client_id,
            "subscriptions": list(subscriptions),
            "queue_max": queue_max,
            "log_level": log_level,
            "auth": auth,
            "protocol": protocol,
            "session_expiry_s": session_expiry_s,
            "receive_max": receive_max,
            "birth": birth,
            "will": will,
        }
        self._proc = ctx.Process(target=_child_main, args=(child_end, params), name="itap-receiver", daemon=True)
        self._child_end = child_end
        self._carry: list[Message] = []
        self._send_lock = threading.Lock()
        self.stopped = False  # the child forwards nothing more (asked to stop, or gone)
        self.gone = False  # the child's pipe closed
        self.retained_ignored = 0  # retained messages the child acknowledged and dropped (`MqttLink`)

    def __len__(self) -> int:
        return len(self._carry)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the child and wait until it is subscribed; raises `BrokerError` if it cannot connect."""
        self._proc.start()
        self._child_end.close()
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._conn.poll(left):
                self._kill()
                msg = f"the MQTT intake process did not connect within {timeout_s:.0f}s"
                raise BrokerError(msg)
            kind, data = self._recv()
            if kind == "ready":
                return
            if kind == "batch":  # a backlog from our session can arrive before the SUBACK
                self._carry.extend(data[0])
                continue
            if kind == "error":
                self._kill()
                raise BrokerError(data)
            if kind == "gone":
                self._kill()
                msg = f"the MQTT intake process ended while connecting (exit code {self._proc.exitcode})"
                raise BrokerError(msg)
            self._handle(kind, data)

    def _send(self, kind: str, data: Any) -> bool:
        with self._send_lock:
            try:
                self._conn.send((kind, data))
                return True
            except (OSError, ValueError, BrokenPipeError):
                return False

    def ack(self, acks: Sequence[tuple[int, int]]) -> None:
        """Have the child acknowledge ``(mid, qos)`` messages (called once they are committed;
        any thread). Lost when the child is gone: the broker then delivers them again."""
        if acks and not self.gone:
            self._send("ack", list(acks))

    def _recv(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()  # type: ignore[no-any-return]
        except (EOFError, OSError):
            self.stopped = self.gone = True
            return "gone", None

    def _handle(self, kind: str, data: Any) -> None:
        if kind == "conn" and self._on_connection is not None:
            self._on_connection(bool(data))
        elif kind == "retained":
            self.retained_ignored = int(data)
        elif kind == "stopped":
            self.stopped = True
        elif kind == "gone":
            log.error("the MQTT intake process ended unexpectedly (exit code %s)", self._proc.exitcode)

    def drain(self, max_items: int, wait_s: float, linger_s: float, max_bytes: int = 0) -> list[Message]:
        """Up to ``max_items`` messages: wait at most ``wait_s`` for the first batch from the
        child, then take further batches for at most ``linger_s``."""
        out, self._carry = self._carry, []
        size = sum(len(m[1]) for m in out)
        deadline = time.monotonic() + linger_s if out else None
        limit = max_bytes or 1 << 62
        while len(out) < max_items and size < limit and not self.stopped:
            timeout = wait_s if deadline is None else deadline - time.monotonic()
            if timeout < 0 or not self._conn.poll(max(0.0, timeout)):
                break
            kind, data = self._recv()
            if kind == "batch":
                msgs, nbytes = data
                out.extend(msgs)
                size += nbytes
                if deadline is None:
                    deadline = time.monotonic() + linger_s
            else:
                self._handle(kind, data)
        if len(out) > max_items:
            out, self._carry = out[:max_items], out[max_items:]
        return out

    def stop(self, timeout_s: float = 5.0) -> list[Message]:
        """Ask the child to forward nothing more; returns what it had already forwarded.
        The connection stays up for the acknowledgements until `close`."""
        rest: list[Message] = []
        if self._proc.is_alive() and not self.stopped:
            if not self._send("stop", None):
                self.stopped = self.gone = True
            deadline = time.monotonic() + timeout_s
            while not self.stopped and time.monotonic() < deadline:
                rest += self.drain(1 << 30, wait_s=max(0.0, deadline - time.monotonic()), linger_s=0.0)
        rest = self._carry + rest
        self._carry = []
        return rest

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the child send the acknowledgements it was given, disconnect (the session
        stays on the broker) and exit."""
        if not self.stopped:
            self.stop(timeout_s)
        if not self.gone:
            self._send("close", None)
        self._proc.join(timeout=timeout_s)
        if self._proc.is_alive():
            self._kill()
        if not self._conn.closed:
            self._conn.close()
        self.gone = True

    def _kill(self) -> None:
        """End the child for good (it ignores SIGTERM: the consumer decides when it stops)."""
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self.gone = self.stopped = True
        self._conn.close()


def _child_main(conn: Any, params: dict[str, Any]) -> None:
    """The intake process: paho into an `Inbox`, the inbox drained into the pipe."""
    # the consumer decides when intake stops (it drains first); Ctrl-C reaches the whole
    # process group, so the child must not die of it before the hand-over
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=params["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = threading.Lock()

    def send(kind: str, data: Any) -> None:
        with lock:
            conn.send((kind, data))

    # a small buffer: the pipe and the consumer's micro-batch hold the rest, and what the
    # consumer cannot take yet should wait in the broker, not in this process's memory
    inbox = Inbox(maxsize=params["queue_max"], max_bytes=CHILD_INBOX_BYTES)
    link = MqttLink(
        params["url"],
        params["client_id"],
        subscriptions=params["subscriptions"],
        inbox=inbox,
        persistent=True,
        on_connection=lambda up: _quiet(send, "conn", up),
        auth=params["auth"],
        protocol=params["protocol"],
        session_expiry_s=params["session_expiry_s"],
        receive_max=params["receive_max"],
        birth=params.get("birth"),
        will=params.get("will"),
    )
    stop, close = threading.Event(), threading.Event()

    def forward() -> None:
        # runs from before the connection: a broker with a backlog for our session sends it
        # at once, ahead of the SUBACK that `link.start` waits for, and paho must not block
        # on a full inbox meanwhile
        retained = 0
        try:
            while not stop.is_set():
                batch = inbox.drain(4096, wait_s=0.05, linger_s=0.0, max_bytes=1 << 20)
                if batch:
                    send("batch", (batch, sum(len(m[1]) for m in batch)))
                if link.retained_ignored != retained:
                    retained = link.retained_ignored
                    send("retained", retained)
            # forwarded messages are acknowledged once committed; the rest stay unacknowledged
            # in the session and come again with the next connection
            send("stopped", None)
        except (EOFError, OSError, BrokenPipeError):
            pass  # the consumer is gone: nothing to hand over to
        # until the consumer has sent its last acknowledgements, keep paho's thread from
        # blocking on a full inbox (it must write those acknowledgements): what arrives now
        # is dropped unacknowledged, and the broker delivers it again next time
        while not close.wait(0.05):
            inbox.drain(1 << 30, wait_s=0.0, linger_s=0.0)
        inbox.close()

    def read_commands() -> None:
        # acknowledgements arrive in commit order, which is the order of arrival
        try:
            while True:
                kind, data = conn.recv()
                if kind == "ack":
                    link.ack(data)
                elif kind == "stop":
                    stop.set()
                elif kind == "close":
                    break
        except (EOFError, OSError):
            pass  # the consumer is gone: what was not acknowledged is delivered again later
        except Exception:  # noqa: BLE001 - a reader that dies silently would stall every acknowledgement
            log.exception("intake command reader failed; closing the intake")
        finally:
            stop.set()
            close.set()

    forwarder = threading.Thread(target=forward, name="itap-receiver-forward", daemon=True)
    forwarder.start()
    try:
        link.start()
    except BrokerError as exc:
        stop.set()
        close.set()
        forwarder.join(timeout=1.0)
        _quiet(send, "error", str(exc))
        return
    reader = threading.Thread(target=read_commands, name="itap-receiver-commands", daemon=True)
    reader.start()
    send("ready", None)
    forwarder.join()  # ends once the consumer said close (or went away)
    reader.join(timeout=1.0)
    link.stop(final=params.get("will"))  # paho writes what it queued (the acknowledgements) before its thread ends


def _quiet(send: Callable[[str, Any], None], kind: str, data: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        send(kind, data)
