"""Recording a camera's annotated frames to a video file."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)


class Recorder:
    """Writes one camera's annotated frames to <record_path>/<camera>.mp4 (mp4v); opened on the first frame."""

    def __init__(self, record_path: Path | str, camera: str, fps: float):
        self.path = Path(record_path) / f"{camera}.mp4"
        self.fps = float(fps) if fps and fps > 0 else 10.0
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._failed = False

    def write(self, image_bgr: np.ndarray) -> bool:
        """Append a frame (resized to the first frame's size when it differs); False when it could not be written."""
        if self._failed:
            return False
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = image_bgr.shape[:2]
            self._size = (w, h)
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size)
            if not self._writer.isOpened():
                log.error("cannot record to %s: the mp4v writer did not open", self.path)
                self._failed = True
                return False
        if (image_bgr.shape[1], image_bgr.shape[0]) != self._size:
            image_bgr = cv2.resize(image_bgr, self._size)
        self._writer.write(image_bgr)
        self.frames += 1
        return True

    def close(self) -> None:
        """Finish the file."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            log.info("recorded %d frames to %s", self.frames, self.path)
