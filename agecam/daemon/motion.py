"""Where the picture changed, away from known faces, and when all of it did (a cut): frame differencing on small
grey copies."""
from __future__ import annotations

import cv2
import numpy as np

WORK_WIDTH_PX = 160  # frames are compared at this width (a 640x480 frame: 4x smaller, ~0.5 ms per comparison)
CELL_PX = 8  # changed pixels are counted per cell of this side at the work width (32 px at 640x480)
CELL_CHANGED_SHARE = 0.10  # a cell with at least this share of changed pixels has changed
# Around a tracked face, this many face sides (left, top, right, bottom) are its own head and body: movement there
# is that person moving, not a new face, and is not searched (a face right beside a tracked one is left to the
# full-frame search).
EXCLUDE_SIDES = (0.75, 0.75, 0.75, 1.0)


CUT_WIDTH_PX = 40  # cut checks compare copies this wide (40x30 for 4:3), made from every 8th pixel: ~0.03 ms
CUT_SUBSAMPLE = 8
CUT_CHANGED_SHARE = 0.5  # a cut: at least this share of the copy's pixels changed at once


class CutFinder:
    """Tells when most of the picture changed since the previous call: a cut (a switched feed, a PTZ preset move,
    the lights). Cheap enough for every frame, so the faces of a new picture are searched for on its first frame
    instead of at the next motion comparison. One per camera, called from its pipeline thread only."""

    def __init__(self, threshold: int = 16):
        self.threshold = int(threshold)
        self._prev: np.ndarray | None = None
        self._prev_hw: tuple[int, int] | None = None

    def is_cut(self, image_bgr: np.ndarray) -> bool:
        """True when at least CUT_CHANGED_SHARE of the picture changed by more than the threshold since the last
        call, or the frame size changed (a new stream: tracks are in the old pixels); the first call only remembers
        the frame."""
        h, w = image_bgr.shape[:2]
        if h == 0 or w == 0:
            return False
        size = (CUT_WIDTH_PX, max(1, int(round(CUT_WIDTH_PX * h / w))))
        tiny = cv2.cvtColor(cv2.resize(image_bgr[::CUT_SUBSAMPLE, ::CUT_SUBSAMPLE], size, interpolation=cv2.INTER_AREA),
                            cv2.COLOR_BGR2GRAY)
        prev, prev_hw = self._prev, self._prev_hw
        self._prev, self._prev_hw = tiny, (h, w)
        if prev is None:
            return False
        if prev_hw != (h, w):
            return True
        return float(np.count_nonzero(cv2.absdiff(tiny, prev) > self.threshold)) >= CUT_CHANGED_SHARE * tiny.size


class MotionFinder:
    """Compares each frame with the one given before it; changed regions outside known faces come back as boxes.

    One per camera, called from its pipeline thread only. The comparison is against the previous call's frame, so
    calling it every 0.2 s compares frames 0.2 s apart: slow movement still shows, sensor noise (averaged away by
    the 4x downscale) does not.
    """

    def __init__(self, threshold: int = 16):
        self.threshold = int(threshold)
        self._prev: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the previous frame (after a gap, or a change of size)."""
        self._prev = None

    def changed(self, image_bgr: np.ndarray, exclude_xyxy: np.ndarray) -> tuple[np.ndarray, float]:
        """(boxes (K, 4) float32 in image pixels, share of the frame that changed) since the previous call.

        Regions covered by `exclude_xyxy` (the tracked faces, widened by EXCLUDE_SIDES) are left out of the boxes
        but counted in the share. The first call, and a call after a size change, only remembers the frame.
        """
        h, w = image_bgr.shape[:2]
        scale = WORK_WIDTH_PX / w
        sw, sh = WORK_WIDTH_PX, max(CELL_PX, int(round(h * scale)))
        small = cv2.resize(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY), (sw, sh), interpolation=cv2.INTER_AREA)
        prev, self._prev = self._prev, small
        if prev is None or prev.shape != small.shape:
            return np.zeros((0, 4), np.float32), 0.0
        mask = (cv2.absdiff(small, prev) > self.threshold).astype(np.uint8)
        gh, gw = sh // CELL_PX, sw // CELL_PX
        cells = mask[:gh * CELL_PX, :gw * CELL_PX].reshape(gh, CELL_PX, gw, CELL_PX).mean(axis=(1, 3))
        changed = (cells >= CELL_CHANGED_SHARE).astype(np.uint8)
        share = float(changed.mean())
        if not changed.any():
            return np.zeros((0, 4), np.float32), share
        cell_img = CELL_PX / scale  # one cell in image pixels
        for x1, y1, x2, y2 in np.asarray(exclude_xyxy, np.float32).reshape(-1, 4):
            side = max(x2 - x1, y2 - y1)
            ml, mt, mr, mb = (k * side for k in EXCLUDE_SIDES)
            c1, r1 = int(max(0, (x1 - ml) // cell_img)), int(max(0, (y1 - mt) // cell_img))
            c2, r2 = int(np.ceil((x2 + mr) / cell_img)), int(np.ceil((y2 + mb) / cell_img))
            if c2 <= 0 or r2 <= 0:
                continue  # wholly off the picture (a lost track drifting away): a negative end would wrap around
            changed[r1:r2, c1:c2] = 0
        n, _, stats, _ = cv2.connectedComponentsWithStats(changed, connectivity=8)
        boxes = [(x, y, x + bw, y + bh) for x, y, bw, bh, _ in stats[1:n]]
        if not boxes:
            return np.zeros((0, 4), np.float32), share
        return np.asarray(boxes, np.float32) * np.float32(cell_img), share


def search_boxes(changed_xyxy: np.ndarray, frame_wh: tuple[int, int], min_side_px: float) -> np.ndarray:
    """Changed regions turned into detector crops: grown by half their side each way (a face is often only partly
    in the changed region), at least `min_side_px` square, clipped to the frame, overlapping ones merged."""
    w, h = frame_wh
    out: list[list[float]] = []
    for x1, y1, x2, y2 in np.asarray(changed_xyxy, np.float32).reshape(-1, 4):
        side = max(x2 - x1, y2 - y1, min_side_px)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half_w = max(x2 - x1, side) / 2 + side / 2
        half_h = max(y2 - y1, side) / 2 + side / 2
        out.append([max(0.0, cx - half_w), max(0.0, cy - half_h), min(float(w), cx + half_w), min(float(h), cy + half_h)])
    merged = True
    while merged and len(out) > 1:  # a handful of boxes: merge pairs until none overlap
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    out[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return np.asarray(out, np.float32).reshape(-1, 4)
