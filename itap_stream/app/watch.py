"""`itap alerts`: subscribe to the alerts topic and print alerts as they arrive."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, TextIO

import paho.mqtt.client as paho

from itap_stream.adapters.mqtt import connect_client
from itap_stream.app.render import format_alert
from itap_stream.config import Settings, parse_broker_url
from itap_stream.errors import BrokerError

__all__ = ["SEVERITY_COLOURS", "watch_alerts"]

#: ANSI colours per severity (used only when the output is a terminal).
SEVERITY_COLOURS = {"CRITICAL": "\033[1;31m", "WARNING": "\033[33m", "INFO": "\033[36m"}
_RESET = "\033[0m"


def watch_alerts(
    settings: Settings,
    out: TextIO,
    *,
    devices: Collection[str] = (),
    severities: Collection[str] = (),
    as_json: bool = False,
    colour: bool = False,
    count: int | None = None,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Print alerts (firing and resolved) until ``count`` were printed, ``timeout_s`` passed
    or ``stop`` is set; returns how many were printed."""
    addr = parse_broker_url(settings.broker_url)
    topics = [settings.topic("alerts", d) for d in devices] or [settings.topic("alerts", "+")]
    wanted = {s.upper() for s in severities}
    printed = 0
    done = stop or threading.Event()
    subscribed = threading.Event()
    lock = threading.Lock()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        nonlocal printed
        try:
            alert = json.loads(msg.payload)
            severity = str(alert["severity"])
        except (ValueError, KeyError, TypeError):
            return  # not an alert object: not ours to print
        if wanted and severity.upper() not in wanted:
            return
        if as_json:
            text = json.dumps(alert, separators=(",", ":"))
        else:
            text = format_alert(alert)
            if colour and severity in SEVERITY_COLOURS:
                text = f"{SEVERITY_COLOURS[severity]}{text}{_RESET}"
        with lock:
            out.write(text + "\n")
            out.flush()
            printed += 1
            if count is not None and printed >= count:
                done.set()

    def setup(c: paho.Client) -> None:
        c.on_message = on_message
        c.on_connect = lambda c, *_a: c.subscribe([(t, 1) for t in topics])
        c.on_subscribe = lambda *_a: subscribed.set()

    client = connect_client(
        settings.broker_url, f"itap-alerts-{time.time_ns()}", setup=setup, auth=settings.broker_auth()
    )
    try:
        if not subscribed.wait(10):
            msg = f"MQTT broker at {addr.host}:{addr.port} did not confirm the subscription"
            raise BrokerError(msg)
        if on_ready is not None:
            on_ready()
        done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return printed
