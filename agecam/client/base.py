"""What every subscription shares: an iterator of Events with a timeout, filters, and close()."""
from __future__ import annotations

import logging
import time

from agecam.client.event import Event, EventError

log = logging.getLogger("agecam.client")


class Subscription:
    """Iterate to receive Events (`for ev in sub`), or call next(timeout_s); close() ends it (also on `with` exit).

    types: prefixes of '<type>/<camera>' to keep (e.g. 'track.', 'camera.status/door'); instances: names to keep.
    timeout_s: iteration raises TimeoutError after this long without an event (None: wait forever).
    """

    def __init__(self, types=(), instances=(), timeout_s: float | None = None):
        self.types = tuple(types)
        self.instances = frozenset(instances)
        self.timeout_s = timeout_s
        self.invalid = 0  # messages that were not valid events (skipped, logged)

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        return self.next(self.timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(ack_last=exc_type is None)  # an event whose handling raised is not acknowledged

    def next(self, timeout_s: float | None = None) -> Event:
        """The next event that passes the filters; TimeoutError after timeout_s without one."""
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left_s = None if deadline_s is None else deadline_s - time.monotonic()
            if left_s is not None and left_s <= 0:
                raise TimeoutError(f"no event within {timeout_s:g} s")
            payload = self._receive(left_s)
            if payload is None:
                continue
            try:
                event = Event.from_json(payload)
            except EventError as exc:
                self.invalid += 1
                log.warning("skipped a message that is not an agecam event: %s", exc)
                continue
            if self._wanted(event):
                return event

    def _wanted(self, event: Event) -> bool:
        if self.instances and event.instance not in self.instances:
            return False
        return not self.types or f"{event.type}/{event.camera}".startswith(self.types)

    def _receive(self, timeout_s: float | None) -> bytes | None:
        """One raw message, or None when nothing came within timeout_s (None: block)."""
        raise NotImplementedError

    def close(self, ack_last: bool = True) -> None:
        """End the subscription. ack_last: the event handed out last was handled (only Redis groups keep acks)."""
        raise NotImplementedError
