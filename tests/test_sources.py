"""Capture threads on real small videos and on injected scripted sources: pacing, end, loop, watchdog, backoff."""
from __future__ import annotations

import shutil
import statistics
import threading
import time

import numpy as np
import pytest

from agecam.config import CameraConfig
from agecam.daemon.slot import LatestSlot
from agecam.daemon.backoff import Backoff
from agecam.daemon.sources import SourceError, SourceUnreachable, source_kind
from tests.helpers import RecordingSlot, wait_for
from tests.media import frame_level, make_numbered_avi

FPS = 20.0
N_FRAMES = 12


class ScriptedReader:
    """A source that yields grey frames at frame_interval_s; after `fail_after` frames it returns None, or blocks
    (until `release` is set) when `block_after` is reached."""

    def __init__(self, frame_interval_s=0.02, fail_after=None, block_after=None, release=None, raise_after=None,
                 late_s=None, base=0):
        self.frame_interval_s = frame_interval_s
        self.late_s, self.base = late_s, base
        self.fail_after, self.block_after, self.raise_after = fail_after, block_after, raise_after
        self.release = release or threading.Event()
        self.n = 0
        self.closed = False

    def read(self):
        if self.fail_after is not None and self.n >= self.fail_after:
            return None
        if self.raise_after is not None and self.n >= self.raise_after:
            raise RuntimeError("kaboom in read")
        if self.block_after is not None and self.n >= self.block_after:
            if self.late_s is None:
                self.release.wait()  # a stuck network read
                return None
            self.release.wait(self.late_s)  # a read that returns a (stale) frame only after a long stall
        self.n += 1
        return np.full((8, 8, 3), (self.base + self.n) % 256, np.uint8)

    def close(self):
        self.closed = True


def cam(source="scripted", **kw) -> CameraConfig:
    base = dict(name="cam1", source=source, reconnect_min_s=0.05, reconnect_max_s=0.2, read_timeout_s=1.0,
                open_timeout_s=1.0)
    base.update(kw)
    return CameraConfig(**base)


def test_slot_keeps_only_the_latest_and_counts_overwrites():
    # given a slot with a drop callback
    drops = []
    slot = LatestSlot(on_drop=lambda: drops.append(1))
    # when three items are put before anyone takes one
    results = [slot.put(i) for i in (1, 2, 3)]
    # then only the newest is taken and the two overwritten ones are counted as dropped
    assert slot.get(0.1) == 3, "get should return the newest item"
    assert results == [False, True, True], f"put should report overwrites, got {results}"
    assert slot.dropped == 2 and len(drops) == 2, f"expected 2 drops, got {slot.dropped} / {len(drops)}"
    # and an empty slot times out with None
    t0 = time.monotonic()
    assert slot.get(0.05) is None
    assert 0.04 <= time.monotonic() - t0 < 5.0, "get(timeout) did not honour its timeout"


def test_slot_get_wakes_when_another_thread_puts():
    slot = LatestSlot()
    threading.Timer(0.05, slot.put, args=("x",)).start()
    t0 = time.monotonic()
    assert slot.get(30.0) == "x"
    assert time.monotonic() - t0 < 15.0, "get did not wake on put (it waited out its 30 s timeout)"


@pytest.mark.parametrize("source, kind", [
    ("demo", "demo"), (0, "camera"), ("2", "camera"), ("/dev/video1", "camera"), ("rtsp://h/x", "rtsp"),
    ("RTSPS://u:p@h:1/x", "rtsp"), ("http://h/x.mjpg", "stream"), ("clip.mp4", "file"), ("/dev/videos/a.mp4", "file"),
    ("/dev/v4l/by-id/usb-Logitech_C920_1234-video-index0", "camera"), ("/dev/v4l/by-path/pci-0000:00:14.0-usb-0:1:1.0-video-index0", "camera"),
    ("/dev/null", "camera"),  # any character device is a capture device, not a file
])
def test_source_kind(source, kind):
    assert source_kind(source) == kind


