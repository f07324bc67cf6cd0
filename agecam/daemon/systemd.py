"""sd_notify for systemd (READY, STATUS, WATCHDOG, STOPPING, RELOADING); a no-op without NOTIFY_SOCKET."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

HealthResult = bool | tuple[bool, str]


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET (path or abstract '@name'); does nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self._addr = addr
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed_once = False
        self.watchdog_interval_s = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        if not usec:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid and pid.strip() != str(os.getpid()):
            return None  # the watchdog is meant for another process (we are a child of the service's main process)
        try:
            value = int(usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
            return None
        return value / 1e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self._addr is not None

    def notify(self, *fields: str) -> bool:
        """Send 'KEY=VALUE' fields in one datagram; returns False when nothing was sent."""
        if self._addr is None:
            return False
        data = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._addr)
                return True
            except OSError as exc:
                if not self._failed_once:
                    log.warning("sd_notify to %r failed: %s (further failures are not logged)",
                                self._addr.replace("\0", "@"), exc)
                    self._failed_once = True
                return False

    def ready(self, status: str | None = None) -> bool:
        """READY=1: models loaded, sources opened, threads running."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive and making progress."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (as systemd 253+ expects); follow with ready() when done."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more start-up time (slow model loads)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        """Close the socket."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str, max_chars: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= max_chars else line[: max_chars - 1] + "…"


class WatchdogPinger:
    """Thread `watchdog`: WATCHDOG=1 every interval/2, but only while healthy() says every pipeline progresses.

    healthy() returns a bool or (bool, reason); an exception counts as unhealthy. Withholding is logged once
    per episode with its reason, and so is the recovery.
    """

    def __init__(self, notifier: Notifier, healthy: Callable[[], HealthResult], stop: threading.Event,
                 interval_s: float | None = None):
        self._notifier = notifier
        self._healthy = healthy
        self._stop = stop
        watchdog_s = notifier.watchdog_interval_s if interval_s is None else interval_s
        self.period_s = watchdog_s / 2 if watchdog_s else None
        self.pings = 0
        self.withholding = False
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start pinging; returns False (and starts nothing) when systemd set no watchdog."""
        if self.period_s is None:
            return False
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread after stop is set; True when it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _check(self) -> tuple[bool, str]:
        try:
            result = self._healthy()
        except Exception as exc:  # a broken health check must not look healthy
            return False, f"health check raised {type(exc).__name__}: {exc}"
        if isinstance(result, tuple):
            return bool(result[0]), str(result[1])
        return bool(result), "a pipeline stopped making progress"

    def tick(self) -> bool:
        """One step: ping when healthy, else withhold (logging each change once). True when a ping was sent."""
        ok, why = self._check()
        if not ok:
            if not self.withholding:
                log.error("withholding systemd watchdog pings: %s; systemd will restart the service if this lasts", why)
                self.withholding = True
            return False
        if self.withholding:
            log.warning("watchdog pings resumed: every pipeline is making progress again")
            self.withholding = False
        if self._notifier.watchdog():
            self.pings += 1
            return True
        return False

    def _run(self) -> None:
        assert self.period_s is not None
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.period_s)
