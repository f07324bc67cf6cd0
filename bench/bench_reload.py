"""Reloads without leaks: `agecam run` on the demo config (a subscriber and an MJPEG viewer attached) gets N SIGHUPs;
prints RSS, threads and open fds before, every few reloads and after.

    python bench/bench_reload.py [--reloads 30] [--every 2.0] [--agecam PATH]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
import zmq


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc(pid: int) -> tuple[float, int, int]:
    """(RSS MB, threads, open fds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
    threads = int(next(line for line in status.splitlines() if line.startswith("Threads")).split()[1])
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reloads", type=int, default=30)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between SIGHUPs")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of running before the first sample")
    ap.add_argument("--agecam", default=str(Path(sys.executable).parent / "agecam"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agecam-reload-"))
    events, preview = f"tcp://127.0.0.1:{_port()}", _port()
    (tmp / "c.yaml").write_text(yaml.safe_dump({
        "cameras": [{"name": "lobby", "source": "demo", "loop": True}], "events": {"bind": events},
        "metrics": {"bind": f"127.0.0.1:{_port()}"}, "preview": {"bind": f"127.0.0.1:{preview}"}}))
    proc = subprocess.Popen([args.agecam, "run", "--config", str(tmp / "c.yaml")], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "log", "wb"))
    stop = threading.Event()
    received = [0]

    def subscribe():
        s = zmq.Context.instance().socket(zmq.SUB)
        s.setsockopt_string(zmq.SUBSCRIBE, "")
        s.connect(events)
        while not stop.is_set():
            if s.poll(100):
                s.recv_multipart()
                received[0] += 1
        s.close(0)

    def view():
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", preview), timeout=5) as c:
                    c.sendall(b"GET /cameras/lobby/stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    while not stop.is_set() and c.recv(65536):
                        pass
            except OSError:
                stop.wait(0.5)

    for fn in (subscribe, view):
        threading.Thread(target=fn, daemon=True).start()
    try:
        time.sleep(args.warmup)
        base = _proc(proc.pid)
        print(f"before: RSS {base[0]:.0f} MB, {base[1]} threads, {base[2]} fds")
        for i in range(1, args.reloads + 1):
            proc.send_signal(signal.SIGHUP)
            time.sleep(args.every)
            if i % 5 == 0 or i == args.reloads:
                rss, threads, fds = _proc(proc.pid)
                print(f"{i:3d} reloads: RSS {rss:.0f} MB ({(rss / base[0] - 1) * 100:+.1f} %), {threads} threads, "
                      f"{fds} fds, {received[0]} events received")
        time.sleep(args.every)
        after = _proc(proc.pid)
        print(f"after: RSS {after[0]:.0f} MB ({(after[0] / base[0] - 1) * 100:+.1f} %), threads {base[1]} -> "
              f"{after[1]}, fds {base[2]} -> {after[2]}")
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
