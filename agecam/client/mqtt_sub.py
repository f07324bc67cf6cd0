"""Events from an MQTT broker that agecam's mqtt sinks publish into."""
from __future__ import annotations

import ssl
import time
import uuid
from collections import deque
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from agecam.client.base import Subscription, log

LOOP_SLICE_S = 0.1


class MqttSubscription(Subscription):
    """Subscribes to <topic_prefix>/<instance>/<camera>/<type> ('+' for every instance or camera); reconnects
    and subscribes again when the broker comes back (events published while it was away are not replayed: QoS 1
    with a clean session)."""

    def __init__(self, url: str, *, topic_prefix: str = "agecam", instance: str = "+", camera: str = "+",
                 qos: int = 1, ca_file: str | None = None, username: str | None = None,
                 password: str | None = None, **kw):
        super().__init__(**kw)
        u = urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"expected mqtt://HOST[:PORT] or mqtts://..., got {u.scheme}://...")
        self._addr = (u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883))
        self.topic = f"{topic_prefix}/{instance}/{camera}/+"
        self._qos = qos
        self._messages: deque[bytes] = deque()
        self._connected = False
        self._refused = False
        self._retry_at_s = 0.0
        self._delay_s = 0.2
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"agecam-client-{uuid.uuid4().hex[:12]}",
                        protocol=mqtt.MQTTv311, clean_session=True)
        user = username or (unquote(u.username) if u.username else None)
        if user:
            c.username_pw_set(user, password or (unquote(u.password) if u.password else None))
        if u.scheme == "mqtts":
            c.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = self._on_connect
        c.on_message = lambda _c, _u, msg: self._messages.append(msg.payload)
        c.on_subscribe = lambda *_: setattr(self, "subscribed_s", time.time())
        self.subscribed_s: float | None = None  # when the broker last confirmed the subscription
        self._client = c
        self._try_connect(first=True)

    def _on_connect(self, client, _userdata, _flags, reason, _props) -> None:
        if reason.is_failure:
            log.warning("mqtt %s:%d refused the connection: %s; retrying in %.1f s", *self._addr, reason,
                        self._delay_s)
            self._refused = True
            return
        self._connected = True
        self._delay_s = 0.2
        client.subscribe(self.topic, qos=self._qos)

    def _try_connect(self, first: bool = False) -> None:
        try:
            if first:
                self._client.connect(*self._addr, keepalive=30)
            else:
                self._client.reconnect()
        except OSError as exc:
            if first:
                log.warning("mqtt %s:%d: %s; retrying", *self._addr, exc.strerror or exc)
            self._retry_at_s = time.monotonic() + self._delay_s
            self._delay_s = min(self._delay_s * 2, 5.0)
            return
        self._retry_at_s = float("inf")  # connected at TCP level; CONNACK arrives in the loop

    def _receive(self, timeout_s: float | None) -> bytes | None:
        if self._messages:
            return self._messages.popleft()
        slice_s = LOOP_SLICE_S if timeout_s is None else max(0.0, min(LOOP_SLICE_S, timeout_s))
        if time.monotonic() >= self._retry_at_s:
            self._try_connect()
        if self._retry_at_s != float("inf"):  # waiting to retry
            time.sleep(slice_s)
            return None
        if self._client.loop(slice_s) != mqtt.MQTT_ERR_SUCCESS or self._refused:
            if self._connected:
                log.warning("mqtt %s:%d: connection lost; reconnecting", *self._addr)
            self._connected = self._refused = False
            self._retry_at_s = time.monotonic() + self._delay_s
            self._delay_s = min(self._delay_s * 2, 5.0)
        return self._messages.popleft() if self._messages else None

    def close(self, ack_last: bool = True) -> None:
        try:
            self._client.disconnect()
        except Exception:
            pass
        reset = getattr(self._client, "_reset_sockets", None)
        if reset is not None:
            reset()
