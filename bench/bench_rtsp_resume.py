"""RTSP resume: a real GStreamer RTSP server is killed and restarted N times (down 1-4 s, then up 6-10 s each);
prints, per cycle and as p50/p95/max, how long after the server was listening again the camera reported online
and delivered a frame, plus the CPU the capture used while the camera was away.

    python bench/bench_rtsp_resume.py [--cycles 20] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecam.config import CameraConfig  # noqa: E402
from agecam.daemon.capture import CaptureThread  # noqa: E402
from tests.helpers import RecordingSlot, Statuses  # noqa: E402
from tests.media import RtspServer, make_demo_mp4  # noqa: E402


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    server = RtspServer(make_demo_mp4(seconds=6.0)).start()
    cam = CameraConfig(name="door", source=server.url)  # the defaults a user gets
    stop, statuses, slot = threading.Event(), Statuses(), RecordingSlot()
    cap = CaptureThread(cam, slot, stop, on_status=statuses)
    cap.start()
    statuses.wait_for("online", 30)
    online_s, frame_s, away_cpu = [], [], []
    try:
        for i in range(1, args.cycles + 1):
            down_s = rng.uniform(1.0, 4.0)
            server.kill()
            statuses.wait_for("offline", 30, nth=i)
            cpu0, t_down = _cpu_s(), time.monotonic()
            time.sleep(max(0.0, down_s - (time.monotonic() - t_down)))
            away_cpu.append((_cpu_s() - cpu0) / max(1e-6, time.monotonic() - t_down))
            server.start()
            t_up, wall_up = time.monotonic(), time.time()
            statuses.wait_for("online", 60, nth=i + 1)
            online_s.append(time.monotonic() - t_up)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(f.ts >= wall_up for f in list(slot.frames)[-50:]):
                time.sleep(0.01)
            frame_s.append(min((f.ts for f in slot.frames if f.ts >= wall_up), default=float("inf")) - wall_up)
            print(f"cycle {i:2d}: down {down_s:.1f} s -> online {online_s[-1]:.2f} s, first frame {frame_s[-1]:.2f} s "
                  f"after the server listened", flush=True)
            time.sleep(rng.uniform(6.0, 10.0))  # the camera runs a while before its next outage
    finally:
        stop.set()
        cap.join(5)
        server.stop()
    for name, xs in (("online", online_s), ("first frame", frame_s)):
        print(f"{name:>11}: p50 {statistics.median(xs):.2f} s, p95 {_pct(xs, 0.95):.2f} s, max {max(xs):.2f} s "
              f"over {len(xs)} restarts")
    print(f"capture CPU while the camera was away: {statistics.mean(away_cpu) * 100:.1f} % of a core (mean)")


if __name__ == "__main__":
    main()
