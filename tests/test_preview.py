"""Preview: annotation pixels, the HTTP routes, token enforcement, MJPEG streaming, healthz and recording."""
from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from agecam.config import PreviewConfig
from agecam.daemon.annotate import NO_AGE_BGR, STABLE_BGR, TENTATIVE_BGR, UNSTABLE_BGR, TrackView, annotate
from agecam.daemon.health import CameraHealth, HealthReport
from agecam.daemon.hub import PreviewHub
from agecam.daemon.metrics import Metrics
from agecam.daemon.preview import PreviewServer
from agecam.events import AgeEstimate
from tests.helpers import wait_for

STABLE = AgeEstimate(34.2, 3.1, 29.0, 39.5, 12, True)
UNSTABLE = AgeEstimate(27.6, 6.4, 20.0, 35.0, 3, False)
TOKEN = "s3cret-preview-token"


def _scene(h: int = 480, w: int = 640) -> np.ndarray:
    """A textured grey frame (a gradient, so JPEG and drawing have something to change)."""
    y, x = np.mgrid[0:h, 0:w]
    g = ((x + y) % 64 + 80).astype(np.uint8)
    return np.dstack([g, g, g])


def _colour_fraction(img: np.ndarray, bgr: tuple[int, int, int], tol: int = 12) -> float:
    return float(np.all(np.abs(img.astype(int) - bgr) <= tol, axis=2).mean())


# ---------------------------------------------------------------- annotate (pure)

def test_annotate_is_pure_and_draws_inside_the_box():
    # given a frame and one stable track
    img = _scene()
    before = img.copy()
    t = TrackView(17, (200, 150, 320, 300), STABLE, 0.9)
    # when annotated
    out = annotate(img, [t], "lobby 12.0 fps faces 1")
    # then the input is untouched, and the box border carries the stable colour
    assert np.array_equal(img, before), "annotate modified its input"
    assert out.shape == img.shape and out.dtype == np.uint8
    border = out[149:151, 210:310]
    assert _colour_fraction(border, STABLE_BGR) > 0.9, "top border of a stable track is not drawn in STABLE_BGR"
    # and pixels far from every drawing are unchanged
    assert np.array_equal(out[400:, 400:], img[400:, 400:]), "annotate changed pixels away from tracks and status"


def test_annotate_writes_a_label_above_the_box():
    # given the same track with and without an age
    img = _scene()
    with_age = annotate(img, [TrackView(17, (200, 150, 320, 300), STABLE, 0.9)], "")
    label = with_age[118:150, 200:320]
    # then a filled label in the box colour sits above it with dark text strokes inside
    assert _colour_fraction(label, STABLE_BGR) > 0.4, "no label background above the box"
    assert (label.max(axis=2) < 60).mean() > 0.03, "no dark text strokes in the label"
    # and the text depends on the estimate (age 34 vs age 61)
    other = annotate(img, [TrackView(17, (200, 150, 320, 300), AgeEstimate(61, 2, 58, 64, 20, True), 0.9)], "")
    assert not np.array_equal(other[118:150, 200:320], label), "label text did not change with the age"


@pytest.mark.parametrize("view, colour", [
    (TrackView(1, (100, 100, 200, 220), STABLE, 0.9), STABLE_BGR),
    (TrackView(1, (100, 100, 200, 220), UNSTABLE, 0.9), UNSTABLE_BGR),
    (TrackView(1, (100, 100, 200, 220), None, None), NO_AGE_BGR),
    (TrackView(1, (100, 100, 200, 220), None, None, confirmed=False), TENTATIVE_BGR),
])
def test_box_colour_tells_the_estimate_state(view, colour):
    # given a track in one state, when annotated, then its left border uses that state's colour
    out = annotate(_scene(), [view], "")
    left = out[110:210, 100:101]
    assert _colour_fraction(left, colour) > 0.4, f"left border not in {colour} for {view}"


def test_unstable_estimate_is_dashed_and_stable_is_solid():
    # given two tracks differing only in stability
    img = _scene()
    solid = annotate(img, [TrackView(1, (100, 100, 300, 300), STABLE, 0.9)], "")[300, 100:300]
    dashed = annotate(img, [TrackView(1, (100, 100, 300, 300), UNSTABLE, 0.9)], "")[300, 100:300]
    # then the stable bottom edge is continuous and the unstable one has gaps
    assert _colour_fraction(solid[None], STABLE_BGR) > 0.95, "stable box edge is not solid"
    frac = _colour_fraction(dashed[None], UNSTABLE_BGR)
    assert 0.3 < frac < 0.8, f"unstable box edge should be dashed, coloured fraction {frac:.2f}"


