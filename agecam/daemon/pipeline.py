"""One camera's frame path: detect (guided by tracks) -> track -> sample ages -> fuse -> events -> preview."""
from __future__ import annotations

import logging
import math
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
from agecam.daemon.detect import nms, pick
from agecam.daemon.metrics import NullMetrics
from agecam.daemon.motion import CutFinder, MotionFinder, search_boxes
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
FULL_SEARCH_CHANGED_SHARE = 0.5  # when this share of the picture changed at once, the whole frame is searched
MOTION_MIN_SIDE_FACES = 3.0  # a changed region is searched in a square of at least this many min_face_px
MERGE_IOU = 0.4  # a track check and a motion search that found the same face: one detection
MIN_CROP_PX = 12  # the smallest image a detector can look at (MTCNN's P-Net window)
DUE_SLACK_S = 0.02  # a stage due within this much of a frame's time runs on that frame (frames jitter)
CUT_SEARCH_MIN_INTERVAL_S = 0.2  # during a pan every frame is a cut: the whole frame is searched at most this often


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
    motion_searches: int = 0
    cuts: int = 0  # frames on which most of the picture changed at once
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


def _since(ts: float, last_ts: float) -> float:
    """Seconds from last_ts to ts; infinite when the wall clock stepped back past last_ts (so the stage is due)."""
    d = ts - last_ts
    return d if d >= 0 else math.inf


