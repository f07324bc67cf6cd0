"""The whole daemon on real models and real sockets: demo scene in, schema-valid ZeroMQ events out."""
import json
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from agecam.events import event_schema
from tests.helpers import Subscriber, free_port, iou, read_video, running_app

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = event_schema()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(models_dir):
    """One 12 s demo scene (one full script cycle) through the in-process daemon, with a real subscriber."""
    truth: dict[float, tuple] = {}
    doc = {"cameras": [{"name": "demo", "source": "demo", "demo_duration_s": 12.0, "demo_seed": 0}],
           "events": {"update_max_interval_s": 2.0}}
    with running_app(doc, models_dir,
                     frame_tap=lambda frame, dets: truth.__setitem__(round(frame.ts, 3), frame.truth)) as run:
        ended_in_time = run.wait_ended(90)
    return {"events": run.sub.events, "topics": run.sub.topics, "truth": truth, "stuck": run.stuck,
            "ended_in_time": ended_in_time, "run_id": run.app.events.run_id}


def test_events_validate_and_are_sequenced(demo_run):
    # given a finished demo run, then every event matches the v1 schema, topics are <type>/<camera>, seq has no gaps
    events = demo_run["events"]
    assert demo_run["ended_in_time"], "the 12 s demo camera did not end within 90 s"
    assert not demo_run["stuck"], f"threads did not stop: {demo_run['stuck']}"
    assert len(events) > 10, f"only {len(events)} events arrived"
    for ev, topic in zip(events, demo_run["topics"]):
        jsonschema.validate(ev, SCHEMA)
        assert topic == f"{ev['type']}/{ev['camera']}"
        assert ev["run_id"] == demo_run["run_id"]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must rise by one per message (gaps = lost events)"
    statuses = [e["status"] for e in events if e["type"] == "camera.status"]
    assert statuses[-1] == "ended" and "online" in statuses, statuses


def test_every_track_starts_ends_once_and_carries_ages(demo_run):
    events = [e for e in demo_run["events"] if e["type"].startswith("track.")]
    by_track = defaultdict(list)
    for e in events:
        by_track[e["track_id"]].append(e)
    assert len(by_track) >= 3, f"expected several tracks on the demo scene, got {len(by_track)}"
    aged = 0
    for tid, evs in by_track.items():
        types = [e["type"] for e in evs]
        assert types[0] == "track.start" and types[-1] == "track.end" and types.count("track.end") == 1, \
            f"track {tid} lifecycle: {types}"
        assert evs[0]["age"] is None, "age is null until the first sample"
        for e in evs:  # the demo frame is 640x480: boxes are clipped to it, and an ended track is where it was seen
            x1, y1, x2, y2 = e["box_xyxy"]
            assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480, f"track {tid} {e['type']} box outside the frame: {e}"
        final = evs[-1]["age"]
        if final is not None and final["samples"] >= 3:
            aged += 1
    assert aged >= 3, f"only {aged} tracks ended with an age from 3+ samples"
    stable = [e["age"] for e in events if e["age"] and e["age"]["stable"]]
    assert stable and all(a["samples"] >= 5 and a["std"] <= 4.0 for a in stable), \
        f"no track became stable, or one was called stable too early: {stable[:3]}"


def _labels_of_tracks(demo_run) -> dict[int, list[str]]:
    """track id -> the ground-truth identity each of its start/update boxes overlaps (IoU > 0.3)."""
    truth, labels = demo_run["truth"], defaultdict(list)
    for e in demo_run["events"]:
        if e["type"] not in ("track.start", "track.update"):
            continue
        faces = truth.get(round(e["ts"], 3))
        if not faces:
            continue
        best = max(faces, key=lambda f: iou(e["box_xyxy"], f[1]))
        if iou(e["box_xyxy"], best[1]) > 0.3:
            labels[e["track_id"]].append(best[0])
    return labels


