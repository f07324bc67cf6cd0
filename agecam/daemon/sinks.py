"""Event sinks beside ZeroMQ: each one a thread behind a bounded backlog that never blocks the pipeline.

A pipeline hands an event to every sink with `submit()` (a non-blocking append). The sink's thread connects to its
broker (with backoff while it is away), delivers the backlog from its head in batches and removes what the broker
took; while the broker is away the backlog holds at most `backlog` events, dropping (and counting) the oldest.
What a broker took is delivered at least once (MQTT QoS 1, Redis); a batch cut by a lost connection is sent again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice

from agecam.daemon.backoff import Backoff
from agecam.daemon.metrics import NullMetrics
from agecam.daemon.worker import Worker
from agecam.logs import scrub
from agecam.secrets import secret_free

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # an idle sink looks for new events (and services its connection) this often
FLUSH_MARGIN_S = 0.6  # on close, the flush ends this long before the caller's deadline (a polite disconnect fits)
STABLE_AFTER_S = 5.0  # a connection up this long resets the reconnect backoff (a connect alone proves little)
POISON_TRIES = 5  # a head event whose batch failed this often in a row, with nothing delivered, is dropped (rejected)


class SinkDown(Exception):
    """The broker is unreachable or the connection broke; `delivered` events from the batch's head made it.

    transient: the broker said "not now" (Redis out of memory, a read-only replica, loading): the batch waits however
    long it takes, never counted towards dropping its head as a poison event."""

    def __init__(self, reason: str, delivered: int = 0, transient: bool = False):
        super().__init__(reason)
        self.delivered = delivered
        self.transient = transient


@dataclass(frozen=True)
class SinkHealth:
    """One sink in /healthz: connected or not, since when and why, and how much waits."""

    kind: str
    connected: bool
    since_s: float
    reason: str
    backlog: int
    sent: int
    dropped: int

    def as_dict(self) -> dict:
        return {"kind": self.kind, "connected": self.connected, "since": round(self.since_s, 3),
                "reason": self.reason, "backlog": self.backlog, "sent": self.sent, "dropped": self.dropped}


class Backlog:
    """A bounded FIFO; every item has a number (rising by one), so the sender removes exactly what it delivered even
    when a full backlog dropped the oldest meanwhile."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: deque = deque()
        self._head_no = 0  # number of the item at the head
        self.dropped = 0  # items pushed out by newer ones (counted under the lock: many threads put)
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item) -> int:
        """Append; returns how many of the oldest were dropped to make room (0 or 1)."""
        with self._cond:
            dropped = 0
            if len(self._items) >= self.max_items:
                self._items.popleft()
                self._head_no += 1
                self.dropped += 1
                dropped = 1
            self._items.append(item)
            self._cond.notify()
            return dropped

    def head(self, n: int) -> tuple[int, list]:
        """(number of the first, up to n items from the head), without removing them."""
        with self._cond:
            return self._head_no, list(islice(self._items, n))

    def remove_before(self, number: int) -> None:
        """Remove every item numbered below `number` (what was delivered), if still there."""
        with self._cond:
            while self._items and self._head_no < number:
                self._items.popleft()
                self._head_no += 1

    def wait(self, timeout_s: float) -> bool:
        """Wait until an item is there (True) or timeout_s passed."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            return bool(self._items)


class Sink(Worker):
    """The loop every sink shares; a subclass says how to connect, deliver a batch, idle and disconnect."""

    kind = "sink"
    batch_size = 100

    def __init__(self, cfg, metrics: NullMetrics = NullMetrics()):
        super().__init__(f"sink:{cfg.label}")
        self.cfg = cfg
        self.label = cfg.label
        self.backlog = Backlog(cfg.backlog)
        self.metrics = metrics
        self._stop = threading.Event()
        self._flush_until_s = 0.0
        self._backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, jitter=0.2)
        self.connected = False
        self._since_s = time.time()
        self._reason = "connecting"
        self.sent = 0
        self.rejected = 0
        self._head_failures = (-1, 0)  # (number of the head event, failed deliveries of it in a row)
        self._connected_at_s = 0.0

    @property
    def dropped(self) -> int:
        """Events given up: pushed out of a full backlog, or refused by the broker."""
        return self.backlog.dropped + self.rejected

    @property
    def metrics(self) -> NullMetrics:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: NullMetrics) -> None:
        """A reload hands a kept sink the new App's metrics: its gauges follow it there."""
        self._metrics = metrics
        metrics.sink_backlog(self.label, self.backlog.__len__)
        metrics.sink_state(self.label, getattr(self, "connected", False))

    # -- what a subclass provides -------------------------------------------------------------------------------------
    def _item(self, event: dict, payload: bytes):
        """What the backlog keeps for one event (encoded once, at submit)."""
        return payload

    def _connect(self) -> None:
        """Connect, or raise SinkDown(why)."""
        raise NotImplementedError

    def _deliver(self, batch: list) -> tuple[int, int]:
        """Send a batch; (delivered, rejected) counted from its head. Raises SinkDown(why, delivered)."""
        raise NotImplementedError

    def _idle(self, timeout_s: float) -> None:
        """Nothing to send: wait up to timeout_s for events, keeping the connection alive (SinkDown if it broke)."""
        self.backlog.wait(timeout_s)

    def _disconnect(self, graceful: bool) -> None:
        """Close the connection (politely when graceful)."""

    def _interrupt(self) -> None:
        """From another thread, at the stop deadline: make a blocked network call return at once."""

    def _give_up_s(self) -> float:
        """For a subclass's waits: the monotonic time after which a stopping sink must return."""
        return self._flush_until_s if self._stop.is_set() else float("inf")

    # -- the shared loop ----------------------------------------------------------------------------------------------
    def submit(self, event: dict, payload: bytes) -> None:
        """Queue an event without blocking; a full backlog drops its oldest, counted."""
        dropped = self.backlog.put(self._item(event, payload))
        if dropped:
            self.metrics.sink_dropped(self.label, "backlog_full", dropped)

    def snapshot(self) -> SinkHealth:
        return SinkHealth(self.kind, self.connected, self._since_s, self._reason, len(self.backlog), self.sent,
                          self.dropped)

    def _set_state(self, connected: bool, reason: str) -> None:
        reason = scrub(secret_free(reason))
        if connected != self.connected or (not connected and reason != self._reason):
            if connected:
                log.info("sink %s: connected to %s", self.label, secret_free(self.cfg.url))
            elif self.connected or self._reason == "connecting":
                log.warning("sink %s: %s; retrying with backoff (backlog %d)", self.label, reason, len(self.backlog))
            else:
                log.debug("sink %s: %s", self.label, reason)
            self._since_s = time.time()
        self.connected, self._reason = connected, reason
        self.metrics.sink_state(self.label, connected)

    def _stopping_done(self) -> bool:
        return self._stop.is_set() and (not self.connected or not len(self.backlog)
                                        or time.monotonic() >= self._flush_until_s)

    def _run(self) -> None:
        while not self._stopping_done():
            self.heartbeat_s = time.monotonic()
            if not self.connected:
                try:
                    self._connect()
                except Exception as exc:  # SinkDown, or a client library's surprise: never end the thread
                    self._lost(exc)
                    continue
                self._set_state(True, "")
                self._connected_at_s = time.monotonic()
            elif time.monotonic() - self._connected_at_s >= STABLE_AFTER_S:
                self._backoff.reset()  # up long enough: the next outage starts from the shortest delay again
            first_no, batch = self.backlog.head(self.batch_size)
            if not batch:
                try:
                    self._idle(IDLE_WAIT_S)
                except Exception as exc:  # lost while idle: no event is to blame
                    self._lost(exc)
                continue
            try:
                delivered, rejected = self._deliver(batch)
            except Exception as exc:
                delivered = exc.delivered if isinstance(exc, SinkDown) else 0
                # an event refused again and again is dropped; a broker saying "not now" blames no event
                rejected = 0 if getattr(exc, "transient", False) else self._poison(first_no, delivered)
                delivered += rejected
                self._lost(exc)  # backs off: a broker that drops every batch (packet size, ACL) is not hammered
            else:
                self._head_failures = (-1, 0)
                self._backoff.reset()
            self.backlog.remove_before(first_no + delivered)
            if delivered - rejected:
                self.sent += delivered - rejected
                self.metrics.sink_sent(self.label, delivered - rejected)
            if rejected:
                self.rejected += rejected
                self.metrics.sink_dropped(self.label, "rejected", rejected)
        if self.connected and time.monotonic() < self._flush_until_s + FLUSH_MARGIN_S / 2:
            self._disconnect(graceful=True)
        else:
            self._disconnect(graceful=False)
        if self.backlog:
            log.warning("sink %s: stopped with %d event(s) undelivered", self.label, len(self.backlog))
        self.connected = False
        self.metrics.sink_state(self.label, False)

    def _lost(self, exc: Exception) -> None:
        """The connection failed or broke: close it, say why, and wait the next backoff delay (or until stopped)."""
        if not isinstance(exc, SinkDown) and not self._stop.is_set():  # at stop, a cut socket may raise anything
            log.error("sink %s: unexpected %s", self.label, type(exc).__name__, exc_info=exc)
        self._disconnect(graceful=False)
        self._set_state(False, str(exc) if isinstance(exc, SinkDown) else f"{type(exc).__name__}: {exc}")
        self._stop.wait(self._backoff.next_delay_s())

    def _poison(self, first_no: int, delivered: int) -> int:
        """1 when the head event has now failed POISON_TRIES deliveries in a row (it is dropped as rejected), else 0."""
        if delivered:
            self._head_failures = (-1, 0)
            return 0
        no, tries = self._head_failures
        tries = tries + 1 if no == first_no else 1
        self._head_failures = (first_no, tries)
        if tries < POISON_TRIES:
            return 0
        log.error("sink %s: dropping an event the broker refused %d times in a row", self.label, tries)
        self._head_failures = (-1, 0)
        return 1

    def signal_stop(self, flush_s: float) -> None:
        """Ask the thread to stop after delivering what waits, for at most flush_s while connected."""
        self._flush_until_s = time.monotonic() + max(0.0, flush_s - FLUSH_MARGIN_S)
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread; at its flush deadline, a network call still blocking (a frozen broker) is cut."""
        t_end = time.monotonic() + timeout_s
        super().join(max(0.0, min(t_end, self._flush_until_s + FLUSH_MARGIN_S / 2) - time.monotonic()))
        if self.alive:
            try:
                self._interrupt()
            except Exception:
                pass
            super().join(max(0.0, t_end - time.monotonic()))
        return not self.alive

    def close(self, timeout_s: float) -> bool:
        """Stop: deliver what waits while connected (until shortly before timeout_s), then disconnect; True when the
        thread ended in time."""
        self.signal_stop(timeout_s)
        return self.join(timeout_s)


def sink_key(cfg, instance: str) -> str:
    """What a running sink is built from: a reload with an equal key keeps it (its connection and backlog). The
    instance matters only to MQTT (its status topic and last will)."""
    return f"{instance if cfg.kind == 'mqtt' else ''}|{cfg.model_dump_json()}"


def build_sink(cfg, instance: str, metrics: NullMetrics = NullMetrics()) -> Sink:
    """The sink for one `sinks:` item (its client library is imported only when used)."""
    if cfg.kind == "mqtt":
        from agecam.daemon.sink_mqtt import MqttSink

        return MqttSink(cfg, instance, metrics)
    from agecam.daemon.sink_redis import RedisSink

    return RedisSink(cfg, metrics)
