"""Which tracks get an age sample now: a pure function over the pipeline's track records and a clock passed in."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from agecam.config import AgeConfig
from agecam.events import AgeEstimate


class Sampled(Protocol):
    """What the sampler reads of a track record (TrackRecord in the pipeline)."""

    confirmed_s: float  # when the track was first offered for sampling (its confirmation)
    last_sampled_s: float | None  # when it was last sampled (or tried), None before the first

    def estimate(self) -> AgeEstimate | None: ...


@dataclass(frozen=True)
class Cadence:
    """A new track is due `first_sample_s` after confirmation, an unconverged one every `unconverged_interval_s`,
    a stable one every `converged_interval_s`; at most `max_per_call` per frame."""

    first_sample_s: float
    unconverged_interval_s: float
    converged_interval_s: float
    max_per_call: int

    @classmethod
    def from_config(cls, cfg: AgeConfig, max_per_call: int | None = None) -> "Cadence":
        return cls(cfg.first_sample_s, cfg.unconverged_interval_s, cfg.converged_interval_s,
                   cfg.max_batch if max_per_call is None else max_per_call)


def due_for_sample(records: Mapping[int, Sampled], now_s: float, cadence: Cadence) -> list[int]:
    """Track ids due for a sample now, most urgent first (never-sampled tracks, then the most overdue), capped.

    Inference cost then follows the number of people, not the frame rate.
    """
    ranked: list[tuple[float, int]] = []
    for tid, rec in records.items():
        if rec.last_sampled_s is None:
            if now_s - rec.confirmed_s >= cadence.first_sample_s:
                ranked.append((-math.inf, tid))  # never sampled: ahead of everyone
            continue
        est = rec.estimate()
        interval = cadence.converged_interval_s if (est is not None and est.stable) else cadence.unconverged_interval_s
        overdue = (now_s - rec.last_sampled_s) / interval
        if overdue >= 1.0:
            ranked.append((-overdue, tid))
    ranked.sort()
    return [tid for _, tid in ranked[: cadence.max_per_call]]
