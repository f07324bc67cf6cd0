"""Plain records passed between daemon stages."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One captured image. `truth` is set only by the demo source: (identity, box_xyxy) of each face drawn."""

    image: np.ndarray  # H x W x 3, uint8, BGR
    frame_id: int
    ts: float  # capture time, Unix seconds
    camera: str
    truth: tuple[tuple[str, tuple[float, float, float, float]], ...] | None = None


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, as plain arrays in that image's pixel coordinates."""

    boxes_xyxy: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    landmarks: np.ndarray | None = None  # (N, 5, 2) float32: left eye, right eye, nose, mouth left, mouth right

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))
