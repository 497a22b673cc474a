"""The bounded inbox between paho's thread and the processing loop."""

from __future__ import annotations

import threading
import time

from itap_stream.adapters.mqtt import Inbox


def test_drain_returns_a_batch_in_order_and_waits_for_the_first():
    box = Inbox(maxsize=100)
    assert box.drain(10, wait_s=0.01, linger_s=0.0) == []
    threading.Timer(0.05, lambda: [box.put(i) for i in range(25)]).start()
    got = box.drain(10, wait_s=2.0, linger_s=0.2)
    assert got == list(range(10))
    assert box.drain(100, wait_s=0.0, linger_s=0.0) == list(range(10, 25))


def test_full_inbox_blocks_the_producer_until_drained():
    box = Inbox(maxsize=5)
    done = threading.Event()

    def produce():
        for i in range(8):
            box.put(i)
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set() and len(box) == 5  # back-pressure, nothing dropped
    first = box.drain(5, wait_s=0.1, linger_s=0.0)
    assert done.wait(2.0)
    assert first + box.drain(10, wait_s=0.1, linger_s=0.0) == list(range(8))
