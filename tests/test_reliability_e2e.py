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


class _SilentServer:
    """A TCP server that accepts connections and never answers: an RTSP camera hung mid-handshake."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("state", ["hung camera open", "dead rtsp server", "stalled subscriber", "stalled viewer",
                                   "mid-reload"])
def test_sigterm_stops_within_five_seconds_in_every_state(models_dir, tmp_path, state):
    # given a daemon in one troubled state (with a live demo camera beside it, so there is work to stop)
    silent = _SilentServer()
    events, preview = f"tcp://127.0.0.1:{free_port()}", free_port()
    cameras = [{"name": "lobby", "source": "demo", "loop": True}]
    if state == "hung camera open":
        cameras.append({"name": "hung", "source": f"rtsp://127.0.0.1:{silent.port}/x", "open_timeout_s": 60,
                        "read_timeout_s": 60})
    if state == "dead rtsp server":
        cameras.append({"name": "dead", "source": f"rtsp://127.0.0.1:{free_port()}/x"})
    d = Daemon(tmp_path, {"cameras": cameras, "events": {"bind": events, "hwm": 100, "update_max_interval_s": 0.2},
                          "metrics": {"bind": None},
                          "preview": {"bind": f"127.0.0.1:{preview}", "max_fps": 30, "client_timeout_s": 60},
                          "runtime": {"models_dir": str(models_dir)}}, watchdog_s=2.0)
    held = []
    try:
        d.wait_ready()
        if state == "stalled subscriber":  # connected, subscribed, never reading: the daemon's queue to it fills
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 1)
            sub.setsockopt(zmq.RCVBUF, 4096)
            sub.setsockopt_string(zmq.SUBSCRIBE, "")
            sub.connect(events)
            held.append(sub)
        if state == "stalled viewer":  # a stream opened with a tiny receive buffer, never read
            v = socket.socket()
            v.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            v.connect(("127.0.0.1", preview))
            v.sendall(b"GET /cameras/lobby/stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            held.append(v)
        time.sleep(3.0)  # the trouble settles in (a blocked open, full buffers)
        if state == "mid-reload":
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
        # when SIGTERM arrives
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(30)
        took_s = time.monotonic() - t0
    finally:
        code = d.stop()
        for h in held:
            h.close(0) if isinstance(h, zmq.Socket) else h.close()
        silent.close()
    print(f"{state}: stopped in {took_s:.2f} s")
    # then it exits cleanly within the 5 s deadline, with STOPPING=1 after the last WATCHDOG=1
    assert code == 0, f"{state}: exit {code}:\n{d.log()[-3000:]}"
    assert took_s <= 5.0, f"{state}: stop took {took_s:.2f} s"
    order = [m for _, m in d.notify.messages if m in ("WATCHDOG=1", "STOPPING=1")]
    assert "STOPPING=1" in order and "WATCHDOG=1" not in order[order.index("STOPPING=1"):], \
        f"{state}: WATCHDOG=1 after STOPPING=1: {order[-5:]}"


def test_recordings_rotate_and_a_killed_daemon_leaves_a_playable_segment(models_dir, tmp_path):
    # given the demo daemon recording in 3 s segments, keeping at most 3 MB of them (MJPEG: ~1 MB a segment, so
    # FFmpeg flushes a segment's data several times before it rotates; the container is what must survive a kill)
    rec = tmp_path / "rec"
    d = Daemon(tmp_path, {"cameras": [{"name": "lobby", "source": "demo", "loop": True}],
                          "events": {"bind": f"tcp://127.0.0.1:{free_port()}"}, "metrics": {"bind": None},
                          "preview": {"bind": None, "record_path": str(rec), "record_segment_s": 3,
                                      "record_max_gb": 0.003, "record_codec": "mjpg"},
                          "runtime": {"models_dir": str(models_dir)}})
    try:
        d.wait_ready()
        # when it has recorded for a while, then segments rotate and retention keeps the folder small
        wait_for(lambda: len(list((rec / "lobby").glob("*.mkv"))) >= 3, 60, "three recording segments")
        time.sleep(6)
        segs = sorted((rec / "lobby").glob("*.mkv"))
        total = sum(s.stat().st_size for s in segs)
        assert total <= 0.003e9 + max(s.stat().st_size for s in segs), f"{total} bytes kept in {len(segs)} segments"
        # when the daemon is killed (no chance to close its writer) in the middle of a segment that holds data
        def writing():
            newest = sorted((rec / "lobby").glob("*.mkv"))[-1]
            return newest if newest.stat().st_size > 32 * 1024 else None  # past FFmpeg's first flush

        killed_in = wait_for(writing, 120, "a segment being written with data in it", every_s=0.05)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
    finally:
        d.stop()
    # then the last segment is still playable: ffprobe decodes frames from it
    last = killed_in
    import subprocess

    from tests.helpers import need_tool

    probe = subprocess.run([need_tool("ffprobe"), "-v", "error", "-count_frames", "-select_streams", "v:0",
                            "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(last)],
                           capture_output=True, text=True, timeout=60)
    frames = int(probe.stdout.strip() or 0)
    print(f"killed mid-segment: {last.name} {last.stat().st_size} bytes, {frames} frames readable")
    assert frames > 0, f"the killed daemon's last segment is not playable: {probe.stdout} {probe.stderr}"


def test_a_short_soak_stays_flat(rtsp_ready, tmp_path):
    # given bench/soak.py: a demo and an RTSP camera, a subscriber, a viewer, reloads and RTSP outages
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "bench" / "soak.py"), "--minutes", "2", "--cameras", "2",
                          "--reload-every-s", "30", "--kill-every-s", "40", "--sample-every-s", "15",
                          "--warmup-min", "0.5", "--agecam", str(Path(sys.executable).parent / "agecam")],
                         capture_output=True, text=True, timeout=400, cwd=tmp_path)
    out = res.stdout + res.stderr
    print(out[-1500:])
    # when it has run two minutes, then the daemon exited cleanly, lost no event, and stayed within loose bounds
    assert res.returncode == 0, out[-3000:]
    rows = [tuple(float(x) for x in line.split()) for line in out.splitlines() if re.fullmatch(r"\s*[\d.]+(\s+\d+){7}\s*", line)]
    assert len(rows) >= 6, f"too few samples:\n{out}"
    rss = [r[1] for r in rows]
    threads, fds, gaps, reloads, kills = ([r[i] for r in rows] for i in (2, 3, 5, 6, 7))
    assert max(rss[2:]) < 1.3 * rss[1], f"RSS grew: {rss}"
    assert max(threads) - min(threads) <= 3 and max(fds) - min(fds) <= 3, f"threads {threads}, fds {fds}"
    assert gaps[-1] == 0, f"{gaps[-1]} events lost by a fast subscriber"
    assert reloads[-1] >= 3 and kills[-1] >= 2, f"the soak did not exercise reloads and outages: {rows[-1]}"
