"""The training loop: split, ResNet50 age model, AdamW with warm-up + cosine, AMP, DDP, checkpoints, early stop."""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from agecam.training import model as M
from agecam.training.data import FaceDataset, Preprocessing, make_loader, normalize
from agecam.files import file_sha256
from agecam.training.split import read_split_csv, run_split, split_counts

LOG_FIELDS = ["epoch", "step", "lr", "train_loss", "train_mae", "val_loss", "val_mae", "epoch_s", "train_img_per_s"]


@dataclass
class TrainConfig:
    """Everything `agecam train` accepts (stored in the checkpoint as train_args)."""

    data: str
    out: str
    epochs: int = 30
    batch_size: int = 64
    img_size: int = 224
    device: str = "auto"  # auto, cpu, cuda
    resume: bool = False
    split_file: str | None = None
    seed: int = 0
    fractions: tuple = (0.8, 0.1, 0.1)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    workers: int = 4
    patience: int = 8
    weights: str | None = None  # None (from scratch), "imagenet" or a state-dict file
    sigma_years: float = 2.0
    l1_weight: float = 0.1
    amp: str = "auto"  # auto, bf16, fp16, off
    max_steps_per_epoch: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            tdist.all_reduce(t)
        return t.tolist()


def setup_distributed(device_arg: str) -> Dist:
    """One process (no torchrun variables) or one rank of a torchrun job (WORLD_SIZE > 1)."""
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                 device_id=device if want_cuda else None)
    return Dist(rank, world, local_rank, device)


def amp_dtype_for(device: torch.device, amp: str) -> torch.dtype | None:
    """Autocast dtype: bf16 where the GPU has it (no loss scaling needed), else fp16; None on CPU or when off."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=device.type == "cuda")


def make_scheduler(opt, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Per-step LR factor: linear warm-up from ~0 to 1, then cosine decay to min_lr_ratio."""
    warmup_steps = max(1, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model, x_u8, ages, prep: Preprocessing, bins, opt, scaler, amp_dtype, channels_last: bool,
               sigma_years: float = 2.0, l1_weight: float = 0.1):
    """One optimisation step on a uint8 batch; returns (loss, predicted ages) as device tensors."""
    device = bins.device
    x = normalize(x_u8.to(device, non_blocking=True), prep)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ages = ages.to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(x)
    loss, pred = M.age_loss(logits, ages, bins, sigma_years, l1_weight)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), pred.detach()


