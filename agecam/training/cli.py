"""`agecam eda | split | train | evaluate`: argument parsing only (torch is imported inside the commands)."""
from __future__ import annotations

import argparse
import os
import sys

from agecam import exits


def _folder_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--data, --out and --near-dup-bits: what the commands that clean a UTKFace folder share."""
    p.add_argument("--data", required=True, help="UTKFace folder ([age]_[gender]_[race]_[datetime].jpg.chip.jpg)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--near-dup-bits", type=int, default=3, help="max pHash and dHash distance of near duplicates")


def register(subparsers) -> None:
    """Add the training sub-commands."""
    p = subparsers.add_parser("eda", help="analyse a UTKFace folder: plots, cleaning report, summary")
    _folder_args(p, "folder for the plots and reports")
    p.set_defaults(func=_eda)

    p = subparsers.add_parser("split", help="clean and split a UTKFace folder into train/val/test (CSV + plot)")
    _folder_args(p, "folder for split.csv, split_hist.png and the reports")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed: the same seed gives the same split")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="shares of train, val and test (each age band x gender stratum is split by them)")
    p.set_defaults(func=_split)

    p = subparsers.add_parser("train", help="train the ResNet50 age model (works under torchrun for DDP)")
    p.add_argument("--data", required=True, help="UTKFace folder")
    p.add_argument("--out", required=True, help="run folder: split.csv, log.csv, curves.png, best.pt, last.pt")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--img-size", type=int, default=224, help="model input side in pixels (smaller trains faster)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--split-file", help="use this published split CSV instead of making one")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (when made here) and of training")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="split shares, when no --split-file is given")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (0: load in the main process)")
    p.add_argument("--patience", type=int, default=8, help="early stop after this many epochs without improvement")
    p.add_argument("--weights", default=None, help="'imagenet' (torchvision, needs the download) or a state-dict file; "
                                                   "default: from scratch")
    p.add_argument("--sigma", type=float, default=2.0, help="std of the Gaussian soft label (years)")
    p.add_argument("--l1-weight", type=float, default=0.1, help="weight of |expected age - true age| in the loss")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="GPU only")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (quick runs, tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("evaluate", help="evaluate a checkpoint on its test split")
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt) written by `agecam train`")
    p.add_argument("--data", required=True, help="the UTKFace folder the checkpoint's split refers to")
    p.add_argument("--out", default=None, help="default: CHECKPOINT_DIR/eval_SPLIT")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="which part of the split")
    p.add_argument("--split-file", default=None, help="default: the split recorded in the checkpoint")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.set_defaults(func=_evaluate)


def _eda(args: argparse.Namespace) -> int:
    from agecam.training.dataset import scan
    from agecam.training.eda import run_eda

    s = run_eda(args.data, args.out, clean=scan(args.data, args.near_dup_bits, progress=True), progress=True)
    print(f"eda: {s['n_kept']} kept, {s['n_excluded']} excluded; wrote {args.out}/eda_summary.md and plots")
    return 0


def _split(args: argparse.Namespace) -> int:
    from agecam.training.dataset import scan
    from agecam.training.split import run_split

    s = run_split(args.data, args.out, args.seed, tuple(args.fractions),
                  clean=scan(args.data, args.near_dup_bits, progress=True))
    print(f"split: {s['counts']} -> {s['split_file']} (sha256 {s['sha256'][:12]}...)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from agecam.training.model import WeightsError
    from agecam.training.train import TrainConfig, train

    cfg = TrainConfig(data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                      img_size=args.img_size, device=args.device, resume=args.resume, split_file=args.split_file,
                      seed=args.seed, fractions=tuple(args.fractions), lr=args.lr, weight_decay=args.weight_decay,
                      warmup_epochs=args.warmup_epochs, workers=args.workers, patience=args.patience,
                      weights=args.weights, sigma_years=args.sigma, l1_weight=args.l1_weight, amp=args.amp,
                      max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.no_progress)
    try:
        r = train(cfg)
    except (WeightsError, FileNotFoundError, ValueError) as exc:
        print(f"agecam train: error: {exc}", file=sys.stderr)
        return exits.USAGE
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"train: best val MAE {r['best_val_mae']:.3f} years (baseline {r['baseline_val_mae']:.3f}) after "
          f"{r['epochs_done']} epochs -> {r['best']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from agecam.training.evaluate import evaluate

    try:
        evaluate(args.checkpoint, args.data, args.out, args.split, args.split_file, args.device, args.batch_size,
                 args.workers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"agecam evaluate: error: {exc}", file=sys.stderr)
        return exits.USAGE
    return 0
