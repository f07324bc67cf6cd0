"""Real face images for export checks: crops from images that ship in installed packages, and folders of chips."""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agecam.models.contract import AgeModelSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Face boxes (x, y, w, h in source pixels) in sample images shipped by installed packages. Found once with
# OpenCV's frontal-face Haar cascade and by eye for the three faces it missed, checked by drawing them.
_PACKAGED_FACES: tuple[tuple[str, str, tuple[tuple[int, int, int, int], ...]], ...] = (
    ("insightface", "data/images/Tom_Hanks_54745.png", ((0, 0, 112, 112),)),  # already an aligned 112-px face
    ("insightface", "data/images/t1.jpg", ((1114, 277, 118, 118), (448, 271, 139, 139), (729, 356, 114, 114),
                                          (60, 255, 120, 130), (275, 120, 120, 125), (900, 40, 120, 135))),
    ("skimage", "data/astronaut.png", ((177, 66, 95, 95),)),
)
_UTK_AGE = re.compile(r"^(\d+)_")


@dataclass(frozen=True)
class FaceSet:
    """Face images (RGB uint8, any size) with a name each and, when known, the true age in years."""

    images: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    ages_years: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.images)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _sample_path(package: str, rel: str) -> Path | None:
    """A packaged sample image: insightface's from the package or the fetched copies, others from their package."""
    if package == "insightface":
        from agecam.models.samples import sample_image

        try:
            return sample_image(Path(rel).name)
        except FileNotFoundError:
            return None
    root = _package_dir(package)
    return root / rel if root is not None and (root / rel).is_file() else None


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _square_crop(rgb: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """A square crop around a face box, grown by `margin` of its side on each side, edge-padded if needed."""
    x, y, w, h = box
    side = max(w, h) * (1.0 + 2.0 * margin)
    cx, cy = x + w / 2.0, y + h / 2.0
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    pad = max(0, -x0, -y0, x0 + s - rgb.shape[1], y0 + s - rgb.shape[0])
    padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else rgb
    return padded[y0 + pad:y0 + pad + s, x0 + pad:x0 + pad + s].copy()


def packaged_faces(margin: float = 0.2) -> FaceSet:
    """The 8 real faces that ship in insightface and scikit-image, as square crops (UTKFace-like framing)."""
    images, names = [], []
    for package, rel, boxes in _PACKAGED_FACES:
        path = _sample_path(package, rel)
        if path is None:
            continue
        rgb = _read_rgb(path)
        for i, box in enumerate(boxes):
            crop = rgb if box == (0, 0, rgb.shape[1], rgb.shape[0]) else _square_crop(rgb, box, margin)
            images.append(crop)
            names.append(f"{package}:{Path(rel).name}#{i}")
    if not images:
        raise FileNotFoundError("no packaged face images found (insightface and scikit-image are expected installed)")
    return FaceSet(tuple(images), tuple(names))


def age_from_name(name: str) -> float | None:
    """The age in a UTKFace-style file name (`[age]_[gender]_[race]_[date].jpg`), or None."""
    m = _UTK_AGE.match(Path(name).name)
    return float(m.group(1)) if m else None


def folder_faces(data_dir: str | Path, names: list[str] | None = None, limit: int | None = None) -> FaceSet:
    """Face chips from a folder (e.g. UTKFace); `names` (relative paths) picks a subset; ages parsed from names."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"face folder {data_dir} does not exist")
    if names is None:
        paths = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    else:
        paths = [data_dir / n for n in names if (data_dir / n).is_file()]
    if limit is not None:
        paths = _spread(paths, limit)
    images, rels, ages = [], [], []
    for p in paths:
        try:
            images.append(_read_rgb(p))
        except ValueError:
            continue
        rels.append(p.relative_to(data_dir).as_posix())
        ages.append(age_from_name(p.name))
    labelled = bool(ages) and all(a is not None for a in ages)
    return FaceSet(tuple(images), tuple(rels), tuple(ages) if labelled else None)


def _spread(items: list, limit: int) -> list:
    """`limit` items evenly spread over a sorted list (deterministic, covers the whole range)."""
    if len(items) <= limit:
        return list(items)
    idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in idx]


def preprocess(images: tuple[np.ndarray, ...] | list[np.ndarray], spec: AgeModelSpec) -> np.ndarray:
    """RGB uint8 images -> the model's input batch (N, 3, H, W) float32, using the spec's size, order, mean/std."""
    h, w = spec.input_size_hw
    mean = np.asarray(spec.mean, np.float32).reshape(1, 1, 3)
    std = np.asarray(spec.std, np.float32).reshape(1, 1, 3)
    out = np.empty((len(images), 3, h, w), np.float32)
    for i, rgb in enumerate(images):
        img = rgb if spec.color_order == "RGB" else rgb[:, :, ::-1]
        interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
        img = cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=interp).astype(np.float32)
        out[i] = ((img - mean) / std).transpose(2, 0, 1)
    return out
