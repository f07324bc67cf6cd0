"""The `demo` scene: real face photos from installed packages moving over a real background, with ground truth."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

# Faces that ship with installed packages. Face boxes (x0, y0, x1, y1, source pixels) were measured once with
# dlib's HOG frontal-face detector (eyebrows to chin) and are design constants; the head crop around each adds
# HEAD_MARGIN face sides of context (hair, forehead, ears) and is clipped to the source image.
_T1_FACES = {  # insightface/data/images/t1.jpg, 1280x886, six faces left to right
    "t1-a": (67, 283, 175, 390),
    "t1-b": (275, 176, 364, 265),
    "t1-c": (450, 295, 557, 402),
    "t1-d": (724, 367, 832, 474),
    "t1-e": (870, 67, 999, 196),
    "t1-f": (1118, 283, 1226, 390),
}
_ASTRONAUT_FACE = (175, 76, 265, 166)  # skimage.data.astronaut(), 512x512 RGB
_HANKS_FACE = (8, 26, 98, 112)  # insightface/data/images/Tom_Hanks_54745.png, 112x112 aligned, tight
_HANKS_PAD_PX = 40  # replicated border added around that photo, so its head crop gets a margin too
HEAD_MARGIN = (0.6, 0.8, 0.6, 0.6)  # left, top, right, bottom, in face sides
ELLIPSE_SOFT = 0.22  # share of the ellipse radius over which the paste fades out

# Scene geometry and timing (seconds). One cycle of the script repeats; every face is off-frame at its end.
CYCLE_S = 12.0
VISIBLE_MIN_FRAC = 0.5  # a face is in the truth when at least this share of its face box is seen (in frame, unoccluded)
_OCC_GRID = 8  # occlusion is measured on an 8x8 grid of points in the face box
_RESIZED_CACHE = 48  # resized (crop, alpha) pairs kept; sizes change slowly, so most frames reuse them


@dataclass(frozen=True)
class _Head:
    """One precomputed head: a BGR crop, its alpha mask, and the face box inside the crop (crop pixels)."""

    name: str
    crop_bgr: np.ndarray
    alpha: np.ndarray  # float32 HxW in [0, 1]
    face_in_crop: tuple[float, float, float, float]

    @property
    def face_side_px(self) -> float:
        return self.face_in_crop[2] - self.face_in_crop[0]


@dataclass(frozen=True)
class _Pass:
    """One scripted appearance: keyframes (t_s, centre x, centre y, face width px) linearly interpolated."""

    keys: tuple[tuple[float, float, float, float], ...]
    bob_px: float
    bob_hz: float
    bob_phase: float


@dataclass(frozen=True)
class Drawn:
    """One head as drawn on a frame: where the paste went, where its face is, and how much of the face is seen."""

    name: str
    head_xyxy: tuple[int, int, int, int]  # clipped paste rectangle
    face_xyxy: tuple[float, float, float, float]  # face box, clipped to the frame
    visible_frac: float


def _soft_ellipse(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2)
    a = np.clip((1.0 - r) / ELLIPSE_SOFT, 0.0, 1.0)
    return (a * a * (3 - 2 * a)).astype(np.float32)  # smoothstep edge


def _head(name: str, img_bgr: np.ndarray, face: tuple[int, int, int, int]) -> _Head:
    x0, y0, x1, y1 = face
    s = x1 - x0
    h, w = img_bgr.shape[:2]
    cx0 = max(0, int(round(x0 - HEAD_MARGIN[0] * s)))
    cy0 = max(0, int(round(y0 - HEAD_MARGIN[1] * s)))
    cx1 = min(w, int(round(x1 + HEAD_MARGIN[2] * s)))
    cy1 = min(h, int(round(y1 + HEAD_MARGIN[3] * s)))
    crop = np.ascontiguousarray(img_bgr[cy0:cy1, cx0:cx1])
    return _Head(name, crop, _soft_ellipse(*crop.shape[:2]), (x0 - cx0, y0 - cy0, min(x1, w) - cx0, min(y1, h) - cy0))


def load_heads() -> list[_Head]:
    """The eight faces available offline, as head crops (t1-a..t1-f, astronaut, hanks)."""
    from agecam.models.samples import sample_image

    t1_path, hanks_path = sample_image("t1.jpg"), sample_image("Tom_Hanks_54745.png")
    t1 = cv2.imread(str(t1_path), cv2.IMREAD_COLOR)
    hanks = cv2.imread(str(hanks_path), cv2.IMREAD_COLOR)
    if t1 is None or hanks is None:
        raise RuntimeError(f"cannot decode the sample photos {t1_path} and {hanks_path}")
    from skimage import data as skdata  # scikit-image bundles astronaut.png

    astronaut = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    heads = [_head(name, t1, box) for name, box in _T1_FACES.items()]
    heads.append(_head("astronaut", astronaut, _ASTRONAUT_FACE))
    # The aligned 112x112 photo has no margin around the face: extend its edges so the soft mask fades
    # outside the face, not across it.
    pad = _HANKS_PAD_PX
    hanks = cv2.copyMakeBorder(hanks, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    heads.append(_head("hanks", hanks, tuple(v + pad for v in _HANKS_FACE)))
    return heads


def _background(size_wh: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A blurred, dimmed real photo (scikit-image's coffee table) with a vignette: plausible, and face-free."""
    from skimage import data as skdata

    w, h = size_wh
    img = cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=cv2.INTER_AREA)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(w, h) / 160)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1.0 - 0.35 * (((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2) / 2
    return np.clip(img.astype(np.float32) * 0.75 * vignette[..., None], 0, 255).astype(np.uint8)


def _script(rng: np.random.Generator, w: int, h: int) -> list[_Pass | list[_Pass]]:
    """Five roles, jittered by the seed. Returns per role one pass, or a list of passes (a face that comes back)."""
    j = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    roles: list = []
    # Role 0 and 1 walk along the same lane in opposite directions and cross (the front one hides part of the other).
    lane_y = h * j(0.58, 0.64)
    fw0, fw1 = j(84, 96), j(96, 110)
    v0, v1 = j(100, 120), j(105, 125)
    t_cross, x_cross = j(2.7, 3.2), w * j(0.42, 0.58)
    for fw, v, dy, sign in ((fw0, v0, 0.0, 1), (fw1, v1, 0.42 * fw1, -1)):
        t_in = t_cross - (x_cross + fw) / v if sign > 0 else t_cross - (w - x_cross + fw) / v
        t_in = max(t_in, 0.0)
        x_in = x_cross - sign * v * (t_cross - t_in)
        t_out = t_cross + (w - x_cross + fw) / v if sign > 0 else t_cross + (x_cross + fw) / v
        x_out = x_cross + sign * v * (t_out - t_cross)
        roles.append(_Pass(((t_in, x_in, lane_y + dy, fw * 0.95), (t_out, x_out, lane_y + dy, fw * 1.05)),
                           j(2, 5), j(0.3, 0.6), j(0, 6.3)))
    # Role 2 stands in the upper left and walks towards the camera (grows), then leaves upwards.
    x2, y2 = w * j(0.18, 0.26), h * j(0.26, 0.32)
    roles.append(_Pass(((0.0, x2, y2, j(72, 80)), (9.0, x2 + j(-10, 10), y2 + 8, j(120, 132)),
                        (10.6, x2 + j(-10, 10), -150.0, 134.0)), j(2, 4), j(0.2, 0.5), j(0, 6.3)))
    # Role 3 steps in from the right edge, stays, leaves, and comes back 2.5 s later (a new track is expected).
    x3, y3, fw3 = w * j(0.76, 0.82), h * j(0.22, 0.28), j(86, 100)
    off = w + fw3
    roles.append([
        _Pass(((1.0, off, y3, fw3), (2.0, x3, y3, fw3), (3.6, x3 - 10, y3, fw3 * 1.05), (4.6, off, y3, fw3 * 1.05)),
              j(1, 3), j(0.3, 0.7), j(0, 6.3)),
        _Pass(((7.0, off, y3 + 10, fw3), (8.0, x3, y3 + 10, fw3), (10.2, x3 + 10, y3, fw3 * 0.95),
               (11.2, off, y3, fw3 * 0.95)), j(1, 3), j(0.3, 0.7), j(0, 6.3)),
    ])
    # Role 4 crosses the bottom of the frame later, left to right.
    fw4, v4, y4 = j(74, 84), j(115, 130), h * j(0.84, 0.88)
    t_in4 = j(4.6, 5.2)
    roles.append(_Pass(((t_in4, -fw4, y4, fw4), (t_in4 + (w + 2 * fw4) / v4, w + fw4, y4, fw4)),
                       j(1, 3), j(0.4, 0.8), j(0, 6.3)))
    return roles


class DemoScene:
    """A deterministic synthetic scene. frame_at(i) renders frame i (time i / fps) with its ground truth.

    Five identities (chosen by the seed from eight real faces) enter, leave, cross and come back on a
    CYCLE_S-second script that repeats; with duration_s set, frames past the end raise IndexError.
    Not thread-safe (it caches resized crops): one scene per capture thread.
    """

    def __init__(self, seed: int, size_wh: tuple[int, int] = (640, 480), fps: float = 15.0,
                 duration_s: float | None = None):
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.seed = seed
        self.size_wh = (int(size_wh[0]), int(size_wh[1]))
        self.fps = float(fps)
        self.duration_s = duration_s
        rng = np.random.default_rng(seed)
        w, h = self.size_wh
        heads = load_heads()
        order = rng.permutation(len(heads))
        self._roles: list[tuple[_Head, list[_Pass]]] = []
        for role, head_i in zip(_script(rng, w, h), order):
            passes = role if isinstance(role, list) else [role]
            self._roles.append((heads[head_i], passes))
        self._background = _background(self.size_wh, rng)
        self._resized: OrderedDict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def n_frames(self) -> int | None:
        """Number of frames, or None for an endless scene."""
        return None if self.duration_s is None else max(1, int(round(self.duration_s * self.fps)))

    @property
    def identities(self) -> list[str]:
        return [head.name for head, _ in self._roles]

    @property
    def crossing_pair(self) -> tuple[str, str]:
        """The two identities who walk past each other (the nearer one briefly hides the other)."""
        return self._roles[0][0].name, self._roles[1][0].name

    def face_image(self, name: str) -> np.ndarray:
        """The source pixels of an identity's face box (BGR), as they are pasted (before scaling)."""
        for head, _ in self._roles:
            if head.name == name:
                x0, y0, x1, y1 = (int(round(v)) for v in head.face_in_crop)
                return head.crop_bgr[y0:y1, x0:x1].copy()
        raise KeyError(name)

    @property
    def background(self) -> np.ndarray:
        """The empty background (a copy)."""
        return self._background.copy()

    def _placements(self, t_s: float) -> list[tuple[_Head, float, float, float]]:
        """(head, centre x, centre y of the face, face width) of every head on the script at t_s, back to front."""
        tc = t_s % CYCLE_S
        out = []
        for head, passes in self._roles:
            for p in passes:
                keys = p.keys
                if not keys[0][0] <= tc <= keys[-1][0]:
                    continue
                ts = [k[0] for k in keys]
                cx = float(np.interp(tc, ts, [k[1] for k in keys]))
                cy = float(np.interp(tc, ts, [k[2] for k in keys]))
                fw = float(np.interp(tc, ts, [k[3] for k in keys]))
                cy += p.bob_px * np.sin(2 * np.pi * p.bob_hz * tc + p.bob_phase)
                out.append((head, cx, cy, fw))
        out.sort(key=lambda o: o[3])
        return out

    def _layout(self, t_s: float) -> list[tuple[_Head, int, int, int, int]]:
        """Integer paste geometry (head, x0, y0, width, height) of each head, back to front."""
        res = []
        for head, cx, cy, fw in self._placements(t_s):
            k = fw / head.face_side_px
            ch, cw = head.crop_bgr.shape[:2]
            pw, ph = max(1, int(round(cw * k))), max(1, int(round(ch * k)))
            fx0, fy0, fx1, fy1 = head.face_in_crop
            # place so that the face centre lands on (cx, cy)
            x0 = int(round(cx - (fx0 + fx1) / 2 * pw / cw))
            y0 = int(round(cy - (fy0 + fy1) / 2 * ph / ch))
            res.append((head, x0, y0, pw, ph))
        return res

    def drawn_at(self, index: int) -> list[Drawn]:
        """Every head pasted on frame `index` (also those mostly hidden or outside), back to front."""
        return self._drawn(self._layout(self._time(index)))

    def _drawn(self, layout: list[tuple[_Head, int, int, int, int]]) -> list[Drawn]:
        w, h = self.size_wh
        out = []
        for n, (head, x0, y0, pw, ph) in enumerate(layout):
            ch, cw = head.crop_bgr.shape[:2]
            sx, sy = pw / cw, ph / ch
            f = head.face_in_crop
            fx0, fy0, fx1, fy1 = x0 + f[0] * sx, y0 + f[1] * sy, x0 + f[2] * sx, y0 + f[3] * sy
            gx = fx0 + (np.arange(_OCC_GRID) + 0.5) / _OCC_GRID * (fx1 - fx0)
            gy = fy0 + (np.arange(_OCC_GRID) + 0.5) / _OCC_GRID * (fy1 - fy0)
            px, py = np.meshgrid(gx, gy)
            seen = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            for head2, x2, y2, pw2, ph2 in layout[n + 1:]:  # heads drawn in front of this one
                rx, ry = pw2 / 2, ph2 / 2
                r = np.sqrt(((px - x2 - rx) / rx) ** 2 + ((py - y2 - ry) / ry) ** 2)
                seen &= r > 1.0 - ELLIPSE_SOFT / 2  # hidden where the front paste is at least half opaque
            face = (max(0.0, fx0), max(0.0, fy0), min(float(w), fx1), min(float(h), fy1))
            head_box = (max(0, x0), max(0, y0), min(w, x0 + pw), min(h, y0 + ph))
            out.append(Drawn(head.name, head_box, face, float(seen.mean())))
        return out

    def _time(self, index: int) -> float:
        if index < 0 or (self.n_frames is not None and index >= self.n_frames):
            raise IndexError(f"demo frame {index} is outside 0..{self.n_frames}")
        return index / self.fps

    def frame_at(self, index: int) -> tuple[np.ndarray, tuple[tuple[str, tuple[float, float, float, float]], ...]]:
        """Frame `index` as a BGR uint8 image and its truth: (identity, face box) of each face at least half seen."""
        w, h = self.size_wh
        img = self._background.copy()
        layout = self._layout(self._time(index))
        for head, x0, y0, pw, ph in layout:
            # paste only the part inside the frame
            ax0, ay0, ax1, ay1 = max(0, x0), max(0, y0), min(w, x0 + pw), min(h, y0 + ph)
            if ax1 <= ax0 or ay1 <= ay0:
                continue
            crop, alpha = self._resized_head(head, pw, ph)
            sub = (slice(ay0 - y0, ay1 - y0), slice(ax0 - x0, ax1 - x0))
            roi = img[ay0:ay1, ax0:ax1]
            a = alpha[sub]
            img[ay0:ay1, ax0:ax1] = cv2.blendLinear(crop[sub], roi, a, 1.0 - a)
        truth = tuple((d.name, d.face_xyxy) for d in self._drawn(layout) if d.visible_frac >= VISIBLE_MIN_FRAC)
        return img, truth

    def _resized_head(self, head: _Head, pw: int, ph: int) -> tuple[np.ndarray, np.ndarray]:
        key = (head.name, pw, ph)
        hit = self._resized.get(key)
        if hit is not None:
            self._resized.move_to_end(key)
            return hit
        hit = (cv2.resize(head.crop_bgr, (pw, ph), interpolation=cv2.INTER_LINEAR),
               cv2.resize(head.alpha, (pw, ph), interpolation=cv2.INTER_LINEAR))
        self._resized[key] = hit
        if len(self._resized) > _RESIZED_CACHE:
            self._resized.popitem(last=False)
        return hit

    def timeline(self) -> dict[str, list[tuple[float, float]]]:
        """Each identity's intervals (first, last frame time, seconds) in the truth, over one cycle or the duration."""
        n = self.n_frames if self.n_frames is not None else int(round(CYCLE_S * self.fps))
        spans: dict[str, list[tuple[float, float]]] = {name: [] for name in self.identities}
        open_at: dict[str, tuple[float, float]] = {}
        for i in range(n):
            t = i / self.fps
            seen = {d.name for d in self.drawn_at(i) if d.visible_frac >= VISIBLE_MIN_FRAC}
            for name in seen:
                start = open_at.get(name, (t, t))[0]
                open_at[name] = (start, t)
            for name in list(open_at):
                if name not in seen:
                    spans[name].append(open_at.pop(name))
        for name, span in open_at.items():
            spans[name].append(span)
        return spans
