"""The export command's work, top to bottom: load, export, convert, check, measure, then publish the file."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agecam.export import checks, faces
from agecam.export.checks import DEFAULT_TOLERANCE_YEARS, ExportCheckError
from agecam.files import file_sha256

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ExportReport:
    """What an export produced and measured (printed by the command, kept in the model's metadata)."""

    out: str
    precision: str
    export_s: float
    size_mb: float
    parity: dict
    heldout: dict
    lines: list[str] = field(default_factory=list)


def _split_names(ckpt: dict, part: str, checkpoint_path: Path) -> list[str] | None:
    """File names (relative to the data folder) of one part of the checkpoint's split CSV, when it is readable.

    The split file is looked for where the checkpoint says, then beside the checkpoint; a file whose sha256
    differs from the checkpoint's record is not used (it is another split).
    """
    from agecam.training.split import read_split_csv

    info = ckpt.get("split") or {}
    split_file = info.get("file")
    if not split_file:
        return None
    candidates = [Path(split_file), checkpoint_path.parent / Path(split_file).name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None or (info.get("sha256") and file_sha256(path) != info["sha256"]):
        return None
    return [r.file for r in read_split_csv(path) if r.split == part]


def _choose_sets(ckpt, checkpoint_path: Path, calib_data, eval_data, calib_count: int, eval_max: int, log,
                 need_calib: bool):
    """(calibration faces, held-out faces, parity faces)."""
    builtin = faces.packaged_faces()
    if eval_data:
        names = _split_names(ckpt, "test", checkpoint_path)
        heldout = faces.folder_faces(eval_data, names, limit=eval_max)
        where = "the checkpoint's test split" if names is not None else "all images (split file not found)"
        log(f"held-out set: {len(heldout)} faces from {eval_data} ({where})")
        if len(heldout) == 0:
            raise ExportCheckError(f"--eval-data {eval_data}: no readable face images found")
    else:
        heldout = builtin
        log(f"held-out set: the {len(builtin)} packaged face crops (no labels: differences are against fp32)")
    calib = None
    train_names = _split_names(ckpt, "train", checkpoint_path)
    ckpt_dir = (ckpt.get("data") or {}).get("root")
    if not calib_data and train_names is not None:  # the checkpoint's own train split, where its folder is at hand
        calib_data = next((d for d in (ckpt_dir, eval_data) if d and Path(d).is_dir()), None)
    if calib_data and need_calib:
        calib = faces.folder_faces(calib_data, train_names, limit=calib_count)
        log(f"calibration set: {len(calib)} faces from {calib_data}"
            + (" (the checkpoint's train split)" if train_names is not None else ""))
        if len(calib) == 0:
            raise ExportCheckError(f"calibration folder {calib_data}: no readable face images found")
    parity_faces = builtin
    if eval_data and len(heldout):
        extra = min(32, len(heldout))
        parity_faces = faces.FaceSet(builtin.images + heldout.images[:extra], builtin.names + heldout.names[:extra])
    return calib, heldout, parity_faces


def _calibration_batch(calib, spec) -> tuple[np.ndarray, str]:
    if calib is not None:
        return faces.preprocess(calib.images, spec), f"{len(calib)} face chips"
    # no folder given: the packaged faces and their mirror images (a small but real-face calibration)
    builtin = faces.preprocess(faces.packaged_faces().images, spec)
    mirrored = np.concatenate([builtin, builtin[:, :, :, ::-1]], 0)
    return np.ascontiguousarray(mirrored), f"{len(mirrored)} packaged face crops (with mirror images)"


def export_checkpoint(checkpoint: str | Path, out: str | Path, precision: str = "fp32", calib_data=None,
                      eval_data=None, tolerance_years: float | None = None, opset: int = 17,
                      calib_count: int = 128, eval_max: int = 256, log=print) -> ExportReport:
    """Export `checkpoint` to `out` at `precision`; raises ExportCheckError (and leaves no `out`) if a check fails."""
    from agecam.export import onnx_export, quantize
    from agecam.models.contract import read_spec, write_metadata

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, found {precision!r}")
    tol = DEFAULT_TOLERANCE_YEARS[precision] if tolerance_years is None else float(tolerance_years)
    checkpoint, out = Path(checkpoint), Path(out)
    model, ckpt = onnx_export.load_checkpoint(checkpoint)
    spec = onnx_export.spec_from_checkpoint(ckpt, precision, file_sha256(checkpoint))
    bins = spec.bins_years
    calib, heldout, parity_faces = _choose_sets(ckpt, checkpoint, calib_data, eval_data, calib_count, eval_max, log,
                                                 need_calib=precision == "int8")
    parity_batch = faces.preprocess(parity_faces.images, spec)
    torch_probs = onnx_export.torch_probabilities(model, parity_batch)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".agecam-export-", dir=out.parent))
    try:
        fp32_path = work / "fp32.onnx"
        export_s = onnx_export.export_fp32(model, spec, fp32_path, opset)
        log(f"exported {spec.name} {spec.version} (torch.onnx legacy exporter, opset {opset}) in {export_s:.1f} s")
        candidate = fp32_path
        t0 = time.perf_counter()
        if precision == "fp16":
            candidate = work / "fp16.onnx"
            quantize.to_fp16(fp32_path, candidate)
            log(f"converted to float16 (float32 input/output kept) in {time.perf_counter() - t0:.1f} s")
        elif precision == "int8":
            candidate = work / "int8.onnx"
            batch, what = _calibration_batch(calib, spec)
            quantize.to_int8(fp32_path, candidate, batch, spec.input_name)
            log(f"quantised to int8 (QDQ, per-channel, MinMax; head and softmax kept float) calibrated on {what} "
                f"in {time.perf_counter() - t0:.1f} s")
        if precision != "fp32":  # converters may drop or keep metadata: write the contract again
            import onnx

            m = onnx.load(str(candidate))
            write_metadata(m, spec)
            onnx.save(m, str(candidate))

        # checks: the file, the contract, a distribution out, parity with PyTorch on real faces
        checks.check_file(candidate)
        log(f"onnx.checker: ok; contract: ok (input {spec.input_name} [N,3,{spec.input_size_hw[0]},"
            f"{spec.input_size_hw[1]}] {spec.color_order}, output {spec.output_name} {len(bins)} bins "
            f"{bins[0]:g}..{bins[-1]:g} years)")
        session = checks.ort_session(candidate)
        probs = checks.run_session(session, parity_batch)
        checks.check_distribution(probs, len(bins), f"{precision} model")
        par = checks.parity(torch_probs, probs, bins, parity_faces.names)
        log(f"parity vs PyTorch fp32 on {par.n_faces} real faces: largest probability difference "
            f"{par.max_prob_diff:.3g}, largest age difference {par.max_age_diff_years:.4f} years "
            f"(mean {par.mean_age_diff_years:.4f}; tolerance {tol} years)")
        checks.require_parity(par, tol, f"{precision} export of {checkpoint.name}")

        held = _heldout(spec, heldout, session, fp32_path if precision != "fp32" else None, precision, log)

        # publish: provenance and check results go into the metadata, then the file moves into place
        import onnx

        final = onnx.load(str(candidate))
        spec.extra["export"] = json.dumps({"precision": precision, "opset": opset,
                                           "exporter": "torch.onnx (dynamo=False)", "parity_vs_torch": par.as_dict(),
                                           "tolerance_years": tol, "heldout": held})
        write_metadata(final, spec)
        staged = work / "final.onnx"
        onnx.save(final, str(staged))
        read_spec(staged)
        os.replace(staged, out)
        size_mb = out.stat().st_size / 1e6
        log(f"wrote {out} ({size_mb:.1f} MB, {precision})")
        return ExportReport(str(out), precision, export_s, size_mb, par.as_dict(), held)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _heldout(spec, heldout, session, fp32_path, precision: str, log) -> dict:
    """Held-out figures: MAE (labelled set) and, for a variant, its change against the fp32 export."""
    batch = faces.preprocess(heldout.images, spec)
    probs = checks.run_session(session, batch)
    ages = checks.expected_age_years(probs, spec.bins_years)
    result: dict = {"n_faces": len(heldout), "labelled": heldout.ages_years is not None}
    if heldout.ages_years is not None:
        result["mae_years"] = round(checks.mae_years(probs, spec.bins_years, heldout.ages_years), 4)
    if fp32_path is not None:
        ref = checks.run_session(checks.ort_session(fp32_path), batch)
        ref_ages = checks.expected_age_years(ref, spec.bins_years)
        result["mean_abs_age_change_vs_fp32_years"] = round(float(np.abs(ages - ref_ages).mean()), 4)
        result["max_abs_age_change_vs_fp32_years"] = round(float(np.abs(ages - ref_ages).max()), 4)
        if heldout.ages_years is not None:
            result["mae_fp32_years"] = round(checks.mae_years(ref, spec.bins_years, heldout.ages_years), 4)
            result["mae_change_vs_fp32_years"] = round(result["mae_years"] - result["mae_fp32_years"], 4)
            log(f"held-out MAE on {len(heldout)} faces: fp32 {result['mae_fp32_years']:.3f} years, {precision} "
                f"{result['mae_years']:.3f} years (change {result['mae_change_vs_fp32_years']:+.3f}); mean |age "
                f"change| per face {result['mean_abs_age_change_vs_fp32_years']:.3f} years")
        else:
            log(f"held-out ({len(heldout)} unlabelled faces): {precision} vs fp32 mean |age change| "
                f"{result['mean_abs_age_change_vs_fp32_years']:.3f} years, largest "
                f"{result['max_abs_age_change_vs_fp32_years']:.3f} (bounds the MAE change)")
    elif heldout.ages_years is not None:
        log(f"held-out MAE on {len(heldout)} faces: fp32 {result['mae_years']:.3f} years")
    return result
