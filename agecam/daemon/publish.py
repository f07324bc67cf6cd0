"""ZeroMQ PUB publisher fed by a bounded queue; never blocks the pipeline."""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
import zmq

from agecam.config import EventsConfig
from agecam.daemon.metrics import NullMetrics
from agecam.daemon.worker import Worker
from agecam.events import CAMERA_STATUS, encode

log = logging.getLogger(__name__)


def _client_keys(folder: Path) -> frozenset[tuple[str, bytes]]:
    """The allow-list as (file name, contents) pairs: a removed or changed key file is a revocation."""
    return frozenset((p.name, p.read_bytes()) for p in folder.glob("*.key") if p.is_file())


HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 5000, 15000  # a peer silent for 15 s is disconnected
MAX_INBOUND_BYTES = 4096
LOOP_WAIT_S = 0.2  # the publish loop checks its stop event this often  # MAXMSGSIZE: a peer sending more is disconnected (PUB receives only subscriptions)


class Publisher(Worker):
    """Owns the PUB socket; pipelines call submit() (non-blocking), the `publish` thread sends.

    It belongs to the run, not to one config: a reload that leaves `events` unchanged keeps it (and its socket),
    so subscribers stay connected and miss nothing; close() ends it.
    """

    def __init__(self, cfg: EventsConfig, metrics: NullMetrics = NullMetrics()):
        super().__init__("publish")
        self.cfg = cfg
        self._stop = threading.Event()
        self._queue: queue.Queue[dict] = queue.Queue(maxsize=cfg.queue_size)
        self.metrics = metrics
        self._clients_seen: frozenset = frozenset()
        self._ctx = zmq.Context.instance()
        self._auth = None
        self._sock = self._ctx.socket(zmq.PUB)
        # per subscriber at most `hwm` queued messages: beyond it PUB drops that subscriber's copy silently (it cannot
        # be counted here, and XPUB_NODROP would stall every subscriber for one slow one); a subscriber sees the
        # loss as a gap in `seq`. Heartbeats drop peers that died without closing, so they hold no queue.
        self._sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)  # subscribers send only short subscriptions
        if cfg.curve is not None:
            self._enable_curve(cfg.curve)
        deadline_s = time.monotonic() + 3.0  # a reload may rebind the address a previous socket is releasing
        while True:
            try:
                self._sock.bind(cfg.bind)
                break
            except zmq.ZMQError as exc:
                if time.monotonic() < deadline_s and exc.errno == zmq.EADDRINUSE:
                    time.sleep(0.1)
                    continue
                self._sock.close(0)
                if self._auth is not None:  # the ZAP handler holds the context's one ZAP endpoint: free it
                    self._auth.stop()
                raise RuntimeError(f"events.bind {cfg.bind}: cannot bind ({exc})") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dropped = 0

    def _enable_curve(self, curve) -> None:
        """Encrypt, and deliver only to clients whose public key is in authorized_clients (checked by ZAP)."""
        from zmq.auth.thread import ThreadAuthenticator

        from agecam.keys import load_secret

        try:
            public, secret = load_secret(curve.server_secret_key, "events.curve.server_secret_key")
            clients = Path(curve.authorized_clients)
            if not clients.is_dir():
                raise FileNotFoundError(f"events.curve.authorized_clients: expected a folder of subscribers' public "
                                        f"certificates (*.key), found nothing at {clients}")
        except Exception:
            self._sock.close(0)
            raise
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("agecam.daemon.zap"))
        try:
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(clients))
        except Exception:
            self._auth.stop()
            self._sock.close(0)
            raise
        self._clients_seen = _client_keys(clients)
        log.info("events: CURVE on, %d authorised subscriber key(s) in %s", len(self._clients_seen), clients)
        self._sock.curve_secretkey = secret
        self._sock.curve_publickey = public
        self._sock.curve_server = True

    def submit(self, event: dict) -> bool:
        """Queue an event without blocking; a full queue drops it and counts the drop."""
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            self.metrics.event_dropped("queue_full")
            return False

    def _send(self, event: dict) -> None:
        try:
            t0 = time.perf_counter()
            self._sock.send_multipart(encode(event), flags=zmq.NOBLOCK)
            latency_s = None if event["type"] == CAMERA_STATUS else time.time() - event["ts"]
            self.metrics.event_published(event["type"], time.perf_counter() - t0, latency_s)
        except zmq.ZMQError as exc:  # never let one bad send kill the thread
            self.dropped += 1
            self.metrics.event_dropped("send_error")
            log.warning("event not sent (%s): %s", event.get("type"), exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat_s = time.monotonic()
            try:
                event = self._queue.get(timeout=LOOP_WAIT_S)
            except queue.Empty:
                continue
            self._send(event)

    def keeps_clients(self) -> bool:
        """For a reload with unchanged `events`: re-read the CURVE allow-list (new keys apply at once) and say
        whether the socket may be kept; False when a key was removed (a new socket then cuts the revoked off)."""
        if self._auth is None:
            return True
        clients = Path(self.cfg.curve.authorized_clients)
        now = _client_keys(clients) if clients.is_dir() else frozenset()
        self._auth.configure_curve(domain="*", location=str(clients))  # new connections: the new list, always
        revoked = not now >= self._clients_seen
        self._clients_seen = now
        if revoked:
            log.info("events: a subscriber key was revoked; its open connection ends with this socket")
        return not revoked

    def close(self, timeout_s: float, linger_s: float = 2.0) -> bool:
        """Stop the thread, send what is still queued, close the socket (waiting at most linger_s for slow
        subscribers to take it); True when the thread stopped in time."""
        self._stop.set()
        stopped = self.join(max(timeout_s, LOOP_WAIT_S * 2))  # its loop notices within LOOP_WAIT_S
        if not stopped:  # a ZeroMQ socket is not thread-safe: never drain or close it beside its own thread
            log.error("the publish thread did not stop; its socket is left to the process exit")
            return False
        self.drain_and_close(linger_s)
        return stopped

    def drain_and_close(self, linger_s: float = 2.0) -> int:
        """After every producer has stopped: send what is still queued, then close. Returns how many were sent."""
        sent = 0
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            self._send(event)
            sent += 1
        self._sock.close(linger=int(linger_s * 1000))
        if self._auth is not None:
            self._auth.stop()
        return sent
