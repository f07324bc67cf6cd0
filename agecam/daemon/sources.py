"""Frame sources (demo scene, video file, USB camera, RTSP) and the capture thread that paces, watches and reconnects.

A source is opened by an `open_fn(cam_cfg) -> reader` callable (default: `open_source`). A reader is any object with
  read() -> (image_bgr, truth) | image_bgr | None    None = a read failed (live sources: reconnect);
                                                      raise SourceEnded when a finite source (file, demo) is finished,
                                                      raise SourceError(reason) for a failure with a clear reason
  close() -> None                                     optional
  frame_interval_s: float | None                      optional; reads are paced to it (files, demo); None = live
Tests inject failing or scripted sources as such plain callables; nothing is patched.

CaptureThread counters, read by the metrics layer and health page as plain attributes:
  frames_captured  frames put into the slot            frames_skipped   frames skipped by max_fps
  frames_dropped   slot overwrites + max_fps skips     reconnects       reopen attempts after the first open
  status, reason   last reported state ('online'|'offline'|'ended'|None before the first report)
"""
from __future__ import annotations

import logging
import os
import queue
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import cv2
import numpy as np

from agecam.config import CameraConfig, secret_free
from agecam.daemon.backoff import Backoff
from agecam.daemon.slot import LatestSlot
from agecam.daemon.types import Frame

log = logging.getLogger(__name__)

DEMO_FPS = 15.0
OPEN_GRACE_S = 2.0  # the supervisor's open deadline: open_timeout_s plus up to this (the capture's own timeout acts first)
POLL_S = 0.1  # supervisor check interval: watchdog resolution and stop latency (a finished attempt wakes it at once)
MAX_STUCK_READERS = 3  # abandoned readers still blocked in a call; beyond this no new one is opened
FALL_BEHIND_RESET_S = 1.0  # a paced source that falls this far behind restarts its schedule instead of bursting
RTSP_CAPTURE_OPTIONS = "rtsp_transport;tcp"
BACKLOG_FAST_FRACTION = 0.25  # at open, a grab faster than this fraction of a frame interval is a buffered frame
BACKLOG_MAX_S = 10.0  # ...and at most this many seconds of frames are discarded

StatusFn = Callable[[str, str, str], None]
OpenFn = Callable[[CameraConfig], Any]


class SourceEnded(Exception):
    """A finite source (file or demo without loop) has delivered its last frame."""


class SourceError(Exception):
    """A source that cannot be opened or read; the message is the offline reason (kept free of secrets)."""


# -- opening sources -------------------------------------------------------------------------------------------------
def source_kind(source: str | int) -> str:
    """'demo', 'camera' (index or /dev/videoN), 'rtsp', 'stream' (another URL) or 'file'."""
    if isinstance(source, int) or re.fullmatch(r"\d+", str(source)):
        return "camera"
    s = str(source)
    if s == "demo":
        return "demo"
    if re.fullmatch(r"/dev/video\d+", s):
        return "camera"
    if re.match(r"(?i)rtsps?://", s):
        return "rtsp"
    if "://" in s:
        return "stream"
    return "file"


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

    def read(self) -> tuple[np.ndarray, None] | None:
        if self._skip_backlog:
            self._skip_backlog = False
            ok = self._grab_past_backlog()
            if self.backlog_skipped:
                log.debug("skipped %d buffered frames after opening the stream", self.backlog_skipped)
            ok, image = self.cap.retrieve() if ok else (False, None)
        else:
            ok, image = self.cap.read()
        if ok and image is not None:
            return image, None
        if self._reopen is not None:  # loop: start the file again
            self.cap.release()
            self.cap = self._reopen()
            ok, image = self.cap.read()
            if ok and image is not None:
                return image, None
            raise SourceError("cannot restart the file from its beginning (no frame after reopening)")
        if self.finite:
            raise SourceEnded("end of file")
        return None

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

    def read(self):
        if self.n_frames is not None and self.index >= self.n_frames:
            if not self.loop:
                raise SourceEnded(f"demo scene finished after {self.n_frames} frames")
            self.index = 0
        image, truth = self.scene.frame_at(self.index)
        self.index += 1
        return image, (tuple(truth) if truth is not None else None)

    def close(self) -> None:
        pass


_env_lock = threading.Lock()


def _ensure_rtsp_over_tcp() -> None:
    """OpenCV's FFmpeg backend reads OPENCV_FFMPEG_CAPTURE_OPTIONS at open: ask for RTSP over TCP, keep user options."""
    with _env_lock:
        cur = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS", "")
        if "rtsp_transport" not in cur:
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"{cur}|{RTSP_CAPTURE_OPTIONS}" if cur else RTSP_CAPTURE_OPTIONS


