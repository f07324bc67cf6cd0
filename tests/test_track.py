"""Tracker ID lifecycle, driven by a scripted detector (fixed boxes at chosen times)."""
from __future__ import annotations


import numpy as np
import pytest

from agecam.config import TrackerConfig
from agecam.daemon.track import Track, Tracker, iou_matrix
from agecam.daemon.types import Detections

FACE_PX = 80.0


def dets(*items: tuple[float, float, float]) -> Detections:
    """Detections from (centre x, centre y, score) triples, FACE_PX square boxes."""
    if not items:
        return Detections.empty()
    boxes = np.array([[x - FACE_PX / 2, y - FACE_PX / 2, x + FACE_PX / 2, y + FACE_PX / 2] for x, y, _ in items],
                     np.float32)
    return Detections(boxes, np.array([s for _, _, s in items], np.float32))


def run(tracker: Tracker, script: list[tuple[float, Detections]]) -> tuple[list[list[Track]], list[Track]]:
    """Feed (ts, dets) pairs; returns the live tracks after each update and everything ended on the way."""
    outs, ended = [], []
    for ts, d in script:
        outs.append(tracker.update(d, ts))
        ended += tracker.pop_ended()
    return outs, ended


def confirmed_ids(outs: list[list[Track]]) -> set[int]:
    return {t.track_id for out in outs for t in out if t.is_confirmed}


@pytest.mark.parametrize(
    "name, velocity_px_s, jitter_px",
    [
        ("still", (0.0, 0.0), 0.0),
        ("walking right", (120.0, 0.0), 0.0),
        ("walking diagonally, jittery detector", (-90.0, 60.0), 4.0),
    ],
)
def test_steady_object_keeps_one_id(name, velocity_px_s, jitter_px):
    # given one face seen on every frame at 15 fps for 4 s
    rng = np.random.default_rng(0)
    tracker = Tracker(TrackerConfig())
    script = []
    for i in range(60):
        ts = 100.0 + i / 15
        x, y = 320 + velocity_px_s[0] * (ts - 100) + rng.normal(0, jitter_px), 240 + velocity_px_s[1] * (ts - 100)
        script.append((ts, dets((x, y, 0.95))))
    # when tracked
    outs, ended = run(tracker, script)
    # then one id, confirmed, matched on every frame once confirmed
    ids = {t.track_id for out in outs for t in out}
    assert ids == {1}, f"{name}: expected one track id 1, got {sorted(ids)}"
    assert not ended, f"{name}: a steady track ended: {ended}"
    last = outs[-1][0]
    assert last.state == "confirmed" and last.hits == 60, f"{name}: final track {last}"
    assert last.det_index == 0, f"{name}: the track's det_index should point at its detection, got {last.det_index}"


@pytest.mark.parametrize("confirm_hits", [1, 2, 3, 5])
def test_confirm_hits_respected(confirm_hits):
    # given a tracker that needs confirm_hits matches
    tracker = Tracker(TrackerConfig(confirm_hits=confirm_hits))
    states = []
    # when a face is seen on consecutive frames
    for i in range(6):
        (t,) = tracker.update(dets((200, 200, 0.9)), i * 0.1)
        states.append(t.state)
    # then it is tentative until the confirm_hits-th hit, confirmed from then on
    expected = ["tentative"] * (confirm_hits - 1) + ["confirmed"] * (6 - confirm_hits + 1)
    assert states == expected, f"confirm_hits={confirm_hits}: states per frame {states}, expected {expected}"


@pytest.mark.parametrize("score, sure_score, confirmed_on_hit", [
    (0.99, 0.95, 2),  # the detector is sure: announced on the second match
    (0.90, 0.95, 3),  # doubtful: confirm_hits as usual
    (0.99, None, 3),  # turned off
])
def test_a_face_the_detector_is_sure_of_is_confirmed_sooner(score, sure_score, confirmed_on_hit):
    tracker = Tracker(TrackerConfig(confirm_hits=3, sure_score=sure_score))
    states = [tracker.update(dets((200, 200, score)), i * 0.1)[0].state for i in range(4)]
    assert states.index("confirmed") + 1 == confirmed_on_hit, states


@pytest.mark.parametrize("score, confirmed_at_once", [(0.99, True), (0.85, False)])
def test_a_sure_face_on_a_new_scene_is_confirmed_at_once(score, confirmed_at_once):
    # given a tracker, and a frame that starts a new picture (a cut)
    tracker = Tracker(TrackerConfig(confirm_hits=3, sure_score=0.95))
    (t,) = tracker.update(dets((200, 200, score)), 0.0, new_scene=True)
    # then a face the detector is sure of is confirmed on it, a doubtful one waits for its matches
    assert (t.state == "confirmed") is confirmed_at_once, t
    # while on an ordinary frame the same sure face needs a second match
    (u,) = Tracker(TrackerConfig(confirm_hits=3, sure_score=0.95)).update(dets((200, 200, score)), 0.0)
    assert u.state == "tentative", u


