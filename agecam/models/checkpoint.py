"""The training checkpoint format (agecam.ckpt/v1): what training writes and export reads, defined once, torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from agecam.models.contract import LANDMARK_NAMES

CKPT_FORMAT = "agecam.ckpt/v1"
CHIP_KIND = "similarity5"
REQUIRED_KEYS = ("arch", "bins_years", "img_size", "color_order", "mean", "std", "chip", "model")


@dataclass(frozen=True)
class CheckpointMeta:
    """How to feed and read a checkpoint's model: everything in it but the weights and the training state.

    Training writes `as_dict()` into every checkpoint; export reads it back with `from_checkpoint`, which refuses a
    checkpoint of another format or with missing fields, naming what was expected and what was found.
    """

    arch: str
    num_classes: int
    bins_years: tuple[float, ...]
    img_size: int
    color_order: str  # of the model input: "RGB" or "BGR"
    mean: tuple[float, ...]  # per channel, in 0..255 pixel units
    std: tuple[float, ...]
    chip_template_unit: tuple[tuple[float, float], ...]  # 5 landmark targets in 0..1 chip units
    chip_landmarks: tuple[str, ...] = LANDMARK_NAMES
    chip_kind: str = CHIP_KIND
    chip_note: str = ""

    def as_dict(self) -> dict:
        """The checkpoint fields (plain lists and numbers, safe for torch.load(weights_only=True))."""
        chip = {"kind": self.chip_kind, "template_unit": [list(p) for p in self.chip_template_unit],
                "landmarks": list(self.chip_landmarks)}
        if self.chip_note:
            chip["note"] = self.chip_note
        return {"format": CKPT_FORMAT, "arch": self.arch, "num_classes": self.num_classes,
                "bins_years": list(self.bins_years), "img_size": self.img_size, "color_order": self.color_order,
                "mean": list(self.mean), "std": list(self.std), "chip": chip}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "CheckpointMeta":
        """The meta of a loaded checkpoint dict; ValueError naming the format or the missing fields."""
        if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
            found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"checkpoint format: expected {CKPT_FORMAT!r}, found {found!r}")
        missing = [k for k in REQUIRED_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint is missing {missing}")
        chip = ckpt["chip"] if isinstance(ckpt["chip"], dict) else {}
        size = ckpt["img_size"]
        if isinstance(size, (list, tuple)):  # an older (h, w) form: the model input is square
            size = size[0]
        return cls(arch=str(ckpt["arch"]), num_classes=int(ckpt.get("num_classes", len(ckpt["bins_years"]))),
                   bins_years=tuple(float(b) for b in ckpt["bins_years"]), img_size=int(size),
                   color_order=str(ckpt["color_order"]), mean=tuple(float(m) for m in ckpt["mean"]),
                   std=tuple(float(s) for s in ckpt["std"]),
                   chip_template_unit=tuple(tuple(float(c) for c in p) for p in chip.get("template_unit", ())),
                   chip_landmarks=tuple(chip.get("landmarks", LANDMARK_NAMES)), chip_kind=str(chip.get("kind", "")),
                   chip_note=str(chip.get("note", "")))