def test_low_quality_changes_the_label_and_the_bar():
    # given the same track with a good and a poor crop
    img = _scene()
    good = annotate(img, [TrackView(1, (100, 100, 200, 220), STABLE, 0.9)], "")
    poor = annotate(img, [TrackView(1, (100, 100, 200, 220), STABLE, 0.1)], "")
    # then the quality bar right of the box is mostly green when good and short and red when poor
    bar_good, bar_poor = good[100:220, 203:206], poor[100:220, 203:206]
    green = lambda a: ((a[..., 1] > 150) & (a[..., 2] < 100)).mean()  # noqa: E731
    assert green(bar_good) > 0.7, "good quality should fill the bar green"
    assert green(bar_poor) < 0.05 and (bar_poor[..., 2] > 150).mean() > 0.05, "poor quality should show a short red bar"
    # and the label differs (a '?' mark)
    assert not np.array_equal(good[60:100, 100:220], poor[60:100, 100:220]), "low quality left the label unchanged"


def test_status_line_is_drawn_on_top():
    # given a status text, when annotated, then the top band changes and has bright text on a darkened band
    img = _scene()
    out = annotate(img, [], "lobby  online  12.3 fps  faces 2")
    band = out[:20, :300]
    assert (band.max(axis=2) > 200).mean() > 0.03, "no bright status text in the top band"
    assert band.mean() < img[:20, :300].mean(), "status band is not darkened"
    assert np.array_equal(annotate(img, [], ""), img), "an empty status and no tracks must leave the frame unchanged"


def test_boxes_off_the_image_are_clipped_not_fatal():
    # given boxes partly and wholly outside the frame, when annotated, then nothing fails
    img = _scene(120, 160)
    partly = TrackView(1, (-50, -50, 40, 40), STABLE, 0.5)
    out = annotate(img, [partly, TrackView(2, (500, 500, 600, 600), UNSTABLE, 0.5)], "")
    # and the visible part of the first box is drawn: its right edge runs down from the top
    assert _colour_fraction(out[:38, 39:42], STABLE_BGR, tol=40) > 0.3, "the visible edge of a clipped box is missing"
    # and the box wholly outside draws nothing
    assert np.array_equal(out, annotate(img, [partly], "")), "a box wholly off the frame changed the image"


# ---------------------------------------------------------------- hub

def test_hub_encodes_only_on_demand_and_once_per_frame():
    # given a hub with metrics and published frames
    m = Metrics(["lobby"])
    hub = PreviewHub(["lobby"], jpeg_quality=80, max_fps=100, metrics=m)
    for _ in range(5):
        hub.publish("lobby", _scene())
    count = lambda: m.registry.get_sample_value("agecam_stage_duration_seconds_count", {"stage": "encode"})  # noqa: E731
    # then nothing was encoded yet
    assert count() == 0, "publish() must not encode"
    # when a snapshot is asked twice for the same frame, then it is encoded once and decodes to the frame size
    a, b = hub.jpeg("lobby"), hub.jpeg("lobby")
    assert a == b and count() == 1, f"same frame encoded {count()} times"
    assert cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_COLOR).shape == (480, 640, 3)
    assert hub.jpeg("nope") is None and PreviewHub(["x"]).jpeg("x") is None


def test_hub_wait_returns_newer_frames_and_times_out():
    hub = PreviewHub(["lobby"], max_fps=100)
    # given no frame, when waiting, then it times out
    t0 = time.monotonic()
    assert hub.wait_jpeg("lobby", 0, timeout_s=0.2) is None
    assert time.monotonic() - t0 >= 0.18
    # given a frame published from another thread, when waiting, then it is returned with its seq
    threading.Timer(0.05, lambda: hub.publish("lobby", _scene())).start()
    got = hub.wait_jpeg("lobby", 0, timeout_s=2.0)
    assert got is not None and got[0] == 1 and got[1][:2] == b"\xff\xd8", f"expected seq 1 JPEG, got {got and got[0]}"


# ---------------------------------------------------------------- server

def _camera(status: str) -> CameraHealth:
    return CameraHealth(status=status, reason="", since_s=1.0, reconnects=0, fps=12.5, tracks=1, last_frame_age_s=0.1)


