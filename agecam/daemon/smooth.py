"""Per-track age fusion: many noisy samples into one estimate whose spread says how far to trust it."""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agecam.config import AgeConfig
from agecam.events import AgeEstimate

Z90 = 1.6448536  # central 90% interval of a normal: mean +- Z90 * std


@dataclass(frozen=True)
class _Sample:
    mean_years: float
    var_years2: float
    weight: float
    ts: float


class AgeSmoother:
    """Fuses one track's age samples into an estimate whose spread says how much to trust it.

    Each sample is the model's distribution over age bins; we keep its mean m_i and variance v_i and fuse them as
    independent Gaussian measurements weighted by quality w_i: the precision-weighted mean
    mu = sum(w_i m_i / v_i) / sum(w_i / v_i), with std 1 / sqrt(sum(w_i / v_i)) (inverse-variance weighting, the
    Gaussian posterior under a flat prior). Two refinements make it honest and steady:
    - Huber reweighting (a few IRLS passes): a sample more than `huber_k` of its own std away from the fused
      mean has its weight scaled by huber_k / |z|, so one bad crop moves a converged age little.
    - Birge ratio: when the samples scatter more than their own variances explain (chi2 / dof > 1, chi2 taken
      with the plain weights so outliers cannot hide) the std is inflated by sqrt(chi2 / dof), so disagreeing
      samples never look converged.
    With one sample the std is that sample's own spread (several years); as agreeing samples accumulate it
    shrinks like 1 / sqrt(n), and a new sample moves the mean by about 1/n of its deviation: no jitter.
    """

    def __init__(self, cfg: AgeConfig | None = None, bins_years: Sequence[float] | None = None, *,
                 huber_k: float = 2.0, min_sample_std_years: float = 1.0):
        cfg = cfg or AgeConfig()
        self.stable_std_years = cfg.stable_std_years
        self.stable_min_samples = cfg.stable_min_samples
        self.samples: deque[_Sample] = deque(maxlen=cfg.max_samples)
        self._bins = None if bins_years is None else np.asarray(bins_years, np.float64)
        self.huber_k = huber_k
        self.min_var = min_sample_std_years ** 2
        self._cache: AgeEstimate | None = None
        self._dirty = False

    def add(self, probs, weight: float = 1.0, ts: float = 0.0, min_std_years: float = 0.0) -> None:
        """Add one sample: a distribution over the age bins (any positive scale), its quality weight, capture time,
        and a floor on its spread (a crop let through below the quality gate: the model's confidence on a poor
        chip is not to be trusted)."""
        p = np.asarray(probs, np.float64).ravel()
        if self._bins is None:
            from agecam.models.reference import CYDRAL_BINS_YEARS  # bins of the default model

            self._bins = np.asarray(CYDRAL_BINS_YEARS, np.float64)
        if p.shape != self._bins.shape:
            raise ValueError(f"expected {len(self._bins)} bin probabilities, found shape {p.shape}")
        total = float(p.sum())
        if not (weight > 0 and total > 0 and np.isfinite(total)):
            return  # a zero-weight or empty sample carries no information
        p = p / total
        mean = float(p @ self._bins)
        var = max(self.min_var, min_std_years ** 2, float(p @ (self._bins - mean) ** 2))
        self.samples.append(_Sample(mean, var, float(weight), float(ts)))
        self._dirty = True

    def __len__(self) -> int:
        return len(self.samples)

    def estimate(self) -> AgeEstimate | None:
        """The fused estimate, or None before the first sample."""
        if not self.samples:
            return None
        if self._dirty or self._cache is None:
            self._cache = self._fuse()
            self._dirty = False
        return self._cache

    def _fuse(self) -> AgeEstimate:
        m = np.array([s.mean_years for s in self.samples])
        v = np.array([s.var_years2 for s in self.samples])
        w = np.array([s.weight for s in self.samples])
        prec = w / v
        mu = float(np.median(m)) if len(m) > 2 else float((prec * m).sum() / prec.sum())
        robust = prec
        for _ in range(4):  # IRLS for the Huber M-estimate, started from the median
            z = np.abs(m - mu) / np.sqrt(v)
            robust = prec * np.minimum(1.0, self.huber_k / np.maximum(z, 1e-9))
            mu = float((robust * m).sum() / robust.sum())
        total = float(robust.sum())
        std = 1.0 / math.sqrt(total)
        n = len(m)
        if n > 1:
            # disagreement measured with the plain weights, so outliers cannot hide it (the mean stays robust)
            chi2 = float((prec * (m - mu) ** 2).sum())  # ~ n - 1 when samples scatter as their variances say
            std *= math.sqrt(max(1.0, chi2 / (n - 1)))
        lo_b, hi_b = float(self._bins[0]), float(self._bins[-1])
        return AgeEstimate(
            years=mu,
            std=std,
            low=max(lo_b, mu - Z90 * std),
            high=min(hi_b, mu + Z90 * std),
            samples=n,
            stable=bool(std <= self.stable_std_years and n >= self.stable_min_samples),
        )
