"""Export figures: ORT CPU throughput of the exported ResNet50 (fp32/int8), the daemon age stage's overhead, GPU fp16.

    .venv/bin/python bench/bench_export.py            # CPU: export at 224 px, batches 1/8/32, fp32 and int8
    .venv/bin/python bench/bench_export.py --gpu      # torch CUDA fp16 inference at batches 1/32/256

Random-init weights (speed does not depend on them); calibration on the packaged face crops.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fake_checkpoint(img_px: int):
    """(agecam.ckpt/v1-shaped dict, the random-init ResNet50 it holds), built with the training package."""
    from agecam.training import model as M

    net = M.build_model(M.NUM_CLASSES, weights=None, log=lambda *_: None).eval()
    return {**M.checkpoint_meta(img_px).as_dict(), "model": net.state_dict(),
            "epoch": 0, "data": {"name": "random-init"}, "created_utc": "bench"}, net


def _time_calls(fn, seconds: float, min_calls: int = 3) -> list[float]:
    """Durations (s) of repeated calls after one warm-up, for at least `seconds` and `min_calls` calls."""
    fn()
    out, t_end = [], time.perf_counter() + seconds
    while len(out) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_cpu(args) -> dict:
    from agecam.config import RuntimeConfig
    from agecam.daemon.age import AgeModel
    from agecam.export import checks, faces, onnx_export, quantize

    work = Path(tempfile.mkdtemp(prefix="agecam-bench-export-"))
    ckpt, net = _fake_checkpoint(args.img_px)
    spec = onnx_export.spec_from_checkpoint(ckpt)
    paths = {"fp32": work / "fp32.onnx", "int8": work / "int8.onnx"}
    t_export = onnx_export.export_fp32(net, spec, paths["fp32"])
    face_set = faces.packaged_faces()
    calib = faces.preprocess(face_set.images, spec)
    t0 = time.perf_counter()
    quantize.to_int8(paths["fp32"], paths["int8"], np.concatenate([calib, calib[:, :, :, ::-1]]))
    t_quant = time.perf_counter() - t0
    print(f"export fp32 {t_export:.1f} s ({paths['fp32'].stat().st_size / 1e6:.1f} MB); int8 quantisation "
          f"{t_quant:.1f} s ({paths['int8'].stat().st_size / 1e6:.1f} MB); {args.threads} threads, {args.img_px} px")

    h, w = spec.input_size_hw
    import cv2

    chips_all = [cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in face_set.images]
    results: dict = {"img_px": args.img_px, "threads": args.threads, "export_s": round(t_export, 2),
                     "quantise_s": round(t_quant, 2), "throughput": {}, "daemon_overhead": {}}
    sessions = {p: checks.ort_session(path, threads=args.threads) for p, path in paths.items()}
    print(f"{'batch':>5} " + " ".join(f"{p + ' img/s':>11} {p + ' ms':>9}" for p in sessions) + "  (interleaved)")
    for b in args.batches:
        x = faces.preprocess([chips_all[i % len(chips_all)] for i in range(b)], spec)
        durations = {p: [] for p in sessions}
        for sess in sessions.values():
            sess.run(None, {"images": x})  # warm-up
        t_end = time.perf_counter() + args.seconds * len(sessions)
        while min(len(d) for d in durations.values()) < 3 or time.perf_counter() < t_end:
            for p, sess in sessions.items():  # alternate, so every precision sees the same machine load
                t0 = time.perf_counter()
                sess.run(None, {"images": x})
                durations[p].append(time.perf_counter() - t0)
        cells = []
        for p, d in durations.items():
            med = statistics.median(d)
            results["throughput"][f"{p}/b{b}"] = round(b / med, 2)
            cells.append(f"{b / med:>11.1f} {med * 1e3:>9.1f}")
        print(f"{b:>5} " + " ".join(cells))

    # the daemon's age stage (uint8 chips -> preprocess -> run -> normalise) against the raw session on a ready tensor
    age = AgeModel(paths["fp32"], RuntimeConfig(providers=["CPUExecutionProvider"], intra_op_threads=args.threads))
    raw = age.session
    print("daemon age stage (AgeModel.predict on uint8 chips) vs raw session.run on a ready tensor, fp32:")
    print(f"{'batch':>5} {'raw ms':>8} {'stage ms':>9} {'overhead':>9} {'prep ms':>8} {'prep/raw':>9}")
    for b in args.batches:
        chips = np.stack([chips_all[i % len(chips_all)] for i in range(b)])
        x = age.preprocess(chips)
        raw_d, stage_d = [], []
        t_end = time.perf_counter() + args.seconds * 2
        age.predict(chips)
        while len(raw_d) < 3 or time.perf_counter() < t_end:  # interleaved: both see the same machine load
            t0 = time.perf_counter()
            raw.run(None, {"images": x})
            t1 = time.perf_counter()
            age.predict(chips)
            t2 = time.perf_counter()
            raw_d.append(t1 - t0)
            stage_d.append(t2 - t1)
        # the stage's own work (normalising chips) timed alone: steadier than a difference of two noisy medians
        prep = statistics.median(_time_calls(lambda: age.preprocess(chips), 0.5, min_calls=20))
        r, s = statistics.median(raw_d), statistics.median(stage_d)
        results["daemon_overhead"][f"b{b}"] = {"raw_ms": round(r * 1e3, 2), "stage_ms": round(s * 1e3, 2),
                                               "overhead_pct": round(100 * (s - r) / r, 2), "pairs": len(raw_d),
                                               "preprocess_ms": round(prep * 1e3, 3),
                                               "preprocess_pct_of_raw": round(100 * prep / r, 3)}
        print(f"{b:>5} {r * 1e3:>8.1f} {s * 1e3:>9.1f} {100 * (s - r) / r:>8.2f}% {prep * 1e3:>8.3f} "
              f"{100 * prep / r:>8.3f}%")
    return results


def bench_gpu(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device")
    from torchvision.models import resnet50

    torch.backends.cudnn.benchmark = True
    net = resnet50(num_classes=100).eval().to("cuda", dtype=torch.float16, memory_format=torch.channels_last)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "img_px": args.img_px,
               "dtype": "float16", "throughput": {}}
    print(f"torch CUDA fp16 ResNet50 on {results['device']} (torch {torch.__version__}), {args.img_px} px")
    print(f"{'batch':>5} {'img/s':>9} {'ms/batch':>9}")
    for b in args.gpu_batches:
        x = torch.randn(b, 3, args.img_px, args.img_px, device="cuda", dtype=torch.float16)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(5):  # warm-up: cudnn autotuning for this shape
                net(x)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            n, t_stop = 0, time.perf_counter() + args.seconds
            start.record()
            while n < 10 or time.perf_counter() < t_stop:
                net(x)
                n += 1
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) / n
        results["throughput"][f"b{b}"] = round(b / (ms / 1e3), 1)
        print(f"{b:>5} {b / (ms / 1e3):>9.1f} {ms:>9.2f}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="torch CUDA fp16 inference instead of the CPU figures")
    p.add_argument("--img-px", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (after a warm-up)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    results = bench_gpu(args) if args.gpu else bench_cpu(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
