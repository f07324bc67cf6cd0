"""Recording a camera's annotated frames: time-based Matroska segments, crash-safe, with retention by age and size.

Thread `record:<camera>` takes frames from a bounded queue (a full queue drops and counts, the pipeline never
waits on the disk) and writes `<record_path>/<camera>/<UTC start>.mkv`, one file per `record_segment_s`.
Matroska stays playable up to its last written cluster when the process is killed (an MP4 without its index
does not). After each segment the oldest files go while they are older than `record_keep_hours` or the camera's
folder exceeds `record_max_gb`. A full disk (less than MIN_FREE_BYTES free) or a writer error stops recording with
an error and a metric, retried after RETRY_S; the camera's pipeline is not affected.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agecam.daemon.metrics import NullMetrics
from agecam.daemon.worker import Worker

log = logging.getLogger(__name__)

SUFFIX = ".mkv"
QUEUE_FRAMES = 32  # a few seconds of preview-rate frames; beyond it frames are dropped (stage "record")
MIN_FREE_BYTES = 200 * 1024 * 1024  # stop recording rather than fill the disk the system needs
RETRY_S = 60.0  # after an error, try again this much later
DISK_CHECK_FRAMES = 50  # check free space this often
# codec -> fourcc. mp4v is cheap (~1 ms a frame) and plays in VLC, mpv, ffplay; vp8 (WebM's codec) also plays in
# browsers but costs ~20 ms a frame; h264 only where the installed OpenCV's FFmpeg has an encoder for it.
CODECS = {"mp4v": "mp4v", "vp8": "VP80", "h264": "avc1", "mjpg": "MJPG"}


@dataclass(frozen=True)
class RecordSettings:
    """What the recorder needs from the preview section."""

    path: Path
    segment_s: float
    keep_hours: float
    max_gb: float
    codec: str  # "auto" or a CODECS key


def segment_name(ts: float) -> str:
    """`20261128T085600Z.mkv` for a Unix time: sortable, UTC, unique per camera at one-second segments or more."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts)) + SUFFIX


def apply_retention(folder: Path, keep_s: float, max_bytes: float, now_s: float, keep: Path | None = None) -> list[Path]:
    """Delete the oldest segments while any is older than keep_s or the folder holds more than max_bytes; the
    segment being written (`keep`) always stays. Returns what was deleted."""
    files = sorted(p for p in folder.glob("*" + SUFFIX) if p.is_file())
    sizes = {p: p.stat().st_size for p in files}
    total, deleted = sum(sizes.values()), []
    for p in files:
        if p == keep:
            continue
        too_old = now_s - p.stat().st_mtime > keep_s
        if not (too_old or total > max_bytes):
            break
        try:
            p.unlink()
        except OSError as exc:
            log.warning("recording retention: cannot delete %s: %s", p, exc.strerror)
            continue
        total -= sizes[p]
        deleted.append(p)
    return deleted


class Recorder(Worker):
    """Thread `record:<camera>`: annotated frames into segments, off the pipeline's thread."""

    def __init__(self, settings: RecordSettings, camera: str, fps: float, metrics: NullMetrics = NullMetrics()):
        super().__init__(f"record:{camera}")
        self.settings = settings
        self.camera = camera
        self.folder = Path(settings.path) / camera
        self.fps = float(fps) if fps and fps > 0 else 10.0
        self.metrics = metrics
        self.frames = 0
        self.segments = 0
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=QUEUE_FRAMES)
        self._writer: cv2.VideoWriter | None = None
        self._path: Path | None = None
        self._size: tuple[int, int] | None = None
        self._opened_s = 0.0
        self._paused_until = 0.0
        self._codec: str | None = None
        self._stop = threading.Event()

    # -- the pipeline's side --------------------------------------------------------------------------------------
    def write(self, image_bgr: np.ndarray) -> bool:
        """Queue a frame without waiting; False (the frame is dropped) when recording is behind or paused."""
        if time.monotonic() < self._paused_until:
            return False
        try:
            self._queue.put_nowait(image_bgr)
            return True
        except queue.Full:
            return False

    def signal_stop(self) -> None:
        """Ask the thread to finish its segment and end (returns at once; join() waits)."""
        self._stop.set()

    def close(self, timeout_s: float = 2.0) -> bool:
        """Finish the current segment and end the thread; True when it ended in time."""
        self.signal_stop()
        return self.join(timeout_s)

    # -- the thread -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat_s = time.monotonic()
                try:
                    image = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if time.monotonic() < self._paused_until:
                    continue
                try:
                    self._write(image)
                except Exception as exc:  # a disk or codec failure stops recording, never the camera
                    self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self._drain()
            self._finish_segment()

    def _drain(self) -> None:
        """Write what is still queued (at most QUEUE_FRAMES frames) before the segment is finished."""
        while time.monotonic() >= self._paused_until:
            try:
                image = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                self._write(image)
            except Exception as exc:
                self._fail(f"{type(exc).__name__}: {exc}")
                return

    def _write(self, image: np.ndarray) -> None:
        now = time.time()
        if self._writer is not None and now - self._opened_s >= self.settings.segment_s:
            self._finish_segment()
        if self._writer is None:
            self._open_segment(image, now)
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size)
        self._writer.write(image)
        self.frames += 1
        if self.frames % DISK_CHECK_FRAMES == 0:
            self._check_disk()

    def _open_segment(self, image: np.ndarray, now: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        apply_retention(self.folder, self.settings.keep_hours * 3600, self.settings.max_gb * 1e9, now)
        self._check_disk()  # after retention: old segments going may be what frees the disk
        h, w = image.shape[:2]
        self._size = (w, h)
        path = self.folder / segment_name(now)
        for codec in self._codecs():
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CODECS[codec]), self.fps, self._size)
            if writer.isOpened():
                self._writer, self._path, self._opened_s = writer, path, now
                self._codec = codec  # found once: later segments do not retry codecs that failed
                self.segments += 1
                log.info("camera %s: recording to %s (%s)", self.camera, path, codec)
                return
            writer.release()
        raise RuntimeError(f"no video writer opened for {path} (codecs tried: {', '.join(self._codecs())})")

    def _codecs(self) -> list[str]:
        if self._codec is not None:
            return [self._codec]
        return ["h264", "mp4v"] if self.settings.codec == "auto" else [self.settings.codec]

    def _finish_segment(self) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        try:
            self.metrics.record_segment(self.camera, self._path.stat().st_size)
            deleted = apply_retention(self.folder, self.settings.keep_hours * 3600, self.settings.max_gb * 1e9,
                                      time.time())
        except OSError as exc:
            log.warning("camera %s: after the segment %s: %s", self.camera, self._path, exc)
            return
        if deleted:
            log.info("camera %s: recording retention removed %d old segment(s)", self.camera, len(deleted))

    def _check_disk(self) -> None:
        free = shutil.disk_usage(self.folder).free
        if free < MIN_FREE_BYTES:
            raise OSError(f"only {free / 1e6:.0f} MB free on the recording disk (at least {MIN_FREE_BYTES / 1e6:.0f} MB kept free)")

    def _fail(self, why: str) -> None:
        log.error("camera %s: recording stopped (%s); trying again in %.0f s", self.camera, why, RETRY_S)
        self.metrics.record_error(self.camera)
        self._finish_segment()
        self._paused_until = time.monotonic() + RETRY_S
