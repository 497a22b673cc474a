"""Per-device ring buffers for the whole fleet, in one set of numpy arrays.

Each device owns a slot: its last ``window`` readings live in row ``slot`` of shared
arrays, so windows of many devices can be gathered and featured together. The
buffers grow by doubling when new devices appear.

Ordering rule (stated once, used by stream and batch alike): per device, a reading is
accepted only when its timestamp is later than every reading accepted before it. A
reading whose timestamp is already in the device's window is a ``duplicate``; one older
than every reading in the window is ``late``; any other earlier one is ``out_of_order``.
All three are dropped from features and counted (the stream stores late and
out-of-order readings; a `~itap_stream.core.ordering.Reorderer` in front of the
windows can put slightly reordered arrivals back in order first).

Gaps: a device that numbers its readings (``seq``) and whose next accepted reading skips
numbers lost readings on the way (a dropped QoS 0 message, a broker queue overflow). Each
jump forward is a `Gap` in `FleetWindows.gaps` (the caller takes them); a ``seq`` lower
than the last one is a device restart (its counter began again), not a gap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from itap_stream.core.readings import Block, Reading
from itap_stream.core.schema import STATES

__all__ = ["ACCEPTED", "DROP_REASONS", "DUE", "DUPLICATE", "LATE", "OUT_OF_ORDER", "FleetWindows", "Gap",
           "WindowBatch"]

ACCEPTED = 0
DUE = 1
DUPLICATE = -1
OUT_OF_ORDER = -2
LATE = -3
#: `FleetWindows.push` status -> the reason a reading was kept out of the features.
DROP_REASONS = {DUPLICATE: "duplicate", OUT_OF_ORDER: "out_of_order", LATE: "late"}

_STATE_CODE = {s: i for i, s in enumerate(STATES)}


@dataclass(frozen=True)
class Gap:
    """Readings of one device that never arrived: ``seq`` jumped from ``seq_before`` to
    ``seq_after`` between the readings at ``ts_before`` and ``ts_after``."""

    device_id: str
    seq_before: int
    seq_after: int
    ts_before: float
    ts_after: float

    @property
    def missing(self) -> int:
        return self.seq_after - self.seq_before - 1


@dataclass
class WindowBatch:
    """Windows ready for featuring: ``values`` is ``(n, window, n_signals)``."""

    device_ids: list[str]
    start_ts: npt.NDArray[np.float64]
    end_ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    states: npt.NDArray[np.int8]
    labels: list[str | None] = field(default_factory=list)
    tags: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.device_ids)

    @property
    def last_states(self) -> list[str]:
        return [STATES[c] for c in self.states[:, -1].tolist()] if len(self) else []


class FleetWindows:
    """Ring buffers of the last ``window`` readings of every device.

    Parameters
    ----------
    n_signals
        Values per reading.
    window
        Readings per window.
    hop
        A window is due every ``hop`` accepted readings once the first one is full.

    Examples
    --------
    >>> from itap_stream.core.readings import Block, Reading
    >>> fw = FleetWindows(n_signals=1, window=3, hop=2)
    >>> [fw.push(Reading("D1", t, "RUN", (float(t),))) for t in range(6)]
    [0, 0, 1, 0, 1, 0]
    >>> batch = fw.take_due()
    >>> batch.values[:, :, 0].tolist()
    [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]]
    >>> [fw.push(Reading("D1", t, "RUN", (9.0,))) for t in (4, 4.5, 1)]  # duplicate, out of order, late
    [-1, -2, -3]
    >>> [fw.push(Reading("D2", t, "RUN", (0.0,), seq)) for t, seq in ((1, 7), (2, 8), (3, 12), (4, 0))]
    [0, 0, 1, 0]
    >>> [(g.seq_before, g.seq_after, g.missing) for g in fw.gaps]  # 9-11 lost; 0: a restart, no gap
    [(8, 12, 3)]
    """

    def __init__(self, n_signals: int, window: int = 32, hop: int = 4, *, capacity: int = 4096) -> None:
        if window < 2:
            msg = f"window must be at least 2 readings, got {window}"
            raise ValueError(msg)
        if not 1 <= hop <= window:
            msg = f"hop must be between 1 and window ({window}), got {hop}"
            raise ValueError(msg)
        self.n_signals = n_signals
        self.window = window
        self.hop = hop
        self._slots: dict[str, int] = {}
        # one row per reading: the signal values, then ts, then the state code, so a
        # reading is stored with one assignment and a window copied with one gather.
        # Devices live in fixed-size blocks: a growing fleet adds a block instead of
        # copying every buffer (no 3x peak while doubling, no unused half).
        self._block = max(1, capacity)
        self._blocks: list[npt.NDArray[np.float64]] = []
        self._labels: list[str | None] = []  # per slot: label of the newest reading
        self._tags: list[list[str | None] | None] = []  # per slot: ring of tags, made on the first tag
        self._tagged: list[int] = []  # per slot, readings in the ring that carry a tag
        self._count: list[int] = []  # accepted readings per slot
        self._last_ts: list[float] = []
        self._last_seq: list[int | None] = []  # per slot, the seq of the latest accepted reading
        self._free: list[int] = []  # slots of forgotten devices, used again before new ones
        #: jumps in ``seq`` found since the caller last emptied this list
        self.gaps: list[Gap] = []
        # chronological order of a full ring whose oldest element sits at position p
        self._order = (np.arange(window)[None, :] + np.arange(window)[:, None]) % window
        self._span = np.arange(window)
        self._due_rows: list[npt.NDArray[np.float64]] = []  # (windows, window, signals + 2) each
        self._due_labels: list[str | None] = []
        self._due_tags: list[tuple[str, ...]] = []
        self._due_devices: list[str] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._slots

    @property
    def devices(self) -> list[str]:
        return list(self._slots)

    def last_ts(self, device_id: str) -> float | None:
        slot = self._slots.get(device_id)
        return None if slot is None else self._last_ts[slot]

    def forget(self, device_ids: Iterable[str]) -> int:
        """Drop devices' rings (their partition moved to another consumer); returns how many
        were held. Their slots are used again by new devices."""
        n = 0
        for device_id in device_ids:
            slot = self._slots.pop(device_id, None)
            if slot is None:
                continue
            self._blocks[slot // self._block][slot % self._block] = np.nan
            self._labels[slot], self._tags[slot], self._tagged[slot] = None, None, 0
            self._count[slot], self._last_ts[slot], self._last_seq[slot] = 0, -np.inf, None
            self._free.append(slot)
            n += 1
        return n

    def _slot(self, device_id: str) -> int:
        if self._free:
            slot = self._slots[device_id] = self._free.pop()
            return slot
        slot = len(self._slots)
        if slot >= len(self._blocks) * self._block:
            self._blocks.append(np.full((self._block, self.window, self.n_signals + 2), np.nan))
        self._slots[device_id] = slot
        self._labels.append(None)
        self._tags.append(None)
        self._tagged.append(0)
        self._count.append(0)
        self._last_ts.append(-np.inf)
        self._last_seq.append(None)
        return slot

    def push(self, reading: Reading) -> int:
        """Add a reading; returns `ACCEPTED`, `DUE` (a window closed), `DUPLICATE`, `LATE` or `OUT_OF_ORDER`."""
        return self._put(reading, snapshot=True)

    def push_block(self, block: Block) -> int | None:
        """Add a device's block of readings at once; returns how many windows closed, or
        None when the block cannot go in whole (a reading not later than the device's
        last, or a device whose ring holds tags): push its readings one by one then.

        The same as pushing the readings one by one: the windows that close inside the
        block are gathered from the ring's newest ``window - 1`` readings followed by the
        block, and the ring then holds the block's last ``window`` readings.
        """
        device_id = block.device_id
        ts = block.ts
        k = len(ts)
        slot = self._slots.get(device_id)
        if slot is None:
            slot = self._slot(device_id)
        last = self._last_ts[slot]
        if not k or ts[0] <= last or self._tags[slot] is not None:
            return None
        seqs = block.seq
        if seqs is not None:
            before = self._last_seq[slot]
            prev_ts = last
            for t, q in zip(ts.tolist(), seqs, strict=True):
                if q is None:
                    prev_ts = t
                    continue
                if before is not None and q > before + 1:
                    self.gaps.append(Gap(device_id, before, q, prev_ts, t))
                before, prev_ts = q, t
            self._last_seq[slot] = before
        w, s, hop = self.window, self.n_signals, self.hop
        ring = self._blocks[slot // self._block][slot % self._block]
        n0 = self._count[slot]
        # the ring's newest w - 1 readings, oldest first, then the block's readings: the
        # window that closes at block reading i is rows i .. i + w - 1 of ``ext``
        ext = np.empty((w - 1 + k, s + 2))
        ext[: w - 1] = ring[self._order[n0 % w][1:]]
        ext[w - 1 :, :s] = block.values
        ext[w - 1 :, s] = ts
        ext[w - 1 :, s + 1] = block.states
        # a window closes after the c-th accepted reading when c >= w and (c - w) % hop == 0
        first = max(w, n0 + 1)
        first += (w - first) % hop
        due = range(first - n0 - 1, k, hop)
        if due:
            self._due_rows.append(ext[np.add.outer(np.asarray(due), self._span)])
            self._due_devices.extend([device_id] * len(due))
            labels = block.labels
            self._due_labels.extend([labels[i] for i in due] if labels is not None else [None] * len(due))
            self._due_tags.extend([()] * len(due))
        keep = min(k, w)
        ring[(np.arange(n0 + k - keep, n0 + k)) % w] = ext[w - 1 + k - keep :]
        self._count[slot] = n0 + k
        self._last_ts[slot] = float(ts[-1])
        self._labels[slot] = block.labels[-1] if block.labels is not None else None
        return len(due)

    def restore(self, device_id: str, readings: list[Reading], count: int) -> None:
        """Refill a device's ring after a restart: its last readings (oldest first) as the
        ``count``-th accepted readings, so windows close where they would have without the
        restart and readings delivered again are recognised. Closes no window."""
        if not readings or device_id in self._slots:
            return
        slot = self._slot(device_id)
        self._count[slot] = max(0, count - len(readings))
        gaps = len(self.gaps)
        for r in readings:
            self._put(r, snapshot=False)
        del self.gaps[gaps:]  # a stored reading's gap was found when it arrived

    def _classify_old(self, slot: int, ts: float) -> int:
        """Why an earlier reading cannot go in: a timestamp already in the window is a
        duplicate, one older than the whole window is late, anything else out of order."""
        held = self._blocks[slot // self._block][slot % self._block, :, self.n_signals]
        held = held[~np.isnan(held)]
        if (held == ts).any():
            return DUPLICATE
        return LATE if not len(held) or ts < held.min() else OUT_OF_ORDER

    def _put(self, reading: Reading, *, snapshot: bool) -> int:
        device_id, ts, state, values, _seq, tag, label = reading
        slot = self._slots.get(device_id)
        if slot is None:
            slot = self._slot(device_id)
        last = self._last_ts[slot]
        if ts <= last:
            return DUPLICATE if ts == last else self._classify_old(slot, ts)
        self._last_ts[slot] = ts
        if _seq is not None:
            before = self._last_seq[slot]
            if before is not None and _seq > before + 1:
                self.gaps.append(Gap(device_id, before, _seq, last, ts))
            self._last_seq[slot] = _seq
        n = self._count[slot]
        window = self.window
        pos = n % window
        self._blocks[slot // self._block][slot % self._block, pos] = (*values, ts, _STATE_CODE[state])
        self._labels[slot] = label
        tags = self._tags[slot]
        if tags is None and tag is not None:
            tags = self._tags[slot] = [None] * window
        if tags is not None and (tag is not None or tags[pos] is not None):
            self._tagged[slot] += (tag is not None) - (tags[pos] is not None)
            tags[pos] = tag
        n += 1
        self._count[slot] = n
        if snapshot and n >= window and (n - window) % self.hop == 0:
            self._snapshot(slot, n % window, device_id)
            return DUE
        return ACCEPTED

    def _snapshot(self, slot: int, oldest: int, device_id: str) -> None:
        order = self._order[oldest]
        self._due_devices.append(device_id)
        self._due_rows.append(self._blocks[slot // self._block][slot % self._block, order][None])
        self._due_labels.append(self._labels[slot])
        tags = self._tags[slot]
        if self._tagged[slot] and tags is not None:
            ordered = [tags[i] for i in order.tolist()]
            self._due_tags.append(tuple(t for t in dict.fromkeys(ordered) if t is not None))
        else:
            self._due_tags.append(())

    def take_due(self) -> WindowBatch:
        """Return the windows that closed since the last call, oldest first, and forget them."""
        s = self.n_signals
        if not self._due_devices:
            return WindowBatch(
                [],
                np.zeros(0),
                np.zeros(0),
                np.zeros((0, self.window, s)),
                np.zeros((0, self.window), dtype=np.int8),
            )
        rows = np.concatenate(self._due_rows)  # (n, window, signals + 2)
        batch = WindowBatch(
            device_ids=self._due_devices,
            start_ts=rows[:, 0, s].copy(),
            end_ts=rows[:, -1, s].copy(),
            values=np.ascontiguousarray(rows[:, :, :s]),
            states=rows[:, :, s + 1].astype(np.int8),
            labels=self._due_labels,
            tags=self._due_tags,
        )
        self._due_devices = []
        self._due_rows = []
        self._due_labels = []
        self._due_tags = []
        return batch
