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

from agecam.config import CameraConfig, Config
from agecam.daemon.agesvc import AgeRequest, AgeResult, AgeService
from agecam.daemon.chip import chip_quality
from agecam.daemon.gate import QualityGate
from agecam.daemon.metrics import NullMetrics
from agecam.daemon.sampling import Cadence, due_for_sample
from agecam.daemon.smooth import AgeSmoother
from agecam.daemon.track import Track, Tracker, TrackIds
from agecam.daemon.types import Detections, Frame
from agecam.daemon.worker import Worker
from agecam.events import AgeEstimate, EventFactory, UpdatePolicy

log = logging.getLogger(__name__)
STATS_KEEP = 10000  # recent latency samples kept per pipeline
SNAPSHOT_REFRESH_S = 1.0  # with nobody watching, the preview frame is still refreshed this often (for snapshots)
REPLY_QUEUE_SIZE = 1024  # age results waiting for this pipeline's next loop


@dataclass
class TrackRecord:
    """Everything the pipeline knows about one confirmed track; created at confirmation, dropped whole at its end."""

    track: Track
    smoother: AgeSmoother
    gate: QualityGate
    confirmed_s: float  # capture time of confirmation: the sampler's clock for a first sample starts here
    first_seen_s: float  # capture time of the face's first frame: first-age delays are measured from here
    last_sampled_s: float | None = None
    quality: float | None = None  # quality score of the last crop considered
    aged: bool = False  # an age sample has come back
    first_age_delay_s: float = float("inf")  # from the face's first frame to its first age
    last_sent_years: float | None = None
    last_sent_s: float = 0.0

    def estimate(self) -> AgeEstimate | None:
        return self.smoother.estimate()


@dataclass
class PipelineStats:
    """Counters for benchmarks and the health snapshot."""

    frames: int = 0
    faces: int = 0
    full_searches: int = 0
    region_searches: int = 0
    fps: float = 0.0
    first_age_delays_s: deque = field(default_factory=lambda: deque(maxlen=STATS_KEEP))
    event_latencies_s: deque = field(default_factory=lambda: deque(maxlen=STATS_KEEP))
    # per ended track: (seconds it was seen, first-age delay from its first frame or inf when it never got one)
    ended_tracks: deque = field(default_factory=lambda: deque(maxlen=STATS_KEEP))


@dataclass(frozen=True)
class PipelineSnapshot:
    """A pipeline's state for health checks, read without touching its internals."""

    alive: bool
    crashed: bool
    heartbeat_s: float  # time.monotonic() of the last loop
    fps: float
    tracks: int
    last_frame_ts: float  # capture time of the last processed frame, 0 before the first


def _shift(d: Detections, dx: float, dy: float, scale: float = 1.0) -> Detections:
    if not len(d):
        return d
    boxes = d.boxes_xyxy * scale + np.array([dx, dy, dx, dy], np.float32)
    lm = d.landmarks * scale + np.array([dx, dy], np.float32) if d.landmarks is not None else None
    return Detections(boxes.astype(np.float32), d.scores, lm.astype(np.float32) if lm is not None else None)


