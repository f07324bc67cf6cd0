"""RTSP capture against a real GStreamer RTSP server process: frames flow, server death, restart, auth, bad URLs."""
from __future__ import annotations

import time

import numpy as np
import pytest

from agecam.config import CameraConfig
from tests.helpers import RecordingSlot, free_port, wait_for
from tests.media import RtspServer, make_numbered_mp4

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("rtsp_ready")]  # the server is required: never a skip

FPS = 15.0


def rtsp_cam(url: str, **kw) -> CameraConfig:
    base = dict(name="door", source=url, open_timeout_s=5.0, read_timeout_s=2.0, reconnect_min_s=0.2,
                reconnect_max_s=1.0)
    base.update(kw)
    return CameraConfig(**base)


@pytest.fixture(scope="module")
def clip():
    return make_numbered_mp4(n_frames=15, fps=FPS)  # a 1 s loop: a few seconds of capture cross its end


def frames_after(slot: RecordingSlot, t: float) -> int:
    return sum(1 for f in slot.frames if f.ts >= t)


def test_rtsp_frames_flow_survive_a_server_restart_on_the_same_port(clip, run_capture):
    with RtspServer(clip) as server:
        # given a capture of a looping 1 s clip served over RTSP
        t0 = time.monotonic()
        cap, slot, statuses, stop = run_capture(rtsp_cam(server.url))
        statuses.wait_for("online", 15)
        open_s = time.monotonic() - t0
        # when it runs past several ends of the clip (waited for: three loops' worth of frames)
        wait_for(lambda: len(slot.frames) >= 3 * 15, 60, "three loops of the 15-frame clip")
        # then the frames are the clip's, decoded in order across its ends, with no stall, and it stayed online
        frames = list(slot.frames)
        levels = [float(f.image.mean()) for f in frames]
        assert np.diff(sorted(levels[:15])).min() > 3, f"not 15 distinct numbered frames: {np.round(levels[:15])}"
        off = [i for i in range(len(levels) - 15) if abs(levels[i + 15] - levels[i]) > 2]
        assert len(off) <= 3, f"the clip did not repeat in order (at {off[:10]}): levels {np.round(levels[:45])}"
        gaps_s = np.diff([f.ts for f in frames])
        assert gaps_s.max() < 2.0, f"a {gaps_s.max():.2f} s stall between frames (read_timeout_s is 2)"
        assert statuses.seq == ["online"], f"transitions {statuses.calls}"
        assert frames[0].image.shape == (120, 160, 3)

        # when the server dies
        server.kill()
        t_kill = time.monotonic()
        _, _, reason = statuses.wait_for("offline", 10)
        offline_s = time.monotonic() - t_kill
        assert reason in ("read failed", "no frame for 2 s"), f"unexpected reason {reason!r}"

        # and comes back on the same port a little later
        stop.wait(1.0)
        server.start()
        t_restart = time.monotonic()
        statuses.wait_for("online", 15, nth=2)
        reconnect_s = time.monotonic() - t_restart
        # then the same capture thread is online again and frames flow
        t_online = time.time()
        wait_for(lambda: frames_after(slot, t_online) >= FPS, 30, "a second's worth of frames after the restart")
        assert cap.alive and statuses.seq == ["online", "offline", "online"], f"transitions {statuses.calls}"
        assert cap.reconnects >= 1
        print(f"\nRTSP measured: first open {open_s:.2f} s, offline {offline_s:.2f} s after the kill "
              f"({reason}), online {reconnect_s:.2f} s after the restart (server ready in {server.start_s:.2f} s)")


def test_rtsp_with_basic_auth(clip, run_capture):
    with RtspServer(clip, user="viewer", password="s3cret-pw") as server:
        # given the right and a wrong password for the same protected stream
        good, good_slot, good_st, _ = run_capture(rtsp_cam(server.url, name="good"))
        bad_url = server.url.replace("s3cret-pw", "wrong-pw")
        bad, _, bad_st, _ = run_capture(rtsp_cam(bad_url, name="bad"))
        # then the right one streams and the wrong one is offline with a reason that names no password
        good_st.wait_for("online", 15)
        _, _, reason = bad_st.wait_for("offline", 15)
        assert "wrong-pw" not in reason and "s3cret" not in reason, f"password in reason {reason!r}"
        assert f"127.0.0.1:{server.port}/cam" in reason, f"reason should name the stream: {reason!r}"
        assert bad_st.seq == ["offline"]


def test_unreachable_rtsp_url_is_offline_with_a_clear_secret_free_reason(run_capture):
    # given an RTSP URL with a password where nothing listens
    port = free_port()
    cap, _, statuses, _ = run_capture(rtsp_cam(f"rtsp://admin:topsecret@127.0.0.1:{port}/live", open_timeout_s=2.0))
    # then it is offline quickly, says why, never shows the password, and keeps retrying
    _, _, reason = statuses.wait_for("offline", 5)
    assert reason == f"cannot connect to 127.0.0.1:{port}: Connection refused", f"reason {reason!r}"
    wait_for(lambda: cap.reconnects >= 2, 30, "retries of an unreachable camera")
    assert "topsecret" not in repr(statuses.calls)


def test_a_frozen_rtsp_server_trips_the_watchdog_and_recovers(run_capture):
    import signal

    with RtspServer(None) as server:  # live videotestsrc, encoded by x264 as it plays
        # given a live RTSP stream that is online
        cap, slot, statuses, stop = run_capture(rtsp_cam(server.url, read_timeout_s=1.5))
        statuses.wait_for("online", 15)
        # when the server freezes (the TCP connection stays open, nothing arrives)
        server.proc.send_signal(signal.SIGSTOP)
        t_freeze = time.monotonic()
        try:
            _, _, reason = statuses.wait_for("offline", 10)
            offline_s = time.monotonic() - t_freeze
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # then the camera is offline within about read_timeout_s and comes back once the server thaws
        assert reason in ("read failed", "no frame for 1.5 s"), f"unexpected reason {reason!r}"
        assert offline_s < 1.5 + 2.0, f"offline only {offline_s:.2f} s after the freeze"
        statuses.wait_for("online", 15, nth=2)
        n_before = len(slot.frames)
        wait_for(lambda: len(slot.frames) - n_before >= 5, 30, "frames flowing again after the thaw")


def test_a_restarted_server_is_back_online_within_two_seconds(run_capture):
    # given a live RTSP camera with the default reconnect settings
    server = RtspServer(make_numbered_mp4(n_frames=15, fps=FPS)).start()
    cap, _, statuses, _ = run_capture(rtsp_cam(server.url, reconnect_min_s=0.5, reconnect_max_s=30.0))
    statuses.wait_for("online", 30)
    back_s = []
    try:
        for i in range(1, 6):
            # when the server dies for 1-3 s and comes back on the same port (the camera ran ~6 s before)
            time.sleep(6.0)
            server.kill()
            statuses.wait_for("offline", 30, nth=i)
            time.sleep(1.0 + (i % 3))
            server.start()
            t_up = time.monotonic()
            statuses.wait_for("online", 30, nth=i + 1)
            back_s.append(time.monotonic() - t_up)
    finally:
        server.stop()
    # then each return is reported online about a second after the server listens (goal: 2 s; a loaded machine
    # gets some slack on the worst one, never on the typical one)
    print(f"\nonline after the server returned: {[round(x, 2) for x in back_s]} s")
    assert sorted(back_s)[2] <= 2.0, f"median return {sorted(back_s)[2]:.2f} s > 2 s: {back_s}"
    assert max(back_s) <= 4.0, f"slowest return {max(back_s):.2f} s: {back_s}"
