"""Evaluate a checkpoint on a split: MAE, CS@5, exact and +-1-year accuracy, per-group MAE, 90 % coverage, plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from agecam.training import model as M
from agecam.training.data import FaceDataset, Preprocessing, make_loader, normalize
from agecam.training.names import AGE_BANDS_YEARS, GENDERS, RACES, age_band, band_label
from agecam.files import file_sha256
from agecam.training.split import read_split_csv

METRIC_KEYS = ("n", "mae_years", "cs5", "exact_acc", "pm1_acc", "argmax_exact_acc", "coverage90",
               "mean_interval90_width_years", "mean_std_years", "baseline_mae_years", "mae_by_age_band",
               "mae_by_gender", "mae_by_ethnicity")


def find_split_file(ckpt: dict, checkpoint_path: Path, split_file: str | None, log=print) -> Path:
    """The split a checkpoint was trained on: --split-file, else the recorded path, else split.csv beside it."""
    if split_file:
        return Path(split_file)
    recorded = Path(ckpt.get("split", {}).get("file", ""))
    candidates = [recorded, checkpoint_path.parent / "split.csv"]
    for c in candidates:
        if str(c) and c.is_file():
            want = ckpt.get("split", {}).get("sha256")
            if want and file_sha256(c) != want:
                log(f"warning: {c} differs from the split the checkpoint was trained on (sha256 mismatch)")
            return c
    raise FileNotFoundError(f"no split file: {recorded} and {candidates[1]} are missing; pass --split-file CSV")


@torch.no_grad()
def predict(model, paths, prep: Preprocessing, device: torch.device, batch_size: int = 64, workers: int = 0,
            log=None):
    """Softmax probabilities [N, classes] (float32 numpy) for the images, in order; progress to `log` (10 steps)."""
    ds = FaceDataset(paths, [0.0] * len(paths), prep, train=False)
    loader = make_loader(ds, batch_size, workers=workers, pin_memory=device.type == "cuda")
    model = model.to(device).eval()
    out, done, every = [], 0, max(1, len(loader) // 10)
    for i, (x_u8, _, _) in enumerate(loader, 1):
        x = normalize(x_u8.to(device), prep)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1).cpu())
        done += len(x_u8)
        if log is not None and (i % every == 0 or i == len(loader)):
            log(f"evaluate: {done}/{len(paths)} images")
    return torch.cat(out).numpy() if out else np.zeros((0, len(M.BINS_YEARS)), np.float32)


def compute_metrics(probs: np.ndarray, true_years: np.ndarray, bins: np.ndarray, genders=None, races=None,
                    baseline_years: float | None = None) -> tuple[dict, dict]:
    """(metrics, per-image arrays). Predicted age = expectation; classes compare round(prediction) with the true
    age clipped to the bins; coverage = share of true (clipped) ages inside the central 90 % interval."""
    true_years = np.asarray(true_years, dtype=np.float64)
    pred = probs @ bins
    err = pred - true_years
    clipped = np.clip(true_years, bins[0], bins[-1])
    pred_class = np.clip(np.rint(pred), bins[0], bins[-1])
    argmax_class = bins[probs.argmax(1)]
    lo_t, hi_t = M.prediction_interval(torch.from_numpy(probs), torch.from_numpy(bins), 0.9)
    lo, hi = lo_t.numpy().astype(np.float64), hi_t.numpy().astype(np.float64)
    std = np.sqrt(np.maximum((probs * (bins[None, :] - pred[:, None]) ** 2).sum(1), 0))
    m = {
        "n": int(len(true_years)),
        "mae_years": float(np.abs(err).mean()),
        "cs5": float((np.abs(err) <= 5).mean()),
        "exact_acc": float((pred_class == clipped).mean()),
        "pm1_acc": float((np.abs(pred_class - clipped) <= 1).mean()),
        "argmax_exact_acc": float((argmax_class == clipped).mean()),
        "coverage90": float(((clipped >= lo) & (clipped <= hi)).mean()),
        "mean_interval90_width_years": float((hi - lo).mean()),
        "mean_std_years": float(std.mean()),
        "mean_error_years": float(err.mean()),
        "baseline_mae_years": None if baseline_years is None else float(np.abs(true_years - baseline_years).mean()),
    }
    bands = np.array([age_band(a) for a in true_years])
    m["mae_by_age_band"] = {band_label(b): {"n": int((bands == b).sum()), "mae_years": float(np.abs(err[bands == b]).mean())}
                            for b in range(len(AGE_BANDS_YEARS)) if (bands == b).any()}
    for key, codes, names in (("mae_by_gender", genders, GENDERS), ("mae_by_ethnicity", races, RACES)):
        codes = np.asarray(codes if codes is not None else [], dtype=int)
        m[key] = {names[c]: {"n": int((codes == c).sum()), "mae_years": float(np.abs(err[codes == c]).mean())}
                  for c in names if (codes == c).any()}
    return m, {"pred": pred, "err": err, "low": lo, "high": hi, "std": std}


def evaluate(checkpoint: str | Path, data: str | Path, out: str | Path | None = None, split: str = "test",
             split_file: str | None = None, device: str = "auto", batch_size: int = 64, workers: int = 0,
             log=print) -> dict:
    """Evaluate `checkpoint` on one part of its split; writes metrics.json/.md, predictions.csv and two PNGs."""
    checkpoint = Path(checkpoint)
    model, ckpt = M.load_checkpoint(checkpoint)
    split_path = find_split_file(ckpt, checkpoint, split_file, log)
    rows = [r for r in read_split_csv(split_path, data) if r.split == split]
    if not rows:
        raise ValueError(f"split {split_path} has no '{split}' images")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    prep = Preprocessing.from_checkpoint(ckpt)
    log(f"evaluate: {len(rows)} images of the '{split}' split ({split_path.name}) on {dev}")
    probs = predict(model, [Path(data) / r.file for r in rows], prep, dev, batch_size, workers, log=log)
    bins = np.asarray(ckpt["bins_years"], dtype=np.float64)
    true = np.array([r.age_years for r in rows], dtype=np.float64)
    metrics, per = compute_metrics(probs.astype(np.float64), true, bins, [r.gender for r in rows],
                                   [r.race for r in rows], ckpt.get("data", {}).get("train_mean_age_years"))
    metrics.update({"split": split, "split_file": str(split_path), "checkpoint": str(checkpoint),
                    "checkpoint_epoch": ckpt.get("epoch")})
    out = Path(out) if out else checkpoint.parent / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    md = metrics_markdown(metrics)
    (out / "metrics.md").write_text(md)
    with (out / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "age", "pred_years", "std_years", "low90_years", "high90_years"])
        for r, p, s, lo, hi in zip(rows, per["pred"], per["std"], per["low"], per["high"]):
            w.writerow([r.file, r.age_years, f"{p:.2f}", f"{s:.2f}", f"{lo:.0f}", f"{hi:.0f}"])
    _plots(true, per["pred"], per["err"], out, metrics)
    log(md)
    return metrics


def metrics_markdown(m: dict) -> str:
    """The metrics as a Markdown report."""
    base = "" if m.get("baseline_mae_years") is None else f" (predict-the-train-mean baseline {m['baseline_mae_years']:.2f})"
    lines = [
        f"# Evaluation on '{m.get('split')}' ({m['n']} images)", "",
        "| metric | value |", "|---|---:|",
        f"| MAE (years){base} | {m['mae_years']:.2f} |",
        f"| CS@5 (share within 5 years) | {m['cs5']:.3f} |",
        f"| exact-class accuracy (rounded expectation) | {m['exact_acc']:.3f} |",
        f"| ±1-year accuracy | {m['pm1_acc']:.3f} |",
        f"| argmax exact accuracy | {m['argmax_exact_acc']:.3f} |",
        f"| 90 % interval coverage (ideal 0.90) | {m['coverage90']:.3f} |",
        f"| mean 90 % interval width (years) | {m['mean_interval90_width_years']:.1f} |",
        f"| mean predicted std (years) | {m['mean_std_years']:.2f} |",
        f"| mean signed error (years) | {m['mean_error_years']:+.2f} |", "",
    ]
    for key, title in (("mae_by_age_band", "age band"), ("mae_by_gender", "gender"), ("mae_by_ethnicity", "ethnicity")):
        lines += [f"| {title} | n | MAE (years) |", "|---|---:|---:|",
                  *[f"| {k} | {v['n']} | {v['mae_years']:.2f} |" for k, v in m[key].items()], ""]
    return "\n".join(lines)


def _plots(true, pred, err, out: Path, m: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=8, alpha=0.5)
    top = max(float(np.max(true)), float(np.max(pred)), 10.0) + 2
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="true age (years)", ylabel="predicted age (years)",
           title=f"Predicted vs true (MAE {m['mae_years']:.2f})")
    fig.tight_layout()
    fig.savefig(out / "pred_vs_true.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(err, bins=np.arange(np.floor(err.min()) - 1, np.ceil(err.max()) + 2, 1.0), color="tab:orange")
    ax.axvline(0, color="k", lw=1)
    ax.set(xlabel="predicted - true (years)", ylabel="images", title=f"Error histogram (CS@5 {m['cs5']:.2f})")
    fig.tight_layout()
    fig.savefig(out / "error_hist.png", dpi=100)
    plt.close(fig)
