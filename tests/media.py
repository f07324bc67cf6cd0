"""Test media and servers: small videos made with cv2/ffmpeg (cached per process) and a real RTSP server process.

    from tests.media import RtspServer, make_demo_mp4, make_numbered_avi, rtsp_server_available
    mp4 = make_demo_mp4(seconds=6)                   # H.264 mp4 of the demo scene (Debian ffmpeg)
    with RtspServer(mp4, user="u", password="p") as srv:   # serves it in a loop on a free loopback port
        srv.url            # rtsp://u:p@127.0.0.1:PORT/cam
        srv.kill(); srv.start()                            # same port again
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO / "tests" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gi and gir1.2-gst-rtsp-server-1.0
FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"

_cache_lock = threading.Lock()
_cache_dir: Path | None = None


def media_dir() -> Path:
    """A per-process temporary folder for generated media (removed at exit)."""
    global _cache_dir
    with _cache_lock:
        if _cache_dir is None:
            _cache_dir = Path(tempfile.mkdtemp(prefix="agecam-test-media-"))
            atexit.register(shutil.rmtree, _cache_dir, True)
        return _cache_dir


def _cached(name: str, make) -> Path:
    """Build `name` once per process with make(tmp_path), then atomically move it into the cache."""
    out = media_dir() / name
    with _cache_lock:
        if not out.exists():
            tmp = out.with_name(".tmp-" + out.name)
            make(tmp)
            os.replace(tmp, out)
    return out


def numbered_frames(n: int, size_wh: tuple[int, int] = (96, 64)) -> Iterable[np.ndarray]:
    """n BGR frames; frame i has mean grey level 20 + (i * 23) % 200, so its index can be recovered after coding."""
    w, h = size_wh
    for i in range(n):
        yield np.full((h, w, 3), frame_level(i), np.uint8)


def frame_level(i: int) -> int:
    """The grey level numbered_frames gives frame i."""
    return 20 + (i * 23) % 200


def make_numbered_avi(n_frames: int = 12, fps: float = 20.0, size_wh: tuple[int, int] = (96, 64)) -> Path:
    """A tiny MJPEG .avi written by cv2 alone (no ffmpeg needed) with numbered frames at `fps`."""

    def make(tmp: Path) -> None:  # tmp ends in .avi, which selects the container
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, size_wh)
        if not writer.isOpened():
            raise RuntimeError("cv2.VideoWriter cannot write MJPEG .avi")
        for img in numbered_frames(n_frames, size_wh):
            writer.write(img)
        writer.release()

    return _cached(f"numbered-{n_frames}-{fps:g}-{size_wh[0]}x{size_wh[1]}.avi", make)


def encode_h264(frames: Iterable[np.ndarray], fps: float, out: Path) -> Path:
    """Encode BGR frames to an H.264 mp4 (yuv420p, GOP 25, no B-frames) by piping raw video to Debian's ffmpeg."""
    frames = iter(frames)
    first = next(frames)
    h, w = first.shape[:2]
    cmd = [FFMPEG, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}",
           "-r", f"{fps:g}", "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
           "-g", "25", "-bf", "0", "-f", "mp4", str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(np.ascontiguousarray(first).tobytes())
        for img in frames:
            proc.stdin.write(np.ascontiguousarray(img).tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait(120) != 0:
        raise RuntimeError(f"ffmpeg failed to encode {out.name}: {err.strip()}")
    return out


def make_numbered_mp4(n_frames: int = 30, fps: float = 15.0, size_wh: tuple[int, int] = (160, 120)) -> Path:
    """An H.264 mp4 of numbered frames."""
    return _cached(f"numbered-{n_frames}-{fps:g}-{size_wh[0]}x{size_wh[1]}.mp4",
                   lambda tmp: encode_h264(numbered_frames(n_frames, size_wh), fps, tmp))


def make_demo_mp4(seconds: float = 6.0, fps: float = 15.0, seed: int = 0,
                  size_wh: tuple[int, int] = (640, 480)) -> Path:
    """An H.264 mp4 of the demo scene (agecam.daemon.demo.DemoScene), frame i = DemoScene(seed).frame_at(i)."""
    from agecam.daemon.demo import DemoScene

    def make(tmp: Path) -> None:
        scene = DemoScene(seed, size_wh=size_wh, fps=fps)
        n = max(1, int(round(seconds * fps)))
        encode_h264((scene.frame_at(i)[0] for i in range(n)), fps, tmp)

    return _cached(f"demo-{seed}-{seconds:g}s-{fps:g}-{size_wh[0]}x{size_wh[1]}.mp4", make)


# -- RTSP server -----------------------------------------------------------------------------------------------------
def rtsp_server_available() -> str | None:
    """None when the RTSP test server can run here; otherwise why not (for pytest.skip)."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = ("import gi; gi.require_version('Gst','1.0'); gi.require_version('GstRtspServer','1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert Gst.ElementFactory.find('rtph264pay') and Gst.ElementFactory.find('qtdemux')")
    res = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return ("GStreamer RTSP server missing (apt install python3-gi gir1.2-gst-rtsp-server-1.0 "
                "gstreamer1.0-plugins-{base,good,bad,ugly}): " + (res.stderr.strip().splitlines() or ["?"])[-1])
    return None


class RtspServer:
    """tests/rtsp_server.py as a child process: start() on a free (then the same) loopback port, kill(), stop().

    media: an H.264 file served in an endless loop, or None for a live videotestsrc.
    """

    def __init__(self, media: str | Path | None = None, *, port: int = 0, path: str = "cam",
                 user: str | None = None, password: str | None = None, ready_timeout_s: float = 30.0):
        self.media = Path(media) if media is not None else None
        self.port = port
        self.path = path.lstrip("/")
        self.user = user
        self.password = password
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []  # every line the server printed (stdout and stderr)
        self.start_s = 0.0  # seconds the last start() took until READY

    @property
    def url(self) -> str:
        """The stream URL, with credentials when the server requires them."""
        cred = f"{self.user}:{self.password}@" if self.user else ""
        return f"rtsp://{cred}127.0.0.1:{self.port}/{self.path}"

    @property
    def url_without_credentials(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{self.path}"

    def start(self) -> "RtspServer":
        """Start the server (on self.port; 0 picks a free port, kept for later restarts) and wait for READY."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("RTSP server already running")
        cmd = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(self.port), "--path", self.path]
        cmd += ["--media", str(self.media)] if self.media is not None else ["--live"]
        if self.user:
            cmd += ["--user", self.user, "--password", self.password or ""]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(self.proc, ready), name="rtsp-server-output", daemon=True).start()
        deadline = t0 + self.ready_timeout_s
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = "".join(self.output[-20:])
                raise RuntimeError(f"RTSP server did not become ready (exit {self.proc.returncode}):\n{tail}")
        self.start_s = time.monotonic() - t0
        return self

    def _drain(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        for line in proc.stdout:
            self.output.append(line)
            if line.startswith("READY "):
                self.port = int(line.split()[1].rsplit(":", 1)[1].split("/")[0])
                ready.set()

    def kill(self) -> None:
        """SIGKILL: the server vanishes like a crashed camera."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> "RtspServer":
        self.stop()
        return self.start()

    def __enter__(self) -> "RtspServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # manual check: python -m tests.media [seconds]
    with RtspServer(make_demo_mp4(float(sys.argv[1]) if len(sys.argv) > 1 else 6.0)) as srv:
        print("serving", srv.url, "- Ctrl-C to stop", flush=True)
        try:
            srv.proc.wait()
        except KeyboardInterrupt:
            pass
