"""Drawing tracks, ages and a status line onto a frame: a pure function of its inputs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from agecam.events import AgeEstimate

# BGR colours; tests and the browser check look for these exact values
STABLE_BGR = (60, 220, 60)  # green: converged estimate
UNSTABLE_BGR = (0, 170, 255)  # orange: estimate still moving
NO_AGE_BGR = (220, 220, 220)  # light grey: confirmed, no sample yet
TENTATIVE_BGR = (140, 140, 140)  # dark grey: not yet confirmed
LOW_QUALITY = 0.3  # below this the label carries a '?'
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_PM = object()  # stands for the '±' glyph, which Hershey fonts lack


@dataclass(frozen=True)
class TrackView:
    """What the preview needs to know about one track."""

    track_id: int
    box_xyxy: tuple[float, float, float, float]
    age: AgeEstimate | None = None
    quality: float | None = None  # 0..1 of the last sampled crop; None when never sampled
    confirmed: bool = True


def track_colour(t: TrackView) -> tuple[int, int, int]:
    """Box colour: tentative, confirmed without age, unstable age or stable age."""
    if not t.confirmed:
        return TENTATIVE_BGR
    if t.age is None:
        return NO_AGE_BGR
    return STABLE_BGR if t.age.stable else UNSTABLE_BGR


def label_parts(t: TrackView) -> list:
    """Label pieces, e.g. ['#17 34', _PM, '3'] for '#17 34±3'; '?' added for a low-quality crop."""
    parts: list = [f"#{t.track_id}"]
    if t.age is not None:
        parts[0] += f" {t.age.years:.0f}"
        parts += [_PM, f"{max(t.age.std, 0):.0f}"]
    if t.quality is not None and t.quality < LOW_QUALITY:
        parts.append(" ?")
    return parts


def _scale(image: np.ndarray) -> tuple[float, int]:
    h = image.shape[0]
    scale = max(0.4, 0.5 * h / 480)
    return scale, max(1, round(h / 480))


def _parts_size(parts: list, scale: float, thick: int) -> tuple[int, int, int]:
    (_, text_h), baseline = cv2.getTextSize("0", _FONT, scale, thick)
    width = 0
    for p in parts:
        width += int(text_h * 0.8) + 2 if p is _PM else cv2.getTextSize(p, _FONT, scale, thick)[0][0]
    return width, text_h, baseline


def _draw_parts(img: np.ndarray, org: tuple[int, int], parts: list, scale: float, thick: int,
                colour: tuple[int, int, int]) -> None:
    x, y = org
    _, text_h, _ = _parts_size(parts, scale, thick)
    for p in parts:
        if p is _PM:
            w = int(text_h * 0.8)
            cx, mid = x + 1 + w // 2, y - text_h // 2 - 1
            cv2.line(img, (x + 1, mid), (x + 1 + w, mid), colour, thick, cv2.LINE_AA)
            cv2.line(img, (cx, mid - w // 2), (cx, mid + w // 2), colour, thick, cv2.LINE_AA)
            cv2.line(img, (x + 1, y), (x + 1 + w, y), colour, thick, cv2.LINE_AA)
            x += w + 2
        else:
            cv2.putText(img, p, (x, y), _FONT, scale, colour, thick, cv2.LINE_AA)
            x += cv2.getTextSize(p, _FONT, scale, thick)[0][0]


def _dashed_rect(img: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], colour, thick: int, dash_px: int) -> None:
    (x1, y1), (x2, y2) = p1, p2
    for a, b, fixed, horizontal in ((x1, x2, y1, True), (x1, x2, y2, True), (y1, y2, x1, False), (y1, y2, x2, False)):
        for s in range(a, b, 2 * dash_px):
            e = min(s + dash_px, b)
            if horizontal:
                cv2.line(img, (s, fixed), (e, fixed), colour, thick)
            else:
                cv2.line(img, (fixed, s), (fixed, e), colour, thick)


def _quality_bar(img: np.ndarray, x: int, y1: int, y2: int, quality: float, thick: int) -> None:
    q = float(np.clip(quality, 0.0, 1.0))
    w = 3 * thick + 1
    x2 = min(x + w, img.shape[1] - 1)
    cv2.rectangle(img, (x, y1), (x2, y2), (40, 40, 40), -1)
    top = int(round(y2 - q * (y2 - y1)))
    colour = (0, int(255 * q), int(255 * (1 - q)))  # red (poor) to green (good)
    if top < y2:
        cv2.rectangle(img, (x, top), (x2, y2), colour, -1)


def annotate(image_bgr: np.ndarray, tracks: Sequence[TrackView], status_text: str) -> np.ndarray:
    """A new image: each track's box, '#id age±spread' label and quality bar, and a status line on top.

    Stable estimates: solid green box. Unstable ones: dashed orange box. Confirmed without age: light grey;
    tentative: thin dark grey, no label. Low-quality crops get a '?' in the label and a short red bar.
    """
    img = image_bgr.copy()
    h, w = img.shape[:2]
    scale, thick = _scale(img)
    (_, status_th), status_base = cv2.getTextSize("Ag", _FONT, scale, thick)
    band_h = status_th + status_base + 8 * thick if status_text else 0
    for t in tracks:
        x1, y1, x2, y2 = (int(round(v)) for v in t.box_xyxy)
        x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
        y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
        if x2 <= x1 or y2 <= y1:
            continue
        colour = track_colour(t)
        if not t.confirmed:
            cv2.rectangle(img, (x1, y1), (x2, y2), colour, 1)
            continue
        if t.age is not None and not t.age.stable:
            _dashed_rect(img, (x1, y1), (x2, y2), colour, 2 * thick, dash_px=6 * thick)
        else:
            cv2.rectangle(img, (x1, y1), (x2, y2), colour, 2 * thick)
        if t.quality is not None:
            bar_x = x2 + 2 * thick
            if bar_x + 3 * thick + 1 >= w:  # no room right of the box: draw it just inside
                bar_x = max(x1, x2 - 5 * thick - 1)
            _quality_bar(img, bar_x, y1, y2, t.quality, thick)
        parts = label_parts(t)
        tw, th, base = _parts_size(parts, scale, thick)
        pad = 3 * thick
        top = y1 - th - base - 2 * pad
        if top < band_h:  # no room above (status line): put the label inside the box
            top = max(y1, band_h)
        lx = min(x1, max(0, w - tw - 2 * pad))
        cv2.rectangle(img, (lx, top), (lx + tw + 2 * pad, top + th + base + 2 * pad), colour, -1)
        _draw_parts(img, (lx + pad, top + pad + th), parts, scale, thick, (0, 0, 0))
    if status_text:
        band = img[:band_h]
        band[:] = (band.astype(np.uint16) * 2 // 7).astype(np.uint8)  # darkened so white text reads on any scene
        cv2.putText(img, status_text, (6 * thick, 4 * thick + status_th), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return img
