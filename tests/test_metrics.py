"""Prometheus metrics: served over real HTTP, clean under promtool, named by the conventions."""
from __future__ import annotations

import re
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agecam.daemon.metrics import STAGES, Metrics
from tests.helpers import need_tool


def _scrape(port: int, host: str = "127.0.0.1") -> str:
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200, f"/metrics answered {resp.status}"
        return resp.read().decode()


@pytest.fixture
def served():
    """Metrics for two cameras with some activity, served on a free loopback port."""
    m = Metrics(["lobby", "door"])
    for _ in range(25):
        m.frame_captured("lobby")
    for i in range(20):
        m.frame_processed("lobby", faces=1 if i < 7 else 0, wait_s=0.01, detect_s=0.08, track_s=0.001)
    for _ in range(5):
        m.frame_dropped("lobby", "capture")
    m.age_batch(["lobby", "lobby", "door"], 0.02)
    m.event_published("track.start", 0.0001, 0.05)
    m.camera_up("lobby", True)
    m.set_model_info(detector_kind="mtcnn", detector_model="default", age_model="cydral-age", age_version="1",
                     age_sha256="0123456789abcdef0123")
    m.set_build_info(providers=["CPUExecutionProvider"])
    server = m.serve("127.0.0.1:0")
    yield m, server
    server.close()


def test_scrape_over_http_returns_the_recorded_values(served):
    # given metrics with activity, served on loopback
    m, server = served
    # when scraped over real HTTP
    text = _scrape(server.port)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    # then the values recorded are the values served
    assert samples[("agecam_frames_captured_total", (("camera", "lobby"),))] == 25
    assert samples[("agecam_frames_dropped_total", (("camera", "lobby"), ("stage", "capture")))] == 5
    assert samples[("agecam_camera_up", (("camera", "lobby"),))] == 1
    assert samples[("agecam_camera_up", (("camera", "door"),))] == 0, "an idle camera's series must exist at 0"
    assert samples[("agecam_stage_duration_seconds_count", (("stage", "detect"),))] == 20
    assert samples[("agecam_faces_detected_total", (("camera", "lobby"),))] == 7
    assert samples[("agecam_age_samples_total", (("camera", "lobby"),))] == 2
    assert samples[("agecam_age_batch_size_sum", ())] == 3
    info = [k for k in samples if k[0] == "agecam_model_info"]
    assert info and dict(info[0][1])["age_sha256"] == "0123456789ab", f"sha256 not shortened to 12: {info}"
    build = dict([k for k in samples if k[0] == "agecam_build_info"][0][1])
    assert build["providers"] == "CPUExecutionProvider" and build["onnxruntime"] != "", build


def test_promtool_check_metrics_reports_nothing(served):
    # given a real scrape
    promtool = need_tool("promtool")
    _, server = served
    text = _scrape(server.port)
    # when promtool lints it
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    # then it has nothing to say
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), \
        f"promtool complained (rc {res.returncode}):\n{res.stdout}{res.stderr}"


def test_every_metric_follows_the_naming_conventions():
    # given the full set of metric families
    every = list(Metrics(["lobby"]).registry.collect())
    # (the standard process_* and python_info series keep their own well-known names)
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"} <= {f.name for f in every}
    fams = [f for f in every if not f.name.startswith(("process_", "python_"))]
    assert len(fams) >= 15, f"expected the full metric set, got {[f.name for f in fams]}"
    for fam in fams:
        # then each is prefixed, counters end _total (the family name drops it), durations are in seconds
        assert fam.name.startswith("agecam_"), f"{fam.name} lacks the agecam_ prefix"
        assert re.fullmatch(r"[a-z_]+", fam.name), f"{fam.name} is not snake_case"
        assert not re.search(r"_(ms|milliseconds|us|minutes)(_|$)", fam.name), f"{fam.name} is not in base units"
        if fam.type == "histogram" and ("duration" in fam.name or "latency" in fam.name or "_to_" in fam.name):
            assert fam.name.endswith("_seconds"), f"time histogram {fam.name} must end in _seconds"
        labels = {k for s in fam.samples for k in s.labels}
        assert not labels & {"track", "track_id", "id", "seq"}, f"{fam.name} has an unbounded label: {labels}"


