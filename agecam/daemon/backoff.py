"""Capped exponential backoff for reconnecting sources: a pure object, so its schedule is tested without a clock."""
from __future__ import annotations

import random


class Backoff:
    """Delays between failed attempts: min_s, then doubling up to max_s; reset() starts again at min_s.

    With jitter j each delay is stretched by a random factor in [1, 1 + j], so cameras that failed together (one
    NVR restarting) do not retry in lockstep; a delay is never shorter than its schedule.
    """

    def __init__(self, min_s: float, max_s: float, jitter: float = 0.0, rng: random.Random | None = None):
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got min_s={min_s}, max_s={max_s}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, got {jitter}")
        self.min_s = min_s
        self.max_s = max_s
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._next_s = min_s

    def next_delay_s(self) -> float:
        """The delay to wait now; the one after it doubles (capped)."""
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2.0, self.max_s)
        return delay_s * (1.0 + self._rng.uniform(0.0, self.jitter)) if self.jitter else delay_s

    def reset(self) -> None:
        """The source worked: the next failure waits min_s again."""
        self._next_s = self.min_s
