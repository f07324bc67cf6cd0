"""Table tests of the per-track age smoother and the per-camera age sampler (pure logic, scripted clock)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from agecam.config import AgeConfig
from agecam.daemon.sampling import Cadence, due_for_sample
from agecam.daemon.smooth import AgeSmoother
from agecam.events import AgeEstimate
from agecam.models.reference import CYDRAL_BINS_YEARS

BINS = np.asarray(CYDRAL_BINS_YEARS)


def dist(mean_years: float, std_years: float = 4.0) -> np.ndarray:
    """A model-like distribution over the reference bins: a discretised normal."""
    p = np.exp(-0.5 * ((BINS - mean_years) / std_years) ** 2)
    return p / p.sum()


def smoother(**cfg) -> AgeSmoother:
    return AgeSmoother(AgeConfig(**cfg), BINS)


def test_no_sample_gives_no_estimate():
    assert smoother().estimate() is None, "an empty smoother must say it knows nothing"


def test_single_sample_is_uncertain_and_not_stable():
    # given one confident-looking sample
    s = smoother(stable_std_years=4.0, stable_min_samples=5)
    s.add(dist(35, 4.0), 1.0, 0.0)
    # when we ask for the estimate
    e = s.estimate()
    # then its spread is the sample's own and it is not stable
    assert abs(e.years - 35) < 0.5, f"mean {e.years} should be the sample's mean 35"
    assert e.std >= 3.5, f"one sample must admit uncertainty, std {e.std}"
    assert e.low < 35 - 5 and e.high > 35 + 5, f"a 90% interval of one sample should be wide: [{e.low}, {e.high}]"
    assert not e.stable and e.samples == 1


def test_agreeing_samples_converge_and_stop_jittering():
    # given per-frame estimates that scatter +-2 years around 40 (like a model on a steady face)
    rng = np.random.default_rng(0)
    s = smoother(stable_std_years=4.0, stable_min_samples=5, max_samples=60)
    means, stds = [], []
    for i in range(30):
        s.add(dist(40 + rng.uniform(-2, 2), 5.0), 1.0, float(i))
        e = s.estimate()
        means.append(e.years)
        stds.append(e.std)
    # then the std shrinks, the estimate becomes stable and late samples barely move it
    assert stds[-1] < stds[0] / 3, f"std should shrink as samples agree: first {stds[0]:.2f}, last {stds[-1]:.2f}"
    assert s.estimate().stable, f"30 agreeing samples should be stable: {s.estimate()}"
    late_steps = np.abs(np.diff(means[-10:]))
    assert late_steps.max() < 0.3, f"a converged age must not jitter; steps {np.round(late_steps, 2)}"
    assert abs(means[-1] - 40) < 1.0, f"converged on {means[-1]:.2f}, expected about 40"


@pytest.mark.parametrize("outlier_years, max_shift_years", [(75, 1.0), (5, 1.0), (52, 1.0)])
def test_outlier_sample_moves_the_mean_little(outlier_years, max_shift_years):
    # given a converged track at 30
    s = smoother()
    for i in range(12):
        s.add(dist(30 + (i % 3 - 1) * 0.8, 4.0), 1.0, float(i))
    before = s.estimate().years
    # when one wild sample arrives
    s.add(dist(outlier_years, 4.0), 1.0, 12.0)
    after = s.estimate().years
    # then the mean moves far less than the outlier's deviation / n would under a plain average
    assert abs(after - before) < max_shift_years, (
        f"outlier at {outlier_years} moved the mean {before:.2f} -> {after:.2f} (allowed {max_shift_years})")


def test_disagreeing_samples_are_not_stable():
    # given samples that alternate between 20 and 50 (two people swapped, or a broken chip)
    s = smoother(stable_std_years=4.0, stable_min_samples=5)
    for i in range(20):
        s.add(dist(20 if i % 2 else 50, 3.0), 1.0, float(i))
    e = s.estimate()
    # then the fused std reflects the disagreement (Birge inflation), not 1/sqrt(n) of each sample's spread
    assert e.std > 4.0 and not e.stable, f"disagreeing samples must not look converged: {e}"


def test_old_samples_are_forgotten():
    # given a smoother that keeps 10 samples, fed 10 at age 20 then 10 at age 60
    s = smoother(max_samples=10)
    for i in range(10):
        s.add(dist(20), 1.0, float(i))
    for i in range(10, 20):
        s.add(dist(60), 1.0, float(i))
    # then only the recent ones count
    e = s.estimate()
    assert e.samples == 10 and abs(e.years - 60) < 0.5, f"the 20-year samples should be forgotten: {e}"


def test_low_quality_samples_weigh_less():
    # given two samples, a good one at 30 and a poor one at 40
    s = smoother()
    s.add(dist(30), 1.0, 0.0)
    s.add(dist(40), 0.1, 1.0)
    # then the fused mean sits near the good sample
    assert s.estimate().years < 32, f"a weight-0.1 sample pulled the mean to {s.estimate().years:.2f}"


def test_zero_weight_sample_is_ignored_and_wrong_width_refused():
    s = smoother()
    s.add(dist(30), 0.0, 0.0)
    assert s.estimate() is None, "a zero-weight sample must not count"
    with pytest.raises(ValueError, match="81 bin"):
        s.add(np.ones(101) / 101, 1.0, 0.0)


# ---- sampler -------------------------------------------------------------------------------------------------

STABLE = AgeEstimate(30, 1, 28, 32, 10, True)
UNSTABLE = AgeEstimate(30, 6, 20, 40, 2, False)


@dataclass
class Rec:
    """What the sampler reads of a pipeline track record (a stand-in: the sampler is pure logic)."""

    confirmed_s: float
    est: AgeEstimate | None = None
    last_sampled_s: float | None = None

    def estimate(self) -> AgeEstimate | None:
        return self.est


CADENCE = Cadence(first_sample_s=0.0, unconverged_interval_s=0.3, converged_interval_s=3.0, max_per_call=16)


def run_script(records: dict[int, Rec], times: list[float], cadence: Cadence = CADENCE) -> list[list[int]]:
    """Ask at each time; every due track is sampled at once (as the pipeline does). Returns the picks."""
    picks = []
    for now_s in times:
        due = due_for_sample(records, now_s, cadence)
        for tid in due:
            records[tid].last_sampled_s = now_s
        picks.append(due)
    return picks


@pytest.mark.parametrize(
    "name, est, times, expected",
    [
        # a new track is sampled at once, then, while it has no age, every third of the unconverged interval
        ("new, no age yet", None, [0.0, 0.05, 0.1, 0.15, 0.21, 0.32], [[1], [], [1], [], [1], [1]]),
        ("unstable estimate", UNSTABLE, [0.0, 0.29, 0.31, 0.62], [[1], [], [1], [1]]),
        # a stable track only every converged interval (3 s)
        ("stable", STABLE, [0.0, 0.3, 1.0, 2.9, 3.0, 5.0, 6.1], [[1], [], [], [], [1], [], [1]]),
    ],
)
def test_sampler_cadence(name, est, times, expected):
    # given the default cadence and one track with a fixed estimate state, when asked at these times
    picks = run_script({1: Rec(confirmed_s=0.0, est=est)}, times)
    # then the track is due exactly at the expected times
    assert picks == expected, f"{name}: picks {picks}, expected {expected}"


def test_sampler_waits_first_sample_s_after_confirmation():
    cadence = Cadence(first_sample_s=0.5, unconverged_interval_s=0.3, converged_interval_s=3.0, max_per_call=16)
    records = {7: Rec(confirmed_s=10.0)}
    assert due_for_sample(records, 10.0, cadence) == [], "not due before first_sample_s"
    assert due_for_sample(records, 10.5, cadence) == [7], "due once first_sample_s has passed since confirmation"


def test_sampler_caps_per_call_new_tracks_first_then_most_overdue():
    # given a cap of 2, two old tracks (one much more overdue), a stable one not due, and one new track
    records = {1: Rec(0.0, UNSTABLE, last_sampled_s=0.0),  # 1.0 s ago -> 3.3 intervals overdue
               2: Rec(0.0, STABLE, last_sampled_s=0.0),  # stable, 1.0 s ago -> not due
               3: Rec(0.0, UNSTABLE, last_sampled_s=0.6),  # 0.4 s ago -> 1.3 intervals overdue
               4: Rec(1.0)}  # new
    cadence = Cadence(first_sample_s=0.0, unconverged_interval_s=0.3, converged_interval_s=3.0, max_per_call=2)
    # when asked at t=1.0, then the new track comes first, then the most overdue, and the cap holds
    picks = run_script(records, [1.0, 1.0], cadence)
    assert picks[0] == [4, 1], f"expected the new track then the most overdue one, got {picks[0]}"
    # and the cost follows people, not frames: asking again at once returns the leftover only
    assert picks[1] == [3], "the capped-out track must be picked next"
