"""ByteTrack-style multi-object tracker: Kalman boxes on real time steps, two-stage IoU association."""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from agecam.config import TrackerConfig
from agecam.daemon.types import Detections

TrackState = Literal["tentative", "confirmed", "lost", "ended"]

# Kalman noise, relative to the box height (so it holds for small and large faces alike).
# Process noise is a random walk per second of real time; measurement noise is per detection.
_POS_STD_PER_SQRT_S = 0.10  # drift of centre/size per sqrt(second), in box heights
_VEL_STD_PER_SQRT_S = 0.60  # drift of velocity per sqrt(second), in box heights per second
_MEAS_STD = 0.05  # detector jitter on centre/size, in box heights
_INIT_VEL_STD = 1.0  # velocity uncertainty of a new track, in box heights per second
_MIN_SIDE_PX = 1.0
MAX_SIDE_RATIO = 1.6  # the most a face's box side changes between two matches of its track
# On a cut's first frame a track only keeps a face found where it was (the lights changed, the face did not move):
# a face merely near an old track's place is someone in the new picture.
NEW_SCENE_MATCH_IOU = 0.5


@dataclass(frozen=True)
class Track:
    """A snapshot of one track after an update.

    state: 'tentative' (not yet announced), 'confirmed' (matched now or recently), 'lost' (kept for
    re-identification), 'ended' (removed; only in pop_ended()/end_all(), and only tracks once confirmed). det_index indexes the Detections of
    this update when matched now, else None. box_xyxy is the matched detection's box, else the prediction; for an
    ended track, the box of its last detection.
    """

    track_id: int
    state: TrackState
    box_xyxy: tuple[float, float, float, float]
    det_score: float
    det_index: int | None
    first_seen_ts: float
    last_seen_ts: float
    hits: int

    @property
    def is_confirmed(self) -> bool:
        """True once the track has been confirmed (announced): also while lost, and when ended."""
        return self.state != "tentative"


def _xyxy_to_z(box: np.ndarray) -> np.ndarray:
    w = max(float(box[2] - box[0]), _MIN_SIDE_PX)
    h = max(float(box[3] - box[1]), _MIN_SIDE_PX)
    return np.array([box[0] + w / 2, box[1] + h / 2, w, h], np.float64)


def _z_to_xyxy(z: np.ndarray) -> np.ndarray:
    w, h = max(z[2], _MIN_SIDE_PX), max(z[3], _MIN_SIDE_PX)
    return np.array([z[0] - w / 2, z[1] - h / 2, z[0] + w / 2, z[1] + h / 2], np.float64)


class _KalmanBox:
    """Constant-velocity Kalman filter on (cx, cy, w, h) with time in seconds.

    F, Q, R and H act on each of the four coordinates separately, so the 8-state filter is exactly four
    independent (position, velocity) filters; they are written out on floats, which is ~10x faster than
    8x8 numpy algebra at these sizes.
    """

    __slots__ = ("pos", "vel", "p00", "p01", "p11")

    def __init__(self, z: np.ndarray):
        s = float(z[3])
        self.pos = [float(v) for v in z]
        self.vel = [0.0] * 4
        self.p00 = [(2 * _MEAS_STD * s) ** 2] * 4
        self.p01 = [0.0] * 4
        self.p11 = [(_INIT_VEL_STD * s) ** 2] * 4

    def predicted_pos(self, dt_s: float) -> list[float]:
        """The (cx, cy, w, h) expected dt_s seconds ahead, without changing the filter."""
        dt = max(dt_s, 0.0)
        return [p + v * dt for p, v in zip(self.pos, self.vel)]

    def predict(self, dt_s: float) -> None:
        if dt_s <= 0:
            return
        dt = dt_s
        s = max(self.pos[3], _MIN_SIDE_PX)
        qp, qv = (_POS_STD_PER_SQRT_S * s) ** 2 * dt, (_VEL_STD_PER_SQRT_S * s) ** 2 * dt
        for i in range(4):
            p01, p11 = self.p01[i], self.p11[i]
            self.pos[i] += self.vel[i] * dt
            self.p00[i] += 2 * dt * p01 + dt * dt * p11 + qp
            self.p01[i] = p01 + dt * p11
            self.p11[i] = p11 + qv
        self.pos[2] = max(self.pos[2], _MIN_SIDE_PX)
        self.pos[3] = max(self.pos[3], _MIN_SIDE_PX)

    def correct(self, z: np.ndarray) -> None:
        r = (_MEAS_STD * max(self.pos[3], _MIN_SIDE_PX)) ** 2
        for i in range(4):
            p00, p01, p11 = self.p00[i], self.p01[i], self.p11[i]
            k0, k1 = p00 / (p00 + r), p01 / (p00 + r)
            innov = float(z[i]) - self.pos[i]
            self.pos[i] += k0 * innov
            self.vel[i] += k1 * innov
            self.p00[i], self.p01[i], self.p11[i] = (1 - k0) * p00, (1 - k0) * p01, p11 - k1 * p01

    def hold_size(self) -> None:
        """Stop extrapolating the size (a lost box keeps its size; only its centre drifts on)."""
        self.vel[2] = self.vel[3] = 0.0


