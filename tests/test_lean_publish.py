"""The intake's lean PUBLISH path (`_Client.raw_handler`) hands over exactly what paho's
own path does, and leaves what it does not handle (properties, QoS 2, odd topics) to paho."""

from __future__ import annotations

import struct

import pytest

from itap_stream.adapters.mqtt import Inbox, MqttLink


def _publish(topic: bytes, payload: bytes, *, qos: int, mid: int, v5: bool, props: bytes = b"\x00") -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if v5:
        body += props
    return body + payload


def _received(protocol: int, lean: bool, packets: list[tuple[int, bytes]]) -> tuple[list, int, list]:
    inbox = Inbox(maxsize=1000)
    # not started: packets are fed to the client's PUBLISH handler as paho's reader would
    link = MqttLink("mqtt://127.0.0.1:1", "t-lean", inbox=inbox, persistent=True, protocol=protocol,
                    watch={"$SYS/broker/dropped": lambda p: seen.append(p)})
    seen: list[bytes] = []
    if not lean:
        link.client.raw_handler = None
    for command, body in packets:
        link.client._in_packet = {"command": command, "packet": bytearray(body)}  # noqa: SLF001
        link.client._handle_publish()  # noqa: SLF001
    msgs = inbox.drain(1000, wait_s=0.0, linger_s=0.0)
    return [(t, p, tok, q, dup) for t, p, _at, tok, q, dup in msgs], link.retained_ignored, seen


@pytest.mark.parametrize("protocol", [4, 5])
def test_the_lean_path_gives_what_paho_gives(protocol):
    v5 = protocol == 5
    packets = [
        (0x30, _publish(b"itap/telemetry/D1", b'{"a":1}', qos=0, mid=0, v5=v5)),
        (0x32, _publish(b"itap/telemetry/D\xc3\xbc2", b"x" * 300, qos=1, mid=7, v5=v5)),  # UTF-8 topic
        (0x3A, _publish(b"itap/telemetry/D3", b"", qos=1, mid=65535, v5=v5)),  # dup, empty payload
        (0x33, _publish(b"itap/telemetry/D4", b"retained", qos=1, mid=9, v5=v5)),  # a retained copy
        (0x30, _publish(b"$SYS/broker/dropped", b"12", qos=0, mid=0, v5=v5)),  # a watched topic
    ]
    lean = _received(protocol, True, packets)
    paho = _received(protocol, False, packets)
    assert lean == paho
    msgs, retained, seen = lean
    assert [m[0] for m in msgs] == ["itap/telemetry/D1", "itap/telemetry/Dü2", "itap/telemetry/D3"]
    assert [(m[3], m[4]) for m in msgs] == [(0, 0), (1, 0), (1, 1)]
    assert [m[2] & 0xFFFF for m in msgs] == [0, 7, 65535]
    assert msgs[1][1] == b"x" * 300 and isinstance(msgs[1][1], bytes)
    assert retained == 1 and seen == [b"12"]


def test_a_publish_with_properties_takes_paho_s_path():
    props = b"\x02\x01\x01"  # 2 bytes of properties: payload format indicator (1) = 1
    packet = (0x32, _publish(b"itap/telemetry/D1", b'{"a":1}', qos=1, mid=3, v5=True, props=props))
    assert _received(5, True, [packet]) == _received(5, False, [packet])
    msgs = _received(5, True, [packet])[0]
    assert msgs[0][:2] == ("itap/telemetry/D1", b'{"a":1}')