class _Health:
    """The App's health() for the server: camera name -> status, set by the test."""

    def __init__(self):
        self.cams = {"lobby": "online", "door": "ended"}

    def __call__(self) -> HealthReport:
        return HealthReport({name: _camera(status) for name, status in self.cams.items()})


@pytest.fixture
def server_factory():
    made = []

    def make(token: str | None = None, max_fps: float = 20.0, bind: str = "127.0.0.1:0", **cfg):
        hub = PreviewHub(["lobby", "door"], jpeg_quality=70, max_fps=max_fps)
        hub.publish("lobby", annotate(_scene(), [TrackView(3, (200, 150, 320, 300), STABLE, 0.8)], "lobby"))
        health = _Health()
        srv = PreviewServer(PreviewConfig(bind=bind, token=token, max_fps=max_fps, **cfg), hub, health)
        srv.start()
        made.append(srv)
        return srv, hub, health

    yield make
    for s in made:
        s.close()


def _get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_routes_answer_with_real_http(server_factory):
    # given a running server without token
    srv, _, _ = server_factory()
    # when each route is fetched, then it answers as documented
    code, headers, body = _get(srv.url)
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    for cam in ("lobby", "door"):
        assert f'src="cameras/{cam}/stream.mjpg"' in page, f"page lacks the {cam} stream"
    code, headers, body = _get(srv.url + "cameras/lobby/snapshot.jpg")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    snap = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert snap.shape == (480, 640, 3) and _colour_fraction(snap[149:151, 210:310], STABLE_BGR, tol=40) > 0.5, \
        "snapshot does not show the annotated frame"
    assert _get(srv.url + "cameras/door/snapshot.jpg")[0] == 503, "a camera with no frame yet should answer 503"
    assert _get(srv.url + "cameras/attic/snapshot.jpg")[0] == 404, "unknown camera should be 404"
    assert _get(srv.url + "cameras/attic/stream.mjpg")[0] == 404
    assert _get(srv.url + "nothing-here")[0] == 404


@pytest.mark.parametrize("cams, expected", [
    ({"lobby": "online", "door": "ended"}, 200),
    ({"lobby": "online", "door": "offline"}, 503),
    ({"lobby": "starting", "door": "online"}, 503),
    ({"lobby": "crashed", "door": "online"}, 503),
    ({}, 503),
])
def test_healthz_is_503_when_a_camera_is_not_healthy(server_factory, cams, expected):
    # given the app reports these camera states
    srv, _, health = server_factory()
    health.cams = cams
    # when /healthz is fetched, then the code follows the worst camera and the body lists them
    code, headers, body = _get(srv.url + "healthz")
    assert code == expected, f"healthz {code} for {cams}, expected {expected}"
    import json
    report = json.loads(body)
    assert report["cameras"] == {n: _camera(s).as_dict() for n, s in cams.items()}, report
    assert report["status"] == ("ok" if expected == 200 else "degraded")


@pytest.mark.parametrize("path", ["", "healthz", "cameras/lobby/snapshot.jpg", "cameras/lobby/stream.mjpg"])
@pytest.mark.parametrize("how, expected", [
    ("none", 401), ("wrong-query", 401), ("wrong-bearer", 401), ("query", 200), ("bearer", 200),
])
def test_token_is_enforced_on_every_route(server_factory, path, how, expected, caplog):
    # given a server with a token
    caplog.set_level(logging.DEBUG)
    srv, _, _ = server_factory(token=TOKEN)
    url, headers = srv.url + path, {}
    if how == "wrong-query":
        url += "?token=nope"
    elif how == "query":
        url += f"?token={TOKEN}"
    elif how == "wrong-bearer":
        headers["Authorization"] = "Bearer nope"
    elif how == "bearer":
        headers["Authorization"] = f"Bearer {TOKEN}"
    # when fetched (streams: only the status line)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    conn.request("GET", url.split(f":{srv.port}", 1)[1], headers=headers)
    code = conn.getresponse().status
    conn.close()
    # then only the right token gets through, and the token is never logged
    assert code == expected, f"{how} on /{path}: {code}, expected {expected}"
    assert all(TOKEN not in r.getMessage() for r in caplog.records), "the token appeared in a log line"


