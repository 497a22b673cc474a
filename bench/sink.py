"""The ceiling: a bare paho-mqtt subscriber that only counts messages.

Run as ``python -m bench.sink HOST PORT TOPIC QOS N [PROTOCOL]`` (PROTOCOL 4, MQTT 3.1.1, the
default, or 5); prints ``ready`` once
subscribed, then one JSON line ``{"n", "first", "last"}`` (wall-clock times of the
first and last message) when N messages arrived or nothing came for 10 s.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import paho.mqtt.client as paho


def main(argv: list[str]) -> None:
    host, port, topic, qos, n = argv[0], int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    protocol = paho.MQTTv5 if len(argv) > 5 and argv[5] == "5" else paho.MQTTv311
    box = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        now = time.time()
        if box["n"] == 0:
            box["first"] = now
        box["n"] += 1
        box["last"] = now
        if box["n"] >= n:
            done.set()

    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=f"itap-bench-sink-{time.time_ns()}", protocol=protocol
    )
    c.on_message = on_message
    c.on_subscribe = lambda *_a: subscribed.set()
    c.max_inflight_messages_set(0)
    c.connect(host, port, keepalive=600)
    c.subscribe(topic, qos=qos)
    c.loop_start()
    subscribed.wait(10)
    print("ready", flush=True)
    seen = -1
    while not done.wait(10):
        if box["n"] == seen:
            break
        seen = box["n"]
    c.disconnect()
    c.loop_stop()
    print(json.dumps(box), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
