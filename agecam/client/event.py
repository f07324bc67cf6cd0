"""The typed v1 event a client receives, parsed and checked from its JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass

from agecam.events import AgeEstimate as Age  # the public age type: years, std, low, high, samples, stable

SCHEMA = "agecam.event/v1"
TRACK_TYPES = ("track.start", "track.update", "track.end")
TYPES = (*TRACK_TYPES, "camera.status")
STATUSES = ("online", "offline", "ended")


class EventError(ValueError):
    """A message that is not a valid agecam v1 event; the text names the field."""


@dataclass(frozen=True)
class Event:
    """One agecam event (schema v1). Track fields are None on camera.status, status fields None on track events;
    `instance` is None for events of daemons older than 0.2."""

    type: str
    seq: int
    run_id: str
    camera: str
    ts: float
    instance: str | None = None
    track_id: int | None = None
    box_xyxy: tuple[int, int, int, int] | None = None
    det_score: float | None = None
    age: Age | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    status: str | None = None
    reason: str | None = None
    raw: dict | None = None  # the object as received (later schema additions stay reachable)

    @property
    def key(self) -> tuple:
        """(instance, run_id, seq): unique per event across hosts and restarts; a repeat has the same key."""
        return (self.instance, self.run_id, self.seq)

    def to_json(self) -> str:
        return json.dumps(self.raw, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str | dict) -> "Event":
        """Parse and check one event; raises EventError naming the first bad field."""
        if isinstance(data, (bytes, bytearray, str)):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise EventError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EventError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            raise EventError(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
        type_ = _field(data, "type", str)
        if type_ not in TYPES:
            raise EventError(f"type: must be one of {', '.join(TYPES)} (got {type_!r})")
        common = dict(type=type_, seq=_field(data, "seq", int), run_id=_field(data, "run_id", str),
                      camera=_field(data, "camera", str), ts=float(_field(data, "ts", (int, float))),
                      instance=_field(data, "instance", str, required=False), raw=data)
        if common["seq"] < 1:
            raise EventError(f"seq: must be 1 or more (got {common['seq']})")
        if type_ == "camera.status":
            status = _field(data, "status", str)
            if status not in STATUSES:
                raise EventError(f"status: must be one of {', '.join(STATUSES)} (got {status!r})")
            return cls(**common, status=status, reason=_field(data, "reason", str))
        box = _field(data, "box_xyxy", list)
        if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
            raise EventError(f"box_xyxy: expected 4 integers (got {box!r})")
        age = data.get("age", "missing")
        if age == "missing":
            raise EventError("age: missing (null when not yet estimated)")
        return cls(**common, track_id=_field(data, "track_id", int), box_xyxy=tuple(box),
                   det_score=float(_field(data, "det_score", (int, float))), age=None if age is None else _age(age),
                   first_seen=float(_field(data, "first_seen", (int, float))),
                   last_seen=float(_field(data, "last_seen", (int, float))))


def _field(data: dict, name: str, kind, required: bool = True, where: str = ""):
    if name not in data or data[name] is None:
        if required:
            raise EventError(f"{where}{name}: missing")
        return None
    value = data[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "number"
        raise EventError(f"{where}{name}: expected {names}, got {type(value).__name__}")
    return value


def _age(d) -> Age:
    if not isinstance(d, dict):
        raise EventError(f"age: expected an object or null, got {type(d).__name__}")
    num = (int, float)
    return Age(years=float(_field(d, "years", num, where="age.")), std=float(_field(d, "std", num, where="age.")),
               low=float(_field(d, "low", num, where="age.")), high=float(_field(d, "high", num, where="age.")),
               samples=_field(d, "samples", int, where="age."), stable=_field(d, "stable", bool, where="age."))