def _ffmpeg_timeouts(cam: CameraConfig) -> list[int]:
    return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cam.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cam.read_timeout_s * 1000)]


def open_file(cam: CameraConfig) -> CvReader:
    """A video file read at its own frame rate; at its end it loops (loop: true) or ends the camera."""
    path = Path(str(cam.source)).expanduser()
    if not path.is_file():
        raise SourceError(f"file not found: {path}")

    def _open() -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
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
    except OSError as exc:
        why = exc.strerror or type(exc).__name__  # socket.timeout has no strerror
        raise SourceError(f"cannot connect to {host}:{port}: {why}") from None


def open_stream(cam: CameraConfig) -> CvReader:
    """An RTSP (over TCP) or other network stream through FFmpeg, with open and read timeouts."""
    url = str(cam.source)
    if source_kind(url) == "rtsp":
        _ensure_rtsp_over_tcp()
        _check_reachable(url, cam.open_timeout_s)
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, _ffmpeg_timeouts(cam))
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


# -- the capture thread ----------------------------------------------------------------------------------------------
class _Session:
    """One open-and-read attempt, run by a worker thread and watched by the supervisor."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.started_mono = time.monotonic()
        self.opened_mono: float | None = None
        self.last_frame_mono: float | None = None
        self.frames = 0
        self.outcome: tuple[str, str] | None = None  # ('ended' | 'failed', reason) once the worker is done
        self.done: queue.Queue[bool] = queue.Queue(maxsize=1)  # the worker puts once when it finishes


class CaptureThread:
    """Reads one camera into its LatestSlot; reports online/offline/ended transitions; reconnects with backoff.

    The thread `capture:<camera>` supervises; each open-and-read attempt runs in a worker thread `capture:<camera>:io`
    so that a source blocked inside a call cannot hang the camera: the watchdog (no frame for read_timeout_s) marks
    it offline, abandons that worker and opens a new one.
    """

    def __init__(self, cam_cfg: CameraConfig, slot: LatestSlot, stop: threading.Event, on_status: StatusFn,
                 on_frame: Callable[[str], None] | None = None, open_fn: OpenFn | None = None):
        self.cam = cam_cfg
        self.slot = slot
        self.stop_event = stop
        self.on_status = on_status
        self.on_frame = on_frame
        self.open_fn = open_fn or open_source
        self.name = f"capture:{cam_cfg.name}"
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.status: str | None = None
        self.reason = ""
        self.frames_captured = 0
        self.frames_skipped = 0
        self.frames_dropped = 0
        self.reconnects = 0
        self._next_frame_id = 0
        self._next_emit_mono = 0.0
        self._status_lock = threading.Lock()
        self._session: _Session | None = None
        self._stuck: list[threading.Thread] = []
        self._source_text = secret_free(cam_cfg.source)

    # public -----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to finish (set the shared stop Event first); True when it has."""
        if self.thread.ident is None:
            return True
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    # status -----------------------------------------------------------------------------------------------------
    def _set_status(self, status: str, reason: str, session: _Session | None = None) -> None:
        """Report a transition (only a change of status is reported); `session` must still be the current one."""
        reason = secret_free(reason)
        with self._status_lock:
            if session is not None and (session is not self._session or session.cancel.is_set()):
                return
            if status == self.status:
                if reason != self.reason:
                    log.info("camera %s still %s: %s", self.cam.name, status, reason)
                    self.reason = reason
                return
            self.status, self.reason = status, reason
            try:
                self.on_status(self.cam.name, status, reason)
            except Exception:
                log.exception("camera %s: status callback failed", self.cam.name)

    # supervisor -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        cfg = self.cam
        backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        attempts = 0
        while not self.stop_event.is_set():
            if attempts:
                self.reconnects += 1
            attempts += 1
            try:
                outcome, reason, got_frames = self._attempt()
            except Exception as exc:  # a bug here must not kill the camera silently
                log.exception("camera %s: capture supervisor failed", cfg.name)
                outcome, reason, got_frames = "failed", f"internal error: {type(exc).__name__}: {exc}", False
            if self.stop_event.is_set():
                break
            if outcome == "ended":
                self._set_status("ended", reason)
                log.info("camera %s ended: %s", cfg.name, reason)
                return
            if got_frames:
                backoff.reset()  # the source worked: start the backoff again
            self._set_status("offline", reason)
            delay_s = backoff.next_delay_s()
            log.debug("camera %s (%s): attempt %d failed (%s); retrying in %.2f s", cfg.name, self._source_text,
                      attempts, secret_free(reason), delay_s)
            if self.stop_event.wait(delay_s):
                break
        self._abandon_current()

    def _attempt(self) -> tuple[str, str, bool]:
        """Open the source in a worker and watch it until it fails, ends, stalls or stop is set."""
        cfg = self.cam
        self._stuck = [t for t in self._stuck if t.is_alive()]
        if len(self._stuck) >= MAX_STUCK_READERS:
            return "failed", f"{len(self._stuck)} earlier readers are still blocked; not opening another yet", False
        session = _Session()
        with self._status_lock:
            self._session = session
        worker = threading.Thread(target=self._work, args=(session,), name=f"{self.name}:io", daemon=True)
        worker.start()
        open_deadline_s = cfg.open_timeout_s + min(OPEN_GRACE_S, cfg.open_timeout_s)
        while True:
            try:
                session.done.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if self.stop_event.is_set():
                self._abandon(session, worker, join_s=0.5)
                return "stopped", "", session.frames > 0
            if session.outcome is not None:
                worker.join(1.0)
                return session.outcome[0], session.outcome[1], session.frames > 0
            now = time.monotonic()
            if session.opened_mono is None:
                if now - session.started_mono > open_deadline_s:
                    self._abandon(session, worker)
                    return "failed", f"open timed out after {cfg.open_timeout_s:g} s", False
            else:
                last = session.last_frame_mono or session.opened_mono
                if now - last > cfg.read_timeout_s:
                    self._abandon(session, worker)
                    return "failed", f"no frame for {cfg.read_timeout_s:g} s", session.frames > 0

    def _abandon(self, session: _Session, worker: threading.Thread, join_s: float = 0.2) -> None:
        session.cancel.set()
        worker.join(join_s)
        if worker.is_alive():
            log.warning("camera %s: reader still blocked in a call; abandoning it", self.cam.name)
            self._stuck.append(worker)

    def _abandon_current(self) -> None:
        with self._status_lock:
            if self._session is not None:
                self._session.cancel.set()

    # worker -----------------------------------------------------------------------------------------------------
    def _work(self, s: _Session) -> None:
        reader = None
        outcome: tuple[str, str] = ("failed", "reader stopped")
        try:
            reader = self.open_fn(self.cam)
            s.opened_mono = time.monotonic()
            interval_s = getattr(reader, "frame_interval_s", None)
            next_due: float | None = None
            while not (self.stop_event.is_set() or s.cancel.is_set()):
                t_read = time.monotonic()
                got = reader.read()
                if time.monotonic() - t_read >= self.cam.read_timeout_s:
                    # a read that outlasted the watchdog returns a stale frame (FFmpeg flushes its decoder after
                    # its own read timeout): the source stalled, whatever came back
                    outcome = ("failed", f"no frame for {self.cam.read_timeout_s:g} s")
                    break
                if got is None:
                    outcome = ("failed", "read failed")
                    break
                image, truth = got if isinstance(got, tuple) else (got, None)
                if image is None or getattr(image, "size", 0) == 0:
                    outcome = ("failed", "read failed (empty image)")
                    break
                if interval_s:
                    now = time.monotonic()
                    if next_due is None or now - next_due > FALL_BEHIND_RESET_S:
                        next_due = now
                    elif next_due > now and self.stop_event.wait(next_due - now):
                        break
                    next_due += interval_s
                if s.cancel.is_set():
                    break
                self._deliver(s, image, truth)
        except SourceEnded as exc:
            outcome = ("ended", str(exc) or "end of source")
        except SourceError as exc:
            outcome = ("failed", str(exc))
        except Exception as exc:
            log.warning("camera %s: source raised %s", self.cam.name, secret_free(repr(exc)), exc_info=True)
            outcome = ("failed", f"{type(exc).__name__}: {exc}")
        finally:
            if reader is not None and hasattr(reader, "close"):
                try:
                    reader.close()
                except Exception:
                    log.warning("camera %s: closing the source failed", self.cam.name, exc_info=True)
            s.outcome = (outcome[0], secret_free(outcome[1]))
            s.done.put_nowait(True)

    def _deliver(self, s: _Session, image: np.ndarray, truth) -> None:
        now_mono = time.monotonic()
        s.last_frame_mono = now_mono
        s.frames += 1
        if s.frames == 1:
            self._set_status("online", "", session=s)
        if self.cam.max_fps:
            period_s = 1.0 / self.cam.max_fps
            if now_mono < self._next_emit_mono - 0.2 * period_s:
                self.frames_skipped += 1
                self.frames_dropped += 1
                return
            self._next_emit_mono = max(self._next_emit_mono + period_s, now_mono)
        frame = Frame(image=image, frame_id=self._next_frame_id, ts=time.time(), camera=self.cam.name, truth=truth)
        self._next_frame_id += 1
        if self.slot.put(frame):
            self.frames_dropped += 1
        self.frames_captured += 1
        if self.on_frame is not None:
            try:
                self.on_frame(self.cam.name)
            except Exception:
                log.exception("camera %s: frame callback failed", self.cam.name)