def test_page_holds_no_token_and_the_cookie_it_sets_authorises_the_streams(server_factory):
    # given a token server, when the page is fetched with the token in the URL
    token = "a b&c-0123456789ab"
    srv, _, _ = server_factory(token=token)
    code, headers, body = _get(srv.url + "?token=a%20b%26c-0123456789ab")
    # then the page carries no token (its URLs are plain), and an HttpOnly, same-site cookie carries it instead
    assert code == 200 and token not in body.decode() and "a%20b%26c" not in body.decode(), body.decode()[:2000]
    assert 'src="cameras/lobby/stream.mjpg"' in body.decode()
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    # and that cookie alone is enough for the page's own requests
    jar = cookie.split(";", 1)[0]
    assert _get(srv.url + "cameras/lobby/snapshot.jpg", {"Cookie": jar})[0] == 200
    assert _get(srv.url + "cameras/lobby/snapshot.jpg", {"Cookie": "agecam_token=wrong-token-0123456"})[0] == 401


def _read_parts(resp, n: int, deadline_s: float) -> list[bytes]:
    """Read n JPEG parts from a multipart/x-mixed-replace response."""
    parts, buf, end = [], b"", time.monotonic() + deadline_s
    while len(parts) < n and time.monotonic() < end:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(4096)
        if not chunk:
            break
        buf += chunk
        while True:
            start = buf.find(b"\xff\xd8")
            stop = buf.find(b"\xff\xd9", start + 2)
            if start < 0 or stop < 0:
                break
            parts.append(buf[start:stop + 2])
            buf = buf[stop + 2:]
    return parts


def test_mjpeg_stream_yields_paced_jpeg_parts_and_ends_on_close(server_factory):
    # given a server capped at 5 fps and a producer publishing at 30 fps
    srv, hub, _ = server_factory(max_fps=5.0)
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            hub.publish("lobby", annotate(_scene(), [TrackView(i, (100 + i % 50, 100, 220, 240), STABLE, 0.8)], f"{i}"))
            i += 1
            stop.wait(1 / 30)

    threading.Thread(target=produce, daemon=True).start()
    try:
        # when the stream is read
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
        conn.request("GET", "/cameras/lobby/stream.mjpg")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("multipart/x-mixed-replace")
        t0 = time.monotonic()
        parts = _read_parts(resp, 4, deadline_s=5.0)
        took = time.monotonic() - t0
        # then the four decodable, distinct JPEG parts arrive, no faster than max_fps
        assert len(parts) == 4, f"only {len(parts)} of 4 parts in 5 s"
        frames = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in parts]
        assert all(f is not None and f.shape == (480, 640, 3) for f in frames), "a part did not decode"
        assert len(set(parts)) == len(parts), "the stream repeated a frame"
        assert took >= (len(parts) - 1) / 5.0 * 0.8, f"{len(parts)} parts in {took:.2f} s exceeds max_fps 5"
        # when the server closes, then the stream ends cleanly with the closing boundary
        assert hub.watching("lobby")
        closer = threading.Thread(target=srv.close)
        closer.start()
        rest = resp.read()
        closer.join(5)
        assert rest.rstrip().endswith(b"--agecamframe--"), f"stream did not end with the closing boundary: {rest[-40:]!r}"
        assert not closer.is_alive(), "close() hung with a viewer connected"
        conn.close()
    finally:
        stop.set()


def test_non_loopback_bind_needs_a_token_and_refuses_without(server_factory):
    # given the config refuses an open non-loopback preview
    with pytest.raises(ValueError, match="token"):
        PreviewConfig(bind="0.0.0.0:0")
    # when bound to every address with a token
    srv, _, _ = server_factory(token=TOKEN, bind="0.0.0.0:0")
    # then a request without it is refused and one with it served
    assert _get(f"http://127.0.0.1:{srv.port}/")[0] == 401
    assert _get(f"http://127.0.0.1:{srv.port}/?token={TOKEN}")[0] == 200


# ---------------------------------------------------------------- bounds (hostile or broken clients)

