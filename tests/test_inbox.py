"""The bounded inbox between paho's thread and the processing loop."""

from __future__ import annotations

import threading
import time

from itap_stream.adapters.mqtt import Inbox


def _m(i, size=10):
    return ("itap/telemetry/D1", bytes([i % 256]) * size, float(i))


def test_drain_returns_a_batch_in_order_and_waits_for_the_first():
    box = Inbox(maxsize=100)
    assert box.drain(10, wait_s=0.01, linger_s=0.0) == []
    threading.Timer(0.05, lambda: [box.put(_m(i)) for i in range(25)]).start()
    got = box.drain(10, wait_s=2.0, linger_s=0.2)
    assert got == [_m(i) for i in range(10)]
    assert box.drain(100, wait_s=0.0, linger_s=0.0) == [_m(i) for i in range(10, 25)]


def test_full_inbox_blocks_the_producer_until_drained():
    box = Inbox(maxsize=5)
    done = threading.Event()

    def produce():
        for i in range(8):
            box.put(_m(i))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set() and len(box) == 5  # back-pressure, nothing dropped
    first = box.drain(5, wait_s=0.1, linger_s=0.0)
    assert done.wait(2.0)
    assert first + box.drain(10, wait_s=0.1, linger_s=0.0) == [_m(i) for i in range(8)]


def test_inbox_is_bounded_by_payload_bytes_too():
    box = Inbox(maxsize=1000, max_bytes=100)
    done = threading.Event()

    def produce():
        for i in range(30):  # 300 bytes in all
            box.put(_m(i))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set() and box.pending_bytes <= 100 + 10
    got = []
    while len(got) < 30:
        got += box.drain(4, wait_s=0.5, linger_s=0.0, max_bytes=25)
    assert done.wait(2.0) and got == [_m(i) for i in range(30)] and box.pending_bytes == 0


def test_drain_stops_at_max_bytes():
    box = Inbox()
    for i in range(10):
        box.put(_m(i, size=100))
    assert len(box.drain(100, wait_s=0.0, linger_s=0.0, max_bytes=250)) == 3
