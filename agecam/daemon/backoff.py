"""Capped exponential backoff for reconnecting sources: a pure object, so its schedule is tested without a clock."""
from __future__ import annotations


class Backoff:
    """Delays between failed attempts: min_s, then doubling up to max_s; reset() starts again at min_s."""

    def __init__(self, min_s: float, max_s: float):
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got min_s={min_s}, max_s={max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self._next_s = min_s

    def next_delay_s(self) -> float:
        """The delay to wait now; the one after it doubles (capped)."""
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2.0, self.max_s)
        return delay_s

    def reset(self) -> None:
        """The source worked: the next failure waits min_s again."""
        self._next_s = self.min_s