@pytest.mark.parametrize("name, kind, labels", [
    ("agecam_frames_captured", "counter", {"camera"}),
    ("agecam_frames_processed", "counter", {"camera"}),
    ("agecam_frames_dropped", "counter", {"camera", "stage"}),
    ("agecam_stage_duration_seconds", "histogram", {"stage"}),
    ("agecam_faces_detected", "counter", {"camera"}),
    ("agecam_age_samples", "counter", {"camera"}),
    ("agecam_age_batch_size", "histogram", set()),
    ("agecam_active_tracks", "gauge", {"camera"}),
    ("agecam_events_published", "counter", {"type"}),
    ("agecam_events_dropped", "counter", {"reason"}),
    ("agecam_reconnects", "counter", {"camera"}),
    ("agecam_camera_up", "gauge", {"camera"}),
    ("agecam_frame_to_event_seconds", "histogram", set()),
    ("agecam_model", "info", {"detector_kind", "detector_model", "age_model", "age_version", "age_sha256"}),
    ("agecam_build", "info", {"version", "python", "onnxruntime", "providers"}),
])
def test_required_metric_exists_with_its_type_and_labels(name, kind, labels):
    # given a fresh registry with the model info set
    m = Metrics(["lobby"])
    m.set_model_info(detector_kind="mtcnn", detector_model="x", age_model="a", age_version="1", age_sha256="ff")
    fams = {f.name: f for f in m.registry.collect()}
    # then the metric is there with the right type and labels
    assert name in fams, f"{name} missing; have {sorted(fams)}"
    assert fams[name].type == kind, f"{name} is a {fams[name].type}, expected {kind}"
    got = {k for s in fams[name].samples for k in s.labels} - {"le"}
    assert got == labels, f"{name} labels {got}, expected {labels}"


def test_stage_series_exist_before_any_observation():
    # given a fresh registry, then every stage histogram is exported at zero
    fams = {f.name: f for f in Metrics([]).registry.collect()}
    stages = {s.labels["stage"] for s in fams["agecam_stage_duration_seconds"].samples}
    assert stages == set(STAGES), f"stage series {stages}, expected {set(STAGES)}"


def test_two_instances_have_independent_registries():
    # given two Metrics (as in tests, or across a reload), when one counts, then the other does not
    a, b = Metrics(["lobby"]), Metrics(["lobby"])
    a.frames_captured_total.labels(camera="lobby").inc()
    assert b.registry.get_sample_value("agecam_frames_captured_total", {"camera": "lobby"}) == 0


def test_close_frees_the_port_for_a_reload():
    # given a served endpoint on a fixed port
    m = Metrics(["lobby"])
    first = m.serve("127.0.0.1:0")
    port = first.port
    # when closed and served again on the same port (what a SIGHUP reload does)
    first.close()
    second = Metrics(["lobby"]).serve(f"127.0.0.1:{port}")
    try:
        # then the new endpoint answers and the old thread is gone
        assert "agecam_camera_up" in _scrape(port)
        assert not first._thread.is_alive(), "metrics thread still running after close()"
    finally:
        second.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_serves_on_ipv6_loopback_when_available():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = Metrics(["lobby"]).serve("[::1]:0")
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert "agecam_frames_captured_total" in _scrape(server.port, "::1")
    finally:
        server.close()


@pytest.mark.parametrize("bind", ["9108", "localhost", ":9108", "host:port"])
def test_bad_bind_is_refused(bind):
    # given a malformed bind, when served, then it is refused with the expected form
    with pytest.raises(ValueError, match="HOST:PORT"):
        Metrics([]).serve(bind)


def test_the_null_metrics_offer_the_same_interface():
    # given the no-op default and the real metrics, then every recording method exists on both with one signature
    import inspect

    from agecam.daemon.metrics import NullMetrics

    names = [n for n, f in inspect.getmembers(NullMetrics, inspect.isfunction) if not n.startswith("_")]
    assert {"frame_captured", "frame_dropped", "event_published", "event_dropped", "camera_up"} <= set(names)
    for n in names:
        assert inspect.signature(getattr(NullMetrics, n)) == inspect.signature(getattr(Metrics, n)), n


@pytest.mark.parametrize("call", [
    lambda m: m.stage_time("decode", 0.1),
    lambda m: m.frame_dropped("lobby", "nowhere"),
    lambda m: m.event_dropped("lost"),
    lambda m: m.event_published("track.moved", 0.0, None),
])
def test_label_values_outside_the_vocabulary_are_refused(call):
    # given the fixed vocabularies (stages, drop stages, reasons, event types), when a call site uses another
    # value, then it fails at once instead of creating a new series
    with pytest.raises(KeyError):
        call(Metrics(["lobby"]))


def test_off_loopback_metrics_need_the_token_and_bounded_connections(tmp_path):
    # given /metrics with a token (as off loopback), served on loopback for the test
    token = "metrics-token-0123456789"
    server = Metrics(["lobby"]).serve("127.0.0.1:0", token=token, max_connections=2)
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        # then without the token it is refused, with it (as Prometheus sends it) served
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url, timeout=5)
        assert exc.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200 and b"agecam_camera_up" in resp.read()
        # and idle connections beyond the cap take no thread and do not block a scrape
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(50)]
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert resp.status == 200
        finally:
            for s in idle:
                s.close()
    finally:
        server.close()
