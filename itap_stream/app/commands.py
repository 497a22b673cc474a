"""Commands to a running consumer over MQTT (`itap ack`): publish on
``{prefix}/commands/{name}``, wait for the answer on ``{prefix}/status/commands``."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import paho.mqtt.client as paho

from itap_stream.adapters.mqtt import connect_client
from itap_stream.config import Settings
from itap_stream.errors import BrokerError

__all__ = ["send_command"]


def send_command(settings: Settings, name: str, body: dict[str, Any], *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one command and return the consumer's answer (``ok``, ``reason``...), logged in
    with the settings' broker credentials (`Settings.broker_auth`).

    `BrokerError` when the broker cannot be reached or no consumer answers in time.
    """
    request_id = uuid.uuid4().hex
    answer: dict[str, Any] = {}
    got = threading.Event()
    subscribed = threading.Event()
    status_topic = settings.topic("status", "commands")

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("request_id") == request_id:
            answer.update(data)
            got.set()

    def setup(c: paho.Client) -> None:
        c.on_connect = lambda cl, *_a: cl.subscribe(status_topic, qos=1)
        c.on_subscribe = lambda *_a: subscribed.set()
        c.on_message = on_message

    client = connect_client(
        settings.broker_url, f"itap-cmd-{request_id[:12]}", setup=setup, auth=settings.broker_auth()
    )
    try:
        if not subscribed.wait(timeout_s):
            msg = f"no answer from the broker at {settings.broker_url} within {timeout_s:g} s"
            raise BrokerError(msg)
        info = client.publish(settings.topic("commands", name), json.dumps(body | {"request_id": request_id}), qos=1)
        info.wait_for_publish(timeout_s)
        if not got.wait(timeout_s):
            msg = (
                f"no consumer answered within {timeout_s:g} s on {settings.broker_url} "
                f"(is `itap run` running with topic prefix {settings.topic_prefix!r}?"
                + (
                    f" May broker user {settings.broker_username!r} publish to {settings.topic('commands', '#')}"
                    " (the itap-engineer role of mosquitto/acl)?" if settings.broker_username else ""
                )
                + ")"
            )
            raise BrokerError(msg)
    finally:
        client.disconnect()
        client.loop_stop()
    return answer
