"""The real daemon through months of operation compressed: reloads that leave nothing behind, a stop deadline."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq

from tests.helpers import Daemon, free_port, wait_for

pytestmark = pytest.mark.slow


def _proc(pid: int) -> tuple[float, int, int]:
    """(RSS MB, threads, open fds) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = int(next(x for x in status if x.startswith("VmRSS")).split()[1]) / 1024
    threads = int(next(x for x in status if x.startswith("Threads")).split()[1])
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def test_thirty_reloads_leave_threads_fds_and_memory_flat(models_dir, tmp_path):
    # given the demo daemon with a ZeroMQ subscriber and an MJPEG viewer attached, warmed up
    events, preview = f"tcp://127.0.0.1:{free_port()}", free_port()
    d = Daemon(tmp_path, {"cameras": [{"name": "lobby", "source": "demo", "loop": True}],
                          "events": {"bind": events}, "metrics": {"bind": f"127.0.0.1:{free_port()}"},
                          "preview": {"bind": f"127.0.0.1:{preview}"}, "runtime": {"models_dir": str(models_dir)}})
    stop, seqs = threading.Event(), []

    def subscribe():
        s = zmq.Context.instance().socket(zmq.SUB)
        s.setsockopt_string(zmq.SUBSCRIBE, "")
        s.connect(events)
        while not stop.is_set():
            if s.poll(100):
                seqs.append(int(s.recv_multipart()[1].split(b'"seq":')[1].split(b",")[0]))
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

    try:
        d.wait_ready()
        for fn in (subscribe, view):
            threading.Thread(target=fn, daemon=True).start()
        time.sleep(10)  # warm-up: caches, first tracks, the viewer's encoder
        before = _proc(d.proc.pid)
        # when it is reloaded 30 times (SIGHUP), each reload applied before the next
        for i in range(30):
            t_hup = time.monotonic()
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: d.notify.with_field("READY=1", since_s=t_hup), 60, f"READY=1 after reload {i + 1}")
            time.sleep(0.5)
        time.sleep(2)
        after = _proc(d.proc.pid)
    finally:
        stop.set()
        code = d.stop()
    print(f"30 reloads: RSS {before[0]:.0f} -> {after[0]:.0f} MB, threads {before[1]} -> {after[1]}, "
          f"fds {before[2]} -> {after[2]}")
    # then threads and fds are as before, and RSS is within 10 %
    assert code == 0, f"daemon exited {code}:\n{d.log()[-3000:]}"
    assert after[1] == before[1], f"threads {before[1]} -> {after[1]} after 30 reloads"
    assert after[2] == before[2], f"fds {before[2]} -> {after[2]} after 30 reloads"
    assert after[0] <= before[0] * 1.10, f"RSS {before[0]:.0f} -> {after[0]:.0f} MB after 30 reloads"
    # and the run's seq kept rising through every reload, with no event lost for this fast subscriber
    assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq gaps or restarts across reloads"
