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
from agecam.daemon.sources import CaptureThread, SourceError, source_kind
from tests.media import frame_level, make_numbered_avi

FPS = 20.0
N_FRAMES = 12


class RecordingSlot(LatestSlot):
    """A LatestSlot that also keeps every frame put into it, so a test sees frames no consumer took."""

    def __init__(self):
        super().__init__()
        self.frames = []

    def put(self, item):
        self.frames.append(item)
        return super().put(item)


class Statuses:
    """Collects on_status calls; wait_for blocks until a given status has been reported."""

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []
        self.cond = threading.Condition()

    def __call__(self, camera: str, status: str, reason: str) -> None:
        with self.cond:
            self.calls.append((camera, status, reason))
            self.cond.notify_all()

    @property
    def seq(self) -> list[str]:
        return [c[1] for c in self.calls]

    def wait_for(self, status: str, timeout_s: float, nth: int = 1) -> tuple[str, str, str]:
        with self.cond:
            ok = self.cond.wait_for(lambda: sum(1 for c in self.calls if c[1] == status) >= nth, timeout_s)
        assert ok, f"no {status!r} (#{nth}) within {timeout_s} s; statuses so far: {self.calls}"
        return [c for c in self.calls if c[1] == status][nth - 1]


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


@pytest.fixture
def run_capture():
    """Start CaptureThreads; on teardown stop them and check each joined within 1 s."""
    started = []

    def start(cfg: CameraConfig, open_fn=None, slot=None):
        stop = threading.Event()
        statuses = Statuses()
        slot = slot or RecordingSlot()
        cap = CaptureThread(cfg, slot, stop, on_status=statuses, open_fn=open_fn)
        cap.start()
        started.append((cap, stop))
        return cap, slot, statuses, stop

    yield start
    for cap, stop in started:
        stop.set()
    for cap, _ in started:
        assert cap.join(2.0), f"{cap.name} did not stop within 2 s"


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
    assert 0.04 <= time.monotonic() - t0 < 0.5, "get(timeout) did not honour its timeout"


def test_slot_get_wakes_when_another_thread_puts():
    slot = LatestSlot()
    threading.Timer(0.05, slot.put, args=("x",)).start()
    t0 = time.monotonic()
    assert slot.get(2.0) == "x"
    assert time.monotonic() - t0 < 1.0, "get did not wake on put"


@pytest.mark.parametrize("source, kind", [
    ("demo", "demo"), (0, "camera"), ("2", "camera"), ("/dev/video1", "camera"), ("rtsp://h/x", "rtsp"),
    ("RTSPS://u:p@h:1/x", "rtsp"), ("http://h/x.mjpg", "stream"), ("clip.mp4", "file"), ("/dev/videos/a.mp4", "file"),
])
def test_source_kind(source, kind):
    assert source_kind(source) == kind


def test_file_plays_at_its_own_frame_rate_then_ends(run_capture):
    # given a 12-frame MJPEG file recorded at 20 fps
    path = make_numbered_avi(N_FRAMES, FPS)
    # when it is captured without loop
    cap, slot, statuses, _ = run_capture(cam(str(path)))
    statuses.wait_for("ended", 10)
    assert cap.join(1.0), "the thread should exit after the file ended"
    # then every frame arrived in order, spaced by about 1/fps, and the camera went online then ended
    frames = slot.frames
    assert statuses.seq == ["online", "ended"], f"unexpected transitions {statuses.calls}"
    assert [f.frame_id for f in frames] == list(range(N_FRAMES)), "frame ids should count every frame once"
    levels = [int(round(f.image.mean())) for f in frames]
    assert all(abs(lv - frame_level(i)) <= 6 for i, lv in enumerate(levels)), f"frames out of order: {levels}"
    gaps = np.diff([f.ts for f in frames])
    assert abs(statistics.median(gaps) - 1 / FPS) < 0.015, f"median spacing {statistics.median(gaps):.3f} s != 1/fps"
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
    time.sleep(0.3)  # a few retries happen meanwhile
    attempts_before = cap.reconnects
    shutil.copy(make_numbered_avi(N_FRAMES, FPS), target)
    # then the retry loop picks it up and plays it
    statuses.wait_for("online", 5)
    statuses.wait_for("ended", 10)
    assert attempts_before >= 2, f"expected retries while the file was missing, got {attempts_before}"
    assert len(slot.frames) == N_FRAMES


