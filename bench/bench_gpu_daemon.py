"""The daemon's detector and age model on each onnxruntime execution provider this machine offers, side by side.

For each provider list ([CPUExecutionProvider], and [CUDAExecutionProvider, CPUExecutionProvider] when offered):
MTCNN on the whole frame and the age model on every face of every frame of a clip (the every-frame worst case),
timed per frame; prints frames/s, faces aged/s, per-frame latency p50/p95 and the split detect/age.

    python bench/bench_gpu_daemon.py --models DIR --clip scene.mp4 [--json out.json]

DIR holds mtcnn/{pnet,rnet,onet}.onnx and age/cydral-age-v1.onnx (as `agecam models fetch` lays them out). Chips are
cut from the detector's 5 points (landmarks 'detector'), so dlib is not needed on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run(providers: list[str], models: Path, frames: list[np.ndarray], threads: int) -> dict:
    import onnxruntime as ort

    from agecam.config import RuntimeConfig
    from agecam.daemon.age import AgeModel
    from agecam.daemon.mtcnn import MtcnnDetector

    rt = RuntimeConfig(providers=providers, intra_op_threads=threads)
    det = MtcnnDetector(models / "mtcnn/pnet.onnx", models / "mtcnn/rnet.onnx", models / "mtcnn/onet.onnx", rt,
                        min_face_px=40)
    age = AgeModel(models / "age/cydral-age-v1.onnx", rt, landmarks="detector")
    used = det.pnet.get_providers()[0], age.session.get_providers()[0]
    for img in frames[:10]:  # warm-up: sessions, CUDA kernels, arena
        d = det.detect(img)
        if len(d):
            age.predict(np.stack([age.make_chip(img, lm, b) for lm, b in zip(d.landmarks, d.boxes_xyxy)]))
    per_frame, det_ms, age_ms, faces = [], [], [], 0
    t_all = time.perf_counter()
    for img in frames:
        t0 = time.perf_counter()
        d = det.detect(img)
        t1 = time.perf_counter()
        if len(d):
            age.predict(np.stack([age.make_chip(img, lm, b) for lm, b in zip(d.landmarks, d.boxes_xyxy)]))
            faces += len(d)
        t2 = time.perf_counter()
        per_frame.append((t2 - t0) * 1000)
        det_ms.append((t1 - t0) * 1000)
        age_ms.append((t2 - t1) * 1000)
    wall = time.perf_counter() - t_all
    # the age model alone at a batch the daemon's AgeService forms with many cameras
    chips = np.zeros((16, *age.chip_hw, 3), np.uint8)
    age.predict(chips)
    t0 = time.perf_counter()
    for _ in range(50):
        age.predict(chips)
    batch16_ms = (time.perf_counter() - t0) / 50 * 1000
    return {"providers": providers, "ran_on": used, "ort": ort.__version__, "frames": len(frames),
            "fps": len(frames) / wall, "faces_aged_per_s": faces / wall,
            "frame_ms_p50": statistics.median(per_frame), "frame_ms_p95": _pct(per_frame, 95),
            "detect_ms_p50": statistics.median(det_ms), "age_ms_p50": statistics.median(age_ms),
            "age_batch16_ms": batch16_ms, "age_faces_per_s_batch16": 16000 / batch16_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--clip", required=True)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (the daemon's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, device {ort.get_device()}, providers offered: {available}", flush=True)
    cap = cv2.VideoCapture(args.clip)
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    plans = [["CPUExecutionProvider"]]
    if "CUDAExecutionProvider" in available:
        plans.append(["CUDAExecutionProvider", "CPUExecutionProvider"])
    else:
        print("CUDAExecutionProvider is not offered by this onnxruntime: only the CPU figures can be measured")
    rows = []
    for plan in plans:
        try:
            rows.append(run(plan, args.models, frames, args.threads))
        except Exception as exc:  # a provider that is listed but cannot start (missing CUDA/cuDNN libraries)
            rows.append({"providers": plan, "error": f"{type(exc).__name__}: {exc}"[:500]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'providers':<40}{'ran on':<24}{'fps':>7}{'aged/s':>8}{'frame p50/p95 ms':>18}{'det/age p50 ms':>16}"
          f"{'age b16 faces/s':>16}")
    for r in rows:
        if "error" in r:
            print(f"{'+'.join(r['providers']):<40}failed: {r['error'][:120]}")
            continue
        print(f"{'+'.join(p.replace('ExecutionProvider', '') for p in r['providers']):<40}"
              f"{'/'.join(p.replace('ExecutionProvider', '') for p in r['ran_on']):<24}{r['fps']:>7.1f}"
              f"{r['faces_aged_per_s']:>8.1f}{r['frame_ms_p50']:>9.1f}/{r['frame_ms_p95']:<8.1f}"
              f"{r['detect_ms_p50']:>8.1f}/{r['age_ms_p50']:<7.1f}{r['age_faces_per_s_batch16']:>16.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"available": available, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