@torch.no_grad()
def validate(model, loader, prep, bins, amp_dtype, channels_last, dist: Dist, cfg: TrainConfig) -> tuple[float, float]:
    """(mean loss, MAE in years against the true age) over the whole validation set, all ranks together."""
    model.eval()
    sums = [0.0, 0.0, 0.0]
    for x_u8, ages, _ in loader:
        x = normalize(x_u8.to(dist.device, non_blocking=True), prep)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ages = ages.to(dist.device)
        with torch.autocast(device_type=dist.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(x)
        loss, pred = M.age_loss(logits, ages, bins, cfg.sigma_years, cfg.l1_weight)
        sums[0] += float(loss) * len(ages)
        sums[1] += float((pred - ages).abs().sum())
        sums[2] += len(ages)
    loss_sum, abs_sum, n = dist.sum(sums)
    return loss_sum / max(n, 1), abs_sum / max(n, 1)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {"best_val_mae", "epochs_done", "best", "last", "stopped_early"}."""
    dist = setup_distributed(cfg.device)
    out = Path(cfg.out)
    log = print if dist.main else (lambda *a, **k: None)
    try:
        return _train(cfg, dist, out, log)
    finally:
        if dist.world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


def _resolve_split(cfg: TrainConfig, dist: Dist, out: Path, resume_ckpt: dict | None, log) -> Path:
    local = out / "split.csv"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.split_file:
            src = Path(cfg.split_file)
            read_split_csv(src, cfg.data)  # refuse early when it does not match the data folder
            if src.resolve() != local.resolve():
                shutil.copyfile(src, local)
            log(f"split: using published split {src} (copied to {local})")
        elif resume_ckpt is not None and local.is_file():
            want = resume_ckpt.get("split", {}).get("sha256")
            if want and file_sha256(local) != want:
                raise RuntimeError(f"{local} changed since the checkpoint was written (sha256 differs); refusing to "
                                   "resume on a different split")
            log(f"split: resuming with {local}")
        else:
            summary = run_split(cfg.data, out, cfg.seed, cfg.fractions, progress=cfg.progress)
            log(f"split: cleaned and split {cfg.data} with seed {cfg.seed}: {summary['counts']} "
                f"({summary['n_excluded']} files excluded, see {out / 'cleaning_report.csv'})")
    dist.barrier()
    return local


def _train(cfg: TrainConfig, dist: Dist, out: Path, log) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    resume_ckpt = None
    last_path, best_path = out / "last.pt", out / "best.pt"
    if cfg.resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"--resume: {last_path} not found (train once without --resume first)")
        resume_ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        if resume_ckpt["img_size"] != cfg.img_size:
            log(f"resume: using the checkpoint's img_size {resume_ckpt['img_size']} (not {cfg.img_size})")
            cfg = dataclasses.replace(cfg, img_size=int(resume_ckpt["img_size"]))
    split_path = _resolve_split(cfg, dist, out, resume_ckpt, log)
    rows = read_split_csv(split_path, cfg.data)
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val"]
    if not train_rows or not val_rows:
        raise ValueError(f"split {split_path} has {len(train_rows)} train and {len(val_rows)} val images; need both")
    data = Path(cfg.data)
    prep = Preprocessing(cfg.img_size, tuple(M.MEAN_PX), tuple(M.STD_PX), "RGB")
    train_ds = FaceDataset([data / r.file for r in train_rows], [r.age_years for r in train_rows], prep, train=True)
    val_ds = FaceDataset([data / r.file for r in val_rows], [r.age_years for r in val_rows], prep, train=False)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                                  seed=cfg.seed)
    per_rank = len(train_ds) // dist.world
    drop_last = per_rank > cfg.batch_size
    pin = dist.device.type == "cuda"
    train_loader = make_loader(train_ds, cfg.batch_size, workers=cfg.workers, sampler=sampler, pin_memory=pin,
                               drop_last=drop_last)
    val_loader = make_loader(torch.utils.data.Subset(val_ds, range(dist.rank, len(val_ds), dist.world)),
                             cfg.batch_size, workers=cfg.workers, pin_memory=pin)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    train_ages = np.array([r.age_years for r in train_rows], dtype=np.float64)
    val_ages = np.array([r.age_years for r in val_rows], dtype=np.float64)
    baseline_val_mae = float(np.abs(val_ages - train_ages.mean()).mean())

    net = M.build_model(M.NUM_CLASSES, weights=None if resume_ckpt else cfg.weights, log=log)
    if resume_ckpt is not None:
        net.load_state_dict(resume_ckpt["model"])
    elif not net.head_from_weights:
        M.init_head_prior(net, train_ages)
    channels_last = dist.device.type == "cuda"
    net = net.to(dist.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = net
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    amp_dtype = amp_dtype_for(dist.device, cfg.amp)
    opt = make_optimizer(net, cfg.lr, cfg.weight_decay, dist.device)
    sched = make_scheduler(opt, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch),
                           cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    bins = torch.tensor(M.BINS_YEARS, device=dist.device)

    start_epoch, best, since_best = 0, float("inf"), 0
    if resume_ckpt is not None:
        opt.load_state_dict(resume_ckpt["optimizer"])
        sched.load_state_dict(resume_ckpt["scheduler"])
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = int(resume_ckpt["epoch"])
        best = float(resume_ckpt["best_val_mae"])
        since_best = int(resume_ckpt.get("epochs_since_best", 0))
        log(f"resume: {last_path} after epoch {start_epoch} (best val MAE {best:.3f}); continuing to {cfg.epochs}")
    log(f"train: {len(train_ds)} train / {len(val_ds)} val images, {dist.world} process(es) on {dist.device}, "
        f"{cfg.img_size} px, batch {cfg.batch_size}/process, {steps_per_epoch} steps/epoch, AMP {amp_dtype}, "
        f"predict-the-mean val MAE {baseline_val_mae:.2f} years")

    split_info = {"file": str(split_path.resolve()), "sha256": file_sha256(split_path), "counts": split_counts(rows)}
    data_info = {"name": "UTKFace", "root": str(data.resolve()), "n_train": len(train_rows), "n_val": len(val_rows),
                 "n_test": sum(r.split == "test" for r in rows), "train_mean_age_years": float(train_ages.mean()),
                 "baseline_val_mae_years": baseline_val_mae}
    log_path = out / "log.csv"
    stopped_early = False
    epoch = start_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum = abs_sum = 0.0
        n_seen = 0
        bar = _progress(train_loader, steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", dist.main and cfg.progress)
        for step, (x_u8, ages, _) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            loss, pred = train_step(model, x_u8, ages, prep, bins, opt, scaler, amp_dtype, channels_last,
                                    cfg.sigma_years, cfg.l1_weight)
            sched.step()
            loss_sum += float(loss) * len(ages)
            abs_sum += float((pred.float().cpu() - ages).abs().sum())
            n_seen += len(ages)
            if hasattr(bar, "set_postfix") and step % 5 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", mae=f"{abs_sum / n_seen:.2f}")
        train_s = time.perf_counter() - t0
        loss_sum, abs_sum, n_all = dist.sum([loss_sum, abs_sum, float(n_seen)])
        val_loss, val_mae = validate(model, val_loader, prep, bins, amp_dtype, channels_last, dist, cfg)
        row = {"epoch": epoch, "step": sched.last_epoch, "lr": opt.param_groups[0]["lr"],
               "train_loss": loss_sum / max(n_all, 1), "train_mae": abs_sum / max(n_all, 1), "val_loss": val_loss,
               "val_mae": val_mae, "epoch_s": time.perf_counter() - t0, "train_img_per_s": n_all / max(train_s, 1e-9)}
        improved = val_mae < best - 1e-9
        best, since_best = (val_mae, 0) if improved else (best, since_best + 1)
        log(f"epoch {epoch}: train loss {row['train_loss']:.4f} MAE {row['train_mae']:.2f} | val loss "
            f"{val_loss:.4f} MAE {val_mae:.2f} (best {best:.2f}) | {row['train_img_per_s']:.1f} img/s")
        if dist.main:
            _append_log(log_path, row)
            ckpt = _checkpoint(net, opt, sched, scaler, cfg, epoch, best, since_best, row, split_info, data_info)
            _atomic_save(ckpt, last_path)
            if improved:
                _atomic_save(ckpt, best_path)
            plot_curves(log_path, out / "curves.png", baseline_val_mae)
        if since_best >= cfg.patience:
            log(f"early stop: no val MAE improvement for {cfg.patience} epochs (best {best:.3f})")
            stopped_early = True
            break
    dist.barrier()
    return {"best_val_mae": best, "epochs_done": epoch, "best": str(best_path), "last": str(last_path),
            "stopped_early": stopped_early, "baseline_val_mae": baseline_val_mae, "split_file": str(split_path)}


def _progress(loader, total: int, desc: str, enabled: bool):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, mininterval=1.0)


def _checkpoint(net, opt, sched, scaler, cfg, epoch, best, since_best, row, split_info, data_info) -> dict:
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    return {
        **M.checkpoint_meta(cfg.img_size).as_dict(),
        "model": M.plain_state_dict(net), "epoch": epoch, "best_val_mae": best, "epochs_since_best": since_best,
        "metrics": {k: float(v) for k, v in row.items()}, "split": split_info, "train_args": args,
        "data": data_info, "loss": {"kind": "soft_label_ce+l1", "sigma_years": cfg.sigma_years,
                                    "l1_weight": cfg.l1_weight},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
    }


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_log(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_log(path: str | Path) -> list[dict]:
    """log.csv rows as dicts of floats (epoch and step as ints)."""
    with Path(path).open(newline="") as f:
        return [{k: (int(v) if k in ("epoch", "step") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def plot_curves(log_path: Path, png_path: Path, baseline_val_mae: float | None = None) -> None:
    """Loss and MAE curves (train and val) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    axes[0].plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss (soft-label CE + L1)")
    axes[1].plot(ep, [r["train_mae"] for r in rows], "o-", label="train")
    axes[1].plot(ep, [r["val_mae"] for r in rows], "o-", label="val")
    if baseline_val_mae is not None:
        axes[1].axhline(baseline_val_mae, color="gray", ls="--", label="predict the mean")
    axes[1].set(xlabel="epoch", ylabel="MAE (years)", title="Mean absolute error")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
