"""Idle-connection flood against the HTTP surfaces: handler threads and /healthz (or /metrics) latency under N
idle sockets, for agecam's bounded server beside prometheus_client's own start_http_server, in one run.

    python bench/bench_http_flood.py [--idle 50 300]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter, start_http_server

from agecam.daemon.metrics import Metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flood(port: int, path: str, n: int) -> tuple[int, float, float]:
    """(threads added while n idle sockets are open, median and max latency of 5 GETs during the flood, seconds)."""
    before = threading.active_count()
    idle = []
    try:
        for _ in range(n):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        added = threading.active_count() - before
        took = []
        for _ in range(5):
            t0 = time.monotonic()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
            except Exception:
                took.append(float("inf"))
                continue
            took.append(time.monotonic() - t0)
        return added, statistics.median(took), max(took)
    finally:
        for s in idle:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, nargs="+", default=[50, 300])
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'server':<44} {'idle':>5} {'threads added':>14} {'GET p50':>9} {'GET max':>9}")
    for n in args.idle:
        reg = CollectorRegistry()
        Counter("x_total", "x", registry=reg).inc()
        port = _free_port()
        httpd, thread = start_http_server(port, addr="127.0.0.1", registry=reg)
        added, p50, worst = _flood(port, "/metrics", n)
        print(f"{'prometheus_client start_http_server /metrics':<44} {n:>5} {added:>14} {p50:>8.3f}s {worst:>8.3f}s")
        httpd.shutdown()
        httpd.server_close()
        server = Metrics(["lobby"]).serve("127.0.0.1:0")
        added, p50, worst = _flood(server.port, "/metrics", n)
        print(f"{'agecam bounded server /metrics':<44} {n:>5} {added:>14} {p50:>8.3f}s {worst:>8.3f}s")
        server.close()


if __name__ == "__main__":
    main()