def test_file_plays_at_its_own_frame_rate_then_ends(run_capture):
    # given a 12-frame MJPEG file recorded at 20 fps
    path = make_numbered_avi(N_FRAMES, FPS)
    # when it is captured without loop
    cap, slot, statuses, _ = run_capture(cam(str(path)))
    statuses.wait_for("ended", 10)
    assert cap.join(5.0), "the thread should exit after the file ended"
    # then every frame arrived in order, spaced by about 1/fps, and the camera went online then ended
    frames = slot.frames
    assert statuses.seq == ["online", "ended"], f"unexpected transitions {statuses.calls}"
    assert [f.frame_id for f in frames] == list(range(N_FRAMES)), "frame ids should count every frame once"
    levels = [int(round(f.image.mean())) for f in frames]
    assert all(abs(lv - frame_level(i)) <= 6 for i, lv in enumerate(levels)), f"frames out of order: {levels}"
    gaps = np.diff([f.ts for f in frames])
    assert abs(statistics.median(gaps) - 1 / FPS) < 0.03, f"median spacing {statistics.median(gaps):.3f} s != 1/fps"
    span = frames[-1].ts - frames[0].ts
    assert 0.8 * (N_FRAMES - 1) / FPS < span < 2.0 * (N_FRAMES - 1) / FPS, f"played {span:.2f} s, expected ~0.55 s"
    assert cap.frames_captured == N_FRAMES and cap.status == "ended"


def test_file_loops_when_asked(run_capture):
    # given the same file with loop: true
    path = make_numbered_avi(N_FRAMES, FPS)
    cap, slot, statuses, stop = run_capture(cam(str(path), loop=True))
    # when more than two lengths of the file have played
    deadline = time.monotonic() + 10
    while len(slot.frames) < 2 * N_FRAMES + 3 and time.monotonic() < deadline:
        stop.wait(0.05)
    # then the second pass repeats the first and the camera never ended
    levels = [int(round(f.image.mean())) for f in slot.frames]
    assert len(levels) >= 2 * N_FRAMES + 3, f"only {len(levels)} frames in 10 s"
    assert all(abs(levels[i + N_FRAMES] - levels[i]) <= 6 for i in range(N_FRAMES + 3)), f"no loop: {levels}"
    assert statuses.seq == ["online"], f"a looping file should stay online, got {statuses.calls}"


def test_missing_file_is_offline_with_reason_and_starts_when_it_appears(run_capture, tmp_path):
    # given a camera whose file does not exist yet
    target = tmp_path / "later.avi"
    cap, slot, statuses, _ = run_capture(cam(str(target)))
    _, status, reason = statuses.wait_for("offline", 5)
    assert reason == f"file not found: {target}", f"unclear reason {reason!r}"
    # when the file is dropped in
    wait_for(lambda: cap.reconnects >= 2, 10, "retries while the file is missing")
    attempts_before = cap.reconnects
    shutil.copy(make_numbered_avi(N_FRAMES, FPS), target)
    # then the retry loop picks it up and plays it
    statuses.wait_for("online", 5)
    statuses.wait_for("ended", 10)
    assert attempts_before >= 2, f"expected retries while the file was missing, got {attempts_before}"
    assert len(slot.frames) == N_FRAMES


@pytest.mark.parametrize("min_s, max_s, resets_after, expected", [
    (0.5, 30.0, None, [0.5, 1, 2, 4, 8, 16, 30, 30]),
    (0.05, 0.2, None, [0.05, 0.1, 0.2, 0.2, 0.2]),
    (1.0, 1.0, None, [1.0, 1.0, 1.0]),
    (0.5, 30.0, 3, [0.5, 1, 2, 0.5, 1]),  # reset() after the third delay: the source worked
])
def test_backoff_doubles_up_to_the_cap_and_resets(min_s, max_s, resets_after, expected):
    # given a backoff, when delays are drawn (with a reset where given), then they double up to the cap
    b = Backoff(min_s, max_s)
    got = []
    for i in range(len(expected)):
        if resets_after is not None and i == resets_after:
            b.reset()
        got.append(b.next_delay_s())
    assert got == pytest.approx(expected), f"delays {got}, expected {expected}"


def test_backoff_refuses_a_minimum_above_the_maximum():
    with pytest.raises(ValueError, match="min_s <= max_s"):
        Backoff(2.0, 1.0)


