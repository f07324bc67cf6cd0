"""Every Prometheus metric of the daemon, defined in one place, and the /metrics HTTP endpoint."""
from __future__ import annotations

import importlib.metadata
import logging
import platform
import threading
from collections.abc import Iterable, Sequence

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info,
                               PlatformCollector, ProcessCollector, generate_latest)

import agecam
from agecam.daemon.gate import UNAGED_REASONS
from agecam.daemon.httpserve import BaseHandler, BoundedHTTPServer, split_host_port

log = logging.getLogger(__name__)

# Label vocabularies, defined once. Cameras are bounded by the config; the rest are fixed here, and the named
# methods below accept nothing else (an unknown stage or reason is a KeyError at the call site, not a new series).
STAGES = ("wait", "detect", "track", "chip", "age", "publish", "annotate", "encode")
DROP_STAGES = ("capture", "age", "preview", "record")
EVENT_TYPES = ("track.start", "track.update", "track.end", "camera.status")
DROP_REASONS = ("queue_full", "send_error")  # per-subscriber HWM drops are invisible to PUB: seq gaps show them
SINK_DROP_REASONS = ("backlog_full", "rejected")  # oldest dropped from a full backlog; refused by the broker
DETECTOR_RUNS = ("full", "tracks", "motion")  # whole frame; around tracked faces; on changed regions

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_EVENT_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class NullMetrics:
    """The daemon's metrics interface, every method a no-op: what a component records when nobody measures it.

    Components take a `metrics` argument defaulting to this, so no call site tests for None.
    """

    def frame_captured(self, camera: str) -> None:
        """A frame was read from the camera's source."""

    def frame_dropped(self, camera: str, stage: str) -> None:
        """A frame (or face) was skipped at `stage` (one of DROP_STAGES)."""

    def detector_run(self, camera: str, kind: str) -> None:
        """The detector ran on a frame: kind is one of DETECTOR_RUNS."""

    def frame_processed(self, camera: str, faces: int, wait_s: float, detect_s: float | None,
                        track_s: float | None) -> None:
        """A frame went through the pipeline; detect_s and track_s are None when no detector ran on it."""

    def stage_time(self, stage: str, seconds: float) -> None:
        """Time spent in one stage (one of STAGES)."""

    def age_batch(self, cameras: Sequence[str], seconds: float) -> None:
        """One age-model batch: the camera of each face in it, and its duration."""

    def tracks_active(self, camera: str, n: int) -> None:
        """Confirmed tracks alive on a camera."""

    def camera_up(self, camera: str, up: bool, reconnected: bool = False) -> None:
        """A camera went online (up) or offline/ended; `reconnected` when it came back after being online."""

    def event_published(self, type_: str, send_s: float, frame_to_event_s: float | None) -> None:
        """An event was handed to ZeroMQ; frame_to_event_s is None for events not caused by a frame."""

    def event_dropped(self, reason: str) -> None:
        """An event was not published (reason one of DROP_REASONS)."""

    def preview_viewers(self, camera: str, n: int) -> None:
        """Open MJPEG streams of a camera."""

    def record_segment(self, camera: str, size_bytes: int) -> None:
        """A recording segment was finished."""

    def record_error(self, camera: str) -> None:
        """Recording stopped on an error (full disk, writer failure); it is retried later."""

    def track_unaged(self, camera: str, reason: str) -> None:
        """A confirmed track ended without any age (reason one of UNAGED_REASONS)."""

    def sink_sent(self, sink: str, n: int) -> None:
        """n events reached a sink's broker (acknowledged, for MQTT QoS 1)."""

    def sink_dropped(self, sink: str, reason: str, n: int = 1) -> None:
        """n events a sink gave up (reason one of SINK_DROP_REASONS)."""

    def sink_state(self, sink: str, connected: bool) -> None:
        """A sink connected to its broker, or lost it."""

    def sink_backlog(self, sink: str, length) -> None:
        """Where to read how many events wait in a sink's backlog (length(), called at each scrape)."""

    def add_sinks(self, sinks: Iterable[str]) -> None:
        """The configured sinks, so their series exist from the first scrape."""


