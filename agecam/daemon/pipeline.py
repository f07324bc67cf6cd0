"""One camera's frame path: detect (guided by tracks) -> track -> sample ages -> fuse -> events -> preview."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import cv2
import numpy as np

from agecam.config import Config, CameraConfig
from agecam.daemon.agesvc import AgeRequest, AgeResult, AgeService
from agecam.daemon.age import AgeSampler, AgeSmoother, chip_quality
from agecam.daemon.track import Tracker
from agecam.daemon.types import Detections, Frame
from agecam.events import EventFactory, UpdatePolicy

log = logging.getLogger(__name__)
STATS_KEEP = 10000  # recent latency samples kept per pipeline
SNAPSHOT_REFRESH_S = 1.0  # with nobody watching, the preview frame is still refreshed this often (for snapshots)

@dataclass
class TrackState:
    """What the pipeline remembers about one confirmed track."""

    track: object
    smoother: AgeSmoother
    last_sent_years: float | None = None
    last_sent_ts: float = 0.0
    quality: float | None = None


@dataclass
class PipelineStats:
    """Counters read by health checks and benchmarks."""

    frames: int = 0
    faces: int = 0
    full_searches: int = 0
    region_searches: int = 0
    fps: float = 0.0
    first_age_delays_s: deque = field(default_factory=lambda: deque(maxlen=STATS_KEEP))  # for benchmarks
    event_latencies_s: deque = field(default_factory=lambda: deque(maxlen=STATS_KEEP))


def _shift(d: Detections, dx: float, dy: float, scale: float = 1.0) -> Detections:
    if not len(d):
        return d
    boxes = d.boxes_xyxy * scale + np.array([dx, dy, dx, dy], np.float32)
    lm = d.landmarks * scale + np.array([dx, dy], np.float32) if d.landmarks is not None else None
    return Detections(boxes.astype(np.float32), d.scores, lm.astype(np.float32) if lm is not None else None)


class CameraPipeline:
    """The `pipeline:<camera>` thread: takes the latest frame and runs it through every stage."""

    def __init__(self, cam: CameraConfig, cfg: Config, *, slot, detector, age_model, age_service: AgeService,
                 events: EventFactory, submit, stop: threading.Event, ended: threading.Event,
                 metrics=None, hub=None, recorder=None, frame_tap=None, first_track_id: int = 1):
        self.cam = cam
        self.cfg = cfg
        self.slot = slot
        self.detector = detector
        self.age_model = age_model
        self.age_service = age_service
        self.events = events
        self.submit = submit
        self.stop = stop
        self.ended = ended
        self.metrics = metrics
        self.hub = hub
        self.recorder = recorder
        self.frame_tap = frame_tap
        self.tracker = Tracker(cfg.tracker, first_id=first_track_id)
        self.sampler = AgeSampler(cfg.age)
        self.policy = UpdatePolicy(cfg.events.update_min_delta_years, cfg.events.update_max_interval_s)
        self.states: dict[int, TrackState] = {}
        self.replies: queue.Queue[AgeResult] = queue.Queue(maxsize=1024)
        self.stats = PipelineStats()
        self.heartbeat_s = time.monotonic()
        self.last_frame_ts = 0.0
        self.frame_wh: tuple[int, int] | None = None  # size of the latest frame, to clip event boxes
        self._last_full_ts = -1e18
        self._last_preview_s = 0.0
        self._fps_window: list[float] = []
        self._confirmed_at: dict[int, float] = {}
        self.thread = threading.Thread(target=self._run_guarded, name=f"pipeline:{cam.name}", daemon=True)

    # -- thread -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pipeline:%s crashed; its tracks are ended and the camera is marked unhealthy", self.cam.name)
            self.crashed = True
        finally:
            self._end_all(time.time())

    crashed = False

    def _run(self) -> None:
        idle_since = time.monotonic()
        while not self.stop.is_set():
            self.heartbeat_s = time.monotonic()
            self._drain_replies()
            frame = self.slot.get(timeout_s=0.25)
            if frame is None:
                if self.ended.is_set():
                    return
                if time.monotonic() - idle_since > 0.5 and self.tracker_has_tracks():
                    self._advance(Detections.empty(), time.time(), None)  # let lost tracks age out
                    idle_since = time.monotonic()
                continue
            idle_since = time.monotonic()
            self.process(frame)

    def tracker_has_tracks(self) -> bool:
        return bool(self.states) or bool(getattr(self.tracker, "tracks", None))

    # -- one frame ----------------------------------------------------------------------------------------------
    def process(self, frame: Frame) -> None:
        """Run every stage on one frame (called by the thread; callable directly in tests)."""
        m = self.metrics
        if m:
            m.stage_duration_seconds.labels(stage="wait").observe(max(0.0, time.time() - frame.ts))
        t0 = time.perf_counter()
        dets = self._detect(frame)
        t1 = time.perf_counter()
        self._advance(dets, frame.ts, frame)
        t2 = time.perf_counter()
        self.stats.frames += 1
        self.frame_wh = (frame.image.shape[1], frame.image.shape[0])
        self.stats.faces += len(dets)
        self.last_frame_ts = frame.ts
        now = time.monotonic()
        self._fps_window = [t for t in self._fps_window if now - t < 2.0] + [now]
        self.stats.fps = (len(self._fps_window) - 1) / max(1e-6, self._fps_window[-1] - self._fps_window[0])
        if m:
            m.frames_processed_total.labels(camera=self.cam.name).inc()
            m.faces_detected_total.labels(camera=self.cam.name).inc(len(dets))
            m.stage_duration_seconds.labels(stage="detect").observe(t1 - t0)
            m.stage_duration_seconds.labels(stage="track").observe(t2 - t1)
            m.active_tracks.labels(camera=self.cam.name).set(len(self.states))
        if self.frame_tap:
            self.frame_tap(frame, dets)
        if self.hub is not None or self.recorder is not None:
            self._preview(frame)

    def _detect(self, frame: Frame) -> Detections:
        img = frame.image
        h, w = img.shape[:2]
        dcfg = self.cfg.detector
        full_due = frame.ts - self._last_full_ts >= dcfg.full_frame_interval_s
        predicted = self.tracker.predict_boxes(frame.ts)
        if full_due:
            self._last_full_ts = frame.ts
            self.stats.full_searches += 1
            scale = min(1.0, dcfg.input_max_px / max(h, w))
            if scale < 1.0:
                small = cv2.resize(img, (int(round(w * scale)), int(round(h * scale))), interpolation=cv2.INTER_AREA)
                return _shift(self.detector.detect(small), 0, 0, 1.0 / scale)
            return self.detector.detect(img)
        if len(predicted) == 0:
            return Detections.empty()
        self.stats.region_searches += 1
        return self.detector.detect_regions(img, predicted)

    def _advance(self, dets: Detections, ts: float, frame: Frame | None) -> None:
        """Track, announce starts and ends, sample ages, send updates."""
        tracks = self.tracker.update(dets, ts)
        for t in self.tracker.pop_ended():
            self._finish(t, ts)
        for t in tracks:
            if t.is_confirmed and t.track_id not in self.states:
                st = TrackState(t, AgeSmoother(self.cfg.age, self.age_model.bins_years))
                self.states[t.track_id] = st
                self._confirmed_at[t.track_id] = t.first_seen_ts  # first frame of the face, for first-age delay
                self._emit("track.start", t, None, ts)
                st.last_sent_ts = ts
            elif t.track_id in self.states:
                self.states[t.track_id].track = t
        if frame is not None:
            self._sample_ages(frame, dets, ts)
        for st in self.states.values():
            if st.track.det_index is None:
                continue
            est = st.smoother.estimate()
            if self.policy.due(st.last_sent_years, st.last_sent_ts, est, ts):
                self._emit("track.update", st.track, est, ts)
                st.last_sent_ts = ts
                st.last_sent_years = est.years if est else None

    def _sample_ages(self, frame: Frame, dets: Detections, ts: float) -> None:
        acfg = self.cfg.age
        live = [(tid, st.smoother.estimate()) for tid, st in self.states.items() if st.track.det_index is not None]
        for tid in self.sampler.due(live, ts):
            st = self.states[tid]
            i = st.track.det_index
            box = dets.boxes_xyxy[i]
            self.sampler.mark_sampled(tid, ts)
            if dets.landmarks is None or min(box[2] - box[0], box[3] - box[1]) < acfg.min_face_px:
                continue
            lm = dets.landmarks[i]
            q = chip_quality(frame.image, box, lm, float(dets.scores[i]))
            st.quality = q
            if q < acfg.min_quality:
                continue
            t0 = time.perf_counter()
            chip = self.age_model.make_chip(frame.image, lm, box)
            if self.metrics:
                self.metrics.stage_duration_seconds.labels(stage="chip").observe(time.perf_counter() - t0)
            self.age_service.submit(AgeRequest(self.cam.name, tid, chip, q, ts, self.replies))

    def _drain_replies(self) -> None:
        while True:
            try:
                r = self.replies.get_nowait()
            except queue.Empty:
                return
            st = self.states.get(r.track_id)
            if st is None:
                continue  # the track ended while its sample was in flight
            first = st.smoother.estimate() is None
            st.smoother.add(r.probs, r.weight, r.ts)
            if first and r.track_id in self._confirmed_at:
                self.stats.first_age_delays_s.append(time.time() - self._confirmed_at.pop(r.track_id))

    def _finish(self, track, ts: float) -> None:
        st = self.states.pop(track.track_id, None)
        self.sampler.forget(track.track_id)
        self._confirmed_at.pop(track.track_id, None)
        if st is not None:
            self._emit("track.end", track, st.smoother.estimate(), ts)

    def _end_all(self, ts: float) -> None:
        """End every open track (camera ended, crashed or daemon stopping)."""
        self._drain_replies()
        for t in self.tracker.end_all():
            self._finish(t, ts)
        for tid in list(self.states):  # anything the tracker no longer knew about
            self._finish(self.states[tid].track, ts)
        if self.metrics:
            self.metrics.active_tracks.labels(camera=self.cam.name).set(0)
        if self.recorder is not None:
            self.recorder.close()

    def _emit(self, type_: str, track, age, ts: float) -> None:
        box = track.box_xyxy
        if self.frame_wh is not None:  # detector boxes may overhang the image edge: report the visible part
            w, h = self.frame_wh
            box = (min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h))
        ev = self.events.track(type_, self.cam.name, ts, track.track_id, box, track.det_score, age,
                               track.first_seen_ts, track.last_seen_ts)
        self.submit(ev)
        if type_ != "track.end":
            self.stats.event_latencies_s.append(time.time() - ts)

    # -- preview --------------------------------------------------------------------------------------------------
    def _preview(self, frame: Frame) -> None:
        from agecam.daemon.preview import TrackView, annotate

        now = time.monotonic()
        watched = self.recorder is not None or (self.hub is not None and self.hub.watching(self.cam.name))
        if now - self._last_preview_s < (1.0 / self.cfg.preview.max_fps if watched else SNAPSHOT_REFRESH_S):
            return
        self._last_preview_s = now
        views = [TrackView(tid, st.track.box_xyxy, st.smoother.estimate(), st.quality, True)
                 for tid, st in self.states.items() if st.track.det_index is not None]
        status = f"{self.cam.name}  {self.stats.fps:4.1f} fps  faces {len(views)}"
        t0 = time.perf_counter()
        image = annotate(frame.image, views, status)
        if self.hub is not None:
            self.hub.publish(self.cam.name, image)
        if self.recorder is not None and not self.recorder.write(image) and self.metrics:
            self.metrics.frames_dropped_total.labels(camera=self.cam.name, stage="record").inc()
        if self.metrics:
            self.metrics.stage_duration_seconds.labels(stage="annotate").observe(time.perf_counter() - t0)
