"""onnxruntime's CPU memory arena on and off (runtime.onnx_memory_arena), side by side in one run: detection CPU,
and the RSS of an in-process App (2 demo + 2 RTSP cameras) at start and over SIGHUP-style reloads.

    python bench/bench_arena.py [--rounds 12] [--reloads 10]

The arena keeps the peak of every input shape it has seen (MTCNN's pyramid levels and region batches vary);
without it each run allocates from malloc.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def detection_cpu(rounds: int) -> dict[bool, float]:
    """Median CPU seconds of 3 full-frame + 20 region searches on t1.jpg, arena on vs off, rounds alternated."""
    import cv2
    import numpy as np

    from agecam.config import DEFAULT_MODELS_DIR, DetectorConfig, RuntimeConfig
    from agecam.daemon.detect import build_detector
    from agecam.models.fetch import ensure_models
    from agecam.models.samples import sample_image

    models = ensure_models(DEFAULT_MODELS_DIR)
    img = cv2.resize(cv2.imread(str(sample_image("t1.jpg"))), (640, 480))
    dets = {a: build_detector(DetectorConfig(), RuntimeConfig(intra_op_threads=1, onnx_memory_arena=a), models)
            for a in (True, False)}
    full = dets[True].detect(img)
    rois = np.array([[b[0] - 20, b[1] - 20, b[2] + 20, b[3] + 20] for b in full.boxes_xyxy], np.float32)
    spent: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for arena, det in dets.items():
            t0 = time.process_time()
            for _ in range(3):
                det.detect(img)
            for k in range(20):
                det.detect_regions(img, rois + np.float32(k % 7))  # shifting regions: new shapes, as tracks move
            spent[arena].append(time.process_time() - t0)
    return {a: float(np.median(v)) for a, v in spent.items()}


def reload_rss(arena: bool, reloads: int) -> list[float]:
    """In a fresh process: RSS (MB) after start and after each reload."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps({"arena": arena, "reloads": reloads})],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(arena: bool, reloads: int) -> None:
    import tempfile

    import yaml

    from agecam.config import load
    from agecam.daemon import memory
    from agecam.daemon.app import App
    from agecam.daemon.run import _reload
    from agecam.daemon.systemd import Notifier
    from tests.media import RtspServer, make_demo_mp4

    memory.limit_arenas()
    server = RtspServer(make_demo_mp4(seconds=12.0, seed=3)).start()
    cams = [{"name": "d0", "source": "demo", "loop": True}, {"name": "r1", "source": server.url},
            {"name": "d2", "source": "demo", "loop": True, "demo_seed": 2}, {"name": "r3", "source": server.url}]
    path = Path(tempfile.mkdtemp(prefix="agecam-arena-")) / "agecam.yaml"
    path.write_text(yaml.safe_dump({"cameras": cams, "events": {"bind": "tcp://127.0.0.1:0"},
                                    "metrics": {"bind": None}, "preview": {"bind": None},
                                    "runtime": {"intra_op_threads": 1, "onnx_memory_arena": arena}}))

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6

    app = App(load(path), notifier=Notifier({}))
    app.start()
    time.sleep(10)
    rows = [rss_mb()]
    for _ in range(reloads):
        app = _reload(app, path, Notifier({}))
        memory.trim()
        time.sleep(3)
        rows.append(rss_mb())
    app.stop()
    server.stop()
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        _child(spec["arena"], spec["reloads"])
        return
    cpu = detection_cpu(args.rounds)
    print(f"detection CPU, 3 full + 20 region searches (median of {args.rounds}, alternated):")
    print(f"  arena on  {cpu[True] * 1000:7.0f} ms\n  arena off {cpu[False] * 1000:7.0f} ms "
          f"({cpu[False] / cpu[True]:.2f}x)")
    print(f"RSS MB, 4 cameras in process, start then after {args.reloads} reloads (3 s apart):")
    for arena in (True, False):
        rows = reload_rss(arena, args.reloads)
        print(f"  arena {'on ' if arena else 'off'}  start {rows[0]:6.0f}  after {rows[-1]:6.0f}  "
              f"max {max(rows):6.0f}  ({(rows[-1] / rows[0] - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
