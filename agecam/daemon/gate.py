"""The per-track quality gate: good crops go to the age model at once; a track that gets none waits a little, then
is aged from the best crop it had, weighted by that crop's quality (so its interval is honestly wide)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

UNAGED_REASONS = ("too_small", "no_chip", "too_short")  # why a track ended without any age
# A crop let through below the gate counts with at least this spread (before its quality weight widens it further):
# the model can be confidently wrong on a turned or blurred chip (measured: 5 years on a strongly turned face
# against 9.5 on the same face frontal), so its own confidence is not taken at its word.
FALLBACK_MIN_STD_YEARS = 8.0


@dataclass
class HeldCrop:
    """The best crop of the current waiting window."""

    quality: float
    chip: np.ndarray
    ts: float


class QualityGate:
    """One track's gate. offer() returns (chip, weight, ts, min_std_years) to age now, or None.

    A crop at or above min_quality passes at once (weight = its quality) and starts a new waiting window. Poorer
    crops are held, the best one only; when max_wait_s has passed in a window without a good crop, the held one
    passes. So a track whose every crop is poor still gets an age about max_wait_s after its first crop, and every
    max_wait_s after that, while good crops, whenever they come, outweigh it in the smoother.
    """

    def __init__(self, min_quality: float, max_wait_s: float):
        self.min_quality = min_quality
        self.max_wait_s = max_wait_s
        self.window_start_s: float | None = None
        self.held: HeldCrop | None = None
        self.offered = 0  # usable crops seen (landmarks and size present)
        self.best_quality = 0.0  # of every crop offered
        self.too_small = 0  # crops below the hard size floor
        self.no_landmarks = 0  # faces the detector gave no landmarks for (no chip can be cut)

    def offer(self, quality: float, now_s: float, make_chip: Callable[[], np.ndarray]):
        """Consider one usable crop; (chip, weight, ts, min_std_years) when something should be aged now."""
        self.offered += 1
        self.best_quality = max(self.best_quality, quality)
        if self.window_start_s is None:
            self.window_start_s = now_s
        if quality >= self.min_quality:
            self.window_start_s, self.held = now_s, None
            return make_chip(), quality, now_s, 0.0
        if self.held is None or quality > self.held.quality:
            self.held = HeldCrop(quality, make_chip(), now_s)
        if now_s - self.window_start_s >= self.max_wait_s and self.held.quality > 0:
            held, self.held, self.window_start_s = self.held, None, now_s
            return held.chip, held.quality, held.ts, FALLBACK_MIN_STD_YEARS
        return None

    def unaged_reason(self) -> str:
        """Why a track that ended without any age got none (one of UNAGED_REASONS)."""
        if self.offered == 0 and self.too_small and self.too_small >= self.no_landmarks:
            return "too_small"
        if (self.offered == 0 and self.no_landmarks) or (self.offered and self.best_quality <= 0.0):
            return "no_chip"  # no landmarks, or only crops of quality 0 (profile, upside down): never a usable chip
        return "too_short"