def _merge(parts: list[Detections]) -> Detections:
    """Detections from several searches of one frame, a face found by two of them kept once (the higher score)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Detections.empty()
    if len(parts) == 1:
        return parts[0]
    boxes = np.concatenate([p.boxes_xyxy for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    lms = [p.landmarks for p in parts]
    lm = np.concatenate(lms) if all(x is not None for x in lms) else None
    d = Detections(boxes, scores, lm)
    return pick(d, nms(boxes, scores, MERGE_IOU))


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
        self._last_check_ts = -1e18
        self._last_motion_ts = -1e18
        self._last_cut_ts = -1e18
        self._cut_now = False  # the frame being processed starts a new picture (and is searched in full)
        self._prev_cut = False  # the last frame checked for a cut was one
        self._last_cut_search_ts = -1e18
        self.motion = MotionFinder(cfg.detector.motion_threshold) if cfg.detector.motion_interval_s > 0 else None
        self.cuts = CutFinder(cfg.detector.motion_threshold) if cfg.detector.cut_check_interval_s is not None else None
        self._last_preview_s = 0.0
        self._last_preview_wall_s = 0.0  # capture time of the frame last drawn for the preview
        self.next_wanted_ts = 0.0  # capture time from which the next frame is needed (0: every frame)
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
            self.slot.wanted_from_mono = 0.0
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
                # no frame for 0.5 s although frames were wanted: the camera is away
                overdue = time.monotonic() - self.slot.wanted_from_mono > 0.5
                if overdue and time.monotonic() - idle_since > 0.5 and (self.records or self.tracker.n_live):
                    self._advance(Detections.empty(), time.time(), None)  # let lost tracks age out
                    idle_since = time.monotonic()
                continue
            idle_since = time.monotonic()
            self._drain_replies()  # ages that came back while this thread waited for a wanted frame
            self.process(frame)

    # -- one frame ----------------------------------------------------------------------------------------------
    def process(self, frame: Frame) -> None:
        """Run every stage on one frame (called by the thread; callable directly in tests)."""
        self.slot.wanted_from_mono = math.inf  # frames arriving while this one is processed are not converted
        wait_s = time.time() - frame.ts
        t0 = time.perf_counter()
        dets = self._detect(frame)
        t1 = time.perf_counter()
        if dets is not None:
            self._advance(dets, frame.ts, frame, new_scene=self._cut_now)
        t2 = time.perf_counter()
        self.stats.frames += 1
        self.frame_wh = (frame.image.shape[1], frame.image.shape[0])
        n_faces = len(dets) if dets is not None else 0
        self.stats.faces += n_faces
        self.last_frame_ts = frame.ts
        now = time.monotonic()
        self._fps_window.append(now)
        while now - self._fps_window[0] >= 2.0:
            self._fps_window.popleft()
        span_s = self._fps_window[-1] - self._fps_window[0]
        self.stats.fps = (len(self._fps_window) - 1) / span_s if span_s > 0 else 0.0
        ran = dets is not None
        self.metrics.frame_processed(self.cam.name, n_faces, wait_s, t1 - t0 if ran else None, t2 - t1 if ran else None)
        self.metrics.tracks_active(self.cam.name, len(self.records))
        if self.frame_tap:
            self.frame_tap(frame, dets if dets is not None else Detections.empty())
        if self.hub is not None or self.recorder is not None:
            self._preview(frame, dets is not None)
        self.next_wanted_ts = self._next_wanted_ts()
        self.slot.wanted_from_mono = (time.monotonic() + self.next_wanted_ts - time.time()) if self.next_wanted_ts else 0.0

    def _next_wanted_ts(self) -> float:
        """The capture time from which the next frame is needed (0: every frame); frames before it are skipped."""
        d = self.cfg.detector
        if (self.tracker.awaiting_confirmation or self.recorder is not None
                or (self.hub is not None and self.hub.watching(self.cam.name))):
            return 0.0
        due = self._last_full_ts + d.full_frame_interval_s
        if self.cuts is not None:
            if d.cut_check_interval_s == 0:
                return 0.0
            due = min(due, self._last_cut_ts + d.cut_check_interval_s)
        if self.motion is not None:
            due = min(due, self._last_motion_ts + d.motion_interval_s)
        if self.tracker.n_live:
            due = min(due, self._last_check_ts + d.track_check_interval_s)
        if self.hub is not None:
            due = min(due, self._last_preview_wall_s + SNAPSHOT_REFRESH_S)
        return due - DUE_SLACK_S

    def _detect(self, frame: Frame) -> Detections | None:
        """This frame's faces, or None when no detector ran: between checks, tracks follow their prediction.

        The detector runs on the whole frame every full_frame_interval_s (the safety net) and on the first frame of
        a new picture (a cut, checked every cut_check_interval_s); around the tracked faces
        every track_check_interval_s and on every frame while a new track awaits confirmation; and on the regions
        that changed away from tracked faces, compared every motion_interval_s. A motion search always comes with a
        track check, so the tracker never sees a frame in which known faces were not looked for. Age samples are
        cut on frames where the detector ran (they need its landmarks), so a due sample waits for the next check.
        """
        img = frame.image
        ts = frame.ts
        h, w = img.shape[:2]
        dcfg = self.cfg.detector
        cut = self._cut_now = False
        if self.cuts is not None and _since(ts, self._last_cut_ts) >= dcfg.cut_check_interval_s - DUE_SLACK_S:
            self._last_cut_ts = ts
            cut = self.cuts.is_cut(img)
            first, self._prev_cut = cut and not self._prev_cut, cut
            if cut:
                self.stats.cuts += 1
                # during a pan every frame is a cut: searched in full at most every CUT_SEARCH_MIN_INTERVAL_S, and
                # only its first frame starts a new picture for the tracker
                cut = _since(ts, self._last_cut_search_ts) >= CUT_SEARCH_MIN_INTERVAL_S - DUE_SLACK_S
                if cut:
                    self._last_cut_search_ts = ts
                self._cut_now = cut and first
        if cut or _since(ts, self._last_full_ts) >= dcfg.full_frame_interval_s - DUE_SLACK_S:
            self._last_full_ts = self._last_check_ts = ts
            if self.motion is not None:
                self.motion.changed(img, np.zeros((0, 4), np.float32))  # keeps its reference frame current
                self._last_motion_ts = ts
            return self._full(img)
        predicted, lost = self.tracker.predicted(ts)
        since_check, since_motion = _since(ts, self._last_check_ts), _since(ts, self._last_motion_ts)
        check = len(predicted) > 0 and (self.tracker.awaiting_confirmation
                                        or since_check >= dcfg.track_check_interval_s - DUE_SLACK_S)
        motion = self.motion is not None and since_motion >= dcfg.motion_interval_s - DUE_SLACK_S
        # each runs early (from half its interval) when the other runs, so they share frames and the frames in
        # between are never asked for
        motion = motion or (self.motion is not None and check and since_motion >= dcfg.motion_interval_s / 2)
        check = check or (len(predicted) > 0 and motion and since_check >= dcfg.track_check_interval_s / 2)
        search = np.zeros((0, 4), np.float32)
        if motion:
            self._last_motion_ts = ts
            changed, share = self.motion.changed(img, predicted)  # lost tracks too: the face leaving moves there
            if share >= FULL_SEARCH_CHANGED_SHARE:  # the whole picture moved (camera, light): search it all
                self._last_full_ts = self._last_check_ts = ts
                return self._full(img)
            search = search_boxes(changed, (w, h), MOTION_MIN_SIDE_FACES * dcfg.min_face_px)
        check = check or (len(predicted) > 0 and len(search) > 0)
        if not check and not len(search):
            return None
        parts = []
        if check:
            self._last_check_ts = ts
            self.stats.region_searches += 1
            self.metrics.detector_run(self.cam.name, "tracks")
            # a face O-Net misses where its track is predicted is searched around when it is first missed; a track
            # already lost gets the light check only (where it is predicted), the full search finds it elsewhere
            parts.append(self.detector.detect_regions(img, predicted, scan_missed=~lost))
        for x1, y1, x2, y2 in search.astype(int):
            if x2 - x1 < MIN_CROP_PX or y2 - y1 < MIN_CROP_PX:
                continue  # a sliver at the frame edge: no face fits
            self.stats.motion_searches += 1
            self.metrics.detector_run(self.cam.name, "motion")
            parts.append(_shift(self._scaled(img[y1:y2, x1:x2]), x1, y1))
        return _merge(parts)

    def _full(self, img: np.ndarray) -> Detections:
        self.stats.full_searches += 1
        self.metrics.detector_run(self.cam.name, "full")
        return self._scaled(img)

    def _scaled(self, img: np.ndarray) -> Detections:
        """The detector on an image (a frame or a crop of one) downscaled to input_max_px, in its own pixels."""
        h, w = img.shape[:2]
        scale = min(1.0, self.cfg.detector.input_max_px / max(h, w))
        if scale < 1.0:
            small = cv2.resize(img, (int(round(w * scale)), int(round(h * scale))), interpolation=cv2.INTER_AREA)
            return _shift(self.detector.detect(small), 0, 0, 1.0 / scale)
        return self.detector.detect(img)

    def _advance(self, dets: Detections, ts: float, frame: Frame | None, new_scene: bool = False) -> None:
        """Track, announce starts and ends, sample ages, send updates."""
        tracks = self.tracker.update(dets, ts, new_scene)
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
    def _preview(self, frame: Frame, detected: bool) -> None:
        from agecam.daemon.annotate import TrackView, annotate

        now = time.monotonic()
        watched = self.recorder is not None or (self.hub is not None and self.hub.watching(self.cam.name))
        if now - self._last_preview_s < (1.0 / self.cfg.preview.max_fps if watched else SNAPSHOT_REFRESH_S - 0.05):
            return
        self._last_preview_s = now
        self._last_preview_wall_s = frame.ts
        if detected:
            views = [TrackView(tid, rec.track.box_xyxy, rec.estimate(), rec.quality, True)
                     for tid, rec in self.records.items() if rec.track.det_index is not None]
        else:  # between detector runs the boxes follow the tracks' predicted motion
            ids, boxes, lost = self.tracker.predicted(frame.ts, with_ids=True)
            where = {int(i): tuple(float(v) for v in b) for i, b, gone in zip(ids, boxes, lost) if not gone}
            views = [TrackView(tid, where[tid], rec.estimate(), rec.quality, True)
                     for tid, rec in self.records.items() if tid in where and rec.track.det_index is not None]
        status = f"{self.cam.name}  {self.stats.fps:4.1f} fps  faces {len(views)}"
        t0 = time.perf_counter()
        image = annotate(frame.image, views, status)
        if self.hub is not None:
            self.hub.publish(self.cam.name, image)
        if self.recorder is not None and not self.recorder.write(image):
            self.metrics.frame_dropped(self.cam.name, "record")
        self.metrics.stage_time("annotate", time.perf_counter() - t0)
