"""The daemon's HTTP server base (preview and /metrics): bounded connections, timeouts, Host and token checks.

What it guarantees, whatever a client does:
- a connection takes no thread until its request arrives (idle sockets wait in a selector, bounded and expired);
  at most `max_connections` requests are served at once (one thread each), more are answered 503 and closed;
  every response closes its connection, so no thread idles in keep-alive;
- a served socket times out after `client_timeout_s` of silence (a slow request) or of not reading (a stalled
  MJPEG viewer), and every socket is shut down on close() (stop and reload), so none outlives the App;
- a Host header that is not a loopback name, an IP address, the bind host or an allowed name gets 421 (no DNS
  rebinding from a browser on this machine);
- with a token, every route needs it (`?token=`, `Authorization: Bearer`, or the HttpOnly cookie the first
  authorised request sets), compared in constant time; refusals close the connection.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
TOKEN_COOKIE = "agecam_token"
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 18\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many clients\r\n")


def split_host_port(bind: str) -> tuple[str, int]:
    """'127.0.0.1:9108' or '[::1]:9108' -> (host, port)."""
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {bind!r}")
    return host.strip("[]"), int(port)


def host_allowed(host_header: str | None, bind_host: str, allowed: Iterable[str]) -> bool:
    """True for a Host header naming a loopback name, an IP address, the bind host or an allowed name."""
    if not host_header:
        return False
    h = host_header.strip().lower()
    if h.startswith("["):
        name = h[1:h.find("]")] if "]" in h else h
    else:
        name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True  # an IP literal cannot be re-bound to another address by DNS
    except ValueError:
        pass
    return name in LOOPBACK_NAMES or name == bind_host.lower() or name in {a.lower() for a in allowed}


class BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose clients cannot exhaust it.

    An accepted connection waits in a selector, without a thread, until its request arrives (at most
    `max_pending` wait, each at most client_timeout_s); then one of at most `max_connections` handler threads
    serves it, and every response closes the connection, so no thread idles in keep-alive. A served client gets
    client_timeout_s in all to send its request line and headers (a trickling client is cut off then, not after
    client_timeout_s between bytes).
    """

    daemon_threads = True
    block_on_close = False  # close() shuts every client socket itself; never wait on a handler thread
    allow_reuse_address = True
    request_queue_size = 512  # a burst of connections waits in the kernel, not refused

    def __init__(self, host: str, port: int, handler, *, max_connections: int, client_timeout_s: float,
                 token: str | None, allowed_hosts: Iterable[str] = (), max_pending: int = 1024, name: str = "http"):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.client_timeout_s = client_timeout_s
        self.token = token or None
        self.bind_host = host
        self.allowed_hosts = tuple(allowed_hosts)
        self.refused_busy = 0
        self.expired_idle = 0
        self._active: dict[socket.socket, float] = {}  # served sockets -> when serving began
        self._headers_read: set[socket.socket] = set()
        self._pending: dict[socket.socket, tuple[float, object]] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._stopping = threading.Event()
        super().__init__((host, port), handler)
        self._waiter = threading.Thread(target=self._wait_for_requests, name=f"{name}-pending", daemon=True)
        self._waiter.start()

    @property
    def open_connections(self) -> int:
        """Connections being served or waiting for their request."""
        with self._lock:
            return len(self._active) + len(self._pending)

    def process_request(self, request, client_address) -> None:
        """Park the new connection until its request arrives (called by the accepting thread)."""
        with self._lock:
            full = len(self._pending) >= self.max_pending or self._stopping.is_set()
            if not full:
                self._pending[request] = (time.monotonic(), client_address)
                self._selector.register(request, selectors.EVENT_READ)
        if full:
            self._refuse(request)

    def headers_read(self, request) -> None:
        """Called by a handler once its request line and headers are in: the header deadline no longer applies."""
        with self._lock:
            if request in self._active:
                self._headers_read.add(request)

    def _wait_for_requests(self) -> None:
        while not self._stopping.is_set():
            try:
                self._wait_once()
            except Exception:  # the waiter must outlive any surprise, or connections would wait forever
                log.exception("HTTP connection waiter failed; continuing")
                self._stopping.wait(0.1)

    def _wait_once(self) -> None:
        with self._lock:
            empty = not self._pending
            now = time.monotonic()
            slow = [s for s, t0 in self._active.items()
                    if s not in self._headers_read and now - t0 > self.client_timeout_s]
        for sock in slow:  # request headers not complete in time: cut off (its handler then ends)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if empty:
            self._stopping.wait(0.05)
            return
        try:
            ready = [key.fileobj for key, _ in self._selector.select(timeout=0.1)]
        except (OSError, ValueError):  # a socket closed under the selector
            ready = []
        now = time.monotonic()
        with self._lock:
            expired = [s for s, (t0, _) in self._pending.items() if now - t0 > self.client_timeout_s]
            for sock in ready + expired:
                if sock in self._pending:
                    self._selector.unregister(sock)
            taken = [(sock, self._pending.pop(sock)[1]) for sock in ready if sock in self._pending]
            for sock in expired:
                self._pending.pop(sock, None)
        for sock in expired:
            self.expired_idle += 1
            super().shutdown_request(sock)
        for sock, address in taken:
            self._serve(sock, address)

    def _serve(self, request, client_address) -> None:
        with self._lock:
            busy = len(self._active) >= self.max_connections or self._stopping.is_set()
            if not busy:
                self._active[request] = time.monotonic()
        if busy:
            self._refuse(request)
            return
        super().process_request(request, client_address)  # a handler thread

    def _refuse(self, request) -> None:
        """503 and close, from the calling thread (no thread of its own)."""
        self.refused_busy += 1
        try:
            request.settimeout(0.5)
            request.sendall(_BUSY)
        except OSError:
            pass
        super().shutdown_request(request)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._active.pop(request, None)
            self._headers_read.discard(request)
        super().shutdown_request(request)

    def close_clients(self) -> int:
        """Close waiting connections and shut down served ones (their threads then end); returns how many."""
        self._stopping.set()
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
            active = list(self._active)
        for sock in pending:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            super().shutdown_request(sock)
        for sock in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(pending) + len(active)

    def server_close(self) -> None:
        self.close_clients()
        self._waiter.join(1.0)
        super().server_close()
        self._selector.close()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up or times out is normal; anything else is logged (never with its query)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, OSError)):
            return
        log.error("HTTP connection from %s failed: %r", client_address[0], exc)