def test_capture_waits_out_the_backoff_and_resets_it_after_frames(run_capture, monkeypatch):
    # given a source that fails to open 5 times, then delivers 5 frames and fails a read, then works; 5 frames
    # count as "stayed up" here (the daemon asks for 5 s of frames before the backoff starts again)
    from agecam.daemon import capture

    monkeypatch.setattr(capture, "BACKOFF_RESET_AFTER_S", 0.05)
    opens: list[float] = []
    failures = 5

    def open_fn(cfg):
        opens.append(time.monotonic())
        if len(opens) <= failures:
            raise SourceError("connection refused")
        if len(opens) == failures + 1:
            return ScriptedReader(fail_after=5)
        return ScriptedReader()

    cap, slot, statuses, _ = run_capture(cam(reconnect_min_s=0.05, reconnect_max_s=3.0), open_fn=open_fn)
    # when it runs until it is online the second time
    statuses.wait_for("online", 30, nth=2)
    # then each wait between failed opens lasted at least its backoff delay (0.05, 0.1, 0.2, 0.4, 0.8: a wait can
    # only run long on a busy machine, never short, so lower bounds are exact)
    gaps = np.diff(opens[: failures + 1])
    for i, (g, e) in enumerate(zip(gaps, [0.05, 0.1, 0.2, 0.4, 0.8])):
        assert g >= e * 0.95, f"wait {i} was {g:.3f} s, shorter than its backoff {e} s (all: {np.round(gaps, 3)})"
    # and after the source had delivered frames, the retry used the minimum delay again, not the next 1.6 s
    reset_gap = opens[failures + 1] - opens[failures]
    assert reset_gap < 1.6, f"backoff not reset after a good read: {reset_gap:.3f} s"
    assert statuses.seq == ["offline", "online", "offline", "online"], f"transitions {statuses.calls}"
    assert statuses.calls[2][2] == "read failed"
    assert cap.reconnects == failures + 1


def test_a_flapping_source_does_not_reset_the_backoff(run_capture):
    # given a source that opens, delivers two frames and dies, every time (up far less than 5 s)
    opens: list[float] = []

    def open_fn(cfg):
        opens.append(time.monotonic())
        return ScriptedReader(fail_after=2)

    run_capture(cam(reconnect_min_s=0.1, reconnect_max_s=10.0), open_fn=open_fn)
    # when it has been reopened a few times
    wait_for(lambda: len(opens) >= 5, 30, "five opens of the flapping source")
    # then the waits kept growing (0.1, 0.2, 0.4, 0.8: lower bounds hold on any machine) instead of starting over
    gaps = np.diff(opens[:5])
    assert gaps[3] >= 0.8 * 0.95 and gaps[3] > gaps[0], f"backoff reset by a flapping source: {np.round(gaps, 3)}"


def test_an_unreachable_server_is_probed_often_without_growing_the_backoff(run_capture):
    # given a server that refuses TCP connections, and a 5 s minimum reconnect delay for failed opens
    opens: list[float] = []

    def open_fn(cfg):
        opens.append(time.monotonic())
        raise SourceUnreachable("cannot connect to 10.0.0.9:554: Connection refused")

    _, _, statuses, _ = run_capture(cam(reconnect_min_s=5.0, reconnect_max_s=30.0), open_fn=open_fn)
    # when it keeps refusing
    wait_for(lambda: len(opens) >= 6, 30, "six connection probes")
    # then the probes came at the probe cadence (at most ~1 s apart), far sooner than the open backoff allows
    assert opens[5] - opens[0] < 5.0, f"probes {np.round(np.diff(opens[:6]), 2)} s apart"
    assert statuses.seq == ["offline"] and "Connection refused" in statuses.calls[0][2]


