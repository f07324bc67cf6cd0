"""A size-one "latest wins" conduit for frames: a put overwrites, and an overwrite counts a dropped frame."""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds at most one item. `put` never blocks; `get` takes the newest item or times out with None.

    An item overwritten before anyone took it is a dropped frame: `dropped` counts it and `on_drop()` is called
    (outside the lock, from the putting thread).
    """

    def __init__(self, on_drop: Callable[[], None] | None = None):
        self._cond = threading.Condition()
        self._item: T | None = None
        self._on_drop = on_drop
        self.dropped = 0  # items overwritten before a get took them
        # The taker's demand: no item is wanted before this time.monotonic() (0: every item; inf: none, while the
        # taker is busy). The taker sets it, the putter reads it (a float assignment: no lock needed), so a source
        # can skip converting frames no one would use. Monotonic: a wall-clock step cannot stall a camera.
        self.wanted_from_mono = 0.0

    def wants(self, now_mono: float) -> bool:
        """Whether the taker wants an item now (see wanted_from_mono)."""
        return now_mono >= self.wanted_from_mono

    def put(self, item: T) -> bool:
        """Store `item`, replacing any untaken one; returns True when that replaced (dropped) an item."""
        if item is None:
            raise ValueError("None cannot be put into a LatestSlot (get() uses None for 'nothing arrived')")
        with self._cond:
            overwrote = self._item is not None
            self._item = item
            if overwrote:
                self.dropped += 1
            self._cond.notify()
        if overwrote and self._on_drop is not None:
            self._on_drop()
        return overwrote

    def get(self, timeout_s: float | None = None) -> T | None:
        """Take the newest item, waiting at most `timeout_s` (None: forever); None when nothing arrived in time."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._item is not None, timeout=timeout_s):
                return None
            item, self._item = self._item, None
            return item
