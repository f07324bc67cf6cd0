"""Prints MTCNN full-frame vs region detection ms/frame on 640x480 (t1.jpg resized), per min face and thread count."""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from agecam.config import DEFAULT_MODELS_DIR, DetectorConfig, RuntimeConfig
from agecam.daemon.detect import build_detector
from agecam.models.fetch import ensure_models


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up (shape-specific allocations)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import insightface

    img = cv2.imread(str(Path(insightface.__file__).parent / "data/images/t1.jpg"))
    img = cv2.resize(img, (640, 480), interpolation=cv2.INTER_AREA)
    models = ensure_models(args.models_dir)
    print(f"640x480 t1.jpg, median of {args.repeats}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'threads':>7} {'min_face':>8} {'faces':>5} {'full ms':>8} {'regions ms':>10} {'regions-scan ms':>15}")
    for threads in (1, 2):
        runtime = RuntimeConfig(intra_op_threads=threads)
        for min_face in (20, 40, 60):
            det = build_detector(DetectorConfig(min_face_px=min_face), runtime, models)
            full = det.detect(img)
            rois = full.boxes_xyxy
            side = (rois[:, 2:] - rois[:, :2]).max(1, keepdims=True)
            moved = np.concatenate([rois[:, :2] + 0.45 * side, rois[:, 2:] + 0.45 * side], 1)  # forces the P-Net scan
            t_full = _time_ms(lambda: det.detect(img), args.repeats)
            t_reg = _time_ms(lambda: det.detect_regions(img, rois), args.repeats)
            t_scan = _time_ms(lambda: det.detect_regions(img, moved), args.repeats)
            print(f"{threads:>7} {min_face:>8} {len(full):>5} {t_full:>8.1f} {t_reg:>10.1f} {t_scan:>15.1f}")


if __name__ == "__main__":
    main()
