"""Webhook delivery of alert transitions: a JSON POST per alert, off the scoring path.

`WebhookSink.submit` only puts the alert on a bounded queue; one worker thread posts
them in order with a timeout, retries a failed post with exponential backoff, and after
``retries`` failures hands the alert to ``on_give_up`` (the consumer dead-letters it).
A full queue drops the oldest waiting alert to ``on_give_up`` too: scoring never waits
for a slow or hanging receiver. ``fmt="slack"`` posts a Slack-compatible
``{"text": ..., "blocks": [...]}`` message instead of the alert object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from itap_stream.errors import ConfigError

__all__ = ["WebhookSink", "slack_message"]

log = logging.getLogger(__name__)

_ICON = {"CRITICAL": ":red_circle:", "WARNING": ":large_orange_circle:", "INFO": ":large_blue_circle:"}


def slack_message(alert: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message for an alert.

    Examples
    --------
    >>> m = slack_message({"severity": "CRITICAL", "status": "firing", "device_id": "DEV-0008",
    ...     "rule": "power_instability", "root_cause": "Power instability", "id": "fc41",
    ...     "families": {"Voltage": 93.5, "Current": 2.5}, "window_end": "2026-01-01T00:18:11.000Z",
    ...     "likely_fault": {"class": "power_instability", "confidence": 0.96}})
    >>> m["text"]
    ':red_circle: CRITICAL firing: DEV-0008 power_instability (Power instability)'
    """
    fams = sorted(alert.get("families", {}).items(), key=lambda kv: -kv[1])[:3]
    likely = alert.get("likely_fault") or {}
    text = (
        f"{_ICON.get(alert.get('severity', ''), '')} {alert.get('severity')} {alert.get('status')}: "
        f"{alert.get('device_id')} {alert.get('rule')} ({alert.get('root_cause', '')})"
    ).strip()
    details = [
        f"*Families:* {', '.join(f'{f} {v:.0f}%' for f, v in fams) or '-'}",
        f"*Likely fault:* {likely.get('class', 'unknown')} ({likely.get('confidence', 0.0):.0%})",
        f"*Window end:* {alert.get('window_end')}   *Alert id:* `{alert.get('id')}`",
    ]
    if alert.get("note"):
        details.append(f"*Note:* {alert['note']}")
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{text}*"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(details)}},
        ],
    }


class WebhookSink:
    """Posts alerts to ``url`` from a worker thread; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        fmt: str = "json",
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        queue_max: int = 1000,
        on_give_up: Callable[[dict[str, Any], str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            msg = f"webhook_url must be an http:// or https:// URL, got {url!r}"
            raise ConfigError(msg)
        if fmt not in ("json", "slack"):
            msg = f"webhook_format must be json or slack, got {fmt!r}"
            raise ConfigError(msg)
        self.url, self.fmt = url, fmt
        self.timeout_s, self.retries, self.backoff_s = timeout_s, max(1, retries), backoff_s
        self.on_give_up = on_give_up
        self._sleep = sleep
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_max)
        self._stop = threading.Event()
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="itap-webhook", daemon=True)
        self._thread.start()

    def submit(self, alert: dict[str, Any]) -> None:
        """Queue an alert for delivery; never blocks."""
        while True:
            try:
                self._q.put_nowait(alert)
                return
            except queue.Full:
                try:
                    oldest = self._q.get_nowait()
                except queue.Empty:
                    continue
                if oldest is not None:
                    self._give_up(oldest, "webhook queue full")

    def _give_up(self, alert: dict[str, Any], reason: str) -> None:
        self.failed += 1
        log.warning("webhook: giving up on alert %s (%s)", alert.get("id"), reason)
        if self.on_give_up is not None:
            self.on_give_up(alert, reason)

    def _post(self, alert: dict[str, Any]) -> None:
        body = json.dumps(slack_message(alert) if self.fmt == "slack" else alert).encode()
        req = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
            resp.read()

    def _run(self) -> None:
        while True:
            alert = self._q.get()
            if alert is None:
                return
            error = ""
            for attempt in range(self.retries):
                try:
                    self._post(alert)
                    self.delivered += 1
                    break
                except urllib.error.HTTPError as exc:
                    error = f"HTTP {exc.code} {exc.reason}"
                except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, timed out, bad answer
                    error = f"{exc.__class__.__name__}: {getattr(exc, 'reason', exc)}"
                if attempt + 1 < self.retries and not self._stop.is_set():
                    self._sleep(self.backoff_s * 2**attempt)
            else:
                self._give_up(alert, f"{self.retries} attempts failed, last: {error}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (within ``timeout_s``), then stop the worker."""
        deadline = time.monotonic() + timeout_s
        while not self._q.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.5)
