"""The pipeline's detector schedule: tracks coast between checks, new faces are found where the picture changed, the
full-frame search is the safety net, and frames nobody needs are not asked for.

The detector here finds white squares on a dark picture (a unit of logic standing in for a face detector, so the
schedule can be tested frame by frame); the real detector's schedule is measured in bench/bench_peer.py."""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from agecam.config import parse
from agecam.daemon.detect import nms, pick
from agecam.daemon.motion import CutFinder, MotionFinder, search_boxes
from agecam.daemon.pipeline import CameraPipeline
from agecam.daemon.slot import LatestSlot
from agecam.daemon.types import Detections, Frame
from agecam.events import EventFactory

FPS = 15.0
W, H = 640, 480


class SquareDetector:
    """'Faces' are bright squares: found by thresholding whatever image it is given (a frame or a crop of one)."""

    def __init__(self):
        self.full_calls: list[tuple[int, int]] = []  # shape (h, w) of every detect() image
        self.region_calls = 0

    def detect(self, image):
        self.full_calls.append(image.shape[:2])
        return self._find(image)

    def detect_regions(self, image, rois, scan_missed=None):
        self.region_calls += 1
        d = self._find(image)
        keep = [i for i, b in enumerate(d.boxes_xyxy) if any(_overlaps(b, r) for r in np.asarray(rois).reshape(-1, 4))]
        return pick(d, np.asarray(keep, np.int64))

    @staticmethod
    def _find(image):
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        n, _, stats, _ = cv2.connectedComponentsWithStats((gray > 200).astype(np.uint8))
        boxes = [(x, y, x + w, y + h) for x, y, w, h, area in stats[1:n] if area >= 400]
        if not boxes:
            return Detections.empty()
        b = np.asarray(boxes, np.float32)
        rel = np.float32([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
        lm = b[:, None, :2] + rel[None] * (b[:, None, 2:] - b[:, None, :2])
        d = Detections(b, np.full(len(b), 0.99, np.float32), lm.astype(np.float32))
        return pick(d, nms(d.boxes_xyxy, d.scores, 0.3))


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class FakeAgeModel:
    bins_years = np.arange(0, 101, dtype=np.float32)

    def make_chip(self, image, landmarks, box):
        return np.zeros((64, 64, 3), np.uint8)


class Requests:
    def __init__(self):
        self.sent = []

    def submit(self, req):
        self.sent.append(req)


def _pipeline(detector_cfg: dict | None = None):
    cfg = parse({"cameras": [{"name": "c", "source": "demo"}], "detector": detector_cfg or {}})
    events = []
    pipe = CameraPipeline(cfg.cameras[0], cfg, slot=LatestSlot(), detector=SquareDetector(), age_model=FakeAgeModel(),
                          age_service=Requests(), events=EventFactory(), submit=events.append,
                          stop=threading.Event(), ended=threading.Event())
    return pipe, events


def _picture(squares, level=30):
    img = np.full((H, W, 3), level, np.uint8)
    for x1, y1, x2, y2 in squares:
        img[y1:y2, x1:x2] = 255
    return img


def _run(pipe, scene, seconds, t0=1000.0, start=0):
    """Feed frames at FPS from frame `start`; scene(t_s) gives the squares. Frames the pipeline does not want (before
    its next_wanted_ts, which the capture thread sees as its slot's wanted_from_mono) are skipped, as the capture
    thread skips them. Returns the frames processed."""
    processed = []
    for i in range(start, start + int(seconds * FPS)):
        ts = t0 + i / FPS
        if pipe.next_wanted_ts and ts < pipe.next_wanted_ts:  # 0: every frame
            continue
        squares, level = scene(i / FPS)
        pipe.process(Frame(image=_picture(squares, level), frame_id=i, ts=ts, camera="c"))
        processed.append(i)
    return processed


def _tracked(pipe):
    return [rec.track.box_xyxy for rec in pipe.records.values()]


A = (100, 100, 180, 180)
B = (420, 260, 500, 340)


def test_a_still_face_is_checked_a_few_times_a_second_not_on_every_frame():
    # given a face that stays put, the default schedule (full search every 3 s, checks every 0.2 s) and no cut checks
    pipe, events = _pipeline({"cut_check_interval_s": None})
    det = pipe.detector
    # when 2.9 s of frames go by
    processed = _run(pipe, lambda t: ([A], 30), 2.9)
    # then the face was found by the first full search, confirmed on the next frames and announced once
    assert len(det.full_calls) == 1 and det.full_calls[0] == (H, W), f"full searches: {det.full_calls}"
    assert [e["type"] for e in events].count("track.start") == 1, [e["type"] for e in events]
    # and afterwards it was only checked about 5 times a second, with the frames in between never even asked for
    assert 12 <= det.region_calls <= 18, f"{det.region_calls} checks in 2.9 s, expected ~5/s"
    assert len(processed) <= 22, f"{len(processed)} of {int(2.9 * FPS)} frames processed; a still scene needs ~7/s"
    # and the track never went lost between checks
    assert all(rec.track.state == "confirmed" for rec in pipe.records.values())


def test_cut_checks_look_at_every_frame_without_running_the_detector_more():
    # given the same still face with the default cut check on every frame
    pipe, _ = _pipeline()
    det = pipe.detector
    # when 2.9 s of frames go by
    processed = _run(pipe, lambda t: ([A], 30), 2.9)
    # then every frame was looked at, but the detector ran as often as without cut checks
    assert len(processed) == int(2.9 * FPS) and pipe.stats.cuts == 0
    assert len(det.full_calls) == 1 and 12 <= det.region_calls <= 18, (det.full_calls, det.region_calls)


@pytest.mark.parametrize("cut_check_interval_s, searched_within_frames", [(0.0, 0), (None, 4)])
def test_a_cut_is_searched_in_full_on_its_first_frame(cut_check_interval_s, searched_within_frames):
    # given a tracked face, and cut checks on every frame (default) or off (the motion comparison notices, later)
    pipe, _ = _pipeline({"cut_check_interval_s": cut_check_interval_s})
    det = pipe.detector
    _run(pipe, lambda t: ([A], 30), 1.0)
    searches = len(det.full_calls)
    # when the picture cuts to another scene (another background, another face elsewhere) at frame 15
    cut_frame = int(1.0 * FPS)
    found_at, announced_at = [], []
    for i in range(cut_frame, cut_frame + 8):
        _run(pipe, lambda t: ([B], 120), 1 / FPS, start=i)
        if len(det.full_calls) > searches and not found_at:
            found_at.append(i)
        if not announced_at and any(r.track.box_xyxy[0] > 300 for r in pipe.records.values()):
            announced_at.append(i)
    # then the whole frame is searched on the cut's first frame (or up to a motion interval later without checks)
    assert found_at and found_at[0] - cut_frame <= searched_within_frames, (found_at, cut_frame)
    # and the new face, found with a sure score, is announced (on the cut's very frame when cuts are checked: a new
    # picture is a first frame)
    assert announced_at, _tracked(pipe)
    if cut_check_interval_s is not None:
        assert pipe.stats.cuts == 1 and found_at[0] == cut_frame and announced_at[0] == cut_frame


def test_a_pan_is_searched_in_full_a_few_times_a_second_not_on_every_frame():
    # given a tracked face, and a camera that pans: every frame differs from the last over most of the picture
    pipe, _ = _pipeline()
    det = pipe.detector
    _run(pipe, lambda t: ([A], 30), 1.0)
    searches = len(det.full_calls)
    stripes = (75 + 60 * np.sin(np.arange(W + 600) * 2 * np.pi / 64)).astype(np.uint8)  # a fence, 64 px apart
    texture = np.repeat(np.repeat(stripes[None, :, None], H, axis=0), 3, axis=2)
    for i in range(15, 60):  # 3 s of panning at 200 px/s
        x = int((i - 15) * 200 / FPS)
        img = np.ascontiguousarray(texture[:, x:x + W])
        pipe.process(Frame(image=img, frame_id=i, ts=1000.0 + i / FPS, camera="c"))
    # then every frame was a cut, but the whole frame was searched at most 5 times a second
    assert pipe.stats.cuts >= 40, pipe.stats.cuts
    assert len(det.full_calls) - searches <= 16, f"{len(det.full_calls) - searches} full searches in 3 s of panning"


def test_a_new_face_is_found_where_the_picture_changed_without_a_full_search():
    # given a tracked face, and a second one appearing at 1.0 s
    pipe, _ = _pipeline()
    det = pipe.detector
    _run(pipe, lambda t: ([A], 30), 1.0)
    # when frames keep coming for 0.8 s more
    _run(pipe, lambda t: ([A, B], 30), 0.8, start=int(1.0 * FPS))
    # then the new face is tracked (found within a motion interval and confirmed), through a search of a crop
    # around it rather than of the whole frame
    assert any(abs(b[0] - B[0]) < 5 and abs(b[1] - B[1]) < 5 for b in _tracked(pipe)), _tracked(pipe)
    crops = det.full_calls[1:]
    assert crops and all(h < H and w < W for h, w in crops), f"searches after the first: {crops}"
    assert len(det.full_calls) <= 3, f"{len(det.full_calls)} detect() calls for one new face"


def test_without_motion_discovery_the_full_search_finds_a_new_face():
    # given motion discovery off and a full search every 1 s
    pipe, _ = _pipeline({"motion_interval_s": 0, "full_frame_interval_s": 1.0})
    _run(pipe, lambda t: ([A], 30), 0.5)
    # when a second face appears at 0.5 s
    _run(pipe, lambda t: ([A, B], 30), 0.4, start=int(0.5 * FPS))
    # then it is not found before the next full search, and found after it
    assert len(pipe.records) == 1, "a new face was found with motion off and no full search due"
    _run(pipe, lambda t: ([A, B], 30), 0.6, start=int(0.9 * FPS))
    assert len(pipe.records) == 2, _tracked(pipe)


def test_when_the_whole_picture_changes_the_whole_frame_is_searched():
    # given a tracked face
    pipe, _ = _pipeline()
    det = pipe.detector
    _run(pipe, lambda t: ([A], 30), 1.0)
    searches = len(det.full_calls)
    # when the lights change (every pixel brighter) at 1.0 s
    _run(pipe, lambda t: ([A], 90), 0.4, start=int(1.0 * FPS))
    # then a full-frame search runs at once, not a crop search of the whole picture in pieces
    assert det.full_calls[searches:] and det.full_calls[searches] == (H, W), det.full_calls[searches:]


def test_every_frame_is_wanted_while_a_new_track_awaits_confirmation():
    # given a face just found by the first full search (tentative: it needs more matches), no cut checks
    pipe, _ = _pipeline({"cut_check_interval_s": None})
    _run(pipe, lambda t: ([A], 30), 1 / FPS)
    # then the very next frame is wanted
    assert pipe.tracker.awaiting_confirmation and pipe.next_wanted_ts == 0.0 and pipe.slot.wanted_from_mono == 0.0
    # and once confirmed, the next frame wanted is a check interval away
    _run(pipe, lambda t: ([A], 30), 0.5, start=1)
    assert pipe.next_wanted_ts > pipe.last_frame_ts + 0.05, (pipe.next_wanted_ts, pipe.last_frame_ts)


def test_motion_finder_boxes_changes_outside_known_faces():
    finder = MotionFinder(threshold=16)
    base = _picture([], 30)
    # the first frame is only remembered
    assert len(finder.changed(base, np.zeros((0, 4)))[0]) == 0
    # a square appearing: one box around it, in image pixels
    boxes, share = finder.changed(_picture([B], 30), np.zeros((0, 4)))
    assert len(boxes) == 1 and 0 < share < 0.1, (boxes, share)
    x1, y1, x2, y2 = boxes[0]
    assert x1 <= B[0] and y1 <= B[1] and x2 >= B[2] and y2 >= B[3] and x2 - x1 < 3 * (B[2] - B[0]), boxes
    # the same change next to a known face (within its head-and-body margin): nothing to search
    finder.changed(base, np.zeros((0, 4)))
    boxes, _ = finder.changed(_picture([B], 30), np.float32([[430, 220, 490, 280]]))
    assert len(boxes) == 0, boxes
    # camera noise below the threshold: nothing
    finder.changed(base, np.zeros((0, 4)))
    noisy = np.clip(base.astype(np.int16) + np.random.default_rng(0).integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
    assert len(finder.changed(noisy, np.zeros((0, 4)))[0]) == 0


def test_a_lost_track_drifting_off_the_picture_does_not_hide_a_new_face():
    # given a known face predicted wholly left of the picture (a lost track keeps its velocity)
    finder = MotionFinder(threshold=16)
    finder.changed(_picture([], 30), np.zeros((0, 4)))
    # when a face appears in the picture, then it is still reported
    boxes, _ = finder.changed(_picture([(100, 100, 180, 180)], 30), np.float32([[-500, -300, -400, -200]]))
    assert len(boxes) == 1, boxes


@pytest.mark.parametrize("cut_check_interval_s", [0.0, None])
def test_a_wall_clock_step_back_does_not_stop_the_checks(cut_check_interval_s):
    # given a tracked face
    pipe, _ = _pipeline({"cut_check_interval_s": cut_check_interval_s})
    det = pipe.detector
    _run(pipe, lambda t: ([A], 30), 1.0)
    checks = det.region_calls
    # when the wall clock steps back an hour (NTP) and frames go on from there (the capture thread waits on the
    # monotonic clock, so the next frame it is asked for still comes)
    t0 = 1000.0 - 3600.0
    pipe.process(Frame(image=_picture([A], 30), frame_id=15, ts=t0 + 15 / FPS, camera="c"))
    _run(pipe, lambda t: ([A], 30), 1.0, t0=t0, start=16)
    # then the face is still checked about 5 times a second, and frames are still wanted
    assert det.region_calls - checks >= 4, f"{det.region_calls - checks} checks in the second after the step"
    if cut_check_interval_s is None:
        assert pipe.next_wanted_ts != 0.0 and pipe.next_wanted_ts <= pipe.last_frame_ts + 1.0, pipe.next_wanted_ts
    else:
        assert pipe.next_wanted_ts == 0.0, "with cut checks on every frame, every frame is wanted"


def test_cut_finder_tells_a_new_picture_from_movement_in_one():
    finder = CutFinder(threshold=16)
    # the first frame is only remembered, and the same picture again is no cut
    assert not finder.is_cut(_picture([A], 30)) and not finder.is_cut(_picture([A], 30))
    # a face moving, or a second one walking in, changes a small part of the picture: no cut
    assert not finder.is_cut(_picture([(140, 100, 220, 180), B], 30))
    # the lights, or a switched feed: most of the picture changed at once
    assert finder.is_cut(_picture([A], 120))
    assert finder.is_cut(_picture([A], 30)), "the comparison is with the previous call's frame"
    # a new frame size (the stream was reconfigured) is a new picture, whatever its content
    assert finder.is_cut(np.full((960, 1280, 3), 30, np.uint8)) and finder.is_cut(np.full((180, 320, 3), 30, np.uint8))
    assert not finder.is_cut(np.full((180, 320, 3), 30, np.uint8))
    # and a frame with no pixels is no cut (nor an error)
    assert not finder.is_cut(np.zeros((0, 320, 3), np.uint8))


def test_search_boxes_grow_clip_and_merge():
    out = search_boxes(np.float32([[0, 0, 10, 10], [12, 12, 20, 20], [600, 400, 640, 480]]), (W, H), 120)
    # the two nearby changes merge into one crop at least 120 px wide, clipped to the frame
    assert len(out) == 2, out
    assert all(b[0] >= 0 and b[1] >= 0 and b[2] <= W and b[3] <= H for b in out), out
    assert all(b[2] - b[0] >= 60 and b[3] - b[1] >= 60 for b in out), out


@pytest.mark.slow
def test_the_real_daemon_runs_the_detector_on_few_frames_and_still_ages_faces(models_dir):
    # given the real detector and age model on the demo scene (15 fps, faces entering, leaving and crossing)
    from tests.helpers import running_app

    with running_app({"cameras": [{"name": "lobby", "source": "demo", "loop": True}]}, models_dir) as run:
        app = run.app
        # when it runs for a while
        assert run.sub.wait_for(lambda e: e["type"] == "track.update" and e["age"], 60), "no aged track.update"
        time.sleep(4.0)
        cam = app.health().cameras["lobby"]
        stats = app.pipelines["lobby"].stats
    # then health reports the source's frame rate and, separately, the rate the pipeline looked at (every frame,
    # for cuts, by default)
    assert 12.0 <= cam.fps <= 16.5, f"source fps {cam.fps:.1f}, the demo plays at 15"
    assert 0.8 * cam.fps <= cam.analysed_fps <= 1.1 * cam.fps, f"analysed {cam.analysed_fps:.1f} of {cam.fps:.1f} fps"
    # but the detector ran on a minority of them (motion searches come with a check of the tracks)
    runs = stats.region_searches + stats.full_searches
    assert runs < 0.6 * stats.frames, f"the detector ran on {runs} of {stats.frames} frames: {vars(stats)}"
    # and the whole frame was searched only as the safety net, the rest around tracks and where things moved
    assert stats.region_searches > 3 * stats.full_searches, vars(stats)
    assert stats.motion_searches > 0, "the demo's faces enter the picture: some were found by motion"
    # and faces got ages and ended tracks were reported with them
    aged = {e["track_id"] for e in run.sub.events if e["type"] in ("track.update", "track.end") and e["age"]}
    assert len(aged) >= 2, f"aged tracks: {aged}"