@pytest.mark.parametrize("where", ["read", "late read", "open"])
def test_a_stalled_source_trips_the_watchdog_and_is_reopened(run_capture, where):
    # given a source that blocks inside read after 3 frames (forever, or returning a stale frame after 0.5 s),
    # or blocks forever inside open
    release = threading.Event()
    opens = []

    def open_fn(cfg):
        opens.append(time.monotonic())
        if len(opens) == 1:
            if where == "open":
                release.wait()
            return ScriptedReader(block_after=3, release=release, late_s=0.33 if where == "late read" else None,
                                  base=100)
        return ScriptedReader()

    try:
        cap, slot, statuses, stop = run_capture(cam(read_timeout_s=0.3, open_timeout_s=0.3), open_fn=open_fn)
        # when the watchdog notices
        _, _, reason = statuses.wait_for("offline", 5)
        # then the reason says what happened and a new reader is opened and delivers
        want = "open timed out after 0.3 s" if where == "open" else "no frame for 0.3 s"
        assert reason == want, f"reason {reason!r}, expected {want!r}"
        statuses.wait_for("online", 5, nth=1 if where == "open" else 2)
        assert len(opens) == 2, f"expected exactly one reopen, got {len(opens)} opens"
        gap = opens[1] - opens[0]
        limit = (0.6 if where == "open" else 3 * 0.02 + 0.33) + 0.05 + 2.0  # watchdog + backoff + a busy machine
        assert gap < limit, f"reopen took {gap:.2f} s after the stall"
        stale = [f.frame_id for f in slot.frames if f.image[0, 0, 0] > 103]
        assert not stale, f"frames returned after the stall were delivered: ids {stale}"
        # and stopping does not wait for the blocked reader
        stop.set()
        assert cap.join(3.0), "capture thread did not stop within 3 s (the daemon's join timeout)"
    finally:
        release.set()


def test_stop_joins_promptly_while_playing(run_capture):
    cap, slot, statuses, stop = run_capture(cam(str(make_numbered_avi(N_FRAMES, FPS)), loop=True))
    statuses.wait_for("online", 5)
    stop.set()
    assert cap.join(3.0), "capture thread did not stop within 3 s (the daemon's join timeout)"


def test_max_fps_skips_frames_before_the_slot(run_capture):
    # given a 50 fps source limited to 10 fps
    readers = []

    def open_fn(cfg):
        readers.append(ScriptedReader(0.02))
        return readers[-1]

    cap, slot, statuses, stop = run_capture(cam(max_fps=10), open_fn=open_fn)
    statuses.wait_for("online", 5)
    # when it has passed a dozen frames
    wait_for(lambda: len(slot.frames) >= 12, 30, "12 frames through max_fps 10")
    stop.set()
    cap.join(3.0)
    n, skipped, read = len(slot.frames), cap.frames_skipped, readers[0].n
    span = slot.frames[-1].ts - slot.frames[0].ts
    # then at most 10 frames per second reached the slot, and every other frame read was counted as skipped
    assert n - 1 <= 10 * span * 1.1 + 1, f"{n} frames in {span:.2f} s exceeds max_fps 10"
    assert skipped > 0 and n + skipped <= read <= n + skipped + 1, f"read {read}, passed {n}, skipped {skipped}"
    assert cap.frames_dropped >= skipped


def test_a_crashing_reader_reports_why_and_retries(run_capture):
    # given a source whose read raises after 2 frames, every time it is opened
    opens = []

    def open_fn(cfg):
        opens.append(1)
        return ScriptedReader(raise_after=2)

    cap, slot, statuses, stop = run_capture(cam(), open_fn=open_fn)
    _, _, reason = statuses.wait_for("offline", 5)
    statuses.wait_for("online", 5, nth=2)
    assert reason == "RuntimeError: kaboom in read", f"reason {reason!r}"
    assert len(opens) >= 2 and cap.alive, "the camera should keep retrying after a crash"


def test_reasons_never_carry_passwords(run_capture):
    def open_fn(cfg):
        raise SourceError("open failed for rtsp://admin:hunter2@10.0.0.5/live?token=abc")

    cap, slot, statuses, _ = run_capture(cam("rtsp://admin:hunter2@10.0.0.5/live"), open_fn=open_fn)
    _, _, reason = statuses.wait_for("offline", 5)
    assert "hunter2" not in reason and "abc" not in reason, f"secret leaked: {reason!r}"
    assert "10.0.0.5/live" in reason, f"reason lost the useful part: {reason!r}"


