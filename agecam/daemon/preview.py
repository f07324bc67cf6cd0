"""Annotated live preview: latest-frame hub, HTTP server (page, MJPEG, snapshot, healthz) and recorder."""
from __future__ import annotations

import hmac
import html
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import cv2
import numpy as np

from agecam.config import PreviewConfig
from agecam.daemon.annotate import TrackView, annotate  # re-exported: the preview's public API
from agecam.daemon.metrics import Metrics, split_host_port

__all__ = ["TrackView", "annotate", "PreviewHub", "PreviewServer", "Recorder", "HEALTHY_STATES", "health_ok"]

log = logging.getLogger(__name__)

HEALTHY_STATES = frozenset({"online", "ended"})
BOUNDARY = "agecamframe"


@dataclass
class _Slot:
    image: np.ndarray | None = None
    seq: int = 0
    jpeg: bytes | None = None
    jpeg_seq: int = 0
    encoded_at: float = float("-inf")
    viewers: int = 0
    encode_lock: threading.Lock = field(default_factory=threading.Lock)


class PreviewHub:
    """Per-camera latest annotated frame. publish() only stores the array; JPEG is encoded on demand.

    Encoding happens only when a viewer or snapshot asks, at most once per frame and at most max_fps times per
    second per camera however many viewers share it.
    """

    def __init__(self, camera_names: Iterable[str], jpeg_quality: int = 80, max_fps: float = 10.0,
                 metrics: Metrics | None = None):
        self._slots = {name: _Slot() for name in camera_names}
        self._cond = threading.Condition()
        self.jpeg_quality = int(jpeg_quality)
        self.max_fps = float(max_fps)
        self._metrics = metrics
        self._closed = False

    @property
    def cameras(self) -> list[str]:
        """Camera names in config order."""
        return list(self._slots)

    def publish(self, camera: str, image_bgr: np.ndarray) -> None:
        """Store the latest annotated frame (cheap: no copy, no encoding). Unknown cameras are ignored."""
        slot = self._slots.get(camera)
        if slot is None:
            return
        with self._cond:
            slot.image = image_bgr
            slot.seq += 1
            self._cond.notify_all()

    def watching(self, camera: str) -> bool:
        """True while at least one MJPEG viewer is connected to this camera."""
        slot = self._slots.get(camera)
        return bool(slot and slot.viewers)

    def _viewer(self, camera: str, delta: int) -> None:
        with self._cond:
            slot = self._slots[camera]
            slot.viewers += delta
            if self._metrics is not None:
                self._metrics.preview_viewers.labels(camera=camera).set(slot.viewers)

    def _encode(self, camera: str, slot: _Slot, after_seq: int) -> tuple[int, bytes] | None:
        with slot.encode_lock:  # one encoder per camera; others reuse its result
            with self._cond:
                image, seq = slot.image, slot.seq
            if image is None:
                return None
            if slot.jpeg is not None and slot.jpeg_seq == seq:
                return seq, slot.jpeg
            now = time.monotonic()
            if slot.jpeg is not None and slot.jpeg_seq > after_seq and now - slot.encoded_at < 1.0 / self.max_fps:
                return slot.jpeg_seq, slot.jpeg  # rate cap: a recent encode is new enough for this caller
            t0 = time.perf_counter()
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if self._metrics is not None:
                self._metrics.stage_duration_seconds.labels(stage="encode").observe(time.perf_counter() - t0)
            if not ok:
                log.warning("JPEG encoding failed for camera %s", camera)
                return None
            slot.jpeg, slot.jpeg_seq, slot.encoded_at = buf.tobytes(), seq, now
            return seq, slot.jpeg

    def jpeg(self, camera: str) -> bytes | None:
        """The latest frame as JPEG (a snapshot), or None when the camera is unknown or has shown nothing yet."""
        slot = self._slots.get(camera)
        if slot is None:
            return None
        got = self._encode(camera, slot, after_seq=-1)
        return got[1] if got else None

    def wait_jpeg(self, camera: str, after_seq: int, timeout_s: float) -> tuple[int, bytes] | None:
        """Wait up to timeout_s for a frame newer than after_seq; returns (seq, jpeg) or None."""
        slot = self._slots.get(camera)
        if slot is None:
            return None
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while slot.seq <= after_seq and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._closed:
                return None
        return self._encode(camera, slot, after_seq)

    def close(self) -> None:
        """Wake every waiter; later waits return None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def camera_state(info: dict) -> str:
    """A camera's state from its health entry ('state' or 'status' key)."""
    return str(info.get("state", info.get("status", "unknown")))


