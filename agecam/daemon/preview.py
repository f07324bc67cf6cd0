"""The preview's HTTP server: page, MJPEG streams, snapshots and /healthz over the hub's frames."""
from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from agecam.config import PreviewConfig
from agecam.daemon.health import HealthReport
from agecam.daemon.hub import PreviewHub
from agecam.daemon.metrics import split_host_port
from agecam.daemon.page import render_page

log = logging.getLogger(__name__)

BOUNDARY = "agecamframe"


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
                ok, report = owner.health_report()
                self._send(200 if ok else 503, json.dumps(report).encode(), "application/json")
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
        _, report = owner.health_report()
        cams = report.get("cameras", {})
        body = render_page({name: cams.get(name, {}).get("status", "unknown") for name in owner.hub.cameras}, qs)
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
        hub.viewer(camera, +1)
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
            hub.viewer(camera, -1)
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

    health() returns the App's HealthReport; /healthz serialises it (200 when ok, else 503). With cfg.token set
    every route needs the token.
    """

    def __init__(self, cfg: PreviewConfig, hub: PreviewHub, health: Callable[[], HealthReport]):
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


