"""The capture thread: reads one camera into its latest-frame slot, paces it, watches it and reconnects it.

CaptureThread counters, read by the metrics layer and health page as plain attributes:
  frames_captured  frames put into the slot            frames_skipped   frames skipped by max_fps
  frames_dropped   slot overwrites + max_fps skips     reconnects       reopen attempts after the first open
  frames_unwanted  frames the pipeline did not ask for (see LatestSlot.wants): decoded, never converted
  status, reason   last reported state ('online'|'offline'|'ended'|None before the first report)
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
import time
from typing import Any, Callable

import numpy as np

from agecam.config import CameraConfig
from agecam.secrets import secret_free
from agecam.daemon.backoff import Backoff
from agecam.daemon.slot import LatestSlot
from agecam.daemon.sources import SourceEnded, SourceError, SourceUnreachable, open_source
from agecam.daemon.types import Frame
from agecam.daemon.worker import Worker

log = logging.getLogger(__name__)

OPEN_GRACE_S = 2.0  # the supervisor's open deadline: open_timeout_s plus up to this (the capture's own timeout acts first)
POLL_S = 0.1  # supervisor check interval: watchdog resolution and stop latency (a finished attempt wakes it at once)
MAX_STUCK_READERS = 3  # abandoned readers still blocked in a call; beyond this no new one is opened
FALL_BEHIND_RESET_S = 1.0  # a paced source that falls this far behind restarts its schedule instead of bursting
BACKOFF_RESET_AFTER_S = 5.0  # a source must deliver frames this long before its reconnect backoff starts again
BACKOFF_JITTER = 0.2  # delays grow by up to 20 %, so cameras behind one failed server do not retry in lockstep
FPS_WINDOW_S, FPS_WINDOW_FRAMES = 2.0, 512  # the source frame rate is measured over this window (bounded)
PROBE_MIN_S, PROBE_MAX_S = 0.1, 0.8  # retry cadence while the server refuses TCP connections (~1 probe/s at most)

StatusFn = Callable[[str, str, str], None]
OpenFn = Callable[[CameraConfig], Any]


class _Session:
    """One open-and-read attempt, run by a worker thread and watched by the supervisor."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.started_mono = time.monotonic()
        self.opened_mono: float | None = None
        self.first_frame_mono: float | None = None
        self.last_frame_mono: float | None = None
        self.frames = 0
        self.outcome: tuple[str, str] | None = None  # ('ended' | 'failed' | 'unreachable', reason) when done
        self.done: queue.Queue[bool] = queue.Queue(maxsize=1)  # the worker puts once when it finishes

    @property
    def up_s(self) -> float:
        """How long this session delivered frames (first to last), 0 before two frames."""
        if self.first_frame_mono is None or self.last_frame_mono is None:
            return 0.0
        return self.last_frame_mono - self.first_frame_mono


