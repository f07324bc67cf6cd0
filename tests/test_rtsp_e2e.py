"""The whole daemon on a real RTSP server: faces tracked, server killed and restarted, camera comes back by itself."""
import json
import time

import pytest

from tests.helpers import running_app
from tests.media import RtspServer, make_demo_mp4

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("rtsp_ready")]


def test_rtsp_camera_survives_server_restart(rtsp_ready, models_dir):
    # given a real RTSP server with a password, serving the demo scene, and the daemon reading it
    server = RtspServer(make_demo_mp4(seconds=12.0), user="viewer", password="pa55word").start()
    doc = {"cameras": [{"name": "door", "source": server.url, "open_timeout_s": 5, "read_timeout_s": 2,
                        "reconnect_min_s": 0.5, "reconnect_max_s": 2}]}
    with running_app(doc, models_dir) as run:
        sub = run.sub
        # then frames flow and faces are tracked
        assert sub.wait_for(lambda e: e["type"] == "track.start", 60), "no track.start from the RTSP camera"
        # when the server dies
        server.kill()
        assert sub.wait_for(lambda e: e.get("status") == "offline", 20), "no camera.status offline after the kill"
        n_before = len(sub.events)
        # and comes back on the same port
        server.start()
        t0 = time.monotonic()
        assert sub.wait_for(lambda e: e.get("status") == "online" and e["seq"] > sub.events[n_before - 1]["seq"], 30), \
            "camera did not come back online after the server restarted"
        reconnect_s = time.monotonic() - t0
        assert sub.wait_for(lambda e: e["type"] == "track.start" and e["seq"] > sub.events[n_before - 1]["seq"], 60), \
            "no new track after the reconnect"
        print(f"reconnected {reconnect_s:.1f} s after the server restarted")
    server.stop()
    assert not run.stuck, f"threads did not stop: {run.stuck}"
    statuses = [e["status"] for e in sub.events if e["type"] == "camera.status"]
    assert statuses[:1] == ["online"] and "offline" in statuses and statuses.count("online") >= 2, statuses
    offline = [e["reason"] for e in sub.events if e.get("status") == "offline"]
    assert all(r for r in offline), f"offline without a reason: {offline}"
    assert "pa55word" not in json.dumps(sub.events), "the RTSP password leaked into events"
    assert run.app.cameras["door"].reconnects >= 1