def test_final_ages_agree_with_each_identitys_own_age(demo_run, models_dir):
    # given each identity's age measured offline on the same scene: the real detector and age model on every
    # 10th frame where the face is fully in view (median over frames)
    from agecam.config import AgeConfig, DetectorConfig, RuntimeConfig
    from agecam.daemon.age import AgeModel
    from agecam.daemon.demo import DemoScene
    from agecam.daemon.detect import build_detector
    from agecam.models.fetch import ensure_models

    runtime = RuntimeConfig(intra_op_threads=1, models_dir=models_dir)
    paths = ensure_models(models_dir)
    detector, age = build_detector(DetectorConfig(), runtime, paths), AgeModel(paths.age, runtime, AgeConfig(), paths)
    scene, per_identity = DemoScene(0, duration_s=12.0), defaultdict(list)
    for i in range(0, scene.n_frames, 10):
        image, faces = scene.frame_at(i)
        dets = detector.detect(image)
        for name, box in faces or []:
            if box[0] <= 0 or box[1] <= 0 or box[2] >= 640 or box[3] >= 480 or not len(dets):
                continue
            j = int(np.argmax([iou(box, d) for d in dets.boxes_xyxy]))
            if iou(box, dets.boxes_xyxy[j]) > 0.5:
                chip = age.make_chip(image, dets.landmarks[j], dets.boxes_xyxy[j])
                per_identity[name].append(float(age.expected_years(age.predict(chip[None]))[0]))
    offline = {name: float(np.median(v)) for name, v in per_identity.items() if len(v) >= 2}
    # when the daemon's final estimates are matched to identities
    identity = {tid: Counter(ls).most_common(1)[0][0] for tid, ls in _labels_of_tracks(demo_run).items()}
    finals = [(identity[e["track_id"]], e["age"]) for e in demo_run["events"]
              if e["type"] == "track.end" and e["age"] and e["age"]["samples"] >= 3 and e["track_id"] in identity]
    report = f"offline {({k: round(v, 1) for k, v in offline.items()})}, daemon " \
             f"{[(n, round(a['years'], 1)) for n, a in finals]}"
    # then each final age is that identity's own age (the faces differ by more than the tolerance, so a mixed-up
    # or constant age fails), within the interval's reach
    compared = [(n, a) for n, a in finals if n in offline]
    assert len(compared) >= 3, f"too few aged tracks of identities measured offline: {report}"
    assert np.ptp(list(offline.values())) > 5, f"the identities' ages are too alike to tell apart: {report}"
    for name, a in compared:
        assert abs(a["years"] - offline[name]) <= 5.0, f"{name}: daemon {a['years']:.1f} y vs offline " \
                                                       f"{offline[name]:.1f} y: {report}"
    print(report)


def test_track_ids_follow_ground_truth_identities(demo_run):
    # given the scene's truth per processed frame, map each event box to the identity it overlaps
    labels = _labels_of_tracks(demo_run)
    assert labels, "no event box overlapped a ground-truth face"
    impure = {tid: Counter(ls) for tid, ls in labels.items() if Counter(ls).most_common(1)[0][1] < 0.9 * len(ls)}
    assert not impure, f"tracks that switched identity: {impure}"
    tracks_per_identity = Counter(Counter(ls).most_common(1)[0][0] for ls in labels.values())
    # each identity appears at most twice per cycle in the script: more tracks than 3 means fragmentation
    assert max(tracks_per_identity.values()) <= 3, f"fragmented identities: {tracks_per_identity}"
    assert len(tracks_per_identity) >= 3, f"only {len(tracks_per_identity)} identities were tracked"


def _write_config(tmp_path, models_dir, cameras, **extra) -> tuple[Path, str]:
    import yaml

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    doc = {"cameras": cameras, "events": {"bind": endpoint}, "metrics": {"bind": None}, "preview": {"bind": None},
           "runtime": {"models_dir": str(models_dir)}}
    doc.update(extra)
    path = tmp_path / "agecam.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, endpoint