def test_demo_source_paces_and_ends_with_truth(run_capture):
    # given the demo scene for 0.5 s at its 15 fps
    cap, slot, statuses, _ = run_capture(cam("demo", demo_duration_s=0.5, demo_seed=3))
    statuses.wait_for("ended", 20)
    frames = slot.frames
    # then it delivered 0.5 * 15 frames with ground truth, spaced about 1/15 s, then ended
    assert len(frames) == round(0.5 * 15), f"{len(frames)} frames"
    from agecam.daemon.demo import DemoScene

    scene = DemoScene(3, fps=15, duration_s=0.5)
    for f in frames:  # the scene's own frames, in order, with their ground truth
        image, truth = scene.frame_at(f.frame_id)
        assert np.array_equal(f.image, image), f"frame {f.frame_id} is not the scene's frame {f.frame_id}"
        assert f.truth == tuple(truth), f"frame {f.frame_id} truth {f.truth} != {truth}"
    gaps = np.diff([f.ts for f in frames])
    assert abs(statistics.median(gaps) - 1 / 15) < 0.03, f"median spacing {statistics.median(gaps):.3f}"
    assert statuses.seq == ["online", "ended"]


def test_backoff_jitter_only_lengthens_and_spreads_delays():
    # given two cameras' backoffs with 20 % jitter (seeded), when drawn, then each delay is within [base, 1.2 base]
    import random

    a, b = Backoff(1.0, 8.0, jitter=0.2, rng=random.Random(1)), Backoff(1.0, 8.0, jitter=0.2, rng=random.Random(2))
    da, db = [a.next_delay_s() for _ in range(5)], [b.next_delay_s() for _ in range(5)]
    for d in (da, db):
        assert all(base <= x <= base * 1.2 for x, base in zip(d, [1, 2, 4, 8, 8])), d
    assert da != db, "two cameras retried in lockstep"


class CountingReader:
    """A split (grab/retrieve) source that counts how many frames it was asked to convert."""

    frame_interval_s = 0.02

    def __init__(self):
        self.grabbed = self.retrieved = 0

    def grab(self):
        self.grabbed += 1
        return True

    def retrieve(self):
        self.retrieved += 1
        return np.full((8, 8, 3), self.grabbed % 256, np.uint8), None

    def close(self):
        pass


def test_frames_the_pipeline_does_not_want_are_grabbed_but_never_converted(run_capture):
    # given a slot whose taker wants no frame for the next 0.5 s
    slot = RecordingSlot()
    slot.wanted_from_mono = time.monotonic() + 0.5
    reader = CountingReader()
    cap, slot, statuses, _ = run_capture(cam(), open_fn=lambda c: reader, slot=slot)
    # when the source runs for a while
    statuses.wait_for("online", 5)
    wait_for(lambda: len(slot.frames) >= 5, 10, "frames after the wanted time")
    # then frames arrived all along (the camera is online and alive) but the unwanted ones were not converted
    assert cap.frames_unwanted >= 10, f"expected ~25 unwanted frames in 0.5 s at 50 fps, got {cap.frames_unwanted}"
    assert reader.retrieved == len(slot.frames) <= reader.grabbed - cap.frames_unwanted, \
        f"converted {reader.retrieved} frames, delivered {len(slot.frames)}, grabbed {reader.grabbed}"
    # and frame ids number every frame the source gave, so the first delivered one says how many were skipped
    first = slot.frames[0].frame_id
    assert first >= cap.frames_unwanted - 1, f"first delivered frame id {first}, {cap.frames_unwanted} skipped"
    ids = [f.frame_id for f in slot.frames[:5]]
    assert ids == list(range(ids[0], ids[0] + 5)), f"wanted frames should follow each other: {ids}"


def test_a_file_read_in_grab_and_retrieve_steps_skips_frames_and_loops(tmp_path):
    # given a real 12-frame video file opened as a looping camera would open it
    from agecam.daemon.sources import open_file

    reader = open_file(cam(str(make_numbered_avi(N_FRAMES, FPS)), loop=True))
    try:
        # when every other frame is grabbed without being converted, over two passes of the file
        levels = []
        for i in range(2 * N_FRAMES):
            assert reader.grab() is True, f"grab {i} failed"
            if i % 2 == 0:
                image, _ = reader.retrieve()
                levels.append(int(round(image.mean())))
        # then the converted frames are exactly the even ones of each pass (the loop restarted the file)
        want = [frame_level(i % N_FRAMES) for i in range(0, 2 * N_FRAMES, 2)]
        assert all(abs(a - b) <= 6 for a, b in zip(levels, want)), f"got levels {levels}, expected {want}"
    finally:
        reader.close()
