"""Frame sources (demo scene, video file, USB camera, RTSP stream), each opened as a reader.

A source is opened by an `open_fn(cam_cfg) -> reader` callable (default: `open_source`). A reader is any object with
  read() -> (image_bgr, truth) | image_bgr | None    None = a read failed (live sources: reconnect);
                                                      raise SourceEnded when a finite source (file, demo) is finished,
                                                      raise SourceError(reason) for a failure with a clear reason
  close() -> None                                     optional
  frame_interval_s: float | None                      optional; reads are paced to it (files, demo); None = live
Tests inject failing or scripted sources as such plain callables; nothing is patched. capture.py runs readers.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import cv2
import numpy as np

from agecam.config import CameraConfig
from agecam.secrets import secret_free

log = logging.getLogger(__name__)

DEMO_FPS = 15.0
# RTSP over TCP, and half a second of stream analysis instead of FFmpeg's default 5 s probing: opening measured
# 1.87 s -> 0.61 s on the test server. Options a user sets in OPENCV_FFMPEG_CAPTURE_OPTIONS are kept.
RTSP_CAPTURE_OPTIONS = {"rtsp_transport": "tcp", "analyzeduration": "500000"}
BACKLOG_FAST_FRACTION = 0.25  # at open, a grab faster than this fraction of a frame interval is a buffered frame
BACKLOG_MAX_S = 10.0  # ...and at most this many seconds of frames are discarded


class SourceEnded(Exception):
    """A finite source (file or demo without loop) has delivered its last frame."""


class SourceError(Exception):
    """A source that cannot be opened or read; the message is the offline reason (kept free of secrets)."""


class SourceUnreachable(SourceError):
    """The source's server does not accept TCP connections (refused or no answer): cheap to probe again soon."""


# -- opening sources -------------------------------------------------------------------------------------------------
def source_kind(source: str | int) -> str:
    """'demo', 'camera' (index or /dev/videoN), 'rtsp', 'stream' (another URL) or 'file'."""
    if isinstance(source, int) or re.fullmatch(r"\d+", str(source)):
        return "camera"
    s = str(source)
    if s == "demo":
        return "demo"
    if re.fullmatch(r"/dev/video\d+", s) or s.startswith(("/dev/v4l/by-id/", "/dev/v4l/by-path/")):
        return "camera"  # stable names (udev links) survive re-plugging, unlike /dev/videoN
    if s.startswith("/dev/") and _is_char_device(s):
        return "camera"
    if re.match(r"(?i)rtsps?://", s):
        return "rtsp"
    if "://" in s:
        return "stream"
    return "file"


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


class CvReader:
    """A cv2.VideoCapture as a reader; `finite` readers end at end of stream, `reopen` (loop) restarts them.

    skip_backlog: a network stream delivers the frames that piled up while FFmpeg probed it (~2 s) in one burst;
    the first read discards frames that arrive without waiting, so the first frame delivered is a live one.
    """

    def __init__(self, cap: cv2.VideoCapture, *, frame_interval_s: float | None, finite: bool,
                 reopen: Callable[[], cv2.VideoCapture] | None = None, skip_backlog: bool = False):
        self.cap = cap
        self.frame_interval_s = frame_interval_s
        self.finite = finite
        self._reopen = reopen
        self._skip_backlog = skip_backlog
        self.backlog_skipped = 0  # stale frames discarded at open

    def _grab_past_backlog(self) -> bool:
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        fps = fps if 1.0 <= fps <= 240.0 else 25.0
        fast_s = BACKLOG_FAST_FRACTION / fps
        for _ in range(int(fps * BACKLOG_MAX_S)):
            t0 = time.monotonic()
            if not self.cap.grab():
                return False
            if time.monotonic() - t0 >= fast_s:  # this grab waited for the network: the frame is live
                break
            self.backlog_skipped += 1
        return True

    def grab(self) -> bool | None:
        """Take the next frame from the source without converting it: True, or None when the read failed.

        A file at its end restarts (loop) or raises SourceEnded."""
        if self._skip_backlog:
            self._skip_backlog = False
            ok = self._grab_past_backlog()
            if self.backlog_skipped:
                log.debug("skipped %d buffered frames after opening the stream", self.backlog_skipped)
        else:
            ok = self.cap.grab()
        if ok:
            return True
        if self._reopen is not None:  # loop: start the file again
            self.cap.release()
            self.cap = self._reopen()
            if self.cap.grab():
                return True
            raise SourceError("cannot restart the file from its beginning (no frame after reopening)")
        if self.finite:
            raise SourceEnded("end of file")
        return None

    def retrieve(self) -> tuple[np.ndarray, None] | None:
        """The grabbed frame as a BGR image (the colour conversion is most of a read's cost), or None."""
        ok, image = self.cap.retrieve()
        return (image, None) if ok and image is not None else None

    def read(self) -> tuple[np.ndarray, None] | None:
        """grab() and retrieve() in one."""
        return self.retrieve() if self.grab() else None

    def close(self) -> None:
        self.cap.release()