@pytest.mark.parametrize("shift_px, keeps_id", [(4, True), (30, False)])
def test_after_a_cut_a_track_keeps_only_a_face_found_where_it_was(shift_px, keeps_id):
    # given a confirmed face (80 px)
    tracker = Tracker(TrackerConfig(confirm_hits=1))
    (t0,) = tracker.update(dets((200, 200, 0.99)), 0.0)
    # when the picture cuts and a face is found a little (the lights changed) or clearly (someone else) aside
    out = tracker.update(dets((200 + shift_px, 200, 0.99)), 0.1, new_scene=True)
    # then only the first keeps the track; IoU 0.45 at 30 px would have matched on an ordinary frame
    assert (t0.track_id in {t.track_id for t in out if t.state == "confirmed"}) is keeps_id, out


def test_one_doubtful_match_makes_a_track_wait_for_confirm_hits():
    tracker = Tracker(TrackerConfig(confirm_hits=3, sure_score=0.95))
    states = [tracker.update(dets((200, 200, s)), i * 0.1)[0].state for i, s in enumerate([0.85, 0.99, 0.99])]
    assert states == ["tentative", "tentative", "confirmed"], states


def test_a_face_of_another_size_over_a_track_is_someone_else():
    # given a confirmed small face (40 px)
    tracker = Tracker(TrackerConfig(confirm_hits=1, match_iou=0.2))
    small = Detections(np.float32([[480, 170, 520, 210]]), np.float32([0.99]))
    (t0,) = tracker.update(small, 0.0)
    # when a face twice its size appears over it (overlapping enough for IoU 0.25, e.g. after a cut)
    big = Detections(np.float32([[470, 160, 550, 240]]), np.float32([0.99]))
    assert iou_matrix(small.boxes_xyxy, big.boxes_xyxy)[0, 0] >= 0.2
    out = tracker.update(big, 0.1)
    # then it starts a track of its own and the small face's track is lost, not moved onto it
    by_id = {t.track_id: t for t in out}
    assert by_id[t0.track_id].state == "lost" and len(by_id) == 2, out
    # while a face that grows by a few percent per match keeps its track
    tracker = Tracker(TrackerConfig(confirm_hits=1))
    ids = {tracker.update(Detections(np.float32([[100, 100, 100 + s, 100 + s]]), np.float32([0.99])), i * 0.1)[0].track_id
           for i, s in enumerate([40, 44, 48, 53, 58, 64])}
    assert len(ids) == 1, ids


def test_tentative_track_that_misses_is_dropped_silently():
    # given a face seen twice with confirm_hits=3
    tracker = Tracker(TrackerConfig(confirm_hits=3))
    tracker.update(dets((200, 200, 0.9)), 0.0)
    tracker.update(dets((200, 200, 0.9)), 0.1)
    # when it is missed once
    out = tracker.update(dets(), 0.2)
    # then the track is gone and nothing reports an end (it was never announced)
    assert out == [], f"a tentative track should be dropped on its first miss, got {out}"
    assert tracker.pop_ended() == [] and tracker.end_all() == [], "an unannounced track must not report an end"
    # and the next face gets a fresh id
    (t,) = tracker.update(dets((200, 200, 0.9)), 0.3)
    assert t.track_id == 2, f"ids must never be reused, got {t.track_id}"


# Timestamps are spaced unevenly on purpose: a buffer counted in frames would get these wrong.
@pytest.mark.parametrize(
    "name, gap_s, frames_in_gap, keeps_id",
    [
        ("short gap, many frames (a frame-counting buffer would drop it)", 1.2, 60, True),
        ("long gap, a single frame (a frame-counting buffer would keep it)", 1.8, 1, False),
        ("long gap, no frame at all", 3.0, 0, False),
        ("short gap, no frame at all", 0.9, 0, True),
        ("just inside the buffer, irregular frames", 1.45, 7, True),
    ],
)
def test_gap_measured_in_seconds(name, gap_s, frames_in_gap, keeps_id):
    # given a confirmed face, lost_track_buffer_s=1.5
    tracker = Tracker(TrackerConfig(lost_track_buffer_s=1.5, confirm_hits=3))
    script = [(i * 0.1, dets((300, 200, 0.9))) for i in range(5)]
    t_last = script[-1][0]
    # when no detection comes for gap_s seconds (frames_in_gap empty frames at irregular times)
    rng = np.random.default_rng(1)
    gap_times = np.sort(rng.uniform(t_last + 0.01, t_last + gap_s - 0.01, frames_in_gap))
    script += [(float(ts), dets()) for ts in gap_times]
    script += [(t_last + gap_s + i * 0.07, dets((300, 200, 0.9))) for i in range(4)]
    outs, ended = run(tracker, script)
    # then the same id resumes iff the gap is shorter than the buffer
    final_ids = [t.track_id for t in outs[-1]]
    if keeps_id:
        assert final_ids == [1], f"{name}: expected id 1 to resume, live ids {final_ids}"
        assert ended == [], f"{name}: no track should end, got {[t.track_id for t in ended]}"
    else:
        assert final_ids == [2], f"{name}: expected a new id 2, live ids {final_ids}"
        assert [t.track_id for t in ended] == [1], f"{name}: id 1 should end once, ended {ended}"
        assert ended[0].state == "ended" and ended[0].last_seen_ts == pytest.approx(t_last), ended[0]


