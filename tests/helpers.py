"""Test helpers shared by the suite: required parts, free ports, polling, IoU, a ZeroMQ subscriber, capture doubles.

Every part `make test` installs is *required*: a test that needs one calls `need_tool`/`need_module`, which fails
(never skips) naming the part and the package that provides it, so a broken set-up turns CI red.
"""
from __future__ import annotations

import contextlib
import ctypes.util
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from agecam.daemon.slot import LatestSlot

ROOT = Path(__file__).resolve().parents[1]

# what `make test` installs (Makefile APT_PKGS and the train/test extras): tool -> the Debian package providing it
REQUIRED_TOOLS = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
    "systemd-analyze": "systemd",
    "ffmpeg": "ffmpeg",
    "ffprobe": "ffmpeg",
    "gst-inspect-1.0": "gstreamer1.0-tools",
    "mosquitto": "mosquitto",
    "mosquitto_sub": "mosquitto-clients",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
}
REQUIRED_LIBRARIES = {"seccomp": "libseccomp2"}
# module -> what installs it
REQUIRED_MODULES = {
    "torch": "make test (torch==2.14.1, the train extra)",
    "torchvision": "make test (torchvision==0.29.1, the train extra)",
    "dlib": "pip package dlib-bin (a runtime dependency)",
    "insightface": "make test (insightface==2.1 --no-deps, the SCRFD reference)",
    "jsonschema": "the test extra",
    "skimage": "pip package scikit-image (a runtime dependency)",
}


def need_tool(name: str) -> str:
    """The path of a required command-line tool, or a test failure naming the Debian package that provides it."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # mosquitto lives in sbin
    if path is None:
        pkg = REQUIRED_TOOLS.get(name, "?")
        pytest.fail(f"required tool {name!r} is missing: install the Debian package {pkg} (`make test` does)",
                    pytrace=False)
    return path


def need_library(name: str) -> str:
    """A required shared library (ctypes name), or a test failure naming its Debian package."""
    found = ctypes.util.find_library(name)
    if found is None:
        pytest.fail(f"required library lib{name} is missing: install the Debian package "
                    f"{REQUIRED_LIBRARIES.get(name, '?')} (`make test` does)", pytrace=False)
    return found


def need_module(name: str):
    """Import a required Python module, or fail naming what installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"required module {name!r} cannot be imported ({exc}): installed by "
                    f"{REQUIRED_MODULES.get(name, 'make test')}", pytrace=False)


# -- ports and polling -------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on host."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(pred, timeout_s: float, what: str, every_s: float = 0.1):
    """Poll pred() until it returns something truthy and return it; fail naming what was awaited.

    Real-time properties are checked this way: a generous deadline for a condition, never a short sampled window.
    """
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            last = pred()
        except (OSError, ValueError, KeyError, IndexError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}; last: {last!r}", pytrace=False)
        time.sleep(every_s)


# -- geometry ----------------------------------------------------------------------------------------------------------
def iou(a, b) -> float:
    """Intersection over union of two xyxy boxes (0 for empty ones)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# -- a real ZeroMQ subscriber ------------------------------------------------------------------------------------------
class Subscriber:
    """A real ZeroMQ SUB socket collecting every event in a background thread."""

    def __init__(self, endpoint: str):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 20)
        self.sock.setsockopt_string(zmq.SUBSCRIBE, "")
        self.sock.connect(endpoint)
        self.events: list[dict] = []
        self.topics: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="test-subscriber", daemon=True)
        self._t.start()

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                topic, payload = self.sock.recv_multipart()
                self.topics.append(topic.decode())
                self.events.append(json.loads(payload))

    def wait_for(self, pred, timeout_s: float) -> bool:
        """True once an event satisfying pred has arrived, False after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(pred(e) for e in list(self.events)):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        time.sleep(0.3)  # let the last messages arrive
        self._stop.set()
        self._t.join(2)
        self.sock.close(0)


# -- capture doubles -------------------------------------------------------------------------------------------------
class RecordingSlot(LatestSlot):
    """A LatestSlot that also keeps every frame put into it, so a test sees frames no consumer took."""

    def __init__(self):
        super().__init__()
        self.frames = []

    def put(self, item):
        self.frames.append(item)
        return super().put(item)


