"""Events from the Redis stream agecam's redis sinks append to, optionally through a consumer group."""
from __future__ import annotations

import socket
import time
from collections import deque

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agecam.client.base import Subscription, log

BLOCK_SLICE_MS = 500
READ_COUNT = 100  # without a group
GROUP_READ_COUNT = 1  # with one: an entry is pending only once handed out, so a crash strands nothing unseen


class RedisSubscription(Subscription):
    """Reads `stream`. Without a group: new entries from now (or from `start`, an entry id or '0' for all).

    With `group` (created at `start`, default '0': the whole stream, when it does not exist yet): entries are
    delivered to `consumer` (default: this host's name; give a stable one where host names change, as in
    containers) and acknowledged when the next one is asked for, or by ack() / close(). A consumer that restarts
    first gets back what it was handed but had not acknowledged (at least once), then new entries: nothing
    acknowledged is repeated and nothing is lost. Entries another consumer of the group held unacknowledged for
    `claim_idle_s` (it died, or was renamed) are claimed at start and delivered here.
    """

    def __init__(self, url: str, *, stream: str = "agecam:events", group: str | None = None,
                 consumer: str | None = None, start: str | None = None, claim_idle_s: float = 60.0,
                 username: str | None = None, password: str | None = None, **kw):
        super().__init__(**kw)
        self.stream = stream
        self.group = group
        self.consumer = consumer or socket.gethostname()
        auth = {k: v for k, v in (("username", username), ("password", password)) if v}
        self._r = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=BLOCK_SLICE_MS / 1000 + 3,
                                       retry=Retry(NoBackoff(), 0), **auth)
        self._buffer: deque = deque()
        self._unacked: str | None = None  # the entry handed out last, acknowledged on the next call
        self._pending_from: str | None = "0"  # first re-read what this consumer was handed before (after a crash)
        self._last_id = start or "$"
        self._group_start = start or "0"
        self._group_ready = False
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._retry_at_s = 0.0
        self.last_id: str | None = None  # the id of the entry handed out last

    def _ensure_group(self) -> None:
        if self.group is None or self._group_ready:
            return
        try:
            self._r.xgroup_create(self.stream, self.group, id=self._group_start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True
        cursor = "0-0"
        while True:  # take over what dead or renamed consumers left pending; read below as this consumer's own
            try:
                cursor, claimed, *_ = self._r.xautoclaim(self.stream, self.group, self.consumer, self._claim_idle_ms,
                                                         start_id=cursor, count=100)
            except redis.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                log.warning("redis: XAUTOCLAIM needs Redis 6.2 or later; entries of dead consumers are not claimed")
                return
            if claimed:
                log.info("redis: claimed %d entries left pending by other consumers of %s", len(claimed), self.group)
            if cursor in ("0-0", b"0-0"):
                break

    def ack(self) -> None:
        """Acknowledge the entry handed out last (done for you on the next call and on close)."""
        if self.group is not None and self._unacked is not None:
            self._r.xack(self.stream, self.group, self._unacked)
            self._unacked = None

    def _read(self, block_ms: int) -> list:
        if self.group is None:
            resp = self._r.xread({self.stream: self._last_id}, count=READ_COUNT, block=block_ms)
        elif self._pending_from is not None:
            resp = self._r.xreadgroup(self.group, self.consumer, {self.stream: self._pending_from},
                                      count=GROUP_READ_COUNT)
            entries = resp[0][1] if resp else []
            if not entries:
                self._pending_from = None
                return []
            self._pending_from = entries[-1][0]
            return entries
        else:
            resp = self._r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=GROUP_READ_COUNT,
                                      block=block_ms)
        entries = resp[0][1] if resp else []
        if entries and self.group is None:
            self._last_id = entries[-1][0]
        return entries

    def _receive(self, timeout_s: float | None) -> bytes | None:
        block_ms = BLOCK_SLICE_MS if timeout_s is None else max(1, min(BLOCK_SLICE_MS, int(timeout_s * 1000)))
        if time.monotonic() < self._retry_at_s:  # Redis was away: wait before trying anything again
            time.sleep(min(block_ms / 1000, self._retry_at_s - time.monotonic()))
            return None
        try:
            self.ack()
            if not self._buffer:
                self._ensure_group()
                self._buffer.extend(self._read(block_ms))
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
            if isinstance(exc, redis.ResponseError) and "NOGROUP" not in str(exc):
                raise
            # NOGROUP: Redis restarted without its data; the group is created again
            log.warning("redis: %s; retrying", exc)
            self._retry_at_s = time.monotonic() + 1.0
            if self.group is not None:
                self._group_ready = False
                if isinstance(exc, redis.ResponseError):
                    self._unacked = None  # its group is gone with the data
                self._pending_from = "0"  # whatever was read but not handed out is still pending: read it again
                self._buffer.clear()
            return None
        if not self._buffer:
            return None
        entry_id, fields = self._buffer.popleft()
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        self._unacked = entry_id
        self.last_id = entry_id
        return fields.get(b"event", fields.get("event", b""))

    def close(self, ack_last: bool = True) -> None:
        """End the subscription; the entry handed out last is acknowledged unless ack_last is False."""
        try:
            if ack_last:
                self.ack()
        except redis.RedisError:
            pass
        self._r.close()
