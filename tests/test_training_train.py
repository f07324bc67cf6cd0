"""End to end on CPU: split -> train (learns the generated age signal) -> resume -> evaluate, through the CLI."""
from __future__ import annotations

import argparse
import csv
import json

import pytest

import cv2
import numpy as np
import torch

from agecam.training import cli
from agecam.training.evaluate import METRIC_KEYS
from agecam.training.model import load_checkpoint
from agecam.training.synth import make_utkface_like
from tests.helpers import not_uniform

CKPT_KEYS = {"format", "arch", "num_classes", "bins_years", "img_size", "color_order", "mean", "std", "chip", "model",
             "epoch", "best_val_mae", "metrics", "split", "train_args", "data", "optimizer", "scheduler", "scaler",
             "created_utc", "torch_version"}


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_split_train_resume_evaluate(tmp_path):
    # given a generated UTKFace-shaped set (with anomalies) and a published split of it
    data = tmp_path / "utk"
    make_utkface_like(data, 300, seed=11, anomalies=True)
    assert run_cli("split", "--data", data, "--out", tmp_path / "split", "--seed", 3) == 0
    run = tmp_path / "run"
    common = ("--data", data, "--out", run, "--batch-size", 16, "--img-size", 64, "--workers", 0, "--device", "cpu",
              "--lr", 1e-3, "--warmup-epochs", 0.3, "--no-progress")

    # when trained for 3 epochs on that split
    assert run_cli("train", *common, "--epochs", 3, "--split-file", tmp_path / "split" / "split.csv") == 0

    # then the training loss falls and the validation MAE beats predicting the training mean by a clear margin
    log = read_log(run / "log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3], f"log epochs {[r['epoch'] for r in log]}"
    losses = [float(r["train_loss"]) for r in log]
    assert losses[-1] < losses[0], f"training loss did not fall: {losses}"
    model, ckpt = load_checkpoint(run / "best.pt")
    baseline = ckpt["data"]["baseline_val_mae_years"]
    print(f"best val MAE {ckpt['best_val_mae']:.2f}, baseline {baseline:.2f}")
    assert ckpt["best_val_mae"] < 0.8 * baseline, f"best val MAE {ckpt['best_val_mae']:.2f} vs baseline {baseline:.2f}"
    # and the checkpoint carries the agreed format, a plain state dict and the split it used
    assert CKPT_KEYS <= set(ckpt), f"checkpoint misses {CKPT_KEYS - set(ckpt)}"
    assert ckpt["format"] == "agecam.ckpt/v1" and ckpt["img_size"] == 64 and len(ckpt["bins_years"]) == 100
    assert not any(k.startswith("module.") for k in ckpt["model"]) and all(v.is_contiguous() for v in ckpt["model"].values())
    assert len(ckpt["chip"]["template_unit"]) == 5 and not model.training
    assert ckpt["split"]["counts"]["train"] == ckpt["data"]["n_train"] > 200, ckpt["split"]
    assert not_uniform(cv2.imread(str(run / "curves.png"))), "curves.png is missing or blank"
    assert (run / "split.csv").read_bytes() == (tmp_path / "split" / "split.csv").read_bytes(), "split not the published one"

    # when resumed to 4 epochs; then training continues at epoch 4 from the saved state
    assert run_cli("train", *common, "--epochs", 4, "--resume") == 0
    log = read_log(run / "log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4], f"resume did not continue: {[r['epoch'] for r in log]}"
    assert int(log[3]["step"]) == 4 * int(log[0]["step"]), f"scheduler step did not continue: {log[3]['step']}"
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 4, f"last.pt epoch {last['epoch']}"

    # when evaluated on the test split; then every metric is reported and saved with its plots
    out = tmp_path / "eval"
    assert run_cli("evaluate", "--checkpoint", run / "best.pt", "--data", data, "--out", out, "--workers", 0,
                   "--device", "cpu") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics), f"metrics miss {set(METRIC_KEYS) - set(metrics)}"
    assert metrics["n"] == ckpt["data"]["n_test"]
    assert metrics["mae_years"] < metrics["baseline_mae_years"], metrics
    # and the saved figures are the ones recomputed from the per-image predictions it wrote
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n"], f"{len(rows)} prediction rows for {metrics['n']} test images"
    true = np.array([float(r["age"]) for r in rows])
    pred = np.array([float(r["pred_years"]) for r in rows])
    lo, hi = np.array([float(r["low90_years"]) for r in rows]), np.array([float(r["high90_years"]) for r in rows])
    assert abs(np.abs(pred - true).mean() - metrics["mae_years"]) < 0.01, "mae_years is not the predictions' MAE"
    clipped = np.clip(true, 1, 100)
    coverage = ((clipped >= lo) & (clipped <= hi)).mean()
    assert abs(coverage - metrics["coverage90"]) <= 1.0 / len(rows), f"coverage90 {metrics['coverage90']} vs {coverage}"
    assert (hi > lo).all() and metrics["mean_interval90_width_years"] > 1, "90 % intervals of zero width"
    assert "MAE (years)" in (out / "metrics.md").read_text(), "metrics.md lacks the MAE row"
    for name in ("pred_vs_true.png", "error_hist.png"):
        assert not_uniform(cv2.imread(str(out / name))), f"evaluate did not draw {name}"