class BaseHandler(BaseHTTPRequestHandler):
    """Request handling shared by the preview and /metrics: timeouts, Host check, token, safe headers."""

    server: BoundedHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.client_timeout_s  # applied to the socket by StreamRequestHandler.setup
        super().setup()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.headers_read(self.connection)
        return ok

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # access lines would carry ?token=

    def send_body(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None,
                  close: bool = True) -> None:
        """A complete response with the security headers; the connection ends after it (no idle keep-alive)."""
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_security_headers()
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_security_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")

    def parsed(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return unquote(parts.path), parse_qs(parts.query)

    def admitted(self, query: dict[str, list[str]]) -> bool:
        """Host allowed and token (when set) given; otherwise the refusal is sent (connection closed)."""
        srv = self.server
        if not host_allowed(self.headers.get("Host"), srv.bind_host, srv.allowed_hosts):
            self.send_body(421, b"unknown host name: add it to allowed_hosts (preview or metrics)\n",
                           "text/plain; charset=utf-8")
            return False
        if srv.token and not hmac.compare_digest(self._given_token(query).encode(), srv.token.encode()):
            self.send_body(401, b"token required: ?token= or Authorization: Bearer\n", "text/plain; charset=utf-8",
                           {"WWW-Authenticate": 'Bearer realm="agecam"'}, close=True)
            return False
        return True

    def token_cookie(self, query: dict[str, list[str]]) -> dict[str, str]:
        """A Set-Cookie header carrying the token when it came in the query, so pages need not repeat it."""
        if not self.server.token or not query.get("token"):
            return {}
        value = quote(self.server.token, safe="")
        return {"Set-Cookie": f"{TOKEN_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict"}

    def _given_token(self, query: dict[str, list[str]]) -> str:
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        if query.get("token"):
            return query["token"][0]
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE:
                return unquote(value)
        return ""
