"""Event building, encoding, schema conformance and the update policy."""
import json
import jsonschema
import pytest

from agecam.events import AgeEstimate, EventFactory, UpdatePolicy, encode, event_schema

SCHEMA = event_schema()
AGE = AgeEstimate(34.2, 3.1, 29.0, 39.5, 12, True)


def test_track_event_matches_schema_and_design_example():
    f = EventFactory()
    ev = f.track("track.update", "lobby", 1712345678.1234, 17, [412.4, 96, 508, 220.6], 0.934, AGE, 1712345670.004, 1712345678.123)
    jsonschema.validate(ev, SCHEMA)
    assert ev["schema"] == "agecam.event/v1" and ev["box_xyxy"] == [412, 96, 508, 221]
    assert ev["age"] == {"years": 34.2, "std": 3.1, "low": 29.0, "high": 39.5, "samples": 12, "stable": True}
    topic, payload = encode(ev)
    assert topic == b"track.update/lobby" and json.loads(payload) == ev


def test_seq_rises_by_one_across_types_and_run_id_is_stable():
    f = EventFactory()
    evs = [f.camera_status("a", 1.0, "online", ""), f.track("track.start", "a", 1.0, 1, [0, 0, 1, 1], 0.9, None, 1, 1),
           f.track("track.end", "b", 2.0, 1, [0, 0, 1, 1], 0.9, AGE, 1, 2)]
    assert [e["seq"] for e in evs] == [1, 2, 3]
    assert len({e["run_id"] for e in evs}) == 1
    for e in evs:
        jsonschema.validate(e, SCHEMA)


def test_schema_rejects_bad_events():
    f = EventFactory()
    ev = f.track("track.start", "a", 1.0, 1, [0, 0, 1, 1], 0.9, None, 1, 1)
    del ev["box_xyxy"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ev, SCHEMA)
    st = f.camera_status("a", 1.0, "sleeping", "")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(st, SCHEMA)


@pytest.mark.parametrize("last_years, last_ts, years, now, due", [
    (None, 0.0, 30.0, 0.1, True),     # first estimate is always news
    (30.0, 0.0, 30.5, 1.0, False),    # small move, recent: quiet
    (30.0, 0.0, 31.2, 1.0, True),     # moved a year or more
    (30.0, 0.0, 30.1, 5.0, True),     # quiet too long: heartbeat update
])
def test_update_policy(last_years, last_ts, years, now, due):
    p = UpdatePolicy(min_delta_years=1.0, max_interval_s=5.0)
    age = AgeEstimate(years, 2.0, years - 3, years + 3, 5, True)
    assert p.due(last_years, last_ts, age, now) is due
