"""Checks run after every export: ONNX validity, the contract, ORT-vs-reference parity, held-out MAE."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agecam.models.contract import AgeModelSpec, read_spec

# Largest |age difference| (years) on any check face between the exported file and PyTorch fp32, per precision.
# int8: 3 years. Per-channel QDQ ResNet50s typically move a softmax-expectation age by 0.5-2 years on single
# faces; 3 years is what a 1-3 px shift of the chip framing already does to a single estimate (FACTS.md), so a
# larger gap means the quantisation, not the framing, dominates the error. The held-out MAE change is printed.
DEFAULT_TOLERANCE_YEARS = {"fp32": 0.05, "fp16": 0.5, "int8": 3.0}
PROB_SUM_TOLERANCE = 1e-3  # each output row must be a distribution (softmax inside the graph)


class ExportCheckError(RuntimeError):
    """An exported file failed a check; the message says which, what was expected and what was found."""


@dataclass(frozen=True)
class Parity:
    """How far one model's outputs are from a reference's on the same inputs."""

    n_faces: int
    max_prob_diff: float
    max_age_diff_years: float
    mean_age_diff_years: float
    worst_face: str

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def expected_age_years(probs: np.ndarray, bins_years) -> np.ndarray:
    """Age per row as the expectation of the bin ages under the row's distribution."""
    return probs.astype(np.float64) @ np.asarray(bins_years, np.float64)


def ort_session(path: str | Path, threads: int = 0):
    """A CPU onnxruntime session (providers passed explicitly)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_session(session, batch: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Outputs of a single-input single-output session over a batch, in chunks."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: batch[i:i + batch_size]})[0] for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs, 0).astype(np.float32)


def check_file(path: str | Path) -> AgeModelSpec:
    """onnx.checker on the file plus the agecam contract (metadata present and agreeing with the graph)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError subclasses
        raise ExportCheckError(f"{path}: onnx.checker rejected the file: {exc}") from None
    return read_spec(path)


def check_distribution(probs: np.ndarray, n_bins: int, where: str) -> None:
    """Rows must be finite, non-negative, `n_bins` wide and sum to 1."""
    if probs.ndim != 2 or probs.shape[1] != n_bins:
        raise ExportCheckError(f"{where}: expected output (N, {n_bins}), found {probs.shape}")
    if not np.isfinite(probs).all():
        raise ExportCheckError(f"{where}: output has {int((~np.isfinite(probs)).sum())} non-finite values")
    sums = probs.sum(1)
    if probs.min() < -1e-6 or np.abs(sums - 1).max() > PROB_SUM_TOLERANCE:
        raise ExportCheckError(f"{where}: output rows are not probability distributions (min {probs.min():.3g}, "
                               f"row sums {sums.min():.4f}..{sums.max():.4f}, expected 1 ± {PROB_SUM_TOLERANCE})")


def parity(ref_probs: np.ndarray, probs: np.ndarray, bins_years, names) -> Parity:
    """Largest probability and age differences between two models' outputs on the same faces."""
    age_diff = np.abs(expected_age_years(probs, bins_years) - expected_age_years(ref_probs, bins_years))
    worst = int(age_diff.argmax())
    return Parity(len(probs), float(np.abs(probs - ref_probs).max()), float(age_diff.max()),
                  float(age_diff.mean()), str(names[worst]))


def require_parity(p: Parity, tolerance_years: float, what: str) -> None:
    """Refuse when the largest age difference exceeds the tolerance."""
    if not p.max_age_diff_years <= tolerance_years:
        raise ExportCheckError(
            f"{what}: disagrees with PyTorch beyond tolerance: largest age difference {p.max_age_diff_years:.3f} "
            f"years (face {p.worst_face}), allowed {tolerance_years} years; largest probability difference "
            f"{p.max_prob_diff:.4g} over {p.n_faces} faces")


def mae_years(probs: np.ndarray, bins_years, ages_years) -> float:
    """Mean absolute error of expected ages against true ages."""
    return float(np.abs(expected_age_years(probs, bins_years) - np.asarray(ages_years, np.float64)).mean())
