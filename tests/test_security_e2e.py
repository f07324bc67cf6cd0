"""The real daemon as an exposed service: CURVE revocation by SIGHUP, a canary secret that appears nowhere, and a
stalled viewer that cannot delay SIGTERM. Each runs `agecam run` under the unit's seccomp sandbox."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import time

import pytest
import zmq

from agecam.keys import generate, load_public, load_secret
from tests.helpers import Daemon, free_port, http_get, wait_for
from tests.media import RtspServer, make_demo_mp4

pytestmark = pytest.mark.slow

# a password with '@' and ':' (FFmpeg accepts such URLs), and a token, each a canary that must appear nowhere
CANARY_PASSWORD = "Kan@ry:pw-7f3e@91"
CANARY_TOKEN = "canary-token-5c1d9e0b7a"


def _curve_sub(endpoint: str, server_key, client_secret) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey = load_public(server_key, "test")
    s.curve_publickey, s.curve_secretkey = load_secret(client_secret, "test")
    s.setsockopt_string(zmq.SUBSCRIBE, "")
    s.connect(endpoint)
    return s


def _drain(socks: dict[str, zmq.Socket], seconds: float) -> dict[str, list[dict]]:
    got = {n: [] for n in socks}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, s in socks.items():
            while s.poll(0):
                got[name].append(json.loads(s.recv_multipart()[1]))
        time.sleep(0.05)
    return got


def test_a_key_revoked_by_sighup_stops_receiving(models_dir, tmp_path):
    # given a daemon publishing with CURVE to an allow-list holding alice's and bob's keys
    generate(tmp_path / "keys", "server")
    for name in ("alice", "bob"):
        generate(tmp_path / "keys", name)
    clients = tmp_path / "clients"
    clients.mkdir()
    for name in ("alice", "bob"):
        shutil.copy(tmp_path / "keys" / f"{name}.key", clients / f"{name}.key")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = {"cameras": [{"name": "lobby", "source": "demo", "loop": True}],
           "events": {"bind": endpoint, "update_max_interval_s": 0.5,
                      "curve": {"server_secret_key": str(tmp_path / "keys" / "server.key_secret"),
                                "authorized_clients": str(clients)}},
           "metrics": {"bind": None}, "preview": {"bind": None}, "runtime": {"models_dir": str(models_dir)}}
    d = Daemon(tmp_path, cfg)
    server_key = tmp_path / "keys" / "server.key"
    subs = {n: _curve_sub(endpoint, server_key, tmp_path / "keys" / f"{n}.key_secret") for n in ("alice", "bob")}
    try:
        d.wait_ready()
        got = {n: [] for n in subs}
        wait_for(lambda: [got[n].extend(v) for n, v in _drain(subs, 0.5).items()] and all(got.values()), 60,
                 "events reaching both allowed subscribers")
        # when bob's key is removed from the allow-list and the daemon reloads
        (clients / "bob.key").unlink()
        t_hup = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.notify.with_field("READY=1", since_s=t_hup), 60, "READY=1 after the reload")
        # (what the old socket queued before it closed, within its 2 s linger, is drained and set aside)
        _drain(subs, 3.0)
        after = _drain(subs, 4.0)
        # then alice keeps receiving and bob receives nothing more
        assert after["alice"], f"alice received nothing after the reload:\n{d.log()[-2000:]}"
        assert after["bob"] == [], f"bob still received {len(after['bob'])} events after his key was revoked"
    finally:
        for s in subs.values():
            s.close(0)
        code = d.stop()
    assert code == 0, f"daemon exited {code}:\n{d.log()[-3000:]}"


def test_a_canary_secret_appears_nowhere(models_dir, tmp_path, rtsp_ready, monkeypatch):
    # given an RTSP camera whose password (with '@' and ':') comes from the environment, a second camera with a
    # wrong password, and a preview and /metrics on every address with a token
    server = RtspServer(make_demo_mp4(seconds=6.0), user="viewer", password=CANARY_PASSWORD).start()
    monkeypatch.setenv("AGECAM_TEST_RTSP_PW", CANARY_PASSWORD)
    monkeypatch.setenv("AGECAM_TEST_TOKEN", CANARY_TOKEN)
    good = f"rtsp://viewer:${{env:AGECAM_TEST_RTSP_PW}}@127.0.0.1:{server.port}/cam"
    bad = f"rtsp://viewer:{CANARY_PASSWORD}-wrong@127.0.0.1:{server.port}/cam?pass={CANARY_PASSWORD}"
    preview_port, metrics_port = free_port(), free_port()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = {"cameras": [{"name": "door", "source": good, "read_timeout_s": 3},
                       {"name": "back", "source": bad, "reconnect_min_s": 0.5, "reconnect_max_s": 1}],
           "events": {"bind": endpoint},
           "metrics": {"bind": f"0.0.0.0:{metrics_port}", "token": "${env:AGECAM_TEST_TOKEN}"},
           "preview": {"bind": f"0.0.0.0:{preview_port}", "token": "${env:AGECAM_TEST_TOKEN}"},
           "runtime": {"models_dir": str(models_dir), "log_level": "DEBUG"}}
    d = Daemon(tmp_path, cfg)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt_string(zmq.SUBSCRIBE, "")
    sub.connect(endpoint)
    auth = {"Authorization": f"Bearer {CANARY_TOKEN}"}
    try:
        d.wait_ready()
        events: list[bytes] = []

        def collect():
            while sub.poll(0):
                events.append(sub.recv_multipart()[1])
            return any(b'"track.start"' in e for e in events) and any(b'"offline"' in e for e in events)

        wait_for(collect, 90, "a track from the good camera and an offline status from the bad one")
        # when every surface is read: metrics, health, the page (fetched with the token), a snapshot
        surfaces = {
            "metrics": http_get(f"http://127.0.0.1:{metrics_port}/metrics", auth)[1],
            "healthz": http_get(f"http://127.0.0.1:{preview_port}/healthz", auth)[1],
            "page": http_get(f"http://127.0.0.1:{preview_port}/?token={CANARY_TOKEN}")[1],
            "events": b"\n".join(events),
        }
    finally:
        sub.close(0)
        code = d.stop()
        server.stop()
    surfaces["log (stdout and stderr, DEBUG)"] = d.log().encode()
    # then the daemon really served and failed (so the surfaces had every chance to leak), and no canary is anywhere
    assert code == 0, f"daemon exited {code}:\n{d.log()[-3000:]}"
    assert b"agecam_camera_up" in surfaces["metrics"] and b'"door"' in surfaces["healthz"], surfaces["healthz"][:300]
    assert b"stream.mjpg" in surfaces["page"] and b"offline" in surfaces["events"]
    for secret in (CANARY_PASSWORD, CANARY_TOKEN, "Kan@ry", "pw-7f3e@91"):  # whole, and each side of its '@'
        leaks = [name for name, text in surfaces.items() if secret.encode() in text]
        assert not leaks, f"{secret!r} leaked into {leaks}"


def test_a_stalled_viewer_does_not_delay_sigterm(models_dir, tmp_path):
    # given a daemon with a preview and a viewer that opened a stream and stopped reading
    preview_port = free_port()
    cfg = {"cameras": [{"name": "lobby", "source": "demo", "loop": True}],
           "events": {"bind": f"tcp://127.0.0.1:{free_port()}"}, "metrics": {"bind": None},
           "preview": {"bind": f"127.0.0.1:{preview_port}", "max_fps": 30, "client_timeout_s": 30},
           "runtime": {"models_dir": str(models_dir)}}
    d = Daemon(tmp_path, cfg)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        d.wait_ready()
        s.settimeout(30)
        s.connect(("127.0.0.1", preview_port))
        s.sendall(b"GET /cameras/lobby/stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(1, socket.MSG_PEEK), "the stream did not start"
        time.sleep(3.0)  # the server's socket buffer fills: its writes now block (client_timeout_s is 30 s)
        # when SIGTERM arrives
        t0 = time.monotonic()
        code = d.stop()
        took_s = time.monotonic() - t0
    finally:
        s.close()
    # then the daemon exits cleanly well within systemd's TimeoutStopSec (20 s), not after the viewer's timeout
    assert code == 0, f"daemon exited {code}:\n{d.log()[-3000:]}"
    assert took_s < 10.0, f"stop took {took_s:.1f} s with a stalled viewer"
    print(f"stop with a stalled viewer: {took_s:.2f} s")
