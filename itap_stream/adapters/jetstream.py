"""Telemetry from a NATS JetStream cluster, each device's readings on exactly one consumer
(``source: nats``; README "Scaling out").

Devices keep publishing MQTT, to the nats-servers' MQTT listeners. The servers map
``{prefix}.telemetry.<device>`` to ``{prefix}.part.<p>.<device>`` with
``{{partition(P,1)}}`` (FNV-1a of the device id, modulo P: `partition_of` computes the
same), and a work-queue stream ``nats_stream`` keeps ``{prefix}.part.>`` until a
consumer acknowledges it. Partition ``p`` is read through the durable pull consumer
``{stream}-p<p>``.

Ownership: every running consumer keeps ``member.<client id>`` in the key-value bucket
``itap-leases`` and each partition it owns as ``part.<p>``; the bucket's TTL is
``takeover_after``, and the keys are renewed every third of it. The live members are
sorted and partition ``p`` belongs to member ``p % N``. A partition whose owner stopped
renewing (killed, partitioned off) expires and is taken by the member it now falls to;
a partition that falls to a new member is released by its owner once every message it
fetched from it is committed and acknowledged. A new owner first restores the devices of
the partition from the shared store (`Consumer` does that, between `changes` and
`done`), then reads the partition from the oldest unacknowledged message: it deletes the
partition's durable and makes it again (a work-queue stream keeps exactly the
unacknowledged messages), and marks the messages the previous owner had been given as
delivered again (stored once; the windows recognise them).

The class is at once the consumer's inbox (`drain`, `ack`) and its publishing link
(`publish`, `start`, `stop`): alerts, dead letters and status go to NATS subjects,
which MQTT clients of the servers receive on the usual topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from itap_stream.adapters.mqtt import Inbox, Message, Will
from itap_stream.errors import BrokerError

__all__ = ["LEASE_BUCKET", "NatsSource", "partition_of", "subject_of"]

log = logging.getLogger(__name__)

#: The key-value bucket of members and partition leases.
LEASE_BUCKET = "itap-leases"
#: Messages asked for per fetch of one partition.
FETCH_BATCH = 512
#: Unacknowledged messages JetStream hands one partition's owner at most.
MAX_ACK_PENDING = 20_000
#: Seconds JetStream waits for an acknowledgement before it delivers a message again.
ACK_WAIT_S = 60.0
#: Payload bytes fetched but not yet processed, at most (then fetching pauses).
INBOX_BYTES = 64 << 20
#: Seconds a graceful release waits for the partition's messages to be committed.
RELEASE_WAIT_S = 30.0
#: A mapping that disagrees with ``partitions`` is logged at most this often.
MISMATCH_LOG_S = 60.0


def partition_of(device_id: str, partitions: int) -> int:
    """The partition nats-server's ``{{partition(P,1)}}`` puts a device in: FNV-1a (32 bit)
    of the id's UTF-8 bytes, modulo P.

    >>> [partition_of(d, 8) for d in ("DEV-0000", "DEV-0001", "DEV-1", "DEV-2")]
    [3, 0, 6, 3]
    """
    h = 0x811C9DC5
    for b in device_id.encode("utf-8", "surrogatepass"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def subject_of(topic: str) -> str:
    """The NATS subject of an MQTT topic (nats-server's MQTT listener maps ``/`` to ``.``).

    >>> subject_of("itap/alerts/DEV-0001")
    'itap.alerts.DEV-0001'
    """
    return topic.replace("/", ".")


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int


class NatsSource:
    """The consumer's inbox and publishing link on a NATS JetStream cluster.

    Parameters
    ----------
    servers
        NATS URLs of the cluster (the client fails over between them).
    prefix
        The topic prefix (``itap``): telemetry on ``{prefix}.part.>``, commands on
        ``{prefix}.commands.>``.
    stream, partitions, replicas
        The JetStream stream (made when missing: work queue, file storage, ``replicas``
        copies, also used for the lease bucket) and P of the servers' mapping.
    client_id
        This consumer's name among the members (unique per consumer).
    takeover_after
        Seconds without renewal after which a member's leases expire.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        prefix: str,
        stream: str,
        partitions: int,
        client_id: str,
        takeover_after: float = 10.0,
        replicas: int = 1,
        user: str | None = None,
        password: str | None = None,
        queue_max: int = 100_000,
        outbox_max: int = 100_000,
        will: Will | None = None,
        birth: Will | None = None,
        on_connection: Callable[[bool], None] | None = None,
        ack_wait_s: float = ACK_WAIT_S,
    ) -> None:
        if not servers:
            raise BrokerError("nats_url names no server")
        self.servers = list(servers)
        first = urlsplit(self.servers[0] if "://" in self.servers[0] else f"nats://{self.servers[0]}")
        self.address = ServerAddress(first.hostname or "127.0.0.1", first.port or 4222)
        self.prefix, self.stream, self.partitions, self.replicas = prefix, stream, partitions, replicas
        self.client_id, self.takeover_after = client_id, takeover_after
        self.user, self.password = user, password
        self.outbox_max = outbox_max
        self.will, self.birth = will, birth
        self.on_connection = on_connection
        self.ack_wait_s = ack_wait_s
        self.inbox = Inbox(maxsize=queue_max, max_bytes=INBOX_BYTES)
        self.retained_ignored = 0  # the inbox interface: NATS has no retained messages
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="itap-nats", daemon=True)
        self._nc: Any = None
        self._js: Any = None
        self._kv: Any = None
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Any, int]] = {}  # token -> (message, partition)
        self._inflight = [0] * partitions  # per partition: fetched, not acknowledged
        self._next_token = 1
        self._leases: dict[int, int] = {}  # partition -> revision of our lease
        self._active: set[int] = set()  # partitions being fetched (restored by the consumer)
        self._waiting: list[int] = []  # leased, waiting for the consumer's restore
        self._draining: dict[int, float] = {}  # partition -> when its graceful release began
        self._lost: list[int] = []  # given up, waiting for the consumer to forget their devices
        self._release: set[int] = set()  # of those, leases to delete once forgotten (graceful)
        self._redelivered: dict[int, int] = {}  # partition -> last stream seq the previous owner was given
        self._fetchers: dict[int, asyncio.Task[None]] = {}
        self._lease_task: asyncio.Future[None] | None = None
        self._member_rev: int | None = None
        self._renewed = 0.0
        self._outbox = 0
        self._closing = False
        self._mismatch_logged = -MISMATCH_LOG_S
        self._acking: set[asyncio.Task[None]] = set()
        self._prepared: set[int] = set()  # leased partitions whose durable was made afresh
        self._renewed_at: dict[int, float] = {}  # partition -> last successful renewal (monotonic)
        self._reset: set[int] = set()  # partitions to read again from their oldest unacknowledged message
        self._kv_lock = asyncio.Lock()
        self.members: list[str] = []

    # -- the inbox interface
    def __len__(self) -> int:
        return len(self.inbox)

    def drain(self, max_items: int, wait_s: float, linger_s: float, max_bytes: int = 0) -> list[Message]:
        """Up to ``max_items`` messages (`Inbox.drain`), without those of partitions lost meanwhile."""
        msgs = self.inbox.drain(max_items, wait_s, linger_s, max_bytes)
        if not msgs:
            return msgs
        with self._lock:
            pending, active = self._pending, self._active | set(self._draining)
            if len(active) == self.partitions:
                return msgs
            keep = []
            for m in msgs:
                held = pending.get(m[3]) if m[4] else None
                if held is None or held[1] in active:
                    keep.append(m)
                else:  # its partition moved on: the new owner reads it again
                    del pending[m[3]]
                    self._inflight[held[1]] -= 1
            return keep

    def ack(self, acks: Sequence[tuple[int, int]]) -> None:
        """Acknowledge messages (tokens from `drain`) once their readings are committed (any thread)."""
        msgs = []
        with self._lock:
            for token, qos in acks:
                if not qos:
                    continue
                held = self._pending.pop(token, None)
                if held is not None:
                    msgs.append(held[0])
                    self._inflight[held[1]] -= 1
        if msgs and not self._closed_loop():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: delivered again
                self._loop.call_soon_threadsafe(self._spawn_ack, msgs)

    def close(self) -> None:
        """Fetch nothing more (stopping); what was not handed over stays in the stream."""
        self._closing = True
        self.inbox.close()
        if not self._closed_loop():
            self._loop.call_soon_threadsafe(self._cancel_fetchers)

    # -- the partitions, for the consumer
    def owned(self) -> set[int]:
        """Partitions this consumer reads now."""
        with self._lock:
            return set(self._active)

    def changes(self) -> tuple[list[int], list[int]]:
        """``(gained, lost)``: partitions leased and waiting for their devices' restore, and
        partitions given up whose devices the consumer must forget. Answer with `done`."""
        with self._lock:
            gained, self._waiting = self._waiting, []
            lost, self._lost = self._lost, []
            return gained, lost

    def done(self, gained: Sequence[int], lost: Sequence[int]) -> None:
        """The consumer restored ``gained`` (fetching starts) and forgot ``lost`` (a
        graceful release deletes the lease now, so the next owner can take it)."""
        if gained or lost:
            self._call(self._done(list(gained), list(lost)), timeout_s=30.0)

    # -- the link interface
    @property
    def outbox(self) -> int:
        return self._outbox

    def start(self, timeout_s: float = 30.0) -> None:
        """Connect, make the stream and the lease bucket when missing, subscribe to the
        commands and begin taking partitions; `BrokerError` when the cluster cannot be used."""
        self._thread.start()
        try:
            self._call(self._start(timeout_s), timeout_s=timeout_s + 5.0)
        except BrokerError:
            self._stop_loop()
            raise

    def announce(self) -> None:
        """Nothing to do: the birth message goes out in `start`."""

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> bool:
        """Publish on the subject of an MQTT topic (MQTT subscribers of the servers get it on
        ``topic``); False when ``outbox_max`` messages already wait for the connection."""
        if self._outbox >= self.outbox_max or self._closed_loop():
            return False
        data = payload.encode() if isinstance(payload, str) else payload
        with self._lock:
            self._outbox += 1
        try:
            self._loop.call_soon_threadsafe(self._spawn, self._publish(subject_of(topic), data))
        except RuntimeError:  # stopped meanwhile
            with self._lock:
                self._outbox -= 1
            return False
        return True

    def stop(self, final: Will | None = None) -> None:
        """Publish ``final`` (our status), give the leases back, disconnect."""
        if self._thread.is_alive():
            with contextlib.suppress(BrokerError):
                self._call(self._shutdown(final), timeout_s=10.0)
        self._stop_loop()

    # -- internals (the loop thread)
    def _closed_loop(self) -> bool:
        return self._loop.is_closed() or not self._thread.is_alive()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        task.add_done_callback(_log_failure)

    def _spawn_ack(self, msgs: list[Any]) -> None:
        task = self._loop.create_task(self._ack_all(msgs))
        self._acking.add(task)
        task.add_done_callback(self._acking.discard)

    def _call(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout_s)
        except TimeoutError as exc:
            fut.cancel()
            raise BrokerError(f"NATS operation timed out after {timeout_s:.0f}s") from exc

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    async def _start(self, timeout_s: float) -> None:
        import nats
        from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import BucketNotFoundError, NotFoundError

        async def disconnected() -> None:
            if self.on_connection is not None:
                self.on_connection(False)

        async def reconnected() -> None:
            if self.on_connection is not None:
                self.on_connection(True)

        async def error(exc: Exception) -> None:
            log.warning("NATS connection: %s", exc)

        deadline = time.monotonic() + timeout_s
        try:
            self._nc = await nats.connect(
                servers=self.servers, user=self.user, password=self.password, name=self.client_id,
                connect_timeout=min(5.0, timeout_s), max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
                pending_size=64 << 20, allow_reconnect=True,
            )
        except Exception as exc:  # noqa: BLE001 - nats-py raises many kinds: all mean "cannot connect"
            raise BrokerError(f"cannot connect to NATS at {', '.join(self.servers)}: {exc!r}") from exc
        if self.on_connection is not None:
            self.on_connection(True)
        self._js = self._nc.jetstream()
        subjects = [f"{self.prefix}.part.>"]
        while True:  # a cluster that just started elects its JetStream leaders first
            try:
                try:
                    info = await self._js.stream_info(self.stream)
                    if info.config.subjects != subjects:
                        msg = (f"JetStream stream {self.stream} exists with subjects {info.config.subjects}, "
                               f"not {subjects}: another topic_prefix? Use another nats_stream")
                        raise BrokerError(msg)
                except NotFoundError:
                    await self._js.add_stream(StreamConfig(
                        name=self.stream, subjects=subjects, retention=RetentionPolicy.WORK_QUEUE,
                        storage=StorageType.FILE, num_replicas=self.replicas,
                    ))
                    log.info("made JetStream stream %s over %s (%d replica(s))", self.stream, subjects[0],
                             self.replicas)
                try:
                    self._kv = await self._js.key_value(LEASE_BUCKET)
                    ttl = (await self._js.stream_info(f"KV_{LEASE_BUCKET}")).config.max_age
                    if ttl and abs(ttl - self.takeover_after) > 0.5:
                        log.warning("lease bucket %s has a TTL of %.0fs, not takeover_after %.0fs: every consumer "
                                    "of the cluster must use the same takeover_after", LEASE_BUCKET, ttl,
                                    self.takeover_after)
                except BucketNotFoundError:
                    self._kv = await self._js.create_key_value(KeyValueConfig(
                        bucket=LEASE_BUCKET, history=1, ttl=self.takeover_after, replicas=self.replicas,
                        storage=StorageType.FILE,
                    ))
                break
            except BrokerError:
                raise
            except Exception as exc:  # noqa: BLE001 - leader elections answer with several error kinds
                if time.monotonic() > deadline:
                    raise BrokerError(f"JetStream is not usable on {', '.join(self.servers)}: {exc!r}") from exc
                await asyncio.sleep(0.5)
        await self._nc.subscribe(f"{self.prefix}.commands.>", cb=self._on_command)
        if self.birth is not None:
            await self._nc.publish(subject_of(self.birth.topic), self.birth.payload)
        await self._nc.flush()
        await self._renew()
        self._lease_task = asyncio.ensure_future(self._lease_loop())

    async def _on_command(self, msg: Any) -> None:
        topic = msg.subject.replace(".", "/")
        self.inbox.put((topic, msg.data, time.time(), 0, 0, 0))

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self._nc.publish(subject, data)
        except Exception as exc:  # noqa: BLE001 - the outbound buffer is full while disconnected
            log.error("NATS publish to %s failed: %r", subject, exc)
        finally:
            with self._lock:
                self._outbox -= 1

    async def _ack_all(self, msgs: list[Any]) -> None:
        for m in msgs:
            with contextlib.suppress(Exception):  # a partition that moved on: its new owner has them
                await m.ack()

    # -- leases
    async def _lease_loop(self) -> None:
        """Balance the partitions every tick (each JetStream call bounded, so that a leader
        election stalls nothing for long); renewals run in their own task."""
        tick = min(1.0, self.takeover_after / 8)
        renewals = asyncio.ensure_future(self._renew_loop())
        failed = 0.0
        try:
            while not self._closing:
                try:
                    await asyncio.wait_for(self._balance(), timeout=self.takeover_after / 2)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a leader election, a lost connection: try again
                    if time.monotonic() - failed > 5.0:
                        log.warning("partition balance: %r; trying again", exc)
                        failed = time.monotonic()
                await asyncio.sleep(tick)
        finally:
            renewals.cancel()

    async def _renew_loop(self) -> None:
        while not self._closing:
            await self._renew()
            await asyncio.sleep(self.takeover_after / 5)

    async def _kv_call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """One key-value operation, at most a fifth of takeover_after (raises TimeoutError)."""
        async with self._kv_lock:
            return await asyncio.wait_for(coro, timeout=max(1.0, self.takeover_after / 5))

    async def _renew(self) -> None:
        """Renew our member key and every lease. A lease is lost when someone else holds
        it now (or it expired), or when it could not be renewed for takeover_after: then
        another consumer may read the partition, and this one stops at once."""
        from nats.js.errors import KeyWrongLastSequenceError

        kv = self._kv
        me = self.client_id.encode()
        now = time.monotonic()
        try:
            await self._kv_call(kv.put(f"member.{self.client_id}", me))
        except Exception as exc:  # noqa: BLE001 - timeouts while a leader is elected: try again soon
            log.debug("member key not renewed: %r", exc)
        for p in sorted(self._leases):
            rev = self._leases.get(p)
            if rev is None:
                continue
            try:
                new = await self._kv_call(kv.update(f"part.{p}", me, last=rev))
            except KeyWrongLastSequenceError:
                self._lose(p, "another consumer holds it now (it was not renewed within takeover_after "
                              f"{self.takeover_after:.0f}s)")
                continue
            except Exception as exc:  # noqa: BLE001 - timeouts while a leader is elected
                age = now - self._renewed_at.get(p, now)
                if age > self.takeover_after * 0.9:
                    self._lose(p, f"it could not be renewed for {age:.0f}s ({exc!r})")
                continue
            if p in self._leases:
                self._leases[p] = new
                self._renewed_at[p] = time.monotonic()
        self._renewed = time.monotonic()

    def _lose(self, p: int, why: str) -> None:
        log.error("lease of partition %d lost: %s; no longer reading it", p, why)
        self._leases.pop(p, None)
        self._renewed_at.pop(p, None)
        self._give_up(p, graceful=False)

    def _give_up(self, p: int, *, graceful: bool) -> None:
        self._prepared.discard(p)
        self._reset.discard(p)
        task = self._fetchers.pop(p, None)
        if task is not None:
            task.cancel()
        with self._lock:
            self._active.discard(p)
            self._draining.pop(p, None)
            if p in self._waiting:
                self._waiting.remove(p)
            if not graceful:
                for token in [t for t, (_m, q) in self._pending.items() if q == p]:
                    del self._pending[token]
                self._inflight[p] = 0
            self._lost.append(p)
            if graceful:
                self._release.add(p)

    async def _members(self) -> set[str]:
        """The consumers whose member key has neither expired nor been deleted (a consumer
        that stopped deletes it, which leaves a marker on its subject)."""
        from nats.js.errors import KeyNotFoundError

        prefix = f"$KV.{LEASE_BUCKET}.member."
        info = await asyncio.wait_for(
            self._js.stream_info(f"KV_{LEASE_BUCKET}", subjects_filter=prefix + ">"),
            timeout=max(1.0, self.takeover_after / 5))
        out = set()
        for name in (s[len(prefix):] for s in (info.state.subjects or {})):
            if name != self.client_id:
                try:
                    await self._kv_call(self._kv.get(f"member.{name}"))
                except KeyNotFoundError:
                    continue  # stopped: its key was deleted
            out.add(name)
        return out

    async def _balance(self) -> None:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        members = sorted(await self._members() | {self.client_id})
        if members != self.members:
            log.info("consumers of the cluster: %s", ", ".join(members))
            self.members = members
        mine = {p for p in range(self.partitions) if members[p % len(members)] == self.client_id}
        held = set(self._leases)
        with self._lock:
            busy = set(self._waiting) | set(self._lost) | self._release
        for p in sorted(mine - held - busy):
            try:
                entry = await self._kv_call(self._kv.get(f"part.{p}"))
                holder = entry.value.decode(errors="replace") if entry.value else ""
            except KeyNotFoundError:
                holder = ""
            if holder:
                continue  # its owner gives it back once drained (or its lease expires)
            try:
                rev = await self._kv_call(self._kv.create(f"part.{p}", self.client_id.encode()))
            except KeyWrongLastSequenceError:
                continue  # someone else was quicker
            self._leases[p] = rev
            self._renewed_at[p] = time.monotonic()
        for p in sorted(self._reset):
            if p not in self._active:
                self._reset.discard(p)
                continue
            task = self._fetchers.pop(p, None)
            if task is not None:
                task.cancel()
            await self._prepare(p)  # a failure is tried again next time (the partition waits)
            sub = await self._js.pull_subscribe_bind(durable=f"{self.stream}-p{p}", stream=self.stream)
            self._reset.discard(p)
            self._fetchers[p] = asyncio.ensure_future(self._fetch(p, sub))
        for p in sorted(set(self._leases) & mine - self._prepared):
            await self._prepare(p)  # a failure (timeout in a leader election) is tried again next time
            self._prepared.add(p)
            with self._lock:
                self._waiting.append(p)
        now = time.monotonic()
        for p in sorted(held - mine):
            if p in self._fetchers or p in self._active:
                log.info("partition %d now falls to another consumer: releasing it once its messages are committed",
                         p)
                task = self._fetchers.pop(p, None)
                if task is not None:
                    task.cancel()
                with self._lock:
                    self._active.discard(p)
                    self._draining.setdefault(p, now)
        with self._lock:
            draining = list(self._draining.items())
        for p, since in draining:
            with self._lock:
                left = self._inflight[p]
            if left <= 0 or now - since > RELEASE_WAIT_S:
                if left > 0:
                    log.warning("partition %d: %d message(s) not committed within %.0fs; released anyway (the next "
                                "owner reads them again)", p, left, RELEASE_WAIT_S)
                self._give_up(p, graceful=True)

    async def _prepare(self, p: int) -> None:
        """Make partition ``p``'s durable start at its oldest unacknowledged message."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        durable = f"{self.stream}-p{p}"
        last = 0
        try:
            info = await self._js.consumer_info(self.stream, durable)
            last = int(info.delivered.stream_seq or 0)
            await self._js.delete_consumer(self.stream, durable)
        except NotFoundError:
            pass
        self._redelivered[p] = last
        await self._js.add_consumer(self.stream, ConsumerConfig(
            durable_name=durable, filter_subject=f"{self.prefix}.part.{p}.>", ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait_s, max_ack_pending=MAX_ACK_PENDING,
            max_deliver=-1,
        ))

    async def _done(self, gained: list[int], lost: list[int]) -> None:
        for p in lost:
            with self._lock:
                graceful = p in self._release
                self._release.discard(p)
            rev = self._leases.pop(p, None)
            self._renewed_at.pop(p, None)
            if graceful and rev is not None:
                with contextlib.suppress(Exception):  # expired meanwhile: free anyway
                    await self._kv_call(self._kv.delete(f"part.{p}", last=rev))
                log.info("released partition %d", p)
        for p in gained:
            if p not in self._leases or self._closing:
                continue
            with self._lock:
                self._active.add(p)
            sub = await self._js.pull_subscribe_bind(durable=f"{self.stream}-p{p}", stream=self.stream)
            self._fetchers[p] = asyncio.ensure_future(self._fetch(p, sub))
            log.info("reading partition %d", p)

    async def _fetch(self, p: int, sub: Any) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        inbox, put = self.inbox, self.inbox.put
        cut = len(self.prefix) + len(".part.") + len(str(p)) + 1
        topic_prefix = f"{self.prefix}/telemetry/"
        redelivered = self._redelivered.get(p, 0)
        expect: int | None = None  # the durable's next delivery sequence
        while not self._closing:
            if len(inbox) >= inbox.maxsize - FETCH_BATCH or inbox.pending_bytes >= inbox.max_bytes:
                await asyncio.sleep(0.005)  # the consumer is behind: leave the rest in the stream
                continue
            try:
                # wait for the first message (a long poll, answered as soon as one is stored),
                # then take what else is there without waiting: a fetch of many that waits
                # until it has them all would hold a quiet partition's readings for its timeout
                msgs = await sub.fetch(1, timeout=5.0)
                with contextlib.suppress(TimeoutError, NatsTimeout):
                    msgs += await sub.fetch(FETCH_BATCH - 1, timeout=0.005)
            except (TimeoutError, NatsTimeout):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a leader election or reconnect: try again
                log.warning("fetching partition %d: %r; trying again", p, exc)
                await asyncio.sleep(0.5)
                continue
            now = time.time()
            # deliveries are numbered without holes: a hole means messages were lost on their way
            # here (a server died while it passed them on); JetStream would send them again only
            # after ack_wait, behind later readings. Start the partition again from its oldest
            # unacknowledged message instead, dropping (not acknowledging) what came after the hole
            for i, m in enumerate(msgs):
                cseq = m.metadata.sequence.consumer
                if expect is not None and cseq != expect:
                    log.warning("partition %d: deliveries %d..%d never arrived (a server went away?); reading it "
                                "again from its oldest unacknowledged message", p, expect, cseq - 1)
                    msgs = msgs[:i]
                    self._reset.add(p)
                    break
                expect = cseq + 1
            with self._lock:
                if p not in self._active:
                    return  # given up meanwhile: these are delivered again to the next owner
                token = self._next_token
                self._next_token += len(msgs)
                self._inflight[p] += len(msgs)
                for i, m in enumerate(msgs):
                    self._pending[token + i] = (m, p)
            for i, m in enumerate(msgs):
                device = m.subject[cut:]
                md = m.metadata
                # given to this partition's previous owner, or delivered again: maybe stored already
                dup = 1 if md.sequence.stream <= redelivered or md.num_delivered > 1 else 0
                if partition_of(device, self.partitions) != p:
                    self._mismatch(device, p)
                put((topic_prefix + device, m.data, now, token + i, 1, dup))
            if p in self._reset:
                return  # the lease loop makes the durable afresh and fetches again

    def _mismatch(self, device: str, p: int) -> None:
        now = time.monotonic()
        if now - self._mismatch_logged >= MISMATCH_LOG_S:
            self._mismatch_logged = now
            log.error("device %s arrived on partition %d but partitions=%d puts it in %d: the servers' mapping "
                      "{{partition(P,1)}} must use P = partitions (restores after a takeover miss such devices)",
                      device, p, self.partitions, partition_of(device, self.partitions))

    def _cancel_fetchers(self) -> None:
        for task in self._fetchers.values():
            task.cancel()
        self._fetchers.clear()

    async def _shutdown(self, final: Will | None) -> None:
        self._closing = True
        self._cancel_fetchers()
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self._nc is None:
            return
        if self._acking:  # the acknowledgements of the last commits go out first
            await asyncio.wait(list(self._acking), timeout=5.0)
        if self._kv is not None:
            # gone at once rather than after takeover_after: the others take over now
            for p, rev in list(self._leases.items()):
                with contextlib.suppress(Exception):
                    await self._kv.delete(f"part.{p}", last=rev)
            with contextlib.suppress(Exception):
                await self._kv.delete(f"member.{self.client_id}")
            self._leases.clear()
        with contextlib.suppress(Exception):
            if final is not None:
                await self._nc.publish(subject_of(final.topic), final.payload)
            await self._nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self._nc.close()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("NATS task failed: %r", task.exception())