class CameraPipeline(Worker):
    """The `pipeline:<camera>` thread: takes the latest frame and runs it through every stage.

    How an age sample travels: when a track is due (`due_for_sample` over the track records), its face chip goes
    to the shared AgeService as an AgeRequest carrying this pipeline's `replies` queue (put_nowait: a full service
    drops the sample and counts it). The `age` thread batches requests from every camera, runs the model and puts
    each AgeResult on the requester's `replies`. The pipeline drains its replies at the top of its next loop,
    before it takes a frame, and fuses each into its track's smoother; a result for a track that ended meanwhile
    is discarded. So the pipeline never waits for the model, and an estimate lags its chip by about one frame.
    """

    def __init__(self, cam: CameraConfig, cfg: Config, *, slot, detector, age_model, age_service: AgeService,
                 events: EventFactory, submit, stop: threading.Event, ended: threading.Event,
                 metrics: NullMetrics = NullMetrics(), hub=None, recorder=None, frame_tap=None,
                 track_ids: TrackIds | None = None):
        super().__init__(f"pipeline:{cam.name}")
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
        self.tracker = Tracker(cfg.tracker, track_ids)
        self.cadence = Cadence.from_config(cfg.age)
        self.policy = UpdatePolicy(cfg.events.update_min_delta_years, cfg.events.update_max_interval_s)
        self.records: dict[int, TrackRecord] = {}
        self.replies: queue.Queue[AgeResult] = queue.Queue(maxsize=REPLY_QUEUE_SIZE)
        self.stats = PipelineStats()
        self.crashed = False
        self.last_frame_ts = 0.0
        self.frame_wh: tuple[int, int] | None = None  # size of the latest frame, to clip event boxes
        self._last_full_ts = -1e18
        self._last_preview_s = 0.0
        self._fps_window: deque[float] = deque(maxlen=256)

    # -- health ---------------------------------------------------------------------------------------------------
    def snapshot(self) -> PipelineSnapshot:
        return PipelineSnapshot(alive=self.alive, crashed=self.crashed, heartbeat_s=self.heartbeat_s,
                                fps=self.stats.fps, tracks=len(self.records), last_frame_ts=self.last_frame_ts)

    # -- thread -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("pipeline:%s crashed; its tracks are ended and the camera is marked unhealthy", self.cam.name)
            self.crashed = True
        finally:
            self._end_all(time.time())

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while not self.stop.is_set():
            self.heartbeat_s = time.monotonic()
            self._drain_replies()
            frame = self.slot.get(timeout_s=0.25)
            if frame is None:
                if self.ended.is_set():
                    return
                if time.monotonic() - idle_since > 0.5 and (self.records or self.tracker.tracks):
                    self._advance(Detections.empty(), time.time(), None)  # let lost tracks age out
                    idle_since = time.monotonic()
                continue
            idle_since = time.monotonic()
            self.process(frame)

    # -- one frame ----------------------------------------------------------------------------------------------
    def process(self, frame: Frame) -> None:
        """Run every stage on one frame (called by the thread; callable directly in tests)."""
        wait_s = time.time() - frame.ts
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
        self._fps_window.append(now)
        while now - self._fps_window[0] >= 2.0:
            self._fps_window.popleft()
        span_s = self._fps_window[-1] - self._fps_window[0]
        self.stats.fps = (len(self._fps_window) - 1) / span_s if span_s > 0 else 0.0
        self.metrics.frame_processed(self.cam.name, len(dets), wait_s, t1 - t0, t2 - t1)
        self.metrics.tracks_active(self.cam.name, len(self.records))
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
            rec = self.records.get(t.track_id)
            if rec is not None:
                rec.track = t
            elif t.is_confirmed:
                acfg = self.cfg.age
                rec = TrackRecord(t, AgeSmoother(acfg, self.age_model.bins_years),
                                  QualityGate(acfg.min_quality, acfg.max_wait_s), confirmed_s=ts,
                                  first_seen_s=t.first_seen_ts, last_sent_s=ts)
                self.records[t.track_id] = rec
                self._emit("track.start", t, None, ts)
        if frame is not None:
            self._sample_ages(frame, dets, ts)
        for rec in self.records.values():
            if rec.track.det_index is None:
                continue
            est = rec.estimate()
            if self.policy.due(rec.last_sent_years, rec.last_sent_s, est, ts):
                self._emit("track.update", rec.track, est, ts)
                rec.last_sent_s = ts
                rec.last_sent_years = est.years if est else None

    def _sample_ages(self, frame: Frame, dets: Detections, ts: float) -> None:
        acfg = self.cfg.age
        live = {tid: rec for tid, rec in self.records.items() if rec.track.det_index is not None}
        for tid in due_for_sample(live, ts, self.cadence):
            rec = live[tid]
            i = rec.track.det_index
            box = dets.boxes_xyxy[i]
            rec.last_sampled_s = ts
            if min(box[2] - box[0], box[3] - box[1]) < acfg.min_face_px:
                rec.gate.too_small += 1  # a hard floor: too few pixels for any age
                continue
            if dets.landmarks is None:
                rec.gate.no_landmarks += 1
                continue
            lm = dets.landmarks[i]
            q = chip_quality(frame.image, box, lm, float(dets.scores[i]))
            rec.quality = q
            passed = rec.gate.offer(q, ts, lambda: self._chip(frame.image, lm, box))
            if passed is not None:
                chip, weight, chip_ts, min_std = passed
                self.age_service.submit(AgeRequest(self.cam.name, tid, chip, weight, chip_ts, self.replies, min_std))

    def _chip(self, image: np.ndarray, landmarks, box) -> np.ndarray:
        t0 = time.perf_counter()
        chip = self.age_model.make_chip(image, landmarks, box)
        self.metrics.stage_time("chip", time.perf_counter() - t0)
        return chip

    def _drain_replies(self) -> None:
        while True:
            try:
                r = self.replies.get_nowait()
            except queue.Empty:
                return
            rec = self.records.get(r.track_id)
            if rec is None:
                continue  # the track ended while its sample was in flight
            rec.smoother.add(r.probs, r.weight, r.ts, r.min_std_years)
            if not rec.aged:
                rec.aged = True
                rec.first_age_delay_s = time.time() - rec.first_seen_s
                self.stats.first_age_delays_s.append(rec.first_age_delay_s)

    def _finish(self, track: Track, ts: float) -> None:
        rec = self.records.pop(track.track_id, None)
        if rec is not None:
            self._emit("track.end", track, rec.estimate(), ts)
            self.stats.ended_tracks.append((track.last_seen_ts - track.first_seen_ts, rec.first_age_delay_s))
            if not rec.aged:
                self.metrics.track_unaged(self.cam.name, rec.gate.unaged_reason())

    def _end_all(self, ts: float) -> None:
        """End every open track (camera ended, crashed or daemon stopping)."""
        self._drain_replies()
        for t in self.tracker.end_all():
            self._finish(t, ts)
        for tid in list(self.records):  # anything the tracker no longer knew about
            self._finish(self.records[tid].track, ts)
        self.metrics.tracks_active(self.cam.name, 0)

    def _emit(self, type_: str, track: Track, age: AgeEstimate | None, ts: float) -> None:
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
        from agecam.daemon.annotate import TrackView, annotate

        now = time.monotonic()
        watched = self.recorder is not None or (self.hub is not None and self.hub.watching(self.cam.name))
        if now - self._last_preview_s < (1.0 / self.cfg.preview.max_fps if watched else SNAPSHOT_REFRESH_S):
            return
        self._last_preview_s = now
        views = [TrackView(tid, rec.track.box_xyxy, rec.estimate(), rec.quality, True)
                 for tid, rec in self.records.items() if rec.track.det_index is not None]
        status = f"{self.cam.name}  {self.stats.fps:4.1f} fps  faces {len(views)}"
        t0 = time.perf_counter()
        image = annotate(frame.image, views, status)
        if self.hub is not None:
            self.hub.publish(self.cam.name, image)
        if self.recorder is not None and not self.recorder.write(image):
            self.metrics.frame_dropped(self.cam.name, "record")
        self.metrics.stage_time("annotate", time.perf_counter() - t0)