def health_ok(report: dict) -> bool:
    """True when every camera in a health report is online or ended normally."""
    cams = cameras_of(report)
    return bool(cams) and all(camera_state(c) in HEALTHY_STATES for c in cams.values())


def cameras_of(report: dict) -> dict[str, dict]:
    """The per-camera part of a health report: report['cameras'] when present, else the report itself."""
    cams = report.get("cameras", report) if isinstance(report, dict) else {}
    if not isinstance(cams, dict):
        return {}
    return {k: v for k, v in cams.items() if isinstance(v, dict)}


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agecam preview</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;background:#111;color:#ddd;margin:1em}}
h1{{font-size:1.2em;margin:0 0 .5em}}
.cams{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{margin:0;background:#222;padding:.5em;border-radius:6px}}
figcaption{{margin-bottom:.3em}}
img{{display:block;max-width:100%;width:640px;background:#000}}
.state{{font-weight:bold}} .online,.ended{{color:#5c5}} .offline,.crashed,.down{{color:#e55}} .starting{{color:#ea3}}
</style></head><body>
<h1>agecam &mdash; live preview</h1>
<div class="cams">
{figures}
</div>
<script>
const q = {query_json};
async function poll() {{
  try {{
    const r = await fetch('healthz' + q, {{cache: 'no-store'}});
    const j = await r.json();
    for (const [name, c] of Object.entries(j.cameras || {{}})) {{
      const el = document.getElementById('state-' + name);
      const s = c.state || c.status;
      if (el) {{ el.textContent = s; el.className = 'state ' + s; }}
    }}
  }} catch (e) {{}}
}}
setInterval(poll, 2000);
</script>
</body></html>
"""

_FIGURE = """<figure id="cam-{name}"><figcaption>{name} &mdash; <span id="state-{name}" class="state {state}">{state}</span></figcaption>
<img id="stream-{name}" alt="live preview of {name}" src="cameras/{qname}/stream.mjpg{query}"></figure>"""


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # access lines would carry ?token=; errors are logged explicitly below without the query

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        token = self.server.owner.token
        if not token:
            return True
        given = query.get("token", [""])[0]
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), token.encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = unquote(parts.path)
        try:
            if not self._authorised(query):
                self._send(401, b"token required: ?token= or Authorization: Bearer\n", "text/plain; charset=utf-8",
                           {"WWW-Authenticate": 'Bearer realm="agecam"'})
                return
            if path in ("/", "/index.html"):
                self._page(query)
            elif path == "/healthz":
                report = owner.health_report()
                self._send(200 if report["status"] == "ok" else 503, json.dumps(report).encode(), "application/json")
            elif path.startswith("/cameras/"):
                segs = path.split("/")
                if len(segs) != 4 or segs[2] not in owner.hub.cameras:
                    self._send(404, b"unknown camera\n", "text/plain; charset=utf-8")
                elif segs[3] == "snapshot.jpg":
                    jpg = owner.hub.jpeg(segs[2])
                    if jpg is None:
                        self._send(503, b"no frame yet\n", "text/plain; charset=utf-8", {"Retry-After": "1"})
                    else:
                        self._send(200, jpg, "image/jpeg")
                elif segs[3] == "stream.mjpg":
                    self._stream(segs[2])
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the viewer went away
        except Exception:
            log.exception("preview request %s %s failed", self.command, parts.path)

    def _page(self, query: dict[str, list[str]]) -> None:
        owner = self.server.owner
        token = query.get("token", [""])[0] if owner.token else ""
        qs = f"?token={quote(token, safe='')}" if token else ""
        cams = cameras_of(owner.health_report())
        figures = "\n".join(
            _FIGURE.format(name=html.escape(name), qname=quote(name, safe=""), query=html.escape(qs),
                           state=html.escape(camera_state(cams.get(name, {}))))
            for name in owner.hub.cameras)
        body = _PAGE.format(figures=figures, query_json=json.dumps(qs).replace("<", "\\u003c"))
        self._send(200, body.encode(), "text/html; charset=utf-8")

    def _stream(self, camera: str) -> None:
        owner = self.server.owner
        hub = owner.hub
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        hub._viewer(camera, +1)
        owner._streams_open(+1)
        try:
            seq = 0
            while not owner.stop.is_set():
                t0 = time.monotonic()
                got = hub.wait_jpeg(camera, seq, timeout_s=0.5)
                if got is None:
                    continue
                seq, jpg = got
                self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n"
                                 .encode() + jpg + b"\r\n")
                self.wfile.flush()
                owner.stop.wait(max(0.0, 1.0 / hub.max_fps - (time.monotonic() - t0)))
            self.wfile.write(f"--{BOUNDARY}--\r\n".encode())  # clean end of the multipart body
        finally:
            hub._viewer(camera, -1)
            owner._streams_open(-1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "PreviewServer"

    def handle_error(self, request, client_address) -> None:
        """A viewer that hangs up is normal; anything else is logged (never with the request's query)."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            return
        log.error("preview connection from %s failed: %r", client_address[0], exc)


class _Server6(_Server):
    address_family = socket.AF_INET6


class PreviewServer:
    """HTTP preview: `/`, `/cameras/<name>/stream.mjpg`, `/cameras/<name>/snapshot.jpg`, `/healthz`.

    health() returns {"cameras": {camera: {"status"|"state": ..., ...}}} (or the per-camera dict bare); /healthz
    answers 200 when every camera is 'online' or 'ended', else 503. With cfg.token set every route needs the token.
    """

    def __init__(self, cfg: PreviewConfig, hub: PreviewHub, health: Callable[[], dict]):
        if not cfg.bind:
            raise ValueError("preview.bind is null: the preview is disabled")
        self.hub = hub
        self.token = cfg.token or None
        self._health = health
        self.stop = threading.Event()
        host, port = split_host_port(cfg.bind)
        self._httpd = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._httpd.owner = self
        self.host, self.port = host, int(self._httpd.server_address[1])
        self._open = 0
        self._open_cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL (without the token)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def health_report(self) -> dict:
        """{'status': 'ok'|'degraded', 'cameras': {...}, 'preview': {...}} from the app's health()."""
        try:
            raw = self._health()
        except Exception as exc:
            log.exception("health callback failed")
            return {"status": "degraded", "error": f"health check failed: {type(exc).__name__}", "cameras": {}}
        cams = cameras_of(raw)
        return {"status": "ok" if health_ok(raw) else "degraded", "cameras": cams,
                "preview": {"max_fps": self.hub.max_fps, "jpeg_quality": self.hub.jpeg_quality}}

    def _streams_open(self, delta: int) -> None:
        with self._open_cond:
            self._open += delta
            self._open_cond.notify_all()

    def start(self) -> None:
        """Serve in thread `preview-http`."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="preview-http", daemon=True)
        self._thread.start()
        log.info("preview on %s%s", self.url, " (token required)" if self.token else "")

    def close(self, timeout_s: float = 5.0) -> None:
        """End every stream cleanly, stop serving and free the port."""
        self.stop.set()
        self.hub.close()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout_s)
        with self._open_cond:
            self._open_cond.wait_for(lambda: self._open == 0, timeout=timeout_s)
            if self._open:
                log.warning("%d preview stream(s) did not end within %.1f s", self._open, timeout_s)
        self._httpd.server_close()


class Recorder:
    """Writes one camera's annotated frames to <record_path>/<camera>.mp4 (mp4v); opened on the first frame."""

    def __init__(self, record_path: Path | str, camera: str, fps: float):
        self.path = Path(record_path) / f"{camera}.mp4"
        self.fps = float(fps) if fps and fps > 0 else 10.0
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._failed = False

    def write(self, image_bgr: np.ndarray) -> bool:
        """Append a frame (resized to the first frame's size when it differs); False when it could not be written."""
        if self._failed:
            return False
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = image_bgr.shape[:2]
            self._size = (w, h)
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size)
            if not self._writer.isOpened():
                log.error("cannot record to %s: the mp4v writer did not open", self.path)
                self._failed = True
                return False
        if (image_bgr.shape[1], image_bgr.shape[0]) != self._size:
            image_bgr = cv2.resize(image_bgr, self._size)
        self._writer.write(image_bgr)
        self.frames += 1
        return True

    def close(self) -> None:
        """Finish the file."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            log.info("recorded %d frames to %s", self.frames, self.path)
