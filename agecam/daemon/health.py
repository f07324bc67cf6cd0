"""Camera status and the health report: decided once by the App, serialised as is by /healthz and the page."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

CameraStatus = Literal["starting", "online", "offline", "ended", "crashed"]
HEALTHY_STATUSES: frozenset[str] = frozenset({"online", "ended"})  # ended: a file or demo that finished normally


@dataclass
class CameraState:
    """What the App knows of one camera's source: its last reported status, since when, and how often it returned."""

    status: CameraStatus = "starting"
    reason: str = ""
    since_s: float = field(default_factory=time.time)
    reconnects: int = 0
    was_online: bool = False

    def report(self, status: CameraStatus, reason: str, now_s: float) -> bool:
        """Record a transition; True when it is a return to online after the camera had been online before."""
        reconnected = status == "online" and self.was_online
        self.reconnects += int(reconnected)
        self.was_online = self.was_online or status == "online"
        self.status, self.reason, self.since_s = status, reason, now_s
        return reconnected


@dataclass(frozen=True)
class CameraHealth:
    """One camera in a health report: its status (a crashed pipeline overrides the source's) and its live figures."""

    status: CameraStatus
    reason: str
    since_s: float
    reconnects: int
    fps: float  # frames per second arriving from the source
    tracks: int
    last_frame_age_s: float | None  # since the capture time of the last frame the pipeline analysed
    analysed_fps: float = 0.0  # frames per second the pipeline looked at (all, with cut checks on every frame)

    @property
    def ok(self) -> bool:
        return self.status in HEALTHY_STATUSES

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "since": round(self.since_s, 3),
                "reconnects": self.reconnects, "fps": round(self.fps, 2), "analysed_fps": round(self.analysed_fps, 2),
                "tracks": self.tracks,
                "last_frame_age_s": None if self.last_frame_age_s is None else round(self.last_frame_age_s, 3)}


@dataclass(frozen=True)
class HealthReport:
    """The daemon's health: ok when every camera is online or ended normally (and there is at least one) and every
    sink is connected. (A sink's broker being away never stops the watchdog: the daemon itself is fine.)"""

    cameras: dict[str, CameraHealth]
    sinks: dict = field(default_factory=dict)  # name -> agecam.daemon.sinks.SinkHealth

    @property
    def ok(self) -> bool:
        return bool(self.cameras) and all(c.ok for c in self.cameras.values()) and all(
            s.connected for s in self.sinks.values())

    def as_dict(self) -> dict:
        """The /healthz body: {"status": "ok"|"degraded", "cameras": {name: {...}}, "sinks": {name: {...}}}."""
        return {"status": "ok" if self.ok else "degraded",
                "cameras": {name: c.as_dict() for name, c in self.cameras.items()},
                "sinks": {name: s.as_dict() for name, s in self.sinks.items()}}

    def status_line(self, faces_aged: int) -> str:
        """One line for systemd's STATUS=."""
        online = sum(1 for c in self.cameras.values() if c.status == "online")
        tracks = sum(c.tracks for c in self.cameras.values())
        fps = sum(c.fps for c in self.cameras.values())
        return f"{online}/{len(self.cameras)} cameras online, {tracks} tracks, {fps:.1f} fps, {faces_aged} faces aged"