class Statuses:
    """Collects on_status calls; wait_for blocks until a given status has been reported."""

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []
        self.cond = threading.Condition()

    def __call__(self, camera: str, status: str, reason: str) -> None:
        with self.cond:
            self.calls.append((camera, status, reason))
            self.cond.notify_all()

    @property
    def seq(self) -> list[str]:
        return [c[1] for c in self.calls]

    def wait_for(self, status: str, timeout_s: float, nth: int = 1) -> tuple[str, str, str]:
        with self.cond:
            ok = self.cond.wait_for(lambda: sum(1 for c in self.calls if c[1] == status) >= nth, timeout_s)
        assert ok, f"no {status!r} (#{nth}) within {timeout_s} s; statuses so far: {self.calls}"
        return [c for c in self.calls if c[1] == status][nth - 1]


def agecam_cmd() -> list[str]:
    """The installed `agecam` console script of this interpreter's environment."""
    exe = Path(sys.executable).parent / "agecam"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agecam.cli"]


def not_uniform(img: np.ndarray, min_std: float = 5.0) -> bool:
    """True when an image has visible content (a blank or single-colour plot fails)."""
    return img is not None and float(np.asarray(img, np.float32).std()) > min_std


# -- a running daemon in this process --------------------------------------------------------------------------------
class RunningApp:
    """What `running_app` yields: the App, a real subscriber on its events, and (after the block) stuck threads."""

    def __init__(self, app, sub: Subscriber):
        self.app, self.sub = app, sub
        self.stuck: list[str] | None = None

    def wait_ended(self, timeout_s: float) -> bool:
        """Wait until every camera has ended (finite demo or file sources); True when they have."""
        deadline = time.monotonic() + timeout_s
        while not self.app.all_ended() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.app.all_ended()


@contextlib.contextmanager
def running_app(doc: dict, models_dir, **app_kwargs):
    """An in-process App on config `doc` with events on a free loopback port and a real ZeroMQ subscriber.

    Metrics and preview are off unless `doc` sets them; runtime.models_dir defaults to the fetched models. The App
    is stopped when the block ends (stuck thread names in `.stuck`), then the subscriber collects the last events.
    """
    from agecam.config import parse
    from agecam.daemon.app import App

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    doc = {"metrics": {"bind": None}, "preview": {"bind": None}, **doc}
    doc["events"] = {**doc.get("events", {}), "bind": endpoint}
    doc["runtime"] = {"models_dir": str(models_dir), **doc.get("runtime", {})}
    sub = Subscriber(endpoint)
    run = RunningApp(App(parse(doc), **app_kwargs), sub)
    try:
        run.app.start()
        yield run
    finally:
        run.stuck = run.app.stop()
        sub.close()


def read_video(path) -> list[np.ndarray]:
    """Every frame OpenCV decodes from a video file (an empty list when it cannot be opened)."""
    import cv2

    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


# -- the real daemon as a process, as systemd runs it ---------------------------------------------------------------
def http_get(url: str, headers: dict | None = None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET, also for error statuses."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; keeps (monotonic_s, message)."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                continue
            except OSError:
                return

    def with_field(self, field: str, since_s: float = 0.0) -> list[tuple[float, str]]:
        return [(t, m) for t, m in list(self.messages) if t >= since_s and field in m.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Daemon:
    """`agecam run` on a config, sandboxed, with NOTIFY_SOCKET and a systemd-style watchdog."""

    def __init__(self, tmp: Path, cfg: dict, watchdog_s: float = 4.0, sandbox: bool = True):
        self.tmp, self.cfg = tmp, cfg
        self.config_path = tmp / "agecam.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "daemon.log"
        self.notify = NotifyListener(tmp / "notify.sock")
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path, WATCHDOG_USEC=str(int(watchdog_s * 1e6)),
                   PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = agecam_cmd() + ["run", "--config", str(self.config_path)]
        if sandbox:
            cmd = [sys.executable, str(ROOT / "tests" / "test_systemd.py"), "--", *cmd]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=tmp)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode} before READY=1:\n{self.log()[-4000:]}")
            return self.notify.with_field("READY=1")
        wait_for(ready, timeout_s, "READY=1 from the daemon")

    def write_config(self, cfg: dict | str) -> None:
        self.config_path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        self.notify.close()
        return self.proc.returncode