def _raw(port: int, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes; the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_hundreds_of_idle_connections_take_no_threads_and_healthz_still_answers(server_factory):
    # given a running preview
    srv, _, _ = server_factory(client_timeout_s=1.0)

    def handler_threads() -> int:
        return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)

    threads_before = handler_threads()
    # when 300 clients connect and send nothing
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(300)]
    try:
        wait_for(lambda: srv.open_connections >= 300, 10, "the 300 idle connections to be accepted")
        # then they hold no handler thread, and /healthz answers within a second (best of three, so one
        # scheduling hiccup on a busy machine does not count; a server blocked by the flood fails all three)
        assert handler_threads() == threads_before, f"handler threads {threads_before} -> {handler_threads()}"
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            code, _, _ = _get(srv.url + "healthz")
            took.append(time.monotonic() - t0)
            assert code == 200, f"/healthz answered {code} under the flood"
        assert min(took) < 1.0, f"/healthz took {[round(t, 2) for t in took]} s under the flood"
        # and after client_timeout_s the idle ones are closed by the server
        wait_for(lambda: srv.open_connections == 0, 10, "idle connections to expire")
        assert idle[0].recv(1) == b"", "the server did not close an idle connection"
    finally:
        for s in idle:
            s.close()


def test_every_response_closes_its_connection_and_carries_the_safety_headers(server_factory):
    srv, _, _ = server_factory(token="t" * 16)
    for path, code in (("/", 401), ("/nothing?token=" + "t" * 16, 404), ("/healthz?token=" + "t" * 16, 200)):
        reply = _raw(srv.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = reply.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith(f"HTTP/1.1 {code}"), head
        assert "Connection: close" in head and "Referrer-Policy: no-referrer" in head, head


@pytest.mark.parametrize("host, allowed, expected", [
    ("evil.example", (), 421),  # DNS rebinding: a page on evil.example resolved to 127.0.0.1
    ("evil.example:8080", (), 421),
    ("localhost:8080", (), 200),
    ("127.0.0.1", (), 200),
    ("[::1]:8080", (), 200),
    ("192.0.2.7:8080", (), 200),  # an address cannot be re-bound
    ("cams.example.org", ("cams.example.org",), 200),  # a reverse proxy's name, when configured
    ("", (), 421),
])
def test_host_header_allow_list(server_factory, host, allowed, expected):
    srv, _, _ = server_factory(allowed_hosts=list(allowed))
    header = f"Host: {host}\r\n" if host else ""
    reply = _raw(srv.port, f"GET /healthz HTTP/1.1\r\n{header}\r\n".encode())
    assert reply.startswith(f"HTTP/1.1 {expected}".encode()), reply[:200]


def test_viewers_beyond_the_limit_get_503(server_factory):
    srv, _, _ = server_factory(max_viewers=2)
    conns = []
    try:
        for _ in range(2):
            c = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
            c.request("GET", "/cameras/lobby/stream.mjpg")
            assert c.getresponse().status == 200
            conns.append(c)
        assert _get(srv.url + "cameras/lobby/stream.mjpg")[0] == 503
    finally:
        for c in conns:
            c.close()


def test_a_stalled_viewer_is_dropped_and_does_not_delay_close(server_factory):
    # given a viewer that opens a stream with a tiny receive buffer and never reads
    srv, hub, _ = server_factory(client_timeout_s=1.0, max_fps=30.0)
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            hub.publish("lobby", annotate(np.random.default_rng(i).integers(0, 255, (480, 640, 3), np.uint8), [], f"{i}"))
            i += 1
            stop.wait(1 / 30)

    threading.Thread(target=produce, daemon=True).start()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    s.sendall(b"GET /cameras/lobby/stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        wait_for(lambda: srv.viewers == 1, 10, "the stalled viewer to be counted")
        # when it stops reading, then the server drops it once a write has blocked for client_timeout_s
        wait_for(lambda: srv.viewers == 0 and not hub.watching("lobby"), 30, "the stalled viewer to be dropped")
        # and close() does not wait for it
        t0 = time.monotonic()
        srv.close()
        assert time.monotonic() - t0 < 3.0, f"close took {time.monotonic() - t0:.1f} s"
    finally:
        stop.set()
        s.close()


def test_a_client_trickling_its_request_is_cut_off_after_the_header_deadline(server_factory):
    # given a preview with a 1 s client timeout, and a client sending its request one byte every 0.3 s
    srv, _, _ = server_factory(client_timeout_s=1.0)
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    t0 = time.monotonic()
    closed_after = None
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        for byte in request:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - t0
                break
            time.sleep(0.3)
    # then it is cut off once its headers are late (about 1 s after it was served), not after 70 s of trickling
    assert closed_after is not None and closed_after < 10, f"a trickling client was served for {time.monotonic() - t0:.0f} s"
    wait_for(lambda: srv.open_connections == 0, 10, "the trickling connection to be gone")