@pytest.mark.parametrize("hidden_s", [0.0, 0.4])
@pytest.mark.parametrize("dy_px", [0.0, 25.0])
def test_crossing_objects_keep_their_ids(hidden_s, dy_px):
    # given two faces walking towards each other at 150 px/s, crossing at t=2 s, 15 fps
    tracker = Tracker(TrackerConfig())
    script = []
    for i in range(61):
        ts = i / 15
        a = (320 - 300 + 150 * ts, 240.0, 0.9)
        b = (320 + 300 - 150 * ts, 240.0 + dy_px, 0.9)
        # when b is hidden behind a for hidden_s around the crossing (a detector sees only the front face)
        b_visible = abs(ts - 2.0) >= hidden_s / 2 or hidden_s == 0
        items = [a, b] if b_visible else [a]
        if i % 2:
            items = items[::-1]  # detection order must not matter
        script.append((ts, dets(*items)))
    outs, ended = run(tracker, script)
    # then a stays id 1 (left to right) and b stays id 2 (right to left) throughout
    assert not ended, f"no track should end while crossing, got {ended}"
    first, last = outs[5], outs[-1]
    left_to_right = {t.track_id: t.box_xyxy[0] for t in first}
    assert sorted(left_to_right) == [1, 2], f"expected ids 1 and 2 early on, got {first}"
    final = {t.track_id: t.box_xyxy[0] for t in last}
    assert sorted(final) == [1, 2], f"expected ids 1 and 2 after crossing, got {last}"
    assert final[1] > final[2], f"ids swapped while crossing: id 1 ends at x={final[1]:.0f}, id 2 at x={final[2]:.0f}"


def test_low_score_detections_extend_but_never_start_tracks():
    cfg = TrackerConfig(high_score=0.8, low_score=0.5, lost_track_buffer_s=1.0)
    tracker = Tracker(cfg)
    # given a confirmed face (high scores) and, elsewhere, a face that only ever scores 0.6
    script = [(i * 0.1, dets((200, 200, 0.9), (500, 300, 0.6))) for i in range(5)]
    # when the first face's score drops to 0.6 for 3 s (longer than the lost buffer)
    script += [(0.5 + i * 0.1, dets((200 + i, 200, 0.6), (500, 300, 0.6))) for i in range(30)]
    outs, ended = run(tracker, script)
    # then the first track lives on as id 1, and the low-score face never got a track
    assert [t.track_id for t in outs[-1]] == [1], f"expected only id 1, got {outs[-1]}"
    assert outs[-1][0].state == "confirmed" and outs[-1][0].det_score == pytest.approx(0.6), outs[-1][0]
    assert not ended, f"nothing should end, got {ended}"
    # and detections under low_score do not even extend a track
    for i in range(12):
        tracker.update(dets((230, 200, 0.4)), 3.5 + i * 0.1)
    ended = tracker.pop_ended()
    assert [t.track_id for t in ended] == [1], f"a track fed only sub-low_score detections should end, got {ended}"


def test_two_trackers_have_independent_ids():
    # given two trackers (two cameras)
    a, b = Tracker(TrackerConfig(confirm_hits=1)), Tracker(TrackerConfig(confirm_hits=1))
    # when each sees faces
    ids_a = [t.track_id for t in a.update(dets((100, 100, 0.9), (400, 100, 0.9)), 0.0)]
    ids_b = [t.track_id for t in b.update(dets((100, 100, 0.9)), 0.0)]
    # then both count from 1 on their own
    assert ids_a == [1, 2] and ids_b == [1], f"ids should be per tracker: camera a {ids_a}, camera b {ids_b}"


