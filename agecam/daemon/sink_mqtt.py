"""The MQTT sink: events on <topic_prefix>/<instance>/<camera>/<type>, camera.status retained (paho-mqtt)."""
from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from agecam.daemon.metrics import NullMetrics
from agecam.daemon.sinks import Sink, SinkDown
from agecam.events import CAMERA_STATUS

CONNECT_TIMEOUT_S = 2.0  # TCP connect
CONNACK_TIMEOUT_S = 5.0
ACK_TIMEOUT_S = 10.0  # a batch not acknowledged within this is treated as a lost connection (and sent again)


def event_topic(prefix: str, instance: str, event: dict) -> str:
    """The topic of one event: <prefix>/<instance>/<camera>/<type>."""
    return f"{prefix}/{event.get('instance') or instance}/{event['camera']}/{event['type']}"


class MqttSink(Sink):
    """Publishes each event as its JSON; `<prefix>/<instance>/status` is a retained online/offline (the broker
    publishes `offline` as our last will when the daemon vanishes)."""

    kind = "mqtt"
    batch_size = 500  # per acknowledged batch: measured 2,200 events/s at 100, see bench/bench_sinks.py

    def __init__(self, cfg, instance: str, metrics: NullMetrics = NullMetrics()):
        super().__init__(cfg, metrics)
        url = urlsplit(cfg.url)
        self._tls = url.scheme == "mqtts"
        self._host = url.hostname
        self._port = url.port or (8883 if self._tls else 1883)
        self._username = cfg.username or (unquote(url.username) if url.username else None)
        self._password = cfg.password or (unquote(url.password) if url.password else None)
        self._instance = instance
        self.status_topic = f"{cfg.topic_prefix}/{instance}/status"
        self._client: mqtt.Client | None = None

    def _item(self, event: dict, payload: bytes):
        return event_topic(self.cfg.topic_prefix, self._instance, event), payload, event["type"] == CAMERA_STATUS

    def _connect(self) -> None:
        # 23 characters at most: all MQTT 3.1.1 brokers must accept it
        ident = hashlib.sha1(f"{self._instance}|{self.label}|{os.getpid()}".encode()).hexdigest()[:16]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"agecam-{ident}", protocol=mqtt.MQTTv311,
                        clean_session=True)
        c.connect_timeout = CONNECT_TIMEOUT_S
        c.max_inflight_messages_set(self.batch_size)
        if self._username:
            c.username_pw_set(self._username, self._password)
        if self._tls:
            c.tls_set(ca_certs=str(self.cfg.ca_file) if self.cfg.ca_file else None, cert_reqs=ssl.CERT_REQUIRED)
        c.will_set(self.status_topic, b"offline", qos=1, retain=True)
        answer: dict = {}
        c.on_connect = lambda _c, _u, _flags, rc, _props: answer.setdefault("rc", rc)
        where = f"{self._host}:{self._port}"
        try:
            c.connect(self._host, self._port, keepalive=self.cfg.keepalive_s)
        except (OSError, ssl.SSLError) as exc:
            raise SinkDown(f"cannot connect to {where}: {getattr(exc, 'strerror', None) or exc}") from None
        self._client = c  # from here _interrupt() can cut a blocked wait
        deadline_s = min(time.monotonic() + CONNACK_TIMEOUT_S, self._give_up_s())
        while "rc" not in answer:
            rc = c.loop(0.1)
            if "rc" in answer:  # a refusal arrives with the connection's end: report the refusal
                break
            if rc != mqtt.MQTT_ERR_SUCCESS or time.monotonic() > deadline_s:
                self._client = None
                self._close_socket(c)
                why = mqtt.error_string(rc) if rc != mqtt.MQTT_ERR_SUCCESS else f"{CONNACK_TIMEOUT_S:g} s passed"
                raise SinkDown(f"no answer to CONNECT from {where} ({why})")
        if answer["rc"].is_failure:
            self._client = None
            self._close_socket(c)
            raise SinkDown(f"{where} refused the connection: {answer['rc']}")
        c.publish(self.status_topic, b"online", qos=1, retain=True)

    def _deliver(self, batch: list) -> tuple[int, int]:
        c = self._client
        infos = []
        for topic, payload, retain in batch:
            info = c.publish(topic, payload, qos=self.cfg.qos, retain=retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_QUEUE_SIZE):
                raise SinkDown(f"publish failed: {mqtt.error_string(info.rc)}", _published(infos))
            infos.append(info)
        deadline_s = time.monotonic() + ACK_TIMEOUT_S
        while (done := _published(infos)) < len(infos):
            rc = c.loop(IDLE_LOOP_S)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise SinkDown(f"connection lost ({mqtt.error_string(rc)})", _published(infos))
            if time.monotonic() > deadline_s:
                raise SinkDown(f"no acknowledgement within {ACK_TIMEOUT_S:g} s", done)
            if time.monotonic() > self._give_up_s():  # stopping: what is unacknowledged stays in the backlog
                raise SinkDown("stopped while waiting for acknowledgements", done, transient=True)
        return len(infos), 0

    def _idle(self, timeout_s: float) -> None:
        rc = self._client.loop(timeout_s)  # keep-alive pings, and notices a closed connection
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise SinkDown(f"connection lost ({mqtt.error_string(rc)})")

    def _disconnect(self, graceful: bool) -> None:
        c, self._client = self._client, None
        if c is None:
            return
        if graceful:  # a clean stop: say offline ourselves (a DISCONNECT suppresses the will)
            try:
                info = c.publish(self.status_topic, b"offline", qos=1, retain=True)
                deadline_s = time.monotonic() + 0.25
                while not info.is_published() and time.monotonic() < deadline_s:
                    if c.loop(IDLE_LOOP_S) != mqtt.MQTT_ERR_SUCCESS:
                        break
                c.disconnect()
                c.loop(0.01)
            except Exception:
                pass
        self._close_socket(c)

    def _interrupt(self) -> None:
        c = self._client
        sock = c.socket() if c is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)  # the blocked select/recv returns; the loop sees the connection lost

    @staticmethod
    def _close_socket(c: mqtt.Client) -> None:
        """Close the connection and paho's wake-up socket pair now (not at garbage collection): a broker that
        restarts a thousand times must not cost a thousand file descriptors (tested)."""
        reset = getattr(c, "_reset_sockets", None)  # paho 2.x: closes the socket and the pair
        if reset is not None:
            reset()
        elif c.socket() is not None:
            c.socket().close()


IDLE_LOOP_S = 0.02


def _published(infos: list) -> int:
    """How many from the head are published (acknowledged for QoS 1, written for QoS 0)."""
    n = 0
    for info in infos:
        if not info.is_published():
            break
        n += 1
    return n