class _LiveTrack:
    """Mutable tracker-internal state of one track."""

    __slots__ = ("track_id", "state", "kf", "box", "seen_box", "det_score", "det_index", "first_seen_ts",
                 "last_seen_ts", "hits", "min_score", "ts")

    def __init__(self, track_id: int, box: np.ndarray, score: float, det_index: int, ts_s: float):
        self.track_id = track_id
        self.state: TrackState = "tentative"
        self.kf = _KalmanBox(_xyxy_to_z(box))
        self.box = box.astype(np.float64)
        self.seen_box = self.box  # the last detection's box: where the face really was when last seen
        self.det_score = score
        self.det_index: int | None = det_index
        self.first_seen_ts = ts_s
        self.last_seen_ts = ts_s
        self.hits = 1
        self.min_score = score  # the lowest score among its matches
        self.ts = ts_s  # time the filter state refers to

    def predict_to(self, ts_s: float) -> None:
        self.kf.predict(ts_s - self.ts)
        self.ts = max(self.ts, ts_s)
        self.box = _z_to_xyxy(self.kf.pos)
        self.det_index = None

    def match(self, box: np.ndarray, score: float, det_index: int, ts_s: float) -> None:
        self.kf.correct(_xyxy_to_z(box))
        self.box = box.astype(np.float64)
        self.seen_box = self.box
        self.det_score = score
        self.det_index = det_index
        self.last_seen_ts = ts_s
        self.hits += 1
        self.min_score = min(self.min_score, score)

    def snapshot(self, state: TrackState | None = None) -> Track:
        state = state or self.state
        box = self.seen_box if state == "ended" else self.box  # an ended track reports where it was last seen
        return Track(self.track_id, state, tuple(float(v) for v in box), float(self.det_score),
                     self.det_index, self.first_seen_ts, self.last_seen_ts, self.hits)


def iou_matrix(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two box sets, shape (len(a), len(b))."""
    a = np.asarray(a_xyxy, np.float64).reshape(-1, 4)
    b = np.asarray(b_xyxy, np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _assign(tracks: list[_LiveTrack], boxes: np.ndarray, min_iou: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Optimal IoU matching: (matched (track_pos, box_pos) pairs, unmatched track positions, unmatched box positions)."""
    if not tracks or len(boxes) == 0:
        return [], list(range(len(tracks))), list(range(len(boxes)))
    track_boxes = np.stack([t.box for t in tracks])
    iou = iou_matrix(track_boxes, boxes)
    # a face does not change size by more than MAX_SIDE_RATIO between two matches: a big face overlapping a small
    # track is someone else (after a cut, or walking past in front)
    side_t = np.sqrt(np.clip((track_boxes[:, 2] - track_boxes[:, 0]) * (track_boxes[:, 3] - track_boxes[:, 1]), 1e-6, None))
    side_b = np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6, None))
    ratio = side_t[:, None] / side_b[None, :]
    iou[(ratio > MAX_SIDE_RATIO) | (ratio < 1 / MAX_SIDE_RATIO)] = 0.0
    rows, cols = linear_sum_assignment(-iou)
    pairs = [(r, c) for r, c in zip(rows, cols) if iou[r, c] >= min_iou]
    matched_t = {r for r, _ in pairs}
    matched_b = {c for _, c in pairs}
    return (pairs, [i for i in range(len(tracks)) if i not in matched_t],
            [j for j in range(len(boxes)) if j not in matched_b])


class TrackIds:
    """One camera's track ID sequence for a whole run: kept across reloads, so no ID is ever issued twice."""

    def __init__(self, first: int = 1):
        self._ids = itertools.count(first)
        self._lock = threading.Lock()

    def next(self) -> int:
        """A new, never issued ID (thread-safe: an old and a new pipeline may overlap during a reload)."""
        with self._lock:
            return next(self._ids)


