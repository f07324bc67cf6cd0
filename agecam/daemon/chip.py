"""Face chips: similarity alignment of 5 landmarks onto a template, sampled the way dlib does, and crop quality."""
from __future__ import annotations

import math

import cv2
import numpy as np


def similarity_fit(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src onto dst, as 2x3.

    Closed form (Umeyama 1991 in 2-D): the same transform dlib's find_similarity_transform returns.
    """
    src = np.asarray(src_xy, np.float64)
    dst = np.asarray(dst_xy, np.float64)
    sm, dm = src.mean(0), dst.mean(0)
    s, d = src - sm, dst - dm
    norm = float((s ** 2).sum())
    if norm <= 1e-12:
        raise ValueError("landmarks are degenerate (all points coincide)")
    a = float((s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum()) / norm
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / norm
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (dm - rot @ sm)[:, None]])


def chip_to_image(landmarks_xy: np.ndarray, template_px: np.ndarray, chip_hw: tuple[int, int]) -> np.ndarray:
    """The 2x3 map from chip pixels to image pixels, built like dlib's chip_details.

    dlib fits the similarity, then keeps only its angle, its scale and where it sends the chip centre, and maps
    chip pixel 0 and side-1 onto the ends of a rectangle `side * scale - 1` wide; we do the same so that a chip cut
    from dlib's own landmarks equals dlib's chip.
    """
    h, w = chip_hw
    fit = similarity_fit(template_px, landmarks_xy)  # chip -> image
    scale = math.hypot(fit[0, 0], fit[1, 0])
    angle = math.atan2(fit[1, 0], fit[0, 0])
    centre = fit[:, :2] @ np.array([w / 2.0, h / 2.0]) + fit[:, 2]
    kx = (w * scale - 1.0) / (w - 1.0)
    ky = (h * scale - 1.0) / (h - 1.0)
    c, s = math.cos(angle), math.sin(angle)
    lin = np.array([[c * kx, -s * ky], [s * kx, c * ky]])
    t = centre - lin @ np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    return np.hstack([lin, t[:, None]])


def warp_chip(image: np.ndarray, chip_to_img: np.ndarray, chip_hw: tuple[int, int]) -> np.ndarray:
    """Sample a chip (bilinear, black outside the image), pre-shrinking by 2x Gaussian pyramid steps like dlib.

    dlib's extract_image_chip goes down a [1 4 6 4 1] pyramid while the chip's source rectangle, halved, is still
    larger than the chip; without it a large face is sampled with aliasing and the model's answer moves by years.
    Only the region under the chip is cropped and shrunk, so the cost follows the chip, not the frame.
    """
    h, w = chip_hw
    m = np.asarray(chip_to_img, np.float64).copy()
    scale = math.hypot(m[0, 0], m[1, 0])
    rw, rh = w * scale - 1.0, h * scale - 1.0  # right - left of dlib's rectangle; its area counts (rw + 1) * (rh + 1)
    levels = 0
    while (rw / 2.0 + 1.0) * (rh / 2.0 + 1.0) > w * h:
        rw, rh = rw / 2.0, rh / 2.0
        levels += 1
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], np.float64) @ m.T
    grow = 2.0 ** (levels + 1) + 2.0
    x0 = int(max(0.0, math.floor(corners[:, 0].min() - grow)))
    y0 = int(max(0.0, math.floor(corners[:, 1].min() - grow)))
    x1 = int(min(image.shape[1], math.ceil(corners[:, 0].max() + grow) + 1))
    y1 = int(min(image.shape[0], math.ceil(corners[:, 1].max() + grow) + 1))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return np.zeros((h, w, 3), np.uint8)
    src = image[y0:y1, x0:x1]
    m[:, 2] -= (x0, y0)
    for _ in range(levels):
        if min(src.shape[:2]) < 4:
            break
        src = cv2.pyrDown(src)
        # A point p of the finer level lands at p/2 in cv2's coarser level; dlib's pyramid assumes
        # p/2 - (1.25, 0.75) for a grid whose true centre is p/2 - (1, 1): sample where dlib samples.
        m = m / 2.0
        m[:, 2] += (-0.25, 0.25)
    return cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def make_chip(image: np.ndarray, landmarks_xy: np.ndarray, template_unit: np.ndarray,
              chip_hw: tuple[int, int]) -> np.ndarray:
    """Cut a chip (same channel order as `image`) whose landmarks fit `template_unit` (x, y in 0..1 of the side)."""
    h, w = chip_hw
    template_px = np.asarray(template_unit, np.float64) * (w, h)
    return warp_chip(image, chip_to_image(np.asarray(landmarks_xy, np.float64), template_px, chip_hw), chip_hw)


# ---- quality ---------------------------------------------------------------------------------------------------

# A strongly turned face (nose over an eye) keeps this much of its weight rather than none: it is still a person to
# age, and the gate's fallback ages it from its best crop with a wide interval (FALLBACK_MIN_STD_YEARS) when nothing
# better comes. Measured on the bench scene: one head seen in three-quarter view for 5 s was never aged with a veto.
TURNED_FLOOR = 0.05


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at or below lo, 1 at or above hi, linear between."""
    return float(min(1.0, max(0.0, (x - lo) / (hi - lo))))


def pose_scores(landmarks_xy: np.ndarray) -> tuple[float, float]:
    """(yaw_offset, roll_deg): where the nose sits along the eye line (0 centred, 1 over an eye) and eye-line tilt."""
    le, re, nose = (np.asarray(landmarks_xy, np.float64)[i] for i in (0, 1, 2))
    eye = re - le
    d2 = float(eye @ eye)
    if d2 < 1e-6:
        return 1.0, 90.0
    t = float((nose - le) @ eye) / d2  # 0 at the left eye, 1 at the right eye
    roll_deg = math.degrees(math.atan2(eye[1], eye[0]))
    return abs(t - 0.5) * 2.0, abs(roll_deg)


def sharpness(gray_face: np.ndarray) -> float:
    """Variance of the Laplacian on the face resized to 64x64 (so it does not grow with face size)."""
    if gray_face.size == 0:
        return 0.0
    g = cv2.resize(gray_face, (64, 64), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(g, cv2.CV_32F).var())


def chip_quality(image_bgr: np.ndarray, box_xyxy, landmarks5, det_score: float, *,
                 full_size_px: float = 80.0, min_size_px: float = 16.0, sharp_full: float = 150.0,
                 max_yaw_offset: float = 0.8, max_roll_deg: float = 40.0) -> float:
    """A 0..1 weight for one face crop: the product of size, sharpness, frontal pose and detector-score factors.

    Each factor is 1 for a good crop and falls to 0 at a limit (a face `min_size_px` wide, a flat Laplacian, the
    eyes tilted `max_roll_deg`, a score of 0.5), so any single defect can veto a sample; a turned face (the nose at or
    beyond `max_yaw_offset`) keeps TURNED_FLOOR instead, so it is aged, though last and weakly.
    """
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    side_px = min(x2 - x1, y2 - y1)
    size_f = _ramp(side_px, min_size_px, full_size_px)
    if size_f <= 0.0:
        return 0.0
    h, w = image_bgr.shape[:2]
    xa, ya, xb, yb = max(0, int(x1)), max(0, int(y1)), min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2)))
    face = image_bgr[ya:yb, xa:xb]
    if face.size == 0:
        return 0.0
    gray = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY) if face.ndim == 3 else face
    sharp_f = min(1.0, sharpness(gray) / sharp_full) ** 0.5
    yaw_offset, roll_deg = pose_scores(landmarks5)
    yaw_f = max(TURNED_FLOOR, _ramp(max_yaw_offset - yaw_offset, 0.0, max_yaw_offset))
    pose_f = yaw_f * _ramp(max_roll_deg - roll_deg, 0.0, max_roll_deg / 2)
    det_f = _ramp(float(det_score), 0.5, 0.9)
    return float(size_f * sharp_f * pose_f * det_f)
