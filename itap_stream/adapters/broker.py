"""A broker for demos and tests: mosquitto on a free port, or an embedded one.

`start_broker` prefers the ``mosquitto`` binary when it is on PATH and falls back to
amqtt, a pure-Python broker run in a background thread, so ``itap demo`` works on a
machine with no broker installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itap_stream.errors import BrokerError

__all__ = ["BrokerHandle", "free_port", "start_broker", "wait_for_port"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports: held open together while they are picked (one by one, two
    calls of `free_port` can return the same port)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    msg = f"broker did not start listening on {host}:{port} within {timeout_s:.0f}s"
    raise BrokerError(msg)


@dataclass
class BrokerHandle:
    """A running broker; ``stop()`` ends it."""

    kind: str  # "mosquitto" or "embedded"
    host: str
    port: int
    _proc: subprocess.Popen[bytes] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _broker: Any = None
    _tmp: Any = field(default=None, repr=False)
    _argv: list[str] = field(default_factory=list, repr=False)  # how to start mosquitto again
    scheme: str = "mqtt"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def directory(self) -> Path | None:
        """The folder holding this mosquitto's config (and persistence, when enabled)."""
        return Path(self._tmp.name) if self._tmp is not None else None

    def terminate(self, timeout_s: float = 10.0) -> None:
        """Stop mosquitto with SIGTERM (it saves its persistence) and wait; `start` runs it again."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        """SIGKILL mosquitto (nothing saved); `start` runs it again."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def start(self) -> None:
        """Start a stopped mosquitto again on the same port, config and persistence."""
        if self.kind != "mosquitto" or not self._argv:
            msg = "only a mosquitto broker started by start_broker can be restarted"
            raise BrokerError(msg)
        if self._proc is None:
            self._proc = _spawn(self._argv, self.host, self.port)

    def stop(self) -> None:
        self.terminate(timeout_s=5.0)
        if self._loop is not None and self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                fut.result(timeout=5)
            except Exception as exc:  # noqa: BLE001 - shutting down; report and go on
                log.warning("embedded broker did not shut down cleanly: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
persistence false
# a slow consumer's backlog must not be dropped by the broker
max_queued_messages 1000000
max_queued_bytes 0
max_inflight_messages 0
# send small packets (alerts) at once instead of batching them (Nagle)
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
"""


def start_broker(
    prefer: str = "auto",
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    conf: str | None = None,
    persistence: bool = False,
    scheme: str = "mqtt",
) -> BrokerHandle:
    """Start a broker on ``host:port`` (a free port by default).

    ``prefer``: ``auto`` (mosquitto when installed, else embedded), ``mosquitto`` or ``embedded``.
    ``conf`` replaces the whole mosquitto config (``{port}``, ``{host}`` and ``{dir}``, the
    broker's own folder, are filled in); ``persistence`` keeps sessions and queued
    messages in that folder across `BrokerHandle.terminate` / `BrokerHandle.start`.
    Both need mosquitto.
    """
    if (conf is not None or persistence) and prefer == "auto":
        prefer = "mosquitto"
    if prefer not in ("auto", "mosquitto", "embedded"):
        msg = f"broker kind must be auto, mosquitto or embedded, got {prefer!r}"
        raise BrokerError(msg)
    port = port or free_port(host)
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if prefer == "mosquitto" and binary is None:
        msg = "mosquitto is not installed (apt-get install mosquitto), use the embedded broker instead"
        raise BrokerError(msg)
    if prefer != "embedded" and binary is not None:
        tmp = tempfile.TemporaryDirectory(prefix="itap-mosquitto-")
        path = Path(tmp.name) / "mosquitto.conf"
        text = (conf if conf is not None else MOSQUITTO_CONF).format(port=port, host=host, dir=tmp.name)
        if persistence:
            # started as root, mosquitto drops to its own user: the folder must be writable for it
            data = Path(tmp.name) / "data"
            data.mkdir()
            os.chmod(tmp.name, 0o755)
            os.chmod(data, 0o777)
            text = text.replace("persistence false\n", "") + f"persistence true\npersistence_location {data}/\n"
        path.write_text(text, encoding="utf-8")
        argv = [binary, "-c", str(path)]
        try:
            proc = _spawn(argv, host, port)
        except BrokerError:
            tmp.cleanup()
            raise
        return BrokerHandle("mosquitto", host, port, _proc=proc, _tmp=tmp, _argv=argv, scheme=scheme)
    return _start_embedded(host, port)


def _spawn(argv: list[str], host: str, port: int) -> subprocess.Popen[bytes]:
    """Run mosquitto and wait until it listens; `BrokerError` with its output if it does not."""
    log_path = Path(argv[-1]).with_name("mosquitto.log")  # a file, not a pipe: a full pipe would stall it
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file)  # noqa: S603 - our own binary and config
    try:
        wait_for_port(host, port)
    except BrokerError:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err = log_path.read_text(errors="replace")[-2000:]
        msg = f"mosquitto failed to start on {host}:{port}: {err.strip() or 'no output'}"
        raise BrokerError(msg) from None
    return proc


def _start_embedded(host: str, port: int) -> BrokerHandle:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:  # pragma: no cover - amqtt is a dependency
        msg = "the embedded broker needs the 'amqtt' package"
        raise BrokerError(msg) from exc
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            broker = Broker(config, loop=loop)
            loop.run_until_complete(broker.start())
            box["broker"] = broker
        except Exception as exc:  # noqa: BLE001 - reported to the caller below
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="itap-embedded-broker", daemon=True)
    thread.start()
    started.wait(15)
    if "broker" not in box:
        msg = f"embedded broker failed to start on {host}:{port}: {box.get('error', 'timeout')}"
        raise BrokerError(msg)
    wait_for_port(host, port)
    return BrokerHandle("embedded", host, port, _loop=loop, _thread=thread, _broker=box["broker"])