def test_end_all_ends_every_confirmed_track_once():
    tracker = Tracker(TrackerConfig(confirm_hits=3, lost_track_buffer_s=1.5))
    # given three confirmed tracks, one of which is lost now, and one tentative track
    for i in range(4):
        tracker.update(dets((100, 100, 0.9), (300, 100, 0.9), (500, 100, 0.9)), i * 0.1)
    tracker.update(dets((100, 100, 0.9), (300, 100, 0.9), (500, 300, 0.9)), 0.4)
    states = {t.track_id: t.state for t in tracker.tracks}
    assert states == {1: "confirmed", 2: "confirmed", 3: "lost", 4: "tentative"}, f"setup went wrong: {states}"
    # when everything is ended
    ended = tracker.end_all()
    # then each confirmed (or lost) track is reported once, the tentative one never, and nothing is left
    assert sorted(t.track_id for t in ended) == [1, 2, 3], f"end_all reported {[t.track_id for t in ended]}"
    assert all(t.state == "ended" and t.is_confirmed for t in ended), ended
    assert tracker.end_all() == [] and tracker.pop_ended() == [] and tracker.tracks == [], "ended twice"
    # and ids keep counting up afterwards
    (t,) = tracker.update(dets((100, 100, 0.9)), 1.0)
    assert t.track_id == 5, f"ids must not be reused after end_all, got {t.track_id}"


def test_det_index_points_at_the_matched_detection():
    tracker = Tracker(TrackerConfig(confirm_hits=1))
    # given two tracked faces whose detections come in a different order on each frame
    for i in range(6):
        items = [(100 + 5 * i, 100, 0.9), (400 - 5 * i, 300, 0.9)]
        d = dets(*(items if i % 2 else items[::-1]))
        out = tracker.update(d, i / 15)
        # then each track's det_index names the detection whose box it reports
        for t in out:
            assert t.det_index is not None, f"frame {i}: track {t.track_id} unmatched"
            assert t.box_xyxy == pytest.approx(tuple(d.boxes_xyxy[t.det_index])), f"frame {i}: {t}"
    # and when the upper face is missed, its track has no det_index and a predicted box
    out = tracker.update(dets((400 - 30, 300, 0.9)), 6 / 15)
    upper = [t for t in out if t.box_xyxy[1] < 200]
    lower = [t for t in out if t.box_xyxy[1] >= 200]
    assert len(upper) == len(lower) == 1, f"expected one track per face, got {out}"
    assert upper[0].det_index is None and upper[0].state == "lost", f"missed face's track: {upper[0]}"
    assert upper[0].box_xyxy[0] == pytest.approx(100 + 30 - FACE_PX / 2, abs=3), f"not predicted on: {upper[0]}"
    assert lower[0].det_index == 0 and lower[0].state == "confirmed", f"seen face's track: {lower[0]}"


@pytest.mark.parametrize("ahead_s", [0.05, 0.3, 0.7])
def test_predict_boxes_uses_velocity_in_pixels_per_second(ahead_s):
    # given a face moving at 100 px/s, seen at irregular times
    tracker = Tracker(TrackerConfig())
    rng = np.random.default_rng(2)
    times = np.cumsum(rng.uniform(0.03, 0.2, 25))
    for ts in times:
        tracker.update(dets((100 + 100 * ts, 200, 0.9)), float(ts))
    # when asked where it will be ahead_s later
    before = tracker.tracks
    pred = tracker.predict_boxes(float(times[-1] + ahead_s))
    # then the centre is where constant velocity puts it, and the tracker did not move
    assert pred.shape == (1, 4) and pred.dtype == np.float32, f"expected one float32 box, got {pred!r}"
    cx = (pred[0, 0] + pred[0, 2]) / 2
    want = 100 + 100 * (times[-1] + ahead_s)
    assert abs(cx - want) < 3.0, f"predicted centre x {cx:.1f}, expected {want:.1f} ({ahead_s} s ahead)"
    assert tracker.tracks == before, "predict_boxes must not change the tracker"


def test_iou_matrix_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    got = iou_matrix(a, b)
    assert got == pytest.approx(np.array([[1, 1 / 3, 0], [0, 0, 0]])), f"IoU matrix {got}"


def test_ended_track_reports_its_last_seen_box_not_a_prediction():
    # given a fast-moving confirmed track that then vanishes
    from agecam.config import TrackerConfig
    from agecam.daemon.track import Tracker
    from agecam.daemon.types import Detections

    tr = Tracker(TrackerConfig(confirm_hits=2, lost_track_buffer_s=0.5))
    last = None
    for i in range(5):
        last = np.array([[100 + 40 * i, 100, 180 + 40 * i, 180]], np.float32)
        tr.update(Detections(last, np.array([0.95], np.float32)), ts_s=i * 0.1)
    # when it has been gone longer than the lost buffer
    for j in range(1, 12):
        tr.update(Detections.empty(), ts_s=0.4 + j * 0.1)
    ended = tr.pop_ended()
    # then its end carries the box where it was last detected, not where the filter extrapolated it
    assert len(ended) == 1, ended
    assert np.allclose(ended[0].box_xyxy, last[0]), f"ended box {ended[0].box_xyxy}, last seen {last[0].tolist()}"
