"""Reloads without leaks: `agecam run` on the demo config (a subscriber and an MJPEG viewer attached) gets N SIGHUPs;
prints RSS, threads and open fds before, every few reloads and after.

    python bench/bench_reload.py [--reloads 30] [--every 2.0] [--agecam PATH]
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _daemon import Subscriber, Viewer, free_port, proc_sample, start_daemon  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reloads", type=int, default=30)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between SIGHUPs")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of running before the first sample")
    ap.add_argument("--agecam", default=str(Path(sys.executable).parent / "agecam"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agecam-reload-"))
    events, preview = f"tcp://127.0.0.1:{free_port()}", free_port()
    proc = start_daemon(args.agecam, {"cameras": [{"name": "lobby", "source": "demo", "loop": True}],
                                      "events": {"bind": events}, "metrics": {"bind": f"127.0.0.1:{free_port()}"},
                                      "preview": {"bind": f"127.0.0.1:{preview}"}}, tmp)
    sub, viewer = Subscriber(events), Viewer(preview, "lobby")
    sub.start()
    viewer.start()
    try:
        time.sleep(args.warmup)
        base = proc_sample(proc.pid)
        print(f"before: RSS {base[0]:.0f} MB, {base[1]} threads, {base[2]} fds")
        for i in range(1, args.reloads + 1):
            proc.send_signal(signal.SIGHUP)
            time.sleep(args.every)
            if i % 5 == 0 or i == args.reloads:
                rss, threads, fds = proc_sample(proc.pid)
                print(f"{i:3d} reloads: RSS {rss:.0f} MB ({(rss / base[0] - 1) * 100:+.1f} %), {threads} threads, "
                      f"{fds} fds, {sub.received} events received, {sub.gaps} seq gaps")
        time.sleep(args.every)
        after = proc_sample(proc.pid)
        print(f"after: RSS {after[0]:.0f} MB ({(after[0] / base[0] - 1) * 100:+.1f} %), threads {base[1]} -> "
              f"{after[1]}, fds {base[2]} -> {after[2]}")
    finally:
        sub.stop.set()
        viewer.stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
