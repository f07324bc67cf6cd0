"""Image loading, preprocessing (shared by training, evaluation and export parity) and the PyTorch dataset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: RGB chip resized to img_size, (pixel - mean) / std in 0..255 units."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_order: str = "RGB"

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "Preprocessing":
        """The preprocessing recorded in an agecam checkpoint."""
        return cls(int(ckpt["img_size"]), tuple(float(v) for v in ckpt["mean"]), tuple(float(v) for v in ckpt["std"]),
                   str(ckpt.get("color_order", "RGB")))


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array; raises OSError when it cannot be decoded."""
    buf = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_chip(rgb: np.ndarray, size_px: int) -> np.ndarray:
    """Square chip resized to size_px (area averaging when shrinking, bilinear when enlarging)."""
    if rgb.shape[0] == size_px and rgb.shape[1] == size_px:
        return rgb
    interp = cv2.INTER_AREA if rgb.shape[0] > size_px else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size_px, size_px), interpolation=interp)


def chip_tensor(path: str | Path, prep: Preprocessing) -> torch.Tensor:
    """One image as a 3xSxS uint8 tensor in the model's colour order (before normalisation)."""
    rgb = resize_chip(load_rgb(path), prep.img_size)
    if prep.color_order == "BGR":
        rgb = rgb[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def normalize(batch_u8: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """NCHW uint8 -> NCHW float32 (pixel - mean) / std, on the batch's device."""
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=batch_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=batch_u8.device).view(1, 3, 1, 1)
    return (batch_u8.float() - mean) / std


def preprocessed_batches(ckpt_or_prep: dict | Preprocessing, paths: Iterable[str | Path],
                         batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Normalised NCHW float32 CPU tensors for `paths`, in order, exactly as evaluation feeds the model."""
    prep = ckpt_or_prep if isinstance(ckpt_or_prep, Preprocessing) else Preprocessing.from_checkpoint(ckpt_or_prep)
    chunk: list[torch.Tensor] = []
    for p in paths:
        chunk.append(chip_tensor(p, prep))
        if len(chunk) == batch_size:
            yield normalize(torch.stack(chunk), prep)
            chunk = []
    if chunk:
        yield normalize(torch.stack(chunk), prep)


def augment_rgb(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training augmentation of an HxWx3 uint8 chip: horizontal flip, small affine (+-8 degrees, +-7 % scale,
    +-5 % shift, reflected border), colour jitter (brightness and contrast +-25 %, saturation +-20 %, hue +-2 %)."""
    h, w = rgb.shape[:2]
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-8, 8)), float(rng.uniform(0.93, 1.07)))
    m[:, 2] += rng.uniform(-0.05, 0.05, 2) * (w, h)
    rgb = cv2.warpAffine(np.ascontiguousarray(rgb), m, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT_101)
    hue_shift = int(round(rng.uniform(-0.02, 0.02) * 180))
    if hue_shift:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + hue_shift) % 180).astype(np.uint8)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    x = rgb.astype(np.float32) * rng.uniform(0.75, 1.25)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - grey.mean()) * rng.uniform(0.75, 1.25) + grey.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    x = grey + (x - grey) * rng.uniform(0.8, 1.2)
    return np.clip(x, 0, 255).astype(np.uint8)


class FaceDataset(torch.utils.data.Dataset):
    """(uint8 CHW chip, age in years, index) for each (path, age_years) item; augmented when `train`."""

    def __init__(self, paths: Sequence[str | Path], ages_years: Sequence[float], prep: Preprocessing,
                 train: bool = False):
        if len(paths) != len(ages_years):
            raise ValueError(f"{len(paths)} paths but {len(ages_years)} ages")
        self.paths = [str(p) for p in paths]
        self.ages = torch.tensor([float(a) for a in ages_years], dtype=torch.float32)
        self.prep = prep
        self.train = train

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rgb = resize_chip(load_rgb(self.paths[i]), self.prep.img_size)
        if self.train:  # seeded from torch's RNG: reproducible, and different in every worker and epoch
            rgb = augment_rgb(rgb, np.random.default_rng(int(torch.randint(0, 2**62, (1,)))))
        if self.prep.color_order == "BGR":
            rgb = rgb[..., ::-1]
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), self.ages[i], i


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)


def make_loader(dataset: FaceDataset, batch_size: int, shuffle: bool = False, workers: int = 0, sampler=None,
                pin_memory: bool = False, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a FaceDataset (persistent workers when there are any)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=workers > 0, worker_init_fn=_worker_init,
        prefetch_factor=4 if workers > 0 else None)
