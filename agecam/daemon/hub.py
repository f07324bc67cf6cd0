"""The preview hub: each camera's latest annotated frame, JPEG-encoded only on demand and at most max_fps."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from agecam.daemon.metrics import NullMetrics

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    image: np.ndarray | None = None
    seq: int = 0
    jpeg: bytes | None = None
    jpeg_seq: int = 0
    encoded_at: float = float("-inf")
    viewers: int = 0
    encode_lock: threading.Lock = field(default_factory=threading.Lock)


class PreviewHub:
    """Per-camera latest annotated frame. publish() only stores the array; JPEG is encoded on demand.

    Encoding happens only when a viewer or snapshot asks, at most once per frame and at most max_fps times per
    second per camera however many viewers share it.
    """

    def __init__(self, camera_names: Iterable[str], jpeg_quality: int = 80, max_fps: float = 10.0,
                 metrics: NullMetrics = NullMetrics()):
        self._slots = {name: _Slot() for name in camera_names}
        self._cond = threading.Condition()
        self.jpeg_quality = int(jpeg_quality)
        self.max_fps = float(max_fps)
        self._metrics = metrics
        self._closed = False

    @property
    def cameras(self) -> list[str]:
        """Camera names in config order."""
        return list(self._slots)

    def publish(self, camera: str, image_bgr: np.ndarray) -> None:
        """Store the latest annotated frame (cheap: no copy, no encoding). Unknown cameras are ignored."""
        slot = self._slots.get(camera)
        if slot is None:
            return
        with self._cond:
            slot.image = image_bgr
            slot.seq += 1
            self._cond.notify_all()

    def watching(self, camera: str) -> bool:
        """True while at least one MJPEG viewer is connected to this camera."""
        slot = self._slots.get(camera)
        return bool(slot and slot.viewers)

    def viewer(self, camera: str, delta: int) -> None:
        """A viewer of camera's stream arrived (+1) or left (-1)."""
        with self._cond:
            slot = self._slots[camera]
            slot.viewers += delta
            self._metrics.preview_viewers(camera, slot.viewers)

    def _encode(self, camera: str, slot: _Slot, after_seq: int) -> tuple[int, bytes] | None:
        with slot.encode_lock:  # one encoder per camera; others reuse its result
            with self._cond:
                image, seq = slot.image, slot.seq
            if image is None:
                return None
            if slot.jpeg is not None and slot.jpeg_seq == seq:
                return seq, slot.jpeg
            now = time.monotonic()
            if slot.jpeg is not None and slot.jpeg_seq > after_seq and now - slot.encoded_at < 1.0 / self.max_fps:
                return slot.jpeg_seq, slot.jpeg  # rate cap: a recent encode is new enough for this caller
            t0 = time.perf_counter()
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            self._metrics.stage_time("encode", time.perf_counter() - t0)
            if not ok:
                log.warning("JPEG encoding failed for camera %s", camera)
                return None
            slot.jpeg, slot.jpeg_seq, slot.encoded_at = buf.tobytes(), seq, now
            return seq, slot.jpeg

    def jpeg(self, camera: str) -> bytes | None:
        """The latest frame as JPEG (a snapshot), or None when the camera is unknown or has shown nothing yet."""
        slot = self._slots.get(camera)
        if slot is None:
            return None
        got = self._encode(camera, slot, after_seq=-1)
        return got[1] if got else None

    def wait_jpeg(self, camera: str, after_seq: int, timeout_s: float) -> tuple[int, bytes] | None:
        """Wait up to timeout_s for a frame newer than after_seq; returns (seq, jpeg) or None."""
        slot = self._slots.get(camera)
        if slot is None:
            return None
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while slot.seq <= after_seq and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._closed:
                return None
        return self._encode(camera, slot, after_seq)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wake every waiter; later waits return None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
