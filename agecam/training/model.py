"""ResNet50 with a 100-way age head (ages 1-100 read as a distribution), its loss, and checkpoint loading."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from agecam.models.checkpoint import CheckpointMeta

ARCH = "resnet50"
NUM_CLASSES = 100
BINS_YEARS = [float(a) for a in range(1, NUM_CLASSES + 1)]  # class k means age k+1 years; older ages clip to 100
MEAN_PX = [123.675, 116.28, 103.53]  # ImageNet mean/std in 0..255 pixel units, RGB
STD_PX = [58.395, 57.12, 57.375]
# Landmarks (left eye, right eye, nose tip, left and right mouth corner; image left/right) in 0..1 chip units for a
# UTKFace chip. UTKFace's 200x200 `.jpg.chip.jpg` files match dlib's default face chip (get_face_chip_details with
# size 200, padding 0.2); these points are that geometry measured for MTCNN-style points (eye centres, nose tip,
# mouth corners) on real faces (see FACTS.md, "Building the Cydral chip"), made left-right symmetric.
CHIP_TEMPLATE_UNIT = [[0.306, 0.272], [0.694, 0.272], [0.500, 0.541], [0.326, 0.694], [0.674, 0.694]]


def checkpoint_meta(img_size: int) -> CheckpointMeta:
    """What every checkpoint of this model records about its input and output (CKPT_FORMAT)."""
    return CheckpointMeta(arch=ARCH, num_classes=NUM_CLASSES, bins_years=tuple(BINS_YEARS), img_size=int(img_size),
                          color_order="RGB", mean=tuple(MEAN_PX), std=tuple(STD_PX),
                          chip_template_unit=tuple(tuple(p) for p in CHIP_TEMPLATE_UNIT),
                          chip_note="UTKFace 200x200 chips = dlib get_face_chip_details(size=200, padding=0.2)")


class WeightsError(RuntimeError):
    """Initial weights that could not be obtained or loaded; the message says what to do."""


def build_model(num_classes: int = NUM_CLASSES, weights: str | Path | None = None, log=print) -> nn.Module:
    """torchvision ResNet50 returning `num_classes` logits (eval-time probabilities = softmax).

    weights: None (from scratch), "imagenet" (torchvision's IMAGENET1K_V2, downloaded or from the torch hub cache)
    or a path to a state dict (a plain one, or a dict holding it under "model"/"state_dict"; a "module." prefix
    and a head of another width are handled: unmatched tensors are skipped and named).
    """
    from torchvision.models import ResNet50_Weights, resnet50

    if weights is None or str(weights).lower() in ("", "none"):
        log("weights: none: training ResNet50 from scratch (slow to converge; use --weights imagenet or "
            "--weights FILE when you have ImageNet weights)")
        model = resnet50(weights=None)
    elif str(weights).lower() == "imagenet":
        try:
            model = resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)
        except Exception as exc:  # URLError, HTTPError, hash mismatch...
            raise WeightsError(
                f"could not get torchvision's ImageNet ResNet50 weights ({type(exc).__name__}: {exc}). They are "
                f"downloaded on first use into {torch.hub.get_dir()}/checkpoints; offline, copy "
                f"{ResNet50_Weights.IMAGENET1K_V2.url.rsplit('/', 1)[-1]} there, or pass --weights FILE with a "
                "ResNet50 state dict, or omit --weights to train from scratch") from None
        log("weights: ImageNet (torchvision ResNet50_Weights.IMAGENET1K_V2); new 100-way head")
    else:
        model = resnet50(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    model.head_from_weights = False  # True when a weights file supplied a head of this width
    if weights is not None and str(weights).lower() not in ("", "none", "imagenet"):
        model.head_from_weights = "fc.weight" in _load_state_file(model, Path(weights), log)
    return model


def _load_state_file(model: nn.Module, path: Path, log) -> set[str]:
    if not path.is_file():
        raise WeightsError(f"--weights {path}: file not found (expected a ResNet50 state dict saved with torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"--weights {path}: not a loadable state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    if len(usable) < len(own) // 2:
        raise WeightsError(f"--weights {path}: only {len(usable)} of {len(own)} ResNet50 tensors match; is this a "
                           f"ResNet50 state dict? (first keys: {list(state)[:5]})")
    model.load_state_dict(usable, strict=False)
    log(f"weights: {path}: loaded {len(usable)}/{len(own)} tensors"
        + (f"; skipped {skipped}" if skipped else "") + (f"; left at init: {missing}" if missing else ""))
    return set(usable)


def init_head_prior(model: nn.Module, ages_years, num_classes: int = NUM_CLASSES, smooth_years: float = 3.0) -> None:
    """Start the head at the training set's age prior: tiny weights, bias = log of the smoothed age histogram,
    so the first prediction is the marginal distribution (about the mean age) instead of a uniform 1-100."""
    bins = torch.tensor(BINS_YEARS[:num_classes])
    ages = torch.as_tensor(list(ages_years), dtype=torch.float32).clamp(bins[0], bins[-1])
    hist = torch.exp(-((bins[None, :] - ages[:, None]) ** 2) / (2 * smooth_years ** 2)).sum(0)
    prior = hist / hist.sum() + 1e-4
    with torch.no_grad():
        model.fc.weight.mul_(0.01)
        model.fc.bias.copy_(torch.log(prior / prior.sum()))


def expected_age(logits: torch.Tensor, bins) -> torch.Tensor:
    """Predicted age in years: the expectation of softmax(logits) over the bins' ages."""
    bins = torch.as_tensor(bins, dtype=torch.float32, device=logits.device)
    return F.softmax(logits.float(), dim=1) @ bins


def soft_labels(ages_years: torch.Tensor, bins: torch.Tensor, sigma_years: float = 2.0) -> torch.Tensor:
    """Gaussian label distributions over the bins, centred on each (clipped) true age."""
    a = ages_years.float().clamp(bins[0], bins[-1])[:, None]
    q = torch.exp(-((bins[None, :] - a) ** 2) / (2 * sigma_years ** 2))
    return q / q.sum(1, keepdim=True)


def age_loss(logits: torch.Tensor, ages_years: torch.Tensor, bins: torch.Tensor, sigma_years: float = 2.0,
             l1_weight: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, predicted ages): soft-label cross-entropy plus l1_weight x |expected age - clipped true age|."""
    logp = F.log_softmax(logits.float(), dim=1)
    ce = -(soft_labels(ages_years, bins, sigma_years) * logp).sum(1).mean()
    pred = logp.exp() @ bins
    l1 = (pred - ages_years.float().clamp(bins[0], bins[-1])).abs().mean()
    return ce + l1_weight * l1, pred


def prediction_interval(probs: torch.Tensor, bins, level: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) ages of the central `level` interval of each predicted distribution (inclusive bins)."""
    bins = torch.as_tensor(bins, dtype=torch.float32, device=probs.device)
    cdf = probs.float().cumsum(1)
    tail = (1.0 - level) / 2
    lo_idx = (cdf < tail).sum(1).clamp(max=len(bins) - 1)
    hi_idx = (cdf < 1.0 - tail).sum(1).clamp(max=len(bins) - 1)
    return bins[lo_idx], bins[hi_idx]


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode with the checkpoint's weights, checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    try:
        meta = CheckpointMeta.from_checkpoint(ckpt)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path}: {exc}") from None
    if meta.arch != ARCH:
        raise ValueError(f"checkpoint {path}: arch {meta.arch!r} is not supported (only {ARCH!r})")
    model = build_model(meta.num_classes, weights=None, log=lambda *_: None)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def plain_state_dict(model: nn.Module) -> dict:
    """State dict without DDP/compile prefixes, contiguous CPU tensors (what checkpoints store)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {k: v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
