"""The preview's HTTP server: page, MJPEG streams, snapshots and /healthz over the hub's frames."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable

from agecam.config import PreviewConfig
from agecam.daemon.health import HealthReport
from agecam.daemon.httpserve import BaseHandler, BoundedHTTPServer, split_host_port
from agecam.daemon.hub import PreviewHub
from agecam.daemon.page import render_page

log = logging.getLogger(__name__)

BOUNDARY = "agecamframe"
STREAM_END_GRACE_S = 0.3  # on close, streams that are being read get this long to send their closing boundary
TEXT = "text/plain; charset=utf-8"


class _Handler(BaseHandler):
    server: "_Server"

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        owner = self.server.owner
        path = "?"
        try:
            path, query = self.parsed()
            if not self.admitted(query):
                return
            if path in ("/", "/index.html"):
                self._page(query)
            elif path == "/healthz":
                ok, report = owner.health_report()
                self.send_body(200 if ok else 503, json.dumps(report).encode(), "application/json")
            elif path.startswith("/cameras/"):
                segs = path.split("/")
                if len(segs) != 4 or segs[2] not in owner.hub.cameras:
                    self.send_body(404, b"unknown camera\n", TEXT)
                elif segs[3] == "snapshot.jpg":
                    jpg = owner.hub.jpeg(segs[2])
                    if jpg is None:
                        self.send_body(503, b"no frame yet\n", TEXT, {"Retry-After": "1"})
                    else:
                        self.send_body(200, jpg, "image/jpeg")
                elif segs[3] == "stream.mjpg":
                    self._stream(segs[2])
                else:
                    self.send_body(404, b"not found\n", TEXT)
            else:
                self.send_body(404, b"not found\n", TEXT)
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True  # the viewer went away or stopped reading
        except ValueError:  # an unparsable path
            self.send_body(400, b"bad request\n", TEXT)
        except Exception:
            log.exception("preview request %s %s failed", self.command, path)
            self.close_connection = True

    def _page(self, query: dict[str, list[str]]) -> None:
        owner = self.server.owner
        _, report = owner.health_report()
        cams = report.get("cameras", {})
        body = render_page({name: cams.get(name, {}).get("status", "unknown") for name in owner.hub.cameras})
        self.send_body(200, body.encode(), "text/html; charset=utf-8", self.token_cookie(query))

    def _stream(self, camera: str) -> None:
        owner = self.server.owner
        if not owner.viewer_slot(+1):
            self.send_body(503, b"too many viewers\n", TEXT, {"Retry-After": "5"})
            return
        try:
            self._stream_frames(camera)
        finally:
            owner.viewer_slot(-1)

    def _stream_frames(self, camera: str) -> None:
        owner, hub = self.server.owner, self.server.owner.hub
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_security_headers()
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        hub.viewer(camera, +1)
        try:
            seq = 0
            while not owner.stop.is_set():
                t0 = time.monotonic()
                got = hub.wait_jpeg(camera, seq, timeout_s=0.5)
                if got is None:
                    if hub.closed:  # the App is stopping: end the stream now, not when the server closes
                        break
                    continue
                seq, jpg = got
                # a viewer that stops reading fills its socket buffer: this write then times out (client_timeout_s)
                self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n"
                                 .encode() + jpg + b"\r\n")
                self.wfile.flush()
                owner.stop.wait(max(0.0, 1.0 / hub.max_fps - (time.monotonic() - t0)))
            self.wfile.write(f"--{BOUNDARY}--\r\n".encode())  # clean end of the multipart body
        finally:
            hub.viewer(camera, -1)


class _Server(BoundedHTTPServer):
    owner: "PreviewServer"


class PreviewServer:
    """HTTP preview: `/`, `/cameras/<name>/stream.mjpg`, `/cameras/<name>/snapshot.jpg`, `/healthz`.

    health() returns the App's HealthReport; /healthz serialises it (200 when ok, else 503). With cfg.token set
    every route needs the token. Connections, viewers and client silence are bounded by the config.
    """

    def __init__(self, cfg: PreviewConfig, hub: PreviewHub, health: Callable[[], HealthReport]):
        if not cfg.bind:
            raise ValueError("preview.bind is null: the preview is disabled")
        self.hub = hub
        self.token = cfg.token or None
        self.max_viewers = cfg.max_viewers
        self._health = health
        self.stop = threading.Event()
        host, port = split_host_port(cfg.bind)
        self._httpd = _Server(host, port, _Handler, max_connections=cfg.max_connections,
                              client_timeout_s=cfg.client_timeout_s, token=self.token,
                              allowed_hosts=cfg.allowed_hosts)
        self._httpd.owner = self
        self.host, self.port = host, int(self._httpd.server_address[1])
        self._viewers = 0
        self._viewers_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL (without the token)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def open_connections(self) -> int:
        return self._httpd.open_connections

    @property
    def viewers(self) -> int:
        return self._viewers

    def viewer_slot(self, delta: int) -> bool:
        """Take (+1) or give back (-1) an MJPEG viewer slot; False when all max_viewers are taken."""
        with self._viewers_lock:
            if delta > 0 and self._viewers >= self.max_viewers:
                return False
            self._viewers += delta
            return True

    def health_report(self) -> tuple[bool, dict]:
        """(ok, the /healthz body): the App's report as it decided it, plus this preview's settings."""
        try:
            report = self._health()
        except Exception as exc:
            log.exception("health callback failed")
            return False, {"status": "degraded", "error": f"health check failed: {type(exc).__name__}", "cameras": {}}
        body = report.as_dict()
        body["preview"] = {"max_fps": self.hub.max_fps, "jpeg_quality": self.hub.jpeg_quality}
        return report.ok, body

    def start(self) -> None:
        """Serve in thread `preview-http`."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="preview-http", daemon=True)
        self._thread.start()
        log.info("preview on %s%s", self.url, " (token required)" if self.token else "")

    def close(self, timeout_s: float = 2.0) -> None:
        """End every stream, stop accepting, shut every client socket and free the port."""
        self.stop.set()
        self.hub.close()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        grace = time.monotonic() + STREAM_END_GRACE_S
        while self._viewers and time.monotonic() < grace:  # live streams end with their closing boundary
            time.sleep(0.02)
        while self._httpd.open_connections and time.monotonic() < deadline:
            self._httpd.close_clients()  # handlers blocked in a read or write end at once
            time.sleep(0.02)
        if self._httpd.open_connections:
            log.warning("%d preview connection(s) did not close within %.1f s", self._httpd.open_connections, timeout_s)
        self._httpd.server_close()
