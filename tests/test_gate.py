"""The per-track quality gate: good crops at once, the best poor crop after max_wait_s (pure logic, scripted clock)."""
from __future__ import annotations

import numpy as np
import pytest

from agecam.daemon.gate import QualityGate


def _run(gate: QualityGate, crops: list[tuple[float, float]]) -> list[tuple[float, float] | None]:
    """crops: (time s, quality); each passed crop is reported as (its quality, its time)."""
    out = []
    for t, q in crops:
        passed = gate.offer(q, t, lambda q=q: np.full((4, 4, 3), int(q * 100), np.uint8))
        out.append(None if passed is None else (passed[1], passed[2]))
        if passed is not None:
            assert passed[3] == (0.0 if passed[1] >= gate.min_quality else 8.0), "a held crop must carry the floor"
        if passed is not None:
            assert passed[0][0, 0, 0] == int(passed[1] * 100), "the chip passed is not the crop of that quality"
    return out


@pytest.mark.parametrize("name, crops, expected", [
    ("good crops pass at once, weighted by quality",
     [(0.0, 0.9), (0.3, 0.5)], [(0.9, 0.0), (0.5, 0.3)]),
    ("poor crops wait max_wait_s, then the best of them passes",
     [(0.0, 0.05), (0.3, 0.12), (0.6, 0.08), (0.9, 0.07), (1.2, 0.06)], [None, None, None, None, (0.12, 0.3)]),
    ("after the fallback a new window starts",
     [(0.0, 0.1), (1.0, 0.05), (1.3, 0.06), (2.0, 0.04)], [None, (0.1, 0.0), None, (0.06, 1.3)]),
    ("a good crop resets the wait and drops the held one",
     [(0.0, 0.1), (0.6, 0.5), (1.2, 0.1), (1.5, 0.1)], [None, (0.5, 0.6), None, None]),
    ("a crop of quality 0 never passes",
     [(0.0, 0.0), (2.0, 0.0)], [None, None]),
])
def test_gate_schedule(name, crops, expected):
    # given a gate at min_quality 0.15 and max_wait_s 1.0, when crops arrive, then these pass, in this order
    assert _run(QualityGate(0.15, 1.0), crops) == expected, name


def test_max_wait_zero_ages_the_first_poor_crop_at_once():
    assert _run(QualityGate(0.15, 0.0), [(0.0, 0.05)]) == [(0.05, 0.0)]


@pytest.mark.parametrize("offered, best_quality, too_small, no_landmarks, reason", [
    (0, 0.0, 5, 0, "too_small"), (0, 0.0, 0, 3, "no_chip"), (0, 0.0, 2, 3, "no_chip"), (0, 0.0, 0, 0, "too_short"),
    (4, 0.3, 2, 0, "too_short"),  # it had crops: it ended before an age came back
    (4, 0.0, 0, 0, "no_chip"),  # every crop of quality 0 (a profile, upside down): never a usable chip
])
def test_unaged_reason(offered, best_quality, too_small, no_landmarks, reason):
    g = QualityGate(0.15, 1.0)
    g.offered, g.best_quality, g.too_small, g.no_landmarks = offered, best_quality, too_small, no_landmarks
    assert g.unaged_reason() == reason
