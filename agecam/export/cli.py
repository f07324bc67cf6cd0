"""`agecam export`: a training checkpoint becomes a checked, self-describing ONNX age model."""
from __future__ import annotations

import argparse
import sys

from agecam import exits


def register(subparsers) -> None:
    """Add the `export` sub-command (torch is imported only when it runs)."""
    p = subparsers.add_parser(
        "export", help="export a training checkpoint to an ONNX age model (fp32, fp16 or int8), with checks",
        description="Export an agecam.ckpt/v1 checkpoint to ONNX (input 'images', output 'probabilities', dynamic "
                    "batch, the agecam contract in metadata_props), then check it: onnx.checker, the contract, and "
                    "onnxruntime against PyTorch on real face crops. A file that fails a check is not written.")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) written by `agecam train`")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp32 (CPU/GPU), fp16 (GPU: half the size, float32 input/output kept) or int8 (CPU: static "
                        "QDQ quantisation calibrated on face crops)")
    p.add_argument("--calib-data", default=None,
                   help="folder of face chips for int8 calibration (the checkpoint's train split is used when its "
                        "split file lists it); default: the checkpoint's data folder, else the packaged face crops")
    p.add_argument("--calib-count", type=int, default=128, help="at most this many calibration images")
    p.add_argument("--eval-data", default=None,
                   help="UTKFace-style folder: its test split (from the checkpoint) is the held-out set for MAE; "
                        "default: the packaged face crops (unlabelled: differences against fp32 only)")
    p.add_argument("--eval-max", type=int, default=256, help="at most this many held-out images (spread evenly)")
    p.add_argument("--tolerance-years", type=float, default=None,
                   help="largest allowed age difference to PyTorch on any check face (default fp32 0.05, "
                        "fp16 0.5, int8 3.0 years)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 runs on onnxruntime CPU and CUDA)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agecam.export.checks import ExportCheckError
    from agecam.export.pipeline import export_checkpoint
    from agecam.models.contract import ModelContractError

    try:
        export_checkpoint(args.checkpoint, args.out, args.precision, calib_data=args.calib_data,
                          eval_data=args.eval_data, tolerance_years=args.tolerance_years, opset=args.opset,
                          calib_count=args.calib_count, eval_max=args.eval_max,
                          log=lambda msg: print(f"export: {msg}", flush=True))
    except (ExportCheckError, ModelContractError) as exc:
        print(f"agecam export: refused, {args.out} not written: {exc}", file=sys.stderr)
        return exits.USAGE
    except (FileNotFoundError, ValueError) as exc:
        print(f"agecam export: {exc}", file=sys.stderr)
        return exits.USAGE
    return exits.OK
