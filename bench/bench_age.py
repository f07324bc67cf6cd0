"""Benchmark the age stage: runner faces/s vs a raw ORT session at batch 1/8/32, and chip-making ms per face."""
from __future__ import annotations

import argparse
import time

import numpy as np


def _rate(fn, n_faces: int, min_s: float) -> float:
    fn()  # warm-up
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s:
        fn()
        calls += 1
    return calls * n_faces / (time.perf_counter() - t0)


def main() -> None:
    import cv2
    import onnxruntime as ort
    import skimage.data

    from agecam.config import AgeConfig, RuntimeConfig
    from agecam.daemon.age import AgeModel
    from agecam.models.fetch import default_model_paths

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = ap.parse_args()
    runtime = RuntimeConfig(intra_op_threads=args.threads)
    paths = default_model_paths(runtime.models_dir)
    model = AgeModel(paths.age, runtime, AgeConfig(landmarks="detector"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    raw = ort.InferenceSession(str(paths.age), so, providers=list(runtime.providers))
    rng = np.random.default_rng(0)
    print(f"age model {paths.age.name}, {args.threads} threads")
    for batch in (1, 8, 32):
        chips = rng.integers(0, 256, (batch, *model.chip_hw, 3), dtype=np.uint8)
        x = model.preprocess(chips)
        runner = _rate(lambda: model.predict(chips), batch, args.seconds)
        bare = _rate(lambda: raw.run(None, {"images": x}), batch, args.seconds)
        print(f"batch {batch:3d}: runner {runner:7.1f} faces/s, raw session {bare:7.1f} faces/s, "
              f"overhead {100 * (bare / runner - 1):+.1f}%")
    img = np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1])
    lm = np.array([[199, 112], [244, 113], [222, 135], [204, 160], [240, 161]], float)
    box = (175, 76, 265, 166)
    for label, m, frame in [("detector landmarks", model, img),
                            ("detector landmarks, 4x face (pyramid)", model, cv2.resize(img, None, fx=4, fy=4)),
                            ("dlib5 landmarks", AgeModel(paths.age, runtime, AgeConfig(landmarks="dlib5"), paths), img)]:
        k = 4.0 if "4x" in label else 1.0
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            m.make_chip(frame, lm * k, np.array(box) * k)
            n += 1
        print(f"chip ({label}): {1000 * (time.perf_counter() - t0) / n:.3f} ms per face")


if __name__ == "__main__":
    main()