class Tracker:
    """Tracks faces of one camera. Pure logic: call update() once per processed frame with its capture time."""

    def __init__(self, cfg: TrackerConfig, ids: TrackIds | None = None):
        self.cfg = cfg
        self._ids = ids if ids is not None else TrackIds()  # a fresh sequence per tracker unless the run shares one
        self._tracks: list[_LiveTrack] = []
        self._ended: list[Track] = []

    def update(self, dets: Detections, ts_s: float, new_scene: bool = False) -> list[Track]:
        """Advance to ts_s, associate dets, and return every live track (tentative, confirmed, lost) by id.

        new_scene: this frame starts a new picture (a cut). Tracks from before it match only at NEW_SCENE_MATCH_IOU
        (or match_iou if higher); and, as on a video's first frame in ByteTrack, a new face the detector is sure of
        (sure_score) is confirmed at once."""
        cfg = self.cfg
        # Tracks unseen for longer than the buffer end before association, so they cannot be revived.
        alive = []
        for t in self._tracks:
            if ts_s - t.last_seen_ts > cfg.lost_track_buffer_s:
                if t.state != "tentative":
                    self._ended.append(t.snapshot("ended"))
            else:
                t.predict_to(ts_s)
                alive.append(t)
        self._tracks = alive

        boxes = np.asarray(dets.boxes_xyxy, np.float64).reshape(-1, 4)
        scores = np.asarray(dets.scores, np.float64).reshape(-1)
        high_idx = np.flatnonzero(scores >= cfg.high_score)
        low_idx = np.flatnonzero((scores >= cfg.low_score) & (scores < cfg.high_score))

        active = [t for t in self._tracks if t.state == "confirmed"]
        lost = [t for t in self._tracks if t.state == "lost"]
        tentative = [t for t in self._tracks if t.state == "tentative"]

        # Stage 1: high-score detections against confirmed and lost tracks.
        pool = active + lost
        match_iou = max(cfg.match_iou, NEW_SCENE_MATCH_IOU) if new_scene else cfg.match_iou
        pairs, rest_t, rest_h = _assign(pool, boxes[high_idx], match_iou)
        for ti, bi in pairs:
            d = int(high_idx[bi])
            pool[ti].match(boxes[d], scores[d], d, ts_s)
            pool[ti].state = "confirmed"
        # Stage 2: low-score detections keep confirmed tracks alive (they never revive lost ones).
        rest_active = [pool[i] for i in rest_t if pool[i].state == "confirmed"]
        pairs2, _, _ = _assign(rest_active, boxes[low_idx], match_iou)
        for ti, bi in pairs2:
            d = int(low_idx[bi])
            rest_active[ti].match(boxes[d], scores[d], d, ts_s)
        # Stage 3: tentative tracks take the remaining high-score detections.
        left_high = high_idx[rest_h]
        pairs3, _, rest_h3 = _assign(tentative, boxes[left_high], match_iou)
        for ti, bi in pairs3:
            d = int(left_high[bi])
            tentative[ti].match(boxes[d], scores[d], d, ts_s)

        # Lifecycle.
        keep: list[_LiveTrack] = []
        for t in self._tracks:
            matched_now = t.det_index is not None
            if t.state == "tentative":
                if not matched_now:
                    continue  # a tentative track that misses is dropped silently (never announced)
                if t.hits >= cfg.confirm_hits or (t.hits >= 2 and self._sure(t.min_score)):
                    t.state = "confirmed"
            elif not matched_now:
                t.state = "lost"
                t.kf.hold_size()
            keep.append(t)
        # New tentative tracks from unmatched high-score detections.
        for bi in rest_h3:
            d = int(left_high[bi])
            t = _LiveTrack(self._ids.next(), boxes[d], scores[d], d, ts_s)
            if cfg.confirm_hits <= 1 or (new_scene and self._sure(scores[d])):
                t.state = "confirmed"
            keep.append(t)
        self._tracks = keep
        return self.tracks

    def _sure(self, score: float) -> bool:
        """The detector is sure of a face with this score (tracker.sure_score; never when null)."""
        return self.cfg.sure_score is not None and score >= self.cfg.sure_score

    @property
    def awaiting_confirmation(self) -> bool:
        """True while some track is tentative: it needs matches on the next frames to be confirmed."""
        return any(t.state == "tentative" for t in self._tracks)

    @property
    def tracks(self) -> list[Track]:
        """Snapshots of the live tracks, by id."""
        return [t.snapshot() for t in sorted(self._tracks, key=lambda t: t.track_id)]

    def predict_boxes(self, ts_s: float) -> np.ndarray:
        """(N, 4) float32 boxes where the live tracks are expected at ts_s, in the order of `tracks` (by id).

        Does not change the tracker; lets the detector search only around them.
        """
        return self.predicted(ts_s)[0]

    def predicted(self, ts_s: float, with_ids: bool = False):
        """(boxes, lost): predict_boxes(ts_s) and, per box, whether its track is lost (unmatched at the last
        update); with_ids, (ids, boxes, lost)."""
        live = sorted(self._tracks, key=lambda t: t.track_id)
        out = np.zeros((len(live), 4), np.float32)
        for i, t in enumerate(live):
            out[i] = _z_to_xyxy(t.kf.predicted_pos(ts_s - t.ts))
        lost = np.array([t.state == "lost" for t in live], bool)
        if with_ids:
            return np.array([t.track_id for t in live], np.int64), out, lost
        return out, lost

    @property
    def n_live(self) -> int:
        """Tracks alive (tentative, confirmed or lost)."""
        return len(self._tracks)

    def pop_ended(self) -> list[Track]:
        """Confirmed tracks removed since the last call (each reported once), state 'ended'."""
        ended, self._ended = self._ended, []
        return ended

    def end_all(self) -> list[Track]:
        """End every track now (camera end, shutdown); returns the confirmed ones not yet reported, each once."""
        ended = self.pop_ended()
        ended += [t.snapshot("ended") for t in self._tracks if t.state != "tentative"]
        self._tracks = []
        return ended
