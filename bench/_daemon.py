"""What the long-running benches share: a daemon process, /proc sampling, a ZeroMQ subscriber, an MJPEG viewer."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import yaml
import zmq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_sample(pid: int) -> tuple[float, int, int]:
    """(RSS MB, threads, open fds) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = int(next(x for x in status if x.startswith("VmRSS")).split()[1]) / 1024
    threads = int(next(x for x in status if x.startswith("Threads")).split()[1])
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def start_daemon(agecam: str, cfg: dict, workdir: Path) -> subprocess.Popen:
    """`agecam run` on cfg (written to workdir/agecam.yaml), its log in workdir/daemon.log."""
    (workdir / "agecam.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([agecam, "run", "--config", str(workdir / "agecam.yaml")], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "daemon.log", "wb"))


class Subscriber(threading.Thread):
    """A real ZeroMQ subscriber counting events and gaps in seq (per run_id)."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint, self.stop = endpoint, threading.Event()
        self.received = self.gaps = 0
        self._last: dict[str, int] = {}

    def run(self) -> None:
        s = zmq.Context.instance().socket(zmq.SUB)
        s.setsockopt_string(zmq.SUBSCRIBE, "")
        s.connect(self.endpoint)
        while not self.stop.is_set():
            if s.poll(100):
                ev = yaml.safe_load(s.recv_multipart()[1])  # JSON is YAML
                self.received += 1
                last = self._last.get(ev["run_id"])
                if last is not None and ev["seq"] != last + 1:
                    self.gaps += ev["seq"] - last - 1
                self._last[ev["run_id"]] = ev["seq"]
        s.close(0)


class Viewer(threading.Thread):
    """An MJPEG viewer that reconnects whenever its stream ends."""

    def __init__(self, port: int, camera: str):
        super().__init__(daemon=True)
        self.port, self.camera, self.stop = port, camera, threading.Event()
        self.bytes = 0

    def run(self) -> None:
        req = f"GET /cameras/{self.camera}/stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                    c.sendall(req)
                    while not self.stop.is_set():
                        data = c.recv(65536)
                        if not data:
                            break
                        self.bytes += len(data)
            except OSError:
                self.stop.wait(0.5)
