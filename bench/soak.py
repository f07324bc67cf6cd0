"""Endurance: N cameras (the demo scene and a looped real clip served over RTSP) for a given time, with a
subscriber, a viewer, a SIGHUP reload every few minutes and an RTSP server that dies now and then. Samples RSS,
threads, fds and the subscriber's seq gaps each minute, then prints growth per hour after the warm-up.

    python bench/soak.py [--minutes 60] [--cameras 4] [--reload-every-s 300] [--kill-every-s 240] [--arena]
"""
from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _daemon import Subscriber, Viewer, free_port, proc_sample, start_daemon  # noqa: E402

from tests.media import RtspServer, make_demo_mp4  # noqa: E402


def _slope_per_h(ts: list[float], ys: list[float]) -> float:
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--cameras", type=int, default=4, help="half demo scenes, half RTSP (a looped real clip)")
    ap.add_argument("--reload-every-s", type=float, default=300.0)
    ap.add_argument("--kill-every-s", type=float, default=240.0, help="the RTSP server dies for 1-4 s this often")
    ap.add_argument("--sample-every-s", type=float, default=60.0)
    ap.add_argument("--warmup-min", type=float, default=5.0, help="growth is measured after this")
    ap.add_argument("--arena", action="store_true", help="runtime.onnx_memory_arena: true (see bench/bench_arena.py)")
    ap.add_argument("--agecam", default=str(Path(sys.executable).parent / "agecam"))
    args = ap.parse_args()
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="agecam-soak-"))
    server = RtspServer(make_demo_mp4(seconds=12.0, seed=3)).start()
    events, preview = f"tcp://127.0.0.1:{free_port()}", free_port()
    cams = [{"name": f"demo{i}", "source": "demo", "loop": True, "demo_seed": i} if i % 2 == 0 else
            {"name": f"rtsp{i}", "source": server.url} for i in range(args.cameras)]
    cfg = {"cameras": cams, "events": {"bind": events}, "metrics": {"bind": f"127.0.0.1:{free_port()}"},
           "preview": {"bind": f"127.0.0.1:{preview}"},
           "runtime": {"intra_op_threads": 1, "onnx_memory_arena": args.arena}}
    proc = start_daemon(args.agecam, cfg, tmp)
    sub, viewer = Subscriber(events), Viewer(preview, cams[0]["name"])
    sub.start()
    viewer.start()
    t0 = time.monotonic()
    next_reload, next_kill, next_sample = t0 + args.reload_every_s, t0 + args.kill_every_s, t0 + 30.0
    rows, reloads, kills = [], 0, 0
    print(f"soak: {args.cameras} cameras for {args.minutes:g} min, reload every {args.reload_every_s:g} s, "
          f"RTSP server killed every {args.kill_every_s:g} s; log in {tmp / 'daemon.log'}", flush=True)
    print(f"{'min':>5} {'RSS MB':>7} {'threads':>7} {'fds':>4} {'events':>8} {'seq gaps':>8} {'reloads':>7} {'kills':>5}")
    try:
        while time.monotonic() - t0 < args.minutes * 60:
            now = time.monotonic()
            if proc.poll() is not None:
                print(f"the daemon exited with {proc.returncode}; see {tmp / 'daemon.log'}")
                return 1
            if now >= next_reload:
                proc.send_signal(signal.SIGHUP)
                reloads += 1
                next_reload += args.reload_every_s
            if now >= next_kill:
                server.kill()
                time.sleep(rng.uniform(1.0, 4.0))
                server.start()
                kills += 1
                next_kill += args.kill_every_s
            if now >= next_sample:
                rss, threads, fds = proc_sample(proc.pid)
                minute = (now - t0) / 60
                rows.append((minute, rss, threads, fds))
                print(f"{minute:5.1f} {rss:7.0f} {threads:7d} {fds:4d} {sub.received:8d} {sub.gaps:8d} {reloads:7d} "
                      f"{kills:5d}", flush=True)
                next_sample += args.sample_every_s
            time.sleep(0.2)
    finally:
        sub.stop.set()
        viewer.stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        server.stop()
    steady = [r for r in rows if r[0] >= args.warmup_min] or rows
    ts = [r[0] * 60 for r in steady]
    base = steady[0][1]
    rss_h = _slope_per_h(ts, [r[1] for r in steady])
    print(f"after the {args.warmup_min:g} min warm-up: RSS {base:.0f} -> {steady[-1][1]:.0f} MB, growth "
          f"{rss_h:+.1f} MB/h ({rss_h / base * 100:+.2f} %/h); threads {steady[0][2]} -> {steady[-1][2]}, fds "
          f"{steady[0][3]} -> {steady[-1][3]}; {sub.received} events, {sub.gaps} seq gaps; {reloads} reloads, "
          f"{kills} RTSP kills; exit {proc.returncode}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
