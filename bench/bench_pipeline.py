"""Daemon throughput on this machine: demo scene and a real clip, 1 and 4 cameras, against a detect+age-every-frame loop.

Prints, per scenario: frames/s captured and processed per camera, full vs region searches, faces aged/s,
first-age delay p50/p95, frame-to-event latency p50/p95, CPU-seconds per camera-second and peak RSS; and the
same CPU figure for the baseline loop (full-frame MTCNN + age model on every face of every frame), side by side.

    .venv/bin/python bench/bench_pipeline.py                     # demo, 1 and 4 cameras, 20 s each + baseline
    .venv/bin/python bench/bench_pipeline.py --clip Megamind.avi # also a real clip (see --fetch-clip)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_daemon(source: str, cameras: int, seconds: float, models_dir: str) -> dict:
    """Run the in-process daemon for `seconds` and return its figures."""
    from agecam.config import parse
    from agecam.daemon.app import App

    cams = [{"name": f"cam{i}", "source": source, "loop": True, "demo_seed": i} for i in range(cameras)]
    cfg = parse({"cameras": cams, "events": {"bind": "tcp://127.0.0.1:0"}, "metrics": {"bind": None},
                 "preview": {"bind": None}, "runtime": {"models_dir": models_dir}})
    app = App(cfg)
    app.load_models()  # model loading is start-up cost, not steady state
    app.start()
    time.sleep(3.0)  # warm-up: sessions, first tracks
    p0 = {n: (p.stats.frames, p.stats.full_searches, p.stats.region_searches) for n, p in app.pipelines.items()}
    cap0 = {n: c.frames_captured if hasattr(c, "frames_captured") else 0 for n, c in app.captures.items()}
    faces0, cpu0, t0 = app.age_service.faces, _cpu_s(), time.monotonic()
    for p in app.pipelines.values():
        p.stats.first_age_delays_s.clear()
        p.stats.event_latencies_s.clear()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    cpu = _cpu_s() - cpu0
    faces = app.age_service.faces - faces0
    frames = {n: p.stats.frames - p0[n][0] for n, p in app.pipelines.items()}
    full = sum(p.stats.full_searches - p0[n][1] for n, p in app.pipelines.items())
    region = sum(p.stats.region_searches - p0[n][2] for n, p in app.pipelines.items())
    captured = {n: (getattr(c, "frames_captured", 0) - cap0[n]) for n, c in app.captures.items()}
    first = [d for p in app.pipelines.values() for d in p.stats.first_age_delays_s]
    lat = [d for p in app.pipelines.values() for d in p.stats.event_latencies_s]
    app.stop()
    ended = [e for p in app.pipelines.values() for e in p.stats.ended_tracks]  # (seen s, first-age delay or inf)
    visits = [d for seen, d in ended if seen >= 2.0]
    return {
        "scenario": f"{Path(source).name} x{cameras}", "wall_s": wall,
        "captured_fps_per_cam": sum(captured.values()) / wall / cameras,
        "processed_fps_per_cam": sum(frames.values()) / wall / cameras,
        "full_searches": full, "region_searches": region,
        "faces_aged_per_s": faces / wall,
        "first_age_p50_s": _pct(first, 50), "first_age_p95_s": _pct(first, 95),
        # every ended track counted, a never-aged one as never (inf): the share without an age, and visits >= 2 s
        "tracks_ended": len(ended), "unaged_share": sum(d == float("inf") for _, d in ended) / max(1, len(ended)),
        "visits_2s_unaged": sum(d == float("inf") for d in visits), "visits_2s": len(visits),
        "visit_first_age_p50_s": _pct(visits, 50), "visit_first_age_p95_s": _pct(visits, 95),
        "event_latency_p50_s": _pct(lat, 50), "event_latency_p95_s": _pct(lat, 95),
        "cpu_s_per_cam_s": cpu / wall / cameras,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_baseline(source: str, seconds: float, models_dir: str) -> dict:
    """Detection on every full frame and the age model on every face: CPU-seconds per camera-second of video."""
    import cv2

    from agecam.config import parse
    from agecam.daemon.age import AgeModel
    from agecam.daemon.demo import DemoScene
    from agecam.daemon.detect import build_detector
    from agecam.models.fetch import ensure_models

    cfg = parse({"cameras": [{"name": "b", "source": source}], "runtime": {"models_dir": models_dir}})
    models = ensure_models(cfg.runtime.models_dir)
    det = build_detector(cfg.detector, cfg.runtime, models)
    age = AgeModel.from_config(cfg.age, cfg.runtime)
    if source == "demo":
        scene = DemoScene(0)
        fps = scene.fps
        frames = (scene.frame_at(i)[0] for i in range(10 ** 9))
    else:
        cap = cv2.VideoCapture(source)
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0

        def _gen():
            while True:
                ok, img = cap.read()
                if not ok:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    continue
                yield img
        frames = _gen()
    n, faces, cpu0, t0 = 0, 0, _cpu_s(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        img = next(frames)
        d = det.detect(img)
        if len(d):
            chips = np.stack([age.make_chip(img, lm, b) for lm, b in zip(d.landmarks, d.boxes_xyxy)])
            age.predict(chips)
            faces += len(d)
        n += 1
    cpu = _cpu_s() - cpu0
    return {"scenario": f"baseline {Path(source).name}", "frames": n, "video_s": n / fps,
            "wall_s": time.monotonic() - t0,
            "cpu_s_per_cam_s": cpu / (n / fps), "faces_aged_per_s": faces / (time.monotonic() - t0),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def fetch_clip(dest: Path) -> Path:
    """Megamind.avi from Debian's opencv-doc package (Apache-2.0/BSD-3), via apt-get download."""
    out = dest / "Megamind.avi"
    if out.exists():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", "opencv-doc"], cwd=dest, check=True)
    deb = next(dest.glob("opencv-doc_*.deb"))
    subprocess.run(f"dpkg-deb --fsys-tarfile {deb.name} | tar -x --wildcards '*Megamind.avi'", shell=True, cwd=dest, check=True)
    found = next(dest.rglob("Megamind.avi*"))
    if found.suffix == ".gz":
        subprocess.run(["gunzip", "-f", str(found)], check=True)
        found = found.with_suffix("")
    found.rename(out)
    return out


