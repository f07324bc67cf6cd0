"""Prints the per-call cost of two cheap stages beside the frame budget they live in: a tracker update with six
faces and one demo-scene frame (both were timed in unit tests; speed belongs here, not in a pass/fail test)."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

from agecam.config import TrackerConfig
from agecam.daemon.demo import DemoScene
from agecam.daemon.track import Tracker
from agecam.daemon.types import Detections

FRAME_BUDGET_MS = 1000 / 15  # one camera at 15 fps


def _faces(i: int, n: int = 6) -> Detections:
    boxes = np.float32([[80 + 90 * k + 2 * i, 200 + 3 * k, 160 + 90 * k + 2 * i, 280 + 3 * k] for k in range(n)])
    return Detections(boxes, np.full(n, 0.9, np.float32), None)


def _median_ms(fn, n: int, repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        runs.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(runs)


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; frame budget {FRAME_BUDGET_MS:.1f} ms")
    tracker = Tracker(TrackerConfig())
    frames = [_faces(i) for i in range(150)]
    t = [0]

    def track(i: int) -> None:
        t[0] += 1
        tracker.update(frames[i % 150], t[0] / 15)

    ms = _median_ms(track, 150)
    print(f"tracker update, 6 faces:      {ms * 1000:8.0f} us  ({ms / FRAME_BUDGET_MS:.2%} of a frame)")
    scene = DemoScene(0)
    for i in range(30):
        scene.frame_at(i)
    ms = _median_ms(scene.frame_at, 45)
    print(f"demo scene frame, 640x480:    {ms:8.2f} ms  ({ms / FRAME_BUDGET_MS:.2%} of a frame)")


if __name__ == "__main__":
    main()
