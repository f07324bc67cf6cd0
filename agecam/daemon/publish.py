"""ZeroMQ PUB publisher fed by a bounded queue; never blocks the pipeline."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import zmq

from agecam.config import EventsConfig
from agecam.events import encode

log = logging.getLogger(__name__)


class Publisher:
    """Owns the PUB socket; pipelines call submit() (non-blocking), the `publish` thread sends."""

    def __init__(self, cfg: EventsConfig, stop: threading.Event,
                 on_sent: Callable[[dict, float], None] | None = None,
                 on_drop: Callable[[str], None] | None = None):
        self.cfg = cfg
        self._stop = stop
        self._queue: queue.Queue[dict] = queue.Queue(maxsize=cfg.queue_size)
        self._on_sent = on_sent or (lambda ev, send_s: None)
        self._on_drop = on_drop or (lambda reason: None)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        deadline_s = time.monotonic() + 3.0  # a reload may rebind the address a previous socket is releasing
        while True:
            try:
                self._sock.bind(cfg.bind)
                break
            except zmq.ZMQError as exc:
                if time.monotonic() < deadline_s and exc.errno == zmq.EADDRINUSE:
                    stop.wait(0.1)
                    continue
                self._sock.close(0)
                raise RuntimeError(f"events.bind {cfg.bind}: cannot bind ({exc})") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, event: dict) -> bool:
        """Queue an event without blocking; a full queue drops it and counts the drop."""
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            self._on_drop("queue_full")
            return False

    def _send(self, event: dict) -> None:
        try:
            t0 = time.perf_counter()
            self._sock.send_multipart(encode(event), flags=zmq.NOBLOCK)
            self._on_sent(event, time.perf_counter() - t0)
        except zmq.Again:  # high-water mark reached for every peer
            self.dropped += 1
            self._on_drop("hwm")
        except zmq.ZMQError as exc:  # never let one bad send kill the thread
            self.dropped += 1
            self._on_drop("send_error")
            log.warning("event not sent (%s): %s", event.get("type"), exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._send(event)

    def alive(self) -> bool:
        """True while the publish thread runs (health checks)."""
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread; True when it stopped."""
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def drain_and_close(self) -> int:
        """After every producer has stopped: send what is still queued, then close. Returns how many were sent."""
        sent = 0
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            self._send(event)
            sent += 1
        self._sock.close(linger=2000)
        return sent
