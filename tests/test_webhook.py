"""Webhook delivery against real local HTTP servers: one that answers, one that fails, one
that hangs; scoring never waits, failures end in the dead-letter topic."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from itap_stream.adapters.webhook import WebhookSink
from itap_stream.errors import ConfigError

ALERT = {"id": "a1", "rule": "power_instability", "severity": "CRITICAL", "device_id": "DEV-0008", "status": "firing",
         "root_cause": "Power instability", "families": {"Voltage": 90.0, "Current": 10.0},
         "window_end": "2026-01-01T00:18:11.000Z", "likely_fault": {"class": "power_instability", "confidence": 0.9}}


class Server:
    """A local HTTP server: ``mode`` ok (200), fail (500) or hang (answers after 5 s)."""

    def __init__(self, mode: str) -> None:
        self.bodies: list[dict] = []
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                outer.hits += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if mode == "hang":
                    time.sleep(5)
                self.send_response(500 if mode == "fail" else 200)
                self.end_headers()
                if mode == "ok":
                    outer.bodies.append(body)

            def log_message(self, *_a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(request):
    s = Server(request.param)
    yield s
    s.close()


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_alerts_are_posted_as_json_or_as_a_slack_message(server, wait):
    plain = WebhookSink(server.url)
    plain.submit(ALERT)
    assert wait(lambda: len(server.bodies) == 1)
    assert server.bodies[0] == ALERT
    plain.close()
    slack = WebhookSink(server.url, fmt="slack")
    slack.submit(ALERT)
    assert wait(lambda: len(server.bodies) == 2)
    msg = server.bodies[1]
    assert msg["text"].startswith(":red_circle: CRITICAL firing: DEV-0008 power_instability")
    assert msg["blocks"][0]["type"] == "section"
    assert "Likely fault:* power_instability (90%)" in msg["blocks"][1]["text"]["text"]
    slack.close()


@pytest.mark.parametrize("server", ["fail"], indirect=True)
def test_a_failing_receiver_is_retried_with_backoff_then_given_up(server, wait):
    waits, gave_up = [], []
    sink = WebhookSink(server.url, retries=4, backoff_s=0.5, sleep=waits.append,
                       on_give_up=lambda a, why: gave_up.append((a["id"], why)))
    sink.submit(ALERT)
    assert wait(lambda: gave_up)
    assert server.hits == 4 and waits == [0.5, 1.0, 2.0]  # exponential backoff between the attempts
    assert gave_up[0][0] == "a1" and "4 attempts failed" in gave_up[0][1] and "500" in gave_up[0][1]
    sink.close()


@pytest.mark.parametrize("server", ["hang"], indirect=True)
def test_a_hanging_receiver_times_out_and_never_blocks_the_caller(server, wait):
    gave_up = []
    sink = WebhookSink(server.url, timeout_s=0.2, retries=2, backoff_s=0.0, queue_max=2,
                       on_give_up=lambda a, why: gave_up.append((a["id"], why)))
    t0 = time.perf_counter()
    for i in range(50):  # the caller (scoring) goes on at once; the overflow is given up, oldest first
        sink.submit(ALERT | {"id": f"a{i}"})
    assert time.perf_counter() - t0 < 0.1
    assert wait(lambda: any("timed out" in why for _i, why in gave_up), 5)
    assert any(why == "webhook queue full" for _i, why in gave_up)
    sink.close(timeout_s=0.1)


def test_bad_webhook_settings_are_refused():
    with pytest.raises(ConfigError, match="http"):
        WebhookSink("ftp://example.org/hook")
    with pytest.raises(ConfigError, match="json or slack"):
        WebhookSink("http://127.0.0.1:1/hook", fmt="xml")


@pytest.mark.network
@pytest.mark.parametrize(("server", "fmt"), [("ok", "slack"), ("fail", "json")], indirect=["server"])
def test_the_consumer_posts_published_alerts_and_dead_letters_what_it_cannot_deliver(
    settings, server, fmt, start_consumer, wait
):
    import paho.mqtt.client as paho

    from itap_stream.adapters.metrics import Metrics
    from simulator import Fault, simulate
    from simulator.transport import publish

    st = settings.replace(webhook_url=server.url, webhook_format=fmt, webhook_retries=2, webhook_timeout=2.0)
    dead: list[dict] = []
    host, port = st.broker_url.removeprefix("mqtt://").split(":")
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-dl-{fmt}")
    ready = threading.Event()
    sub.on_connect = lambda c, *_a: c.subscribe(f"{st.topic_prefix}/deadletter", qos=1)
    sub.on_subscribe = lambda *_a: ready.set()
    sub.on_message = lambda _c, _u, m: dead.append(json.loads(m.payload))
    sub.connect(host, int(port))
    sub.loop_start()
    assert ready.wait(10)
    metrics = Metrics()
    start_consumer(st, metrics)
    try:
        sim = simulate(2, 900, seed=31, faults=[Fault("power_instability", "DEV-0002", 300, 600)], maint=False)
        publish(sim, st.broker_url, speed=0, qos=1, client_id=f"t-sim-hook-{fmt}")
        if fmt == "slack":
            assert wait(lambda: any("DEV-0002 power_instability" in b["text"] for b in server.bodies), 15)
        else:
            assert wait(lambda: any(d["reason"] == "webhook_failed" for d in dead), 20)
    finally:
        sub.disconnect()
        sub.loop_stop()
    if fmt == "json":
        d = next(d for d in dead if d["reason"] == "webhook_failed")
        assert d["topic"] == server.url and "2 attempts failed, last: HTTP 500" in d["detail"]
        assert "\"device_id\": \"DEV-0002\"" in d["payload"]
        assert metrics.sample("itap_webhook_failures_total") >= 1