def _agecam(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "agecam.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_stops_within_seconds_and_ends_tracks(tmp_path, models_dir):
    # given the daemon running as a process on an endless demo scene with a subscriber
    path, endpoint = _write_config(tmp_path, models_dir, [{"name": "demo", "source": "demo"}])
    sub = Subscriber(endpoint)
    proc = _agecam("run", "--config", str(path))
    try:
        assert sub.wait_for(lambda e: e["type"] == "track.start", 60), "no track.start within 60 s"
        # when it gets SIGTERM
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        took_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    # then it exits cleanly within a few seconds and every started track got its track.end
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    assert took_s < 8, f"took {took_s:.1f} s to stop"
    started = {e["track_id"] for e in sub.events if e["type"] == "track.start"}
    ended = {e["track_id"] for e in sub.events if e["type"] == "track.end"}
    assert started <= ended, f"tracks without track.end: {started - ended}"
    assert "events:" in out and endpoint in out, f"the daemon should print where its events are: {out!r}"


def test_bad_cameras_are_reported_and_others_keep_running(tmp_path, models_dir):
    # given one good camera and two bad ones: a missing file and an unreachable RTSP URL with a password
    port = free_port()  # nothing listens there
    path, endpoint = _write_config(tmp_path, models_dir, [
        {"name": "good", "source": "demo"},
        {"name": "missing", "source": str(tmp_path / "nope.mp4")},
        {"name": "dead", "source": f"rtsp://user:s3cret@127.0.0.1:{port}/x", "open_timeout_s": 2, "reconnect_max_s": 2},
    ])
    sub = Subscriber(endpoint)
    proc = _agecam("run", "--config", str(path))
    try:
        ok = sub.wait_for(lambda e: e["type"] == "track.start" and e["camera"] == "good", 60)
        sub.wait_for(lambda e: e.get("camera") == "dead" and e.get("status") == "offline", 20)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    assert ok, "the good camera produced no track while the others were failing"
    offline = {e["camera"]: e["reason"] for e in sub.events if e["type"] == "camera.status" and e["status"] == "offline"}
    assert "missing" in offline and "not found" in offline["missing"], offline
    assert "dead" in offline, offline
    assert "s3cret" not in json.dumps(sub.events) + out + err, "the RTSP password leaked into events or logs"


@pytest.mark.parametrize("case", ["missing_model", "no_metadata"])
def test_bad_age_model_is_refused_at_startup(tmp_path, models_dir, case):
    # given an age model path that does not exist, or an ONNX without the agecam metadata
    import onnx
    from onnx import TensorProto, helper

    model = tmp_path / "age.onnx"
    if case == "no_metadata":
        g = helper.make_graph([helper.make_node("Softmax", ["images"], ["p"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 81])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 81])])
        onnx.save(helper.make_model(g), model)
    path, _ = _write_config(tmp_path, models_dir, [{"name": "demo", "source": "demo"}], age={"model": str(model)})
    proc = _agecam("run", "--config", str(path))
    out, err = proc.communicate(timeout=60)
    # then the daemon refuses to start (exit 2: input refused, a restart will not help) and says what was expected
    assert proc.returncode == 2, f"exit {proc.returncode}: {err[-1500:]}"
    expected = "file not found" if case == "missing_model" else "agecam.contract"
    assert expected in err and str(model) in err, err[-1500:]


def test_config_errors_exit_2_with_paths(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cameras:\n  - {name: a, source: demo, colour: red}\ndetector: {min_face_px: tiny}\n")
    proc = _agecam("run", "--config", str(path))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "cameras[0].colour: unknown field" in err and "detector.min_face_px" in err, err


def test_annotated_stream_is_recorded_to_a_video_file(tmp_path, models_dir):
    # given a short demo run with preview.record_path set and no preview server

    doc = {"cameras": [{"name": "demo", "source": "demo", "demo_duration_s": 5.0}],
           "preview": {"bind": None, "record_path": str(tmp_path / "rec")}}
    with running_app(doc, models_dir) as run:
        assert run.wait_ended(60), "the 5 s demo camera did not end within 60 s"
    # then <record_path>/<camera>/<UTC start>.mkv holds the annotated frames: the status line is drawn on every one
    segments = sorted((tmp_path / "rec" / "demo").glob("*.mkv"))
    assert len(segments) == 1, f"a 5 s run in 300 s segments: {segments}"
    frames = read_video(segments[0])
    assert len(frames) >= 10, f"only {len(frames)} frames recorded from a 5 s scene"
    assert frames[0].shape == (480, 640, 3), frames[0].shape
    # the annotation darkens a status band at the top to 2/7: far darker than the scene just below it
    bar_dark = np.mean([f[2:14].mean() < 0.6 * f[30:46].mean() for f in frames])
    assert bar_dark > 0.9, f"only {bar_dark:.0%} of recorded frames carry the darkened status band of the annotation"
    # and aged faces are boxed (orange while the estimate moves, then green) on most frames
    from agecam.daemon.annotate import STABLE_BGR, UNSTABLE_BGR

    def boxed(f) -> bool:
        return any(np.all(np.abs(f[40:].astype(int) - c) <= 30, axis=2).sum() > 150 for c in (STABLE_BGR, UNSTABLE_BGR))
    share = np.mean([boxed(f) for f in frames])
    print(f"recorded {len(frames)} frames, {share:.0%} with an aged face's box")
    assert share > 0.5, f"only {share:.0%} of the recorded frames carry an aged face's box"
