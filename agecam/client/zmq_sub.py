"""Events from a daemon's ZeroMQ publisher (optionally CURVE-encrypted)."""
from __future__ import annotations

from pathlib import Path

import zmq

from agecam.client.base import Subscription

POLL_SLICE_MS = 500  # a blocking wait still wakes this often (Ctrl-C stays responsive)


class ZmqSubscription(Subscription):
    """SUB socket connected to `url`; topic prefixes in `types` are also filtered by the publisher."""

    def __init__(self, url: str, *, server_key: Path | None = None, client_key: Path | None = None, **kw):
        super().__init__(**kw)
        from agecam.keys import load_public, load_secret

        if (server_key is None) != (client_key is None):
            raise ValueError("server_key and client_key go together (CURVE needs both)")
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            if server_key is not None:
                self._sock.curve_serverkey = load_public(server_key, "server key")
                self._sock.curve_publickey, self._sock.curve_secretkey = load_secret(client_key, "client key")
            self._sock.connect(url)
        except Exception:
            self._sock.close(0)
            raise
        for prefix in self.types or ("",):
            self._sock.setsockopt_string(zmq.SUBSCRIBE, prefix)

    def _receive(self, timeout_s: float | None) -> bytes | None:
        wait_ms = POLL_SLICE_MS if timeout_s is None else min(POLL_SLICE_MS, max(0, int(timeout_s * 1000)))
        if not self._sock.poll(wait_ms, zmq.POLLIN):
            return None
        _topic, payload = self._sock.recv_multipart()
        return payload

    def close(self, ack_last: bool = True) -> None:
        self._sock.close(0)
