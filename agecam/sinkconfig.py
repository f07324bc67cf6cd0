"""Config sections of the event sinks beside ZeroMQ (MQTT, Redis Streams) and of the daemon's instance name."""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # also an MQTT topic level: no '/', '+' or '#'


def default_instance() -> str:
    """$AGECAM_INSTANCE (set by the agecam@ unit: host-instance) or this host's name, reduced to the characters an
    instance name (an MQTT topic level) may hold."""
    raw = os.environ.get("AGECAM_INSTANCE") or socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", raw)[:64].strip(".")
    return name or "agecam"


class _SinkSection(BaseModel):
    """What every sink has: a name, a bounded backlog and its reconnect backoff."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name: str | None = Field(None, pattern=NAME_PATTERN, description="Names the sink in metrics, logs and /healthz; "
                             "default: its kind (a second sink of the same kind needs a name).")
    backlog: int = Field(10_000, ge=1, le=1_000_000, description="Events kept while the broker is away or slow; "
                         "beyond it the oldest are dropped and counted (about 0.5 kB each).")
    reconnect_min_s: float = Field(0.5, gt=0, le=3600, description="First reconnect delay; doubled after each failure.")
    reconnect_max_s: float = Field(10.0, gt=0, le=3600, description="Cap on the reconnect delay.")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts:// or rediss:// (default: the system's).")
    username: str | None = Field(None, description="Broker user; or put it in the URL.")
    password: str | None = Field(None, description="Broker password: use ${env:NAME} or ${cred:NAME}, never plain "
                                 "text in the file.")

    @model_validator(mode="after")
    def _check(self):
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(f"reconnect_min_s ({self.reconnect_min_s:g}) must not exceed reconnect_max_s "
                             f"({self.reconnect_max_s:g})")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]


def _check_url(v: str, schemes: tuple[str, ...], example: str) -> str:
    try:
        parts = urlsplit(v)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"expected {' or '.join(s + '://' for s in schemes)}HOST[:PORT], e.g. {example}")
    if port == 0:
        raise ValueError("port must be 1-65535")
    return v


class MqttSinkConfig(_SinkSection):
    """Events into an MQTT broker: topic <topic_prefix>/<instance>/<camera>/<type>, camera.status retained."""

    kind: Literal["mqtt"]
    url: str = Field(description="mqtt://HOST[:PORT] (1883) or mqtts://HOST[:PORT] (8883, TLS).")
    topic_prefix: str = Field("agecam", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
                              description="First topic levels; no wildcards.")
    qos: Literal[0, 1] = Field(1, description="1: at least once (the broker acknowledges each event; a resend after "
                               "a lost connection can repeat one). 0: at most once, faster.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive; a dead broker is noticed within ~1.5x this.")

    _u = field_validator("url")(classmethod(lambda cls, v: _check_url(v, ("mqtt", "mqtts"), "mqtt://127.0.0.1:1883")))


class RedisSinkConfig(_SinkSection):
    """Events appended to a Redis stream: XADD <stream> MAXLEN ~ <maxlen> * event <json>."""

    kind: Literal["redis"]
    url: str = Field(description="redis://HOST[:PORT][/DB] (6379) or rediss:// (TLS).")
    stream: str = Field("agecam:events", min_length=1, max_length=256, description="Stream key.")
    maxlen: int = Field(1_000_000, ge=1, le=1_000_000_000, description="Approximate cap on the stream's length "
                        "(oldest trimmed by Redis): the durable window consumers can fall behind by.")

    _u = field_validator("url")(classmethod(lambda cls, v: _check_url(v, ("redis", "rediss"), "redis://127.0.0.1:6379/0")))


SinkConfig = Annotated[Union[MqttSinkConfig, RedisSinkConfig], Field(discriminator="kind")]


def check_sink_names(sinks: list) -> None:
    """Sink names (or kinds, when unnamed) must be unique: they label metrics and health."""
    seen: dict[str, int] = {}
    for i, s in enumerate(sinks):
        if s.label in seen:
            raise ValueError(f"sinks[{i}].name: {s.label!r} is already used by sinks[{seen[s.label]}]; give each "
                             f"sink a unique name")
        seen[s.label] = i
