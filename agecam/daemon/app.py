"""Builds every component from the Config, starts and stops them: the only wiring site."""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from agecam.config import Config
from agecam.daemon.health import CameraHealth, CameraState, HealthReport
from agecam.secrets import secret_free
from agecam.daemon.track import TrackIds

log = logging.getLogger("agecam")

STOP_DEADLINE_S = 4.0  # the whole App stops within this (systemd's TimeoutStopSec is 20 s; the goal is 5 s)


class App:
    """The running daemon: one instance per loaded config. Boundaries can be injected for tests."""

    def __init__(self, cfg: Config, *, detector=None, age_model=None, open_fn=None, notifier=None,
                 frame_tap=None, events=None, metrics=None, track_ids: dict[str, TrackIds] | None = None,
                 publisher=None, sinks: dict | None = None):
        """events (the run's EventFactory: run_id and seq) and track_ids (per camera) outlive a reload: pass the
        previous App's to the next one, so seq keeps rising and no track ID is issued twice in a run. A publisher
        passed in (an unchanged events section, handed over by the previous App) keeps its subscribers connected;
        sinks passed in (by sink_key, unchanged sections) keep their connections and backlogs."""
        from agecam.events import EventFactory

        self.cfg = cfg
        self.stop_event = threading.Event()
        self.events = events or EventFactory()
        self.track_ids: dict[str, TrackIds] = track_ids if track_ids is not None else defaultdict(TrackIds)
        self._detector = detector
        self._age_model = age_model
        self._open_fn = open_fn
        self._frame_tap = frame_tap
        self.notifier = notifier
        self.metrics = metrics
        self.publisher = publisher
        self._owns_publisher = True  # the App closes its publisher on stop, unless it handed it over
        self.sinks: dict = dict(sinks or {})  # sink_key -> running Sink
        self._owned_sinks: set[str] = set()  # the keys this App closes on stop (not handed over)
        self.cameras: dict[str, CameraState] = {c.name: CameraState() for c in cfg.cameras if c.enabled}
        self.pipelines = {}
        self.captures = {}
        self.recorders = {}
        self.ended = {}
        self._servers = []
        self._lock = threading.Lock()
        self.started = False

    # -- build ----------------------------------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load detector and age model (refused here, at start-up, with what was expected)."""
        from agecam.daemon.age import AgeModel
        from agecam.daemon.detect import build_detector
        from agecam.models.fetch import ensure_models

        cfg = self.cfg
        need_defaults = (self._detector is None and cfg.detector.kind == "mtcnn" and cfg.detector.model is None) or (
            self._age_model is None and cfg.age.model is None)
        models = ensure_models(cfg.runtime.models_dir) if need_defaults else None
        if self._detector is None:
            self._detector = build_detector(cfg.detector, cfg.runtime, models)
        if self._age_model is None:
            self._age_model = AgeModel.from_config(cfg.age, cfg.runtime)

    def start(self) -> None:
        """Build and start every component; on failure, stop() closes whatever was already built."""
        from agecam.daemon.agesvc import AgeService
        from agecam.daemon.metrics import Metrics
        from agecam.daemon.pipeline import CameraPipeline
        from agecam.daemon.publish import Publisher
        from agecam.daemon.slot import LatestSlot
        from agecam.daemon.capture import CaptureThread

        cfg = self.cfg
        self.started = True  # from here on stop() has something to close
        self.events.instance = cfg.runtime.instance  # here, not at build: a refused reload renames nothing
        if self.metrics is None:
            self.metrics = Metrics(cameras=list(self.cameras))
        m = self.metrics

        if self.publisher is None:
            self.publisher = Publisher(cfg.events, m)
            # bound before the models load, so subscribers are connected by the time the first events flow
            self.publisher.start()
        else:
            self.publisher.metrics = m
        self._start_sinks(m)
        self.load_models()
        self._set_info(m)
        if cfg.metrics.bind:
            self._servers.append(m.serve(cfg.metrics.bind, token=cfg.metrics.token,
                                         allowed_hosts=cfg.metrics.allowed_hosts))
        self.age_service = AgeService(self._age_model, cfg.age.max_batch, self.stop_event, m)
        self.hub = None
        if cfg.preview.bind:
            from agecam.daemon.hub import PreviewHub
            from agecam.daemon.preview import PreviewServer

            self.hub = PreviewHub(list(self.cameras), cfg.preview.jpeg_quality, cfg.preview.max_fps, metrics=m)
            server = PreviewServer(cfg.preview, self.hub, self.health)
            server.start()
            self._servers.append(server)
        for cam in cfg.cameras:
            if not cam.enabled:
                continue
            slot = LatestSlot(on_drop=lambda c=cam.name: m.frame_dropped(c, "capture"))
            self.ended[cam.name] = threading.Event()
            self.pipelines[cam.name] = CameraPipeline(
                cam, cfg, slot=slot, detector=self._detector, age_model=self._age_model,
                age_service=self.age_service, events=self.events, submit=self.submit,
                stop=self.stop_event, ended=self.ended[cam.name], metrics=m, hub=self.hub,
                recorder=self._recorder(cam), frame_tap=self._frame_tap, track_ids=self.track_ids[cam.name])
            self.captures[cam.name] = CaptureThread(
                cam, slot, self.stop_event, on_status=self._on_status,
                on_frame=m.frame_captured,
                open_fn=self._open_fn)
        # start in dependency order; stop() joins in reverse
        self.age_service.start()
        for p in self.pipelines.values():
            p.start()
        for c in self.captures.values():
            c.start()
        log.info("started: %d camera(s); events on %s%s%s", len(self.captures), self.publisher.endpoint,
                 f"; metrics on http://{cfg.metrics.bind}/metrics" if cfg.metrics.bind else "",
                 f"; preview on http://{cfg.preview.bind}/" if cfg.preview.bind else "")

    def _start_sinks(self, m) -> None:
        """Start the configured sinks (keeping those handed over by a reload); a broker that is down does not stop
        the daemon: its sink retries in its own thread and /healthz shows it."""
        from agecam.daemon.sinks import build_sink, sink_key

        inherited, self.sinks = self.sinks, {}
        try:
            m.add_sinks([c.label for c in self.cfg.sinks])
            for c in self.cfg.sinks:
                key = sink_key(c, self.cfg.runtime.instance)
                sink = inherited.pop(key, None)
                if sink is None:
                    sink = build_sink(c, self.cfg.runtime.instance, m)
                    sink.start()
                sink.metrics = m
                self.sinks[key] = sink
                self._owned_sinks.add(key)
        finally:  # handed over but no longer configured (or a failed start): stopped together
            for sink in inherited.values():
                sink.signal_stop(1.0)
            for sink in inherited.values():
                sink.join(1.0)

    def submit(self, event: dict) -> None:
        """Hand one event to the ZeroMQ publisher and every sink, never blocking (each has its own bounded queue)."""
        self.publisher.submit(event)
        if self.sinks:
            payload = json.dumps(event, separators=(",", ":")).encode()
            for sink in self.sinks.values():
                sink.submit(event, payload)

    def _recorder(self, cam):
        if not self.cfg.preview.record_path:
            return None
        from agecam.daemon.record import Recorder, RecordSettings

        p = self.cfg.preview
        settings = RecordSettings(p.record_path, p.record_segment_s, p.record_keep_hours, p.record_max_gb, p.record_codec)
        rec = Recorder(settings, cam.name, cam.max_fps or p.max_fps, self.metrics)
        rec.start()
        self.recorders[cam.name] = rec
        return rec

    def _set_info(self, m) -> None:
        spec = getattr(self._age_model, "spec", None)
        det_model = str(self.cfg.detector.model) if self.cfg.detector.model else "default"
        m.set_model_info(detector_kind=self.cfg.detector.kind, detector_model=Path(det_model).name,
                         age_model=getattr(spec, "name", "unknown"), age_version=getattr(spec, "version", "unknown"),
                         age_sha256=getattr(self._age_model, "sha256", "") or "")
        m.set_build_info(providers=self.cfg.runtime.providers)

    # -- status ----------------------------------------------------------------------------------------------------
    def _on_status(self, camera: str, status: str, reason: str) -> None:
        """Called by capture threads on every online/offline/ended transition."""
        from agecam.logs import scrub

        reason = scrub(secret_free(reason))  # URL credentials, and every registered secret (${env:} / ${cred:} values)
        with self._lock:
            reconnected = self.cameras[camera].report(status, reason, time.time())
        self.metrics.camera_up(camera, status == "online", reconnected)
        self.submit(self.events.camera_status(camera, time.time(), status, reason))
        if status == "ended":
            self.ended[camera].set()

    def health(self) -> HealthReport:
        """Every camera's status (a crashed pipeline overrides its source's) and live figures."""
        now = time.time()
        cams = {}
        with self._lock:
            states = {name: (st.status, st.reason, st.since_s, st.reconnects) for name, st in self.cameras.items()}
        for name, (status, reason, since_s, reconnects) in states.items():
            p, c = self.pipelines.get(name), self.captures.get(name)
            snap = p.snapshot() if p is not None else None
            cams[name] = CameraHealth(
                status="crashed" if snap is not None and snap.crashed else status, reason=reason, since_s=since_s,
                reconnects=reconnects, fps=c.fps() if c is not None else 0.0, tracks=snap.tracks if snap else 0,
                last_frame_age_s=now - snap.last_frame_ts if snap and snap.last_frame_ts else None,
                analysed_fps=snap.fps if snap else 0.0)
        return HealthReport(cams, {s.label: s.snapshot() for s in self.sinks.values()})

    def healthy(self) -> tuple[bool, str]:
        """(True, "") while every live pipeline, the age service and the publisher make progress (drives WATCHDOG=1);
        else (False, why)."""
        limit = self.cfg.runtime.heartbeat_timeout_s
        now = time.monotonic()
        for name, p in self.pipelines.items():
            snap = p.snapshot()
            if self.ended[name].is_set() and not snap.alive:
                continue
            if snap.crashed or not snap.alive:
                return False, f"pipeline:{name} is not running"
            if now - snap.heartbeat_s > limit:
                return False, f"pipeline:{name} stalled for {now - snap.heartbeat_s:.0f} s"
        if now - self.age_service.heartbeat_s > limit:
            return False, f"the age service stalled for {now - self.age_service.heartbeat_s:.0f} s"
        if not self.publisher.alive:
            return False, "the event publisher is not running"
        return True, ""

    def all_ended(self) -> bool:
        return bool(self.pipelines) and all(e.is_set() and not self.pipelines[n].alive for n, e in self.ended.items())

    def status_line(self) -> str:
        return self.health().status_line(self.age_service.faces)

    def hand_over_publisher(self):
        """For a reload: the publisher now belongs to the next App; stop() will not close it."""
        self._owns_publisher = False
        return self.publisher

    def hand_over_sinks(self, keys) -> dict:
        """For a reload: these sinks now belong to the next App; stop() will not close them."""
        kept = {k: self.sinks[k] for k in keys if k in self.sinks}
        self._owned_sinks -= set(kept)
        return kept

    # -- stop ------------------------------------------------------------------------------------------------------
    def stop(self, deadline_s: float = STOP_DEADLINE_S) -> list[str]:
        """Stop everything within one deadline, joining threads in reverse start order; returns the names of threads
        that did not stop in time (daemon threads: they are abandoned, named in the log, and end with the process)."""
        if not self.started:
            return []
        t_end = time.monotonic() + deadline_s

        def left(cap_s: float = deadline_s) -> float:
            return max(0.0, min(cap_s, t_end - time.monotonic()))

        self.stop_event.set()
        if getattr(self, "hub", None) is not None:
            self.hub.close()  # wakes MJPEG streams waiting for a frame
        stuck = [w.name for w in [*self.captures.values(), *self.pipelines.values()] if not w.join(left())]
        for r in self.recorders.values():  # all at once: each finishes its segment in parallel
            r.signal_stop()
        stuck += [r.name for r in self.recorders.values() if not r.join(left(1.0))]
        age_service = getattr(self, "age_service", None)
        if age_service is not None and not age_service.join(left()):
            stuck.append(age_service.name)
        closing = [self.sinks[k] for k in self._owned_sinks if k in self.sinks]
        for sink in closing:  # all at once: each delivers what waits (the track.end events) while connected
            sink.signal_stop(left(1.5))
        if self.publisher is not None and self._owns_publisher:
            # sends the track.end events of the stopping pipelines; a stalled subscriber costs at most 1 s
            if not self.publisher.close(left(), linger_s=left(1.0)):
                stuck.append(self.publisher.name)
        stuck += [sink.name for sink in closing if not sink.join(left())]
        for s in reversed(self._servers):
            try:
                s.close(left(2.0))
            except Exception:
                log.exception("closing %s failed", s)
        if stuck:
            log.error("threads that did not stop within the %.0f s stop deadline (abandoned): %s", deadline_s,
                      ", ".join(stuck))
        self.started = False
        return stuck
