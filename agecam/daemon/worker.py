"""The one surface every daemon thread offers: start, join(timeout) -> bool, alive, name, heartbeat_s."""
from __future__ import annotations

import threading
import time


class Worker:
    """A named daemon thread running `self._run`; subclasses refresh `heartbeat_s` (time.monotonic()) as they loop."""

    def __init__(self, name: str):
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.heartbeat_s = time.monotonic()

    @property
    def name(self) -> str:
        return self.thread.name

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread (after its stop event is set); True when it has finished or never started."""
        if self.thread.ident is not None:
            self.thread.join(timeout_s)
        return not self.thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError
