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


# A track still without any age is offered crops this much more often than an unconverged one: while its crops wait
# at the quality gate, the gate should see each new one (its best is aged when age.max_wait_s runs out).
UNAGED_INTERVAL_SHARE = 1 / 3


@dataclass(frozen=True)
class Cadence:
    """A new track is due `first_sample_s` after confirmation, one still without an age every
    UNAGED_INTERVAL_SHARE of `unconverged_interval_s` (its gate decides), an unconverged one every
    `unconverged_interval_s`, a stable one every `converged_interval_s`; at most `max_per_call` per frame."""

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
        if est is None:  # sampled, but no age yet (its crops wait at the quality gate): offered more often
            interval = cadence.unconverged_interval_s * UNAGED_INTERVAL_SHARE
        else:
            interval = cadence.converged_interval_s if est.stable else cadence.unconverged_interval_s
        overdue = (now_s - rec.last_sampled_s) / interval
        if overdue >= 1.0:
            ranked.append((-overdue, tid))
    ranked.sort()
    return [tid for _, tid in ranked[: cadence.max_per_call]]