def _dist_version(*names: str) -> str:
    """Installed version of the first distribution found among names, without importing it."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


class Metrics(NullMetrics):
    """The daemon's metrics on one registry; attributes are named after the metric without the `agecam_` prefix."""

    def __init__(self, cameras: Sequence[str] = (), registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_captured_total = Counter(
            "agecam_frames_captured_total", "Frames read from the source.", ["camera"], registry=r)
        self.frames_processed_total = Counter(
            "agecam_frames_processed_total", "Frames the pipeline looked at (the detector runs on some of them; "
            "frames no stage needed are skipped unconverted and only counted in agecam_frames_captured_total).",
            ["camera"], registry=r)
        self.frames_dropped_total = Counter(
            "agecam_frames_dropped_total",
            "Frames skipped: capture = overwritten in the latest-frame slot before the pipeline took them; "
            "age = faces not sampled because the age queue was full; preview/record = not shown or not written.",
            ["camera", "stage"], registry=r)
        self.stage_duration_seconds = Histogram(
            "agecam_stage_duration_seconds",
            "Time spent per stage: wait = capture to pipeline pickup, then detect, track, chip (face alignment), "
            "age (per batch), publish, annotate, encode (JPEG).",
            ["stage"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.faces_detected_total = Counter(
            "agecam_faces_detected_total", "Faces returned by the detector.", ["camera"], registry=r)
        self.detector_runs_total = Counter(
            "agecam_detector_runs_total", "Detector runs: full = the whole frame (the safety net); tracks = around "
            "tracked faces, one per checked frame (between runs they follow their predicted motion); motion = one "
            "per changed region searched.",
            ["camera", "kind"], registry=r)
        self.age_samples_total = Counter(
            "agecam_age_samples_total", "Face crops run through the age model.", ["camera"], registry=r)
        self.age_batch_size = Histogram(
            "agecam_age_batch_size", "Faces per age-model batch (across cameras).", buckets=_BATCH_BUCKETS, registry=r)
        self.active_tracks = Gauge(
            "agecam_active_tracks", "Confirmed tracks currently alive.", ["camera"], registry=r)
        self.events_published_total = Counter(
            "agecam_events_published_total", "Events handed to ZeroMQ.", ["type"], registry=r)
        self.events_dropped_total = Counter(
            "agecam_events_dropped_total",
            "Events not published: queue_full = internal queue full, send_error = the socket refused the message. "
            "(A slow subscriber's own losses at its high-water mark show as gaps in its events' seq.)",
            ["reason"], registry=r)
        self.reconnects_total = Counter(
            "agecam_reconnects_total", "Times a camera came back online after it failed or went silent.", ["camera"], registry=r)
        self.camera_up_gauge = Gauge(
            "agecam_camera_up", "1 while the camera delivers frames, 0 while it is offline or ended.", ["camera"], registry=r)
        self.frame_to_event_seconds = Histogram(
            "agecam_frame_to_event_seconds", "Capture time of a frame to the publication of the event it caused.",
            buckets=_EVENT_LATENCY_BUCKETS_S, registry=r)
        self.preview_viewers_gauge = Gauge(
            "agecam_preview_viewers", "Open MJPEG preview streams.", ["camera"], registry=r)
        self.recorded_bytes_total = Counter(
            "agecam_recorded_bytes_total", "Bytes of finished recording segments.", ["camera"], registry=r)
        self.tracks_unaged_total = Counter(
            "agecam_tracks_unaged_total", "Confirmed tracks that ended without any age: too_small (every crop below "
            "age.min_face_px), no_chip (no landmarks to cut a chip), too_short (gone before a sample came back).",
            ["camera", "reason"], registry=r)
        self.record_errors_total = Counter(
            "agecam_record_errors_total", "Times recording stopped on an error (full disk, writer failure).",
            ["camera"], registry=r)
        self.sink_events_sent_total = Counter(
            "agecam_sink_events_sent_total", "Events delivered to a sink's broker.", ["sink"], registry=r)
        self.sink_events_dropped_total = Counter(
            "agecam_sink_events_dropped_total", "Events a sink gave up: backlog_full = the oldest, dropped while the "
            "broker was away and the backlog full; rejected = refused by the broker.", ["sink", "reason"], registry=r)
        self.sink_connected = Gauge(
            "agecam_sink_connected", "1 while the sink is connected to its broker.", ["sink"], registry=r)
        self.sink_backlog_events = Gauge(
            "agecam_sink_backlog_events", "Events waiting in the sink's backlog.", ["sink"], registry=r)
        self.model = Info(
            "agecam_model", "Models in use (detector kind and model, age model name, version and sha256 prefix).",
            registry=r)
        self.build = Info(
            "agecam_build", "agecam, Python and onnxruntime versions and the onnxruntime providers asked for.", registry=r)
        # children of the fixed vocabularies, bound once (an unknown value is a KeyError, never a new series)
        self._stage = {s: self.stage_duration_seconds.labels(stage=s) for s in STAGES}
        self._published = {t: self.events_published_total.labels(type=t) for t in EVENT_TYPES}
        self._event_dropped = {r_: self.events_dropped_total.labels(reason=r_) for r_ in DROP_REASONS}
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        PlatformCollector(registry=r)  # python_info
        self.add_cameras(cameras)
        self.set_build_info(providers=())

    # -- the interface ------------------------------------------------------------------------------------------
    def frame_captured(self, camera: str) -> None:
        self.frames_captured_total.labels(camera=camera).inc()

    def detector_run(self, camera: str, kind: str) -> None:
        if kind not in DETECTOR_RUNS:
            raise KeyError(f"detector run {kind!r} is not one of {DETECTOR_RUNS}")
        self.detector_runs_total.labels(camera=camera, kind=kind).inc()

    def frame_dropped(self, camera: str, stage: str) -> None:
        if stage not in DROP_STAGES:
            raise KeyError(f"drop stage {stage!r} is not one of {DROP_STAGES}")
        self.frames_dropped_total.labels(camera=camera, stage=stage).inc()

    def frame_processed(self, camera: str, faces: int, wait_s: float, detect_s: float | None,
                        track_s: float | None) -> None:
        self.frames_processed_total.labels(camera=camera).inc()
        self.faces_detected_total.labels(camera=camera).inc(faces)
        self._stage["wait"].observe(max(0.0, wait_s))
        if detect_s is not None:  # None: no detector ran on this frame (the tracks followed their prediction)
            self._stage["detect"].observe(detect_s)
        if track_s is not None:
            self._stage["track"].observe(track_s)

    def stage_time(self, stage: str, seconds: float) -> None:
        self._stage[stage].observe(seconds)

    def age_batch(self, cameras: Sequence[str], seconds: float) -> None:
        self._stage["age"].observe(seconds)
        self.age_batch_size.observe(len(cameras))
        for camera in cameras:
            self.age_samples_total.labels(camera=camera).inc()

    def tracks_active(self, camera: str, n: int) -> None:
        self.active_tracks.labels(camera=camera).set(n)

    def camera_up(self, camera: str, up: bool, reconnected: bool = False) -> None:
        self.camera_up_gauge.labels(camera=camera).set(1 if up else 0)
        if reconnected:
            self.reconnects_total.labels(camera=camera).inc()

    def event_published(self, type_: str, send_s: float, frame_to_event_s: float | None) -> None:
        self._published[type_].inc()
        self._stage["publish"].observe(send_s)
        if frame_to_event_s is not None:
            self.frame_to_event_seconds.observe(max(0.0, frame_to_event_s))

    def event_dropped(self, reason: str) -> None:
        self._event_dropped[reason].inc()

    def preview_viewers(self, camera: str, n: int) -> None:
        self.preview_viewers_gauge.labels(camera=camera).set(n)

    def record_segment(self, camera: str, size_bytes: int) -> None:
        self.recorded_bytes_total.labels(camera=camera).inc(size_bytes)

    def record_error(self, camera: str) -> None:
        self.record_errors_total.labels(camera=camera).inc()

    def track_unaged(self, camera: str, reason: str) -> None:
        if reason not in UNAGED_REASONS:
            raise KeyError(f"unaged reason {reason!r} is not one of {UNAGED_REASONS}")
        self.tracks_unaged_total.labels(camera=camera, reason=reason).inc()

    def sink_sent(self, sink: str, n: int) -> None:
        self.sink_events_sent_total.labels(sink=sink).inc(n)

    def sink_dropped(self, sink: str, reason: str, n: int = 1) -> None:
        if reason not in SINK_DROP_REASONS:
            raise KeyError(f"sink drop reason {reason!r} is not one of {SINK_DROP_REASONS}")
        self.sink_events_dropped_total.labels(sink=sink, reason=reason).inc(n)

    def sink_state(self, sink: str, connected: bool) -> None:
        self.sink_connected.labels(sink=sink).set(1 if connected else 0)

    def sink_backlog(self, sink: str, length) -> None:
        self.sink_backlog_events.labels(sink=sink).set_function(length)

    def add_sinks(self, sinks: Iterable[str]) -> None:
        """Create every per-sink series at zero (disconnected until the sink says otherwise)."""
        for sink in sinks:
            self.sink_events_sent_total.labels(sink=sink)
            for reason in SINK_DROP_REASONS:
                self.sink_events_dropped_total.labels(sink=sink, reason=reason)
            self.sink_state(sink, False)
            self.sink_backlog_events.labels(sink=sink)

    def add_cameras(self, cameras: Iterable[str]) -> None:
        """Create every per-camera series at zero so rates and absences are visible from the first scrape."""
        for cam in cameras:
            for metric in (self.frames_captured_total, self.frames_processed_total, self.faces_detected_total,
                           self.age_samples_total, self.active_tracks, self.reconnects_total, self.camera_up_gauge,
                           self.preview_viewers_gauge, self.recorded_bytes_total, self.record_errors_total):
                metric.labels(camera=cam)
            for stage in DROP_STAGES:
                self.frames_dropped_total.labels(camera=cam, stage=stage)
            for reason in UNAGED_REASONS:
                self.tracks_unaged_total.labels(camera=cam, reason=reason)
            for kind in DETECTOR_RUNS:
                self.detector_runs_total.labels(camera=cam, kind=kind)

    def set_model_info(self, *, detector_kind: str, detector_model: str, age_model: str, age_version: str,
                       age_sha256: str) -> None:
        """Record which models run; the sha256 is shortened to 12 hex digits."""
        self.model.info({"detector_kind": detector_kind, "detector_model": detector_model, "age_model": age_model,
                         "age_version": age_version, "age_sha256": age_sha256[:12]})

    def set_build_info(self, *, providers: Sequence[str]) -> None:
        """Record versions (read from package metadata, nothing heavy imported) and the providers in use."""
        self.build.info({"version": agecam.__version__, "python": platform.python_version(),
                         "onnxruntime": _dist_version("onnxruntime-gpu", "onnxruntime"),
                         "providers": ",".join(providers)})

    def serve(self, bind: str, token: str | None = None, max_connections: int = 8,
              client_timeout_s: float = 10.0, allowed_hosts: Sequence[str] = ()) -> "MetricsServer":
        """Serve /metrics on HOST:PORT (port 0 picks a free one) in a named daemon thread, bounded like the preview."""
        host, port = split_host_port(bind)
        return MetricsServer(self.registry, host, port, token=token, max_connections=max_connections,
                             client_timeout_s=client_timeout_s, allowed_hosts=allowed_hosts)


class _MetricsHandler(BaseHandler):
    server: "_MetricsHTTPServer"

    def do_GET(self) -> None:
        try:
            path, query = self.parsed()
        except ValueError:
            self.send_body(400, b"bad request\n", "text/plain; charset=utf-8")
            return
        if not self.admitted(query):
            return
        if path != "/metrics":
            self.send_body(404, b"not found: the metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        self.send_body(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)


class _MetricsHTTPServer(BoundedHTTPServer):
    registry: CollectorRegistry


class MetricsServer:
    """A running /metrics endpoint: bounded connections and timeouts, Host check, optional token; `close()` frees it.

    Not prometheus_client's start_http_server: its server starts a thread per connection with no cap and no socket
    timeout (measured: bench/bench_http_flood.py), and has no token check.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *, token: str | None = None,
                 max_connections: int = 8, client_timeout_s: float = 10.0, allowed_hosts: Sequence[str] = ()):
        self._httpd = _MetricsHTTPServer(host, port, _MetricsHandler, max_connections=max_connections,
                                         client_timeout_s=client_timeout_s, token=token, name="metrics",
                                         allowed_hosts=allowed_hosts)
        self._httpd.registry = registry
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics%s", host if ":" not in host else f"[{host}]", self.port,
                 " (token required)" if token else "")

    @property
    def open_connections(self) -> int:
        return self._httpd.open_connections

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop serving, close every client socket, join the thread and free the port."""
        self._httpd.shutdown()
        self._thread.join(timeout_s)
        self._httpd.server_close()
        if self._thread.is_alive():
            log.warning("thread %s did not stop within %.1f s", self._thread.name, timeout_s)
