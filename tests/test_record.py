"""Recording: time-based Matroska segments written off the pipeline's thread, retention, a full disk."""
from __future__ import annotations

import os
import time

import cv2
import numpy as np
import pytest

from agecam.daemon import record
from agecam.daemon.annotate import TrackView, annotate
from agecam.daemon.metrics import Metrics
from agecam.daemon.record import Recorder, RecordSettings, apply_retention, segment_name
from agecam.events import AgeEstimate
from tests.helpers import read_video, wait_for

STABLE = AgeEstimate(30.0, 1.5, 27.5, 32.5, 8, True)


def _frame(i: int) -> np.ndarray:
    img = np.full((480, 640, 3), (40 + 3 * i) % 200, np.uint8)
    return annotate(img, [TrackView(1, (100 + 5 * i, 100, 200 + 5 * i, 220), STABLE, 0.9)], f"frame {i}")


def _settings(tmp_path, **kw) -> RecordSettings:
    base = dict(path=tmp_path / "rec", segment_s=300.0, keep_hours=24.0, max_gb=1.0, codec="auto")
    base.update(kw)
    return RecordSettings(**base)


def test_frames_are_written_in_order_into_time_based_segments(tmp_path):
    # given a recorder with 1 s segments
    m = Metrics(["lobby"])
    rec = Recorder(_settings(tmp_path, segment_s=1.0), "lobby", fps=10, metrics=m)
    rec.start()
    written = []
    # when 25 frames arrive over 2.5 s, one of another size
    for i in range(25):
        img = _frame(i) if i != 5 else cv2.resize(_frame(i), (320, 240))
        assert rec.write(img), f"frame {i} was dropped"
        written.append(cv2.resize(img, (640, 480)))
        time.sleep(0.1)
    assert rec.close(5.0), "the recorder did not finish"
    # then there are several .mkv segments named by their UTC start, holding every frame in order
    segs = sorted((tmp_path / "rec" / "lobby").glob("*.mkv"))
    assert len(segs) >= 2, f"segments: {[s.name for s in segs]}"
    assert all(len(s.stem) == 16 and s.stem.endswith("Z") for s in segs), [s.name for s in segs]
    frames = [f for s in segs for f in read_video(s)]
    assert len(frames) == 25, f"{len(frames)} frames in {len(segs)} segments"
    errors = [float(np.abs(f.astype(np.int16) - w).mean()) for f, w in zip(frames, written)]
    assert max(errors) < 12, f"recorded frames differ from the written ones: {np.round(errors, 1)}"
    assert m.registry.get_sample_value("agecam_recorded_bytes_total", {"camera": "lobby"}) == \
        sum(s.stat().st_size for s in segs)


def test_retention_deletes_the_oldest_by_age_and_by_size(tmp_path):
    # given six 1 MB segments, one an hour apart
    now = time.time()
    files = []
    for k in range(6):
        p = tmp_path / segment_name(now - (6 - k) * 3600)
        p.write_bytes(b"\0" * 1_000_000)
        os.utime(p, (now - (6 - k) * 3600, now - (6 - k) * 3600))
        files.append(p)
    # when kept for 4.5 hours, then the two older than that go
    assert apply_retention(tmp_path, 4.5 * 3600, 1e12, now) == files[:2]
    # when at most 2.5 MB are kept, then the oldest go until the rest fits
    assert apply_retention(tmp_path, 1e9, 2.5e6, now) == files[2:4]
    assert sorted(tmp_path.glob("*.mkv")) == files[4:]


def test_a_full_disk_stops_recording_with_an_error_and_a_metric(tmp_path, monkeypatch):
    # given a disk that looks full
    monkeypatch.setattr(record, "MIN_FREE_BYTES", 1 << 62)
    m = Metrics(["lobby"])
    rec = Recorder(_settings(tmp_path), "lobby", fps=10, metrics=m)
    rec.start()
    try:
        # when frames come, then recording stops (counted), later frames are refused at once, nothing is written
        rec.write(_frame(0))
        wait_for(lambda: m.registry.get_sample_value("agecam_record_errors_total", {"camera": "lobby"}) == 1, 10,
                 "the recording error to be counted")
        assert not rec.write(_frame(1)), "a paused recorder accepted a frame"
        assert not list((tmp_path / "rec" / "lobby").glob("*.mkv"))
    finally:
        assert rec.close(5.0)


def test_a_full_queue_drops_instead_of_blocking(tmp_path, monkeypatch):
    # given a recorder whose thread has not started (nothing drains its queue)
    rec = Recorder(_settings(tmp_path), "lobby", fps=10)
    # when more frames come than the queue holds, then the extra ones are refused at once
    t0 = time.monotonic()
    accepted = [rec.write(_frame(0)) for _ in range(record.QUEUE_FRAMES + 5)]
    assert time.monotonic() - t0 < 1.0 and accepted.count(False) == 5, accepted


@pytest.mark.parametrize("codec", ["mp4v", "mjpg"])
def test_each_offered_codec_writes_a_readable_segment(tmp_path, codec):
    rec = Recorder(_settings(tmp_path, codec=codec), "lobby", fps=10)
    rec.start()
    for i in range(5):
        rec.write(_frame(i))
    assert rec.close(5.0)
    (seg,) = (tmp_path / "rec" / "lobby").glob("*.mkv")
    assert len(read_video(seg)) == 5
