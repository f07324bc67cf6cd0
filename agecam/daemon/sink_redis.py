"""The Redis Streams sink: XADD <stream> MAXLEN ~ <maxlen> * event <json>, pipelined per batch (redis-py)."""
from __future__ import annotations

import logging
import socket
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agecam.daemon.metrics import NullMetrics
from agecam.daemon.sinks import Sink, SinkDown

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 2.0  # a broker that stops answering mid-batch is treated as gone (and the batch sent again)
# replies that mean "not now": the batch waits (at least once), it is never dropped as refused. redis-py maps some
# (OOM, READONLY, LOADING) to classes and strips their prefix; the others keep it.
TRANSIENT_CLASSES = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                     redis.exceptions.BusyLoadingError)
TRANSIENT_PREFIXES = ("BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "NOREPLICAS")
PING_EVERY_S = 5.0  # an idle sink checks its connection this often, so /healthz and the gauge stay true


class RedisSink(Sink):
    """Appends every event to one stream; Redis trims it to about `maxlen` entries (consumers read it with a
    consumer group: see agecam.client)."""

    kind = "redis"

    def __init__(self, cfg, metrics: NullMetrics = NullMetrics()):
        super().__init__(cfg, metrics)
        self._redis: redis.Redis | None = None
        self._last_ok_s = 0.0

    def _connect(self) -> None:
        # no hidden retries: the sink's own loop decides (redis-py's default retries a command three times)
        kw = {"socket_connect_timeout": SOCKET_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S,
              "retry": Retry(NoBackoff(), 0)}
        if self.cfg.username:
            kw["username"] = self.cfg.username
        if self.cfg.password:
            kw["password"] = self.cfg.password
        if self.cfg.url.startswith("rediss://") and self.cfg.ca_file:
            kw["ssl_ca_certs"] = str(self.cfg.ca_file)
        client = redis.Redis.from_url(self.cfg.url, **kw)
        self._redis = client  # from here _interrupt() can cut a blocked PING
        try:
            client.ping()
        except redis.RedisError as exc:
            self._redis = None
            client.close()
            raise SinkDown(_why(exc)) from None
        self._last_ok_s = time.monotonic()

    def _deliver(self, batch: list) -> tuple[int, int]:
        pipe = self._redis.pipeline(transaction=False)
        for payload in batch:
            pipe.xadd(self.cfg.stream, {"event": payload}, maxlen=self.cfg.maxlen, approximate=True)
        try:
            results = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise SinkDown(_why(exc)) from None  # unknown how many landed: the batch is sent again (at least once)
        for i, r in enumerate(results):
            if isinstance(r, TRANSIENT_CLASSES) or isinstance(r, Exception) and str(r).startswith(TRANSIENT_PREFIXES):
                # from here on, everything is sent again once Redis accepts writes (some may land twice)
                raise SinkDown(f"Redis: {r}", delivered=i, transient=True)
        rejected = sum(1 for r in results if isinstance(r, Exception))
        if rejected:
            first = next(r for r in results if isinstance(r, Exception))
            log.error("sink %s: Redis refused %d event(s): %s", self.label, rejected, first)
        self._last_ok_s = time.monotonic()
        return len(batch), rejected

    def _idle(self, timeout_s: float) -> None:
        if time.monotonic() - self._last_ok_s >= PING_EVERY_S:
            try:
                self._redis.ping()
            except redis.RedisError as exc:
                raise SinkDown(_why(exc)) from None
            self._last_ok_s = time.monotonic()
        self.backlog.wait(timeout_s)

    def _interrupt(self) -> None:
        """Shut the sockets down (never close them from this thread): the blocked read fails, the sink thread closes."""
        client = self._redis
        pool = getattr(client, "connection_pool", None)
        for conn in list(getattr(pool, "_in_use_connections", ())) + list(getattr(pool, "_available_connections", ())):
            sock = getattr(conn, "_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _disconnect(self, graceful: bool) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if "redis" in text.lower() else f"Redis: {text}"