class CaptureThread(Worker):
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
        super().__init__(f"capture:{cam_cfg.name}")
        self.status: str | None = None
        self.reason = ""
        self.frames_captured = 0
        self.frames_skipped = 0
        self.frames_unwanted = 0
        self._arrivals: deque[float] = deque(maxlen=FPS_WINDOW_FRAMES)  # monotonic times of recent frames
        self.frames_dropped = 0
        self.reconnects = 0
        self._next_frame_id = 0
        self._next_emit_mono = 0.0
        self._status_lock = threading.Lock()
        self._session: _Session | None = None
        self._stuck: list[threading.Thread] = []
        self._source_text = secret_free(cam_cfg.source)

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
        backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, jitter=BACKOFF_JITTER)
        probe = Backoff(min(PROBE_MIN_S, cfg.reconnect_min_s), min(PROBE_MAX_S, cfg.reconnect_max_s), jitter=BACKOFF_JITTER)
        attempts = 0
        while not self.stop_event.is_set():
            if attempts:
                self.reconnects += 1
            attempts += 1
            try:
                outcome, reason, up_s = self._attempt()
            except Exception as exc:  # a bug here must not kill the camera silently
                log.exception("camera %s: capture supervisor failed", cfg.name)
                outcome, reason, up_s = "failed", f"internal error: {type(exc).__name__}: {exc}", 0.0
            if self.stop_event.is_set():
                break
            if outcome == "ended":
                self._set_status("ended", reason)
                log.info("camera %s ended: %s", cfg.name, reason)
                return
            if up_s >= BACKOFF_RESET_AFTER_S:
                backoff.reset()  # the source stayed up a while: start the backoff again (a flapping one does not)
            self._set_status("offline", reason)
            if outcome == "unreachable":
                # the port refuses or does not answer: a TCP probe is cheap, so it is retried often (capped at
                # PROBE_MAX_S) and a server that comes back is found within a second; the open backoff waits
                delay_s = probe.next_delay_s()
            else:
                probe.reset()
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
            self.heartbeat_s = time.monotonic()
            try:
                session.done.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if self.stop_event.is_set():
                self._abandon(session, worker, join_s=0.5)
                return "stopped", "", session.up_s
            if session.outcome is not None:
                worker.join(1.0)
                return session.outcome[0], session.outcome[1], session.up_s
            now = time.monotonic()
            if session.opened_mono is None:
                if now - session.started_mono > open_deadline_s:
                    self._abandon(session, worker)
                    return "failed", f"open timed out after {cfg.open_timeout_s:g} s", False
            else:
                last = session.last_frame_mono or session.opened_mono
                if now - last > cfg.read_timeout_s:
                    self._abandon(session, worker)
                    return "failed", f"no frame for {cfg.read_timeout_s:g} s", session.up_s

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
            split = hasattr(reader, "grab") and hasattr(reader, "retrieve")  # can skip decoding unwanted frames
            next_due: float | None = None
            while not (self.stop_event.is_set() or s.cancel.is_set()):
                t_read = time.monotonic()
                got = reader.grab() if split else reader.read()
                if time.monotonic() - t_read >= self.cam.read_timeout_s:
                    # a read that outlasted the watchdog returns a stale frame (FFmpeg flushes its decoder after
                    # its own read timeout): the source stalled, whatever came back
                    outcome = ("failed", f"no frame for {self.cam.read_timeout_s:g} s")
                    break
                if got is None or got is False:
                    outcome = ("failed", "read failed")
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
                self._arrived(s)
                if not self._wanted():
                    continue  # nobody needs this frame: with a split reader it is not even converted
                if split:
                    got = reader.retrieve()
                    if got is None:
                        outcome = ("failed", "read failed (no image after a frame was grabbed)")
                        break
                image, truth = got if isinstance(got, tuple) else (got, None)
                if image is None or getattr(image, "size", 0) == 0:
                    outcome = ("failed", "read failed (empty image)")
                    break
                self._deliver(image, truth)
        except SourceEnded as exc:
            outcome = ("ended", str(exc) or "end of source")
        except SourceUnreachable as exc:
            outcome = ("unreachable", str(exc))
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

    def fps(self) -> float:
        """Frames per second arriving from the source over the last FPS_WINDOW_S (0 when none)."""
        now = time.monotonic()
        recent = [t for t in list(self._arrivals) if now - t <= FPS_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def _arrived(self, s: _Session) -> None:
        """A frame came from the source (wanted or not): the camera is alive."""
        now_mono = time.monotonic()
        self._arrivals.append(now_mono)
        s.last_frame_mono = now_mono
        s.frames += 1
        self._next_frame_id += 1
        if s.frames == 1:
            s.first_frame_mono = now_mono
            self._set_status("online", "", session=s)
        if self.on_frame is not None:
            try:
                self.on_frame(self.cam.name)
            except Exception:
                log.exception("camera %s: frame callback failed", self.cam.name)

    def _wanted(self) -> bool:
        """Whether the frame that just arrived goes to the pipeline: wanted by the slot's taker, and within max_fps
        (an unwanted frame does not use up max_fps's budget)."""
        now_mono = time.monotonic()
        if not self.slot.wants(now_mono):
            self.frames_unwanted += 1
            return False
        if self.cam.max_fps:
            period_s = 1.0 / self.cam.max_fps
            if now_mono < self._next_emit_mono - 0.2 * period_s:
                self.frames_skipped += 1
                self.frames_dropped += 1
                return False
            self._next_emit_mono = max(self._next_emit_mono + period_s, now_mono)
        return True

    def _deliver(self, image: np.ndarray, truth) -> None:
        frame = Frame(image=image, frame_id=self._next_frame_id - 1, ts=time.time(), camera=self.cam.name, truth=truth)
        if self.slot.put(frame):
            self.frames_dropped += 1
        self.frames_captured += 1
