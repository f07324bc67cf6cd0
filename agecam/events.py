"""Public event types (schema v1): building, encoding and deciding when a track update is due."""
from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import dataclass

SCHEMA_VERSION = "agecam.event/v1"
TRACK_TYPES = ("track.start", "track.update", "track.end")
CAMERA_STATUS = "camera.status"


@dataclass(frozen=True)
class AgeEstimate:
    """A fused age: mean years, spread, a central interval and how many samples made it."""

    years: float
    std: float
    low: float
    high: float
    samples: int
    stable: bool

    def as_dict(self) -> dict:
        return {"years": round(self.years, 2), "std": round(self.std, 2), "low": round(self.low, 2),
                "high": round(self.high, 2), "samples": self.samples, "stable": self.stable}


class EventFactory:
    """Stamps events with the schema, the daemon's instance name, this process's run_id and a seq that rises by one
    per message (across reloads: the run keeps one factory; a reload may rename the instance)."""

    def __init__(self, run_id: str | None = None, instance: str = "agecam"):
        self.run_id = run_id or str(uuid.uuid4())
        self.instance = instance
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def _base(self, type_: str, camera: str, ts: float) -> dict:
        with self._lock:
            seq = next(self._seq)
        return {"schema": SCHEMA_VERSION, "type": type_, "seq": seq, "run_id": self.run_id,
                "instance": self.instance, "camera": camera, "ts": round(ts, 3)}

    def track(self, type_: str, camera: str, ts: float, track_id: int, box_xyxy, det_score: float,
              age: AgeEstimate | None, first_seen: float, last_seen: float) -> dict:
        """A track.start / track.update / track.end event."""
        assert type_ in TRACK_TYPES, type_
        ev = self._base(type_, camera, ts)
        ev.update({
            "track_id": int(track_id),
            "box_xyxy": [int(round(float(v))) for v in box_xyxy],
            "det_score": round(float(det_score), 3),
            "age": age.as_dict() if age is not None else None,
            "first_seen": round(first_seen, 3),
            "last_seen": round(last_seen, 3),
        })
        return ev

    def camera_status(self, camera: str, ts: float, status: str, reason: str) -> dict:
        """A camera.status event: online, offline (with the reason) or ended."""
        ev = self._base(CAMERA_STATUS, camera, ts)
        ev.update({"status": status, "reason": reason})
        return ev


def event_schema() -> dict:
    """The JSON Schema of v1 events (agecam/schemas/event.v1.json, shipped inside the package)."""
    from importlib.resources import files

    return json.loads(files("agecam").joinpath("schemas/event.v1.json").read_text())


def topic(event: dict) -> bytes:
    """ZeroMQ topic `<type>/<camera>`, so subscribers filter by prefix."""
    return f"{event['type']}/{event['camera']}".encode()


def encode(event: dict) -> list[bytes]:
    """The multipart message [topic, json] for one event."""
    return [topic(event), json.dumps(event, separators=(",", ":")).encode()]


@dataclass
class UpdatePolicy:
    """Decides when a live track deserves a track.update: the age moved enough, or it has been quiet too long."""

    min_delta_years: float
    max_interval_s: float

    def due(self, last_sent_years: float | None, last_sent_ts: float, age: AgeEstimate | None, now_s: float) -> bool:
        if age is None:
            return now_s - last_sent_ts >= self.max_interval_s
        if last_sent_years is None:
            return True  # first estimate of this track
        return abs(age.years - last_sent_years) >= self.min_delta_years or now_s - last_sent_ts >= self.max_interval_s