def main() -> int:
    from agecam.config import DEFAULT_MODELS_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--clip", help="a real video file to run besides the demo scene")
    ap.add_argument("--fetch-clip", action="store_true", help="download Megamind.avi from Debian's opencv-doc first")
    ap.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one scenario in this process, print JSON
    args = ap.parse_args()
    if args.one:
        kind, source, cams = json.loads(args.one)
        res = run_baseline(source, args.seconds, args.models_dir) if kind == "baseline" else \
            run_daemon(source, cams, args.seconds, args.models_dir)
        print(json.dumps(res))
        return 0
    sources = ["demo"]
    if args.fetch_clip:
        args.clip = str(fetch_clip(ROOT / ".cache" / "media"))
    if args.clip:
        sources.append(args.clip)
    rows = []
    for source in sources:
        plan = [("baseline", source, 1)] + [("daemon", source, c) for c in args.cameras]
        for kind, src, cams in plan:  # each scenario in its own process: clean RSS and CPU accounting
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps([kind, src, cams]),
                                  "--seconds", str(args.seconds), "--models-dir", args.models_dir],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\nscenario              cap fps/cam  proc fps/cam  aged/s  1st age p50/p95 s  event lat p50/p95 s  CPU s/cam-s  RSS MB")
    base = {}
    for r in rows:
        if r["scenario"].startswith("baseline"):
            base[r["scenario"].split(" ", 1)[1]] = r["cpu_s_per_cam_s"]
            print(f"{r['scenario']:<22}{'-':>11}{r['frames'] / r['wall_s']:>13.1f}{r['faces_aged_per_s']:>8.1f}"
                  f"{'-':>19}{'-':>21}{r['cpu_s_per_cam_s']:>13.3f}{r['peak_rss_mb']:>8.0f}")
        else:
            src = r["scenario"].rsplit(" x", 1)[0]
            ratio = r["cpu_s_per_cam_s"] / base[src] if src in base else float("nan")
            print(f"{r['scenario']:<22}{r['captured_fps_per_cam']:>11.1f}{r['processed_fps_per_cam']:>13.1f}"
                  f"{r['faces_aged_per_s']:>8.1f}{r['first_age_p50_s']:>10.2f}/{r['first_age_p95_s']:<8.2f}"
                  f"{r['event_latency_p50_s']:>12.3f}/{r['event_latency_p95_s']:<8.3f}{r['cpu_s_per_cam_s']:>13.3f}"
                  f"{r['peak_rss_mb']:>8.0f}   ({ratio:.2f}x baseline CPU)")
    print("\nage coverage: ended tracks, share that never got an age, and visits seen >= 2 s (a never-aged one counts "
          "as never in the first-age delay from the face's first frame)")
    for r in rows:
        if "tracks_ended" in r:
            print(f"{r['scenario']:<22}{r['tracks_ended']:>5} tracks, {r['unaged_share'] * 100:5.1f} % unaged; "
                  f"visits >= 2 s: {r['visits_2s']}, {r['visits_2s_unaged']} unaged, first age p50/p95 "
                  f"{r['visit_first_age_p50_s']:.2f}/{r['visit_first_age_p95_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