class DemoReader:
    """The synthetic demo scene, paced at its frame rate; ends after demo_duration_s unless loop."""

    def __init__(self, cam: CameraConfig):
        from agecam.daemon.demo import DemoScene  # imported here: only demo cameras need it

        self.scene = DemoScene(cam.demo_seed, fps=DEMO_FPS, duration_s=cam.demo_duration_s)
        fps = float(getattr(self.scene, "fps", DEMO_FPS))
        self.frame_interval_s = 1.0 / fps
        self.n_frames = getattr(self.scene, "n_frames", None) if cam.demo_duration_s is not None else None
        self.loop = cam.loop
        self.index = 0

    def grab(self) -> bool:
        """Move to the next frame without drawing it."""
        if self.n_frames is not None and self.index >= self.n_frames:
            if not self.loop:
                raise SourceEnded(f"demo scene finished after {self.n_frames} frames")
            self.index = 0
        self.index += 1
        return True

    def retrieve(self):
        """The frame grab() moved to, drawn, with its truth."""
        image, truth = self.scene.frame_at(self.index - 1)
        return image, (tuple(truth) if truth is not None else None)

    def read(self):
        self.grab()
        return self.retrieve()

    def close(self) -> None:
        pass


_env_lock = threading.Lock()


def quiet_native_logs() -> None:
    """Silence what OpenCV and FFmpeg print straight to stderr: it bypasses the secret scrubbing and journald's
    priorities, and the capture thread reports every failure itself, with a secret-free reason."""
    os.environ["OPENCV_FFMPEG_LOGLEVEL"] = "-8"  # AV_LOG_QUIET; OpenCV reads it when FFmpeg is first used
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _ensure_rtsp_options() -> None:
    """OpenCV's FFmpeg backend reads OPENCV_FFMPEG_CAPTURE_OPTIONS at open: add ours, keep the user's."""
    with _env_lock:
        cur = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS", "")
        have = {kv.split(";", 1)[0] for kv in cur.split("|") if kv}
        extra = [f"{k};{v}" for k, v in RTSP_CAPTURE_OPTIONS.items() if k not in have]
        if extra:
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "|".join(([cur] if cur else []) + extra)


def _ffmpeg_params(cam: CameraConfig) -> list[int]:
    """VideoCapture open parameters for a network stream: timeouts and decoder threads."""
    return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cam.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cam.read_timeout_s * 1000),
            cv2.CAP_PROP_N_THREADS, cam.decode_threads]


def open_file(cam: CameraConfig) -> CvReader:
    """A video file read at its own frame rate; at its end it loops (loop: true) or ends the camera."""
    path = Path(str(cam.source)).expanduser()
    if not path.is_file():
        raise SourceError(f"file not found: {path}")

    def _open() -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, cam.decode_threads])
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot decode video file: {path}")
        return cap

    cap = _open()
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not (0.1 <= fps <= 1000.0):
        log.warning("camera %s: %s reports no usable frame rate (%r); playing at 25 fps", cam.name, path, fps)
        fps = 25.0
    return CvReader(cap, frame_interval_s=1.0 / fps, finite=True, reopen=_open if cam.loop else None)


def open_camera(cam: CameraConfig) -> CvReader:
    """A USB camera by index or /dev/videoN through V4L2, at the configured size when set."""
    src = cam.source if isinstance(cam.source, int) else str(cam.source)
    cap = cv2.VideoCapture(src, cv2.CAP_V4L2)
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"cannot open camera {src} (missing device, busy, or no permission)")
    if cam.width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, cam.width)
    if cam.height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cam.height)
    return CvReader(cap, frame_interval_s=None, finite=False)


def _check_reachable(url: str, timeout_s: float) -> None:
    """Fail fast with a clear reason when the server does not accept TCP connections at all."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise SourceError(f"no host in {secret_free(url)}")
    default_port = 322 if parts.scheme.lower() == "rtsps" else 554
    try:
        port = parts.port or default_port
    except ValueError:
        raise SourceError(f"bad port in {secret_free(url)}") from None
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except socket.gaierror as exc:  # a name that does not resolve: the normal backoff, not the fast probe
        raise SourceError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__  # socket.timeout has no strerror
        raise SourceUnreachable(f"cannot connect to {host}:{port}: {why}") from None


def open_stream(cam: CameraConfig) -> CvReader:
    """An RTSP (over TCP) or other network stream through FFmpeg, with open and read timeouts."""
    url = str(cam.source)
    if source_kind(url) == "rtsp":
        _ensure_rtsp_options()
        _check_reachable(url, cam.open_timeout_s)
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, _ffmpeg_params(cam))
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"open failed for {secret_free(url)} (wrong path or credentials, unsupported codec, "
                          f"or no answer within {cam.open_timeout_s:g} s)")
    return CvReader(cap, frame_interval_s=None, finite=False, skip_backlog=True)


def open_source(cam: CameraConfig):
    """The default open_fn: a reader for the camera's source, by kind."""
    kind = source_kind(cam.source)
    if kind == "demo":
        return DemoReader(cam)
    if kind == "camera":
        return open_camera(cam)
    if kind in ("rtsp", "stream"):
        return open_stream(cam)
    return open_file(cam)
