"""A real Prometheus server (Debian's `prometheus`, installed by .ci/run) scrapes a running
consumer on loopback; a metric is queried back through Prometheus' HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from itap_stream.adapters.broker import free_port
from itap_stream.adapters.metrics import Metrics, serve
from simulator import simulate
from simulator.transport import publish

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (.ci/run installs it)"),
]


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    return body["data"]["result"] if body.get("status") == "success" else []


def test_prometheus_scrapes_the_consumer_and_answers_a_query(settings, tmp_path, start_consumer):
    metrics = Metrics()
    start_consumer(settings, metrics)
    exporter = serve(f"127.0.0.1:{free_port()}", metrics.registry)
    target = f"127.0.0.1:{exporter.server_address[1]:d}"
    prom_port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: itap\n    static_configs:\n      - targets: ['{target}']\n"
    )
    prom = subprocess.Popen(  # noqa: S603
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        sent = publish(
            simulate(2, 120, seed=4, maint=False), settings.broker_url, speed=0, qos=1, client_id="t-sim-prom"
        )
        deadline = time.monotonic() + 60
        got = None
        while time.monotonic() < deadline:
            try:
                res = _query(base, 'itap_readings_processed_total{job="itap"}')
            except OSError:  # not listening yet
                res = []
            if res and float(res[0]["value"][1]) == sent:
                got = res[0]
                break
            time.sleep(0.5)
        assert got is not None, (
            f"Prometheus never saw {sent} readings; its log: {prom.stderr.read() if prom.poll() is not None else ''}"
        )
        assert got["metric"]["instance"] == target
        up = _query(base, 'up{job="itap"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
        exporter.shutdown()
