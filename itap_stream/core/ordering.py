"""Event-time order before the windows: a bounded reorder buffer per device.

Networks and gateways deliver some readings a little out of order (a retried QoS 1
message overtaken by the next one, two publishing threads). `FleetWindows` accepts a
device's readings only in timestamp order, so without help such a reading is dropped as
``out_of_order``. `Reorderer` holds each device's readings until the device has sent a
reading at least ``tolerance_s`` seconds (event time) newer, or until they have waited
``tolerance_s`` seconds of service time (a device that went quiet), and releases them
sorted. Within the tolerance, features then equal those of the sorted recording; a
reading later than that is still classified by the windows (late / out of order).

The price is latency: a reading reaches the features up to ``tolerance_s`` later.
``tolerance_s = 0`` (the default setting) passes readings straight through.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from itap_stream.core.readings import Reading

__all__ = ["Reorderer"]


class Reorderer:
    """Per-device reorder buffers.

    Examples
    --------
    >>> ro = Reorderer(tolerance_s=2.0)
    >>> r = lambda t: Reading("D1", float(t), "RUN", (0.0,))
    >>> [x.ts for x in ro.add([r(1), r(3), r(2)], now=100.0)]
    [1.0]
    >>> [x.ts for x in ro.add([r(5)], now=101.0)]
    [2.0, 3.0]
    >>> [x.ts for x in ro.expire(now=110.0)]
    [5.0]
    """

    def __init__(self, tolerance_s: float, max_held: int = 10_000) -> None:
        if tolerance_s < 0:
            msg = f"reorder tolerance must not be negative, got {tolerance_s}"
            raise ValueError(msg)
        self.tolerance_s = float(tolerance_s)
        self.max_held = max_held  # per device: beyond it the oldest is released at once
        self._heaps: dict[str, list[tuple[float, int, Reading]]] = {}
        self._newest: dict[str, float] = {}  # device -> newest event time seen
        self._since: dict[str, float] = {}  # device -> service time its oldest held reading arrived
        self._n = 0  # tie-breaker: equal timestamps leave in arrival order
        self.held = 0

    def __len__(self) -> int:
        return self.held

    def add(self, readings: Iterable[Reading], now: float | None = None) -> list[Reading]:
        """Take readings (arrival order); return those now due, each device's in timestamp order."""
        if self.tolerance_s == 0.0:
            return list(readings)
        out: list[Reading] = []
        touched: dict[str, None] = {}
        heaps, newest = self._heaps, self._newest
        for r in readings:
            heap = heaps.get(r.device_id)
            if heap is None:
                heap = heaps[r.device_id] = []
            if not heap and now is not None and r.device_id not in self._since:
                self._since[r.device_id] = now
            heapq.heappush(heap, (r.ts, self._n, r))
            self._n += 1
            self.held += 1
            if len(heap) > self.max_held:  # a device whose clock stands still must not fill memory
                out.append(heapq.heappop(heap)[2])
                self.held -= 1
            if r.ts > newest.get(r.device_id, -float("inf")):
                newest[r.device_id] = r.ts
            touched[r.device_id] = None
        for device in touched:
            self._release(device, newest[device] - self.tolerance_s, out, now)
        return out

    def _release(self, device: str, up_to: float, out: list[Reading], now: float | None) -> None:
        heap = self._heaps[device]
        while heap and heap[0][0] <= up_to:
            out.append(heapq.heappop(heap)[2])
            self.held -= 1
        if not heap:
            del self._heaps[device]
            self._since.pop(device, None)
        # otherwise the clock of the oldest wait keeps running: a device whose readings never
        # get ``tolerance_s`` ahead (a stuck clock) is still flushed every ``tolerance_s``

    def expire(self, now: float) -> list[Reading]:
        """Release everything of devices whose held readings waited ``tolerance_s`` of service time."""
        out: list[Reading] = []
        for device, since in list(self._since.items()):
            if now - since >= self.tolerance_s:
                self._release(device, float("inf"), out, now)
        return out

    def forget(self, devices: set[str]) -> int:
        """Drop what is held of ``devices`` (their partition moved away; the new owner reads
        them from the store); returns the readings dropped."""
        n = 0
        for device in devices & self._heaps.keys():
            n += len(self._heaps.pop(device))
            self._since.pop(device, None)
        for device in devices & self._newest.keys():
            del self._newest[device]
        self.held -= n
        return n

    def flush(self) -> list[Reading]:
        """Release everything held (the service is stopping)."""
        out: list[Reading] = []
        for device in list(self._heaps):
            self._release(device, float("inf"), out, None)
        return out