def test_backoff_doubles_up_to_the_cap_and_resets_after_frames(run_capture):
    # given a source that fails to open 6 times, then delivers 5 frames and fails a read, then works
    opens: list[float] = []
    failures = 6

    def open_fn(cfg):
        opens.append(time.monotonic())
        if len(opens) <= failures:
            raise SourceError("connection refused")
        if len(opens) == failures + 1:
            return ScriptedReader(fail_after=5)
        return ScriptedReader()

    cap, slot, statuses, _ = run_capture(cam(reconnect_min_s=0.05, reconnect_max_s=0.2), open_fn=open_fn)
    # when it runs until it is online the second time
    statuses.wait_for("online", 10, nth=2)
    # then the waits between failed opens grew 0.05, 0.1, 0.2 and stayed at the 0.2 cap
    gaps = np.diff(opens[: failures + 1])
    expected = [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]
    for i, (g, e) in enumerate(zip(gaps, expected)):
        assert e * 0.9 <= g <= e + 0.1, f"wait {i} was {g:.3f} s, expected ~{e} s (all: {np.round(gaps, 3)})"
    # and after the source had delivered frames, the first retry used the minimum delay again
    reset_gap = opens[failures + 1] - opens[failures]
    assert reset_gap < 5 * 0.02 + 0.05 + 0.15, f"backoff not reset after a good read: {reset_gap:.3f} s"
    assert statuses.seq == ["offline", "online", "offline", "online"], f"transitions {statuses.calls}"
    assert statuses.calls[2][2] == "read failed"
    assert cap.reconnects == failures + 1


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
        limit = (0.6 if where == "open" else 3 * 0.02 + 0.33) + 0.05 + 0.3
        assert gap < limit, f"reopen took {gap:.2f} s after the stall"
        stale = [f.frame_id for f in slot.frames if f.image[0, 0, 0] > 103]
        assert not stale, f"frames returned after the stall were delivered: ids {stale}"
        # and stopping does not wait for the blocked reader
        t0 = time.monotonic()
        stop.set()
        assert cap.join(1.0), "capture thread did not stop within 1 s"
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()


def test_stop_joins_within_a_second_while_playing(run_capture):
    cap, slot, statuses, stop = run_capture(cam(str(make_numbered_avi(N_FRAMES, FPS)), loop=True))
    statuses.wait_for("online", 5)
    t0 = time.monotonic()
    stop.set()
    assert cap.join(1.0), "capture thread did not stop within 1 s"
    assert time.monotonic() - t0 < 1.0


def test_max_fps_skips_frames_before_the_slot(run_capture):
    # given a 50 fps source limited to 10 fps
    cap, slot, statuses, stop = run_capture(cam(max_fps=10), open_fn=lambda cfg: ScriptedReader(0.02))
    statuses.wait_for("online", 5)
    # when it runs for about a second
    stop.wait(1.2)
    n, skipped = len(slot.frames), cap.frames_skipped
    span = slot.frames[-1].ts - slot.frames[0].ts
    # then about 10 frames per second reach the slot and the rest are counted as skipped and dropped
    assert n - 1 <= 10 * span * 1.1 + 1, f"{n} frames in {span:.2f} s exceeds max_fps 10"
    assert n >= 6, f"only {n} frames passed in ~1 s"
    assert skipped >= 2 * n, f"expected most frames skipped, got {skipped} skipped vs {n} passed"
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
    assert len(opens) >= 2 and cap.is_alive(), "the camera should keep retrying after a crash"


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
    assert all(isinstance(f.truth, tuple) for f in frames), "demo frames carry truth"
    assert frames[0].image.shape == (480, 640, 3)
    gaps = np.diff([f.ts for f in frames])
    assert abs(statistics.median(gaps) - 1 / 15) < 0.02, f"median spacing {statistics.median(gaps):.3f}"
    assert statuses.seq == ["online", "ended"]
