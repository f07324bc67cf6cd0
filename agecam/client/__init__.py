"""agecam.client: typed events from a daemon's ZeroMQ bus, an MQTT broker or a Redis stream.

    from agecam.client import subscribe

    with subscribe("redis://127.0.0.1:6379/0", group="dashboard", types=["track.end"]) as events:
        for ev in events:
            print(ev.instance, ev.camera, ev.track_id, ev.age.years if ev.age else None)
"""
from __future__ import annotations

from agecam.client.base import Subscription
from agecam.client.event import Age, Event, EventError

__all__ = ["Age", "Event", "EventError", "Subscription", "subscribe", "SCHEMES"]

SCHEMES = ("tcp", "ipc", "inproc", "mqtt", "mqtts", "redis", "rediss")


def subscribe(url: str, **options) -> Subscription:
    """A subscription for `url`: tcp://, ipc:// (a daemon's events.bind), mqtt(s):// (a broker its mqtt sink
    publishes to) or redis(s):// (the stream its redis sink appends to).

    Common options: types (prefixes of '<type>/<camera>'), instances, timeout_s. ZeroMQ: server_key, client_key
    (CURVE). MQTT: topic_prefix, instance, camera, qos, ca_file, username, password. Redis: stream, group,
    consumer, start.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("tcp", "ipc", "inproc"):
        from agecam.client.zmq_sub import ZmqSubscription

        return ZmqSubscription(url, **options)
    if scheme in ("mqtt", "mqtts"):
        from agecam.client.mqtt_sub import MqttSubscription

        return MqttSubscription(url, **options)
    if scheme in ("redis", "rediss"):
        from agecam.client.redis_sub import RedisSubscription

        return RedisSubscription(url, **options)
    raise ValueError(f"unsupported address {url.split('://', 1)[0]!r}://: expected one of "
                     + ", ".join(s + "://" for s in SCHEMES))
