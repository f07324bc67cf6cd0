"""Builds every component from the Config, starts and stops them, handles signals: the only wiring site."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agecam.config import Config, ConfigError, load, secret_free

log = logging.getLogger("agecam")

JOIN_TIMEOUT_S = 3.0


@dataclass
class CameraState:
    """Last known status of one camera, for health checks and the preview."""

    status: str = "starting"  # starting | online | offline | ended
    reason: str = ""
    since_s: float = field(default_factory=time.time)
    reconnects: int = 0
    was_online: bool = False


class App:
    """The running daemon: one instance per loaded config. Boundaries can be injected for tests."""

    def __init__(self, cfg: Config, *, detector=None, age_model=None, open_fn=None, notifier=None,
                 frame_tap=None, events=None, metrics=None):
        from agecam.events import EventFactory

        self.cfg = cfg
        self.stop_event = threading.Event()
        self.events = events or EventFactory()
        self._detector = detector
        self._age_model = age_model
        self._open_fn = open_fn
        self._frame_tap = frame_tap
        self.notifier = notifier
        self.metrics = metrics
        self.cameras = {c.name: CameraState() for c in cfg.cameras if c.enabled}
        self.pipelines = {}
        self.captures = {}
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

    def start(self, first_track_ids: dict[str, int] | None = None) -> None:
        """Build and start every component; on failure, stop() closes whatever was already built."""
        from agecam.daemon.agesvc import AgeService
        from agecam.daemon.metrics import Metrics
        from agecam.daemon.pipeline import CameraPipeline
        from agecam.daemon.publish import Publisher
        from agecam.daemon.slot import LatestSlot
        from agecam.daemon.sources import CaptureThread

        cfg = self.cfg
        self.started = True  # from here on stop() has something to close
        if self.metrics is None:
            self.metrics = Metrics(cameras=list(self.cameras))
        m = self.metrics

        def on_sent(ev: dict, send_s: float) -> None:
            m.events_published_total.labels(type=ev["type"]).inc()
            m.stage_duration_seconds.labels(stage="publish").observe(send_s)
            if ev["type"] != "camera.status":
                m.frame_to_event_seconds.observe(max(0.0, time.time() - ev["ts"]))

        self.publisher = Publisher(cfg.events, self.stop_event, on_sent=on_sent,
                                   on_drop=lambda reason: m.events_dropped_total.labels(reason=reason).inc())
        # bound before the models load, so subscribers are connected by the time the first events flow
        self.publisher.start()
        self.load_models()
        self._set_info(m)
        if cfg.metrics.bind:
            self._servers.append(m.serve(cfg.metrics.bind))
        self.age_service = AgeService(self._age_model, cfg.age.max_batch, self.stop_event, m)
        self.hub = None
        if cfg.preview.bind:
            from agecam.daemon.preview import PreviewHub, PreviewServer

            self.hub = PreviewHub(list(self.cameras), cfg.preview.jpeg_quality, cfg.preview.max_fps, metrics=m)
            server = PreviewServer(cfg.preview, self.hub, self.health)
            server.start()
            self._servers.append(server)
        for cam in cfg.cameras:
            if not cam.enabled:
                continue
            slot = LatestSlot(on_drop=lambda c=cam.name: m.frames_dropped_total.labels(camera=c, stage="capture").inc())
            self.ended[cam.name] = threading.Event()
            self.pipelines[cam.name] = CameraPipeline(
                cam, cfg, slot=slot, detector=self._detector, age_model=self._age_model,
                age_service=self.age_service, events=self.events, submit=self.publisher.submit,
                stop=self.stop_event, ended=self.ended[cam.name], metrics=m, hub=self.hub,
                recorder=self._recorder(cam), frame_tap=self._frame_tap,
                first_track_id=(first_track_ids or {}).get(cam.name, 1))
            self.captures[cam.name] = CaptureThread(
                cam, slot, self.stop_event, on_status=self._on_status,
                on_frame=lambda c=cam.name: m.frames_captured_total.labels(camera=c).inc(),
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

    def _recorder(self, cam):
        if not self.cfg.preview.record_path:
            return None
        from agecam.daemon.preview import Recorder

        return Recorder(self.cfg.preview.record_path, cam.name, cam.max_fps or self.cfg.preview.max_fps)

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
        with self._lock:
            st = self.cameras[camera]
            if status == "online" and st.was_online:
                st.reconnects += 1
                self.metrics.reconnects_total.labels(camera=camera).inc()
            st.was_online = st.was_online or status == "online"
            st.status, st.reason, st.since_s = status, secret_free(reason), time.time()
        self.metrics.camera_up.labels(camera=camera).set(1 if status == "online" else 0)
        self.publisher.submit(self.events.camera_status(camera, time.time(), status, st.reason))
        if status == "ended":
            self.ended[camera].set()

    def health(self) -> dict:
        """Per-camera state for /healthz and the status line."""
        now = time.time()
        cams = {}
        for name, st in self.cameras.items():
            p = self.pipelines.get(name)
            cams[name] = {
                "status": "crashed" if p is not None and p.crashed else st.status,
                "reason": st.reason,
                "since": round(st.since_s, 3),
                "reconnects": st.reconnects,
                "fps": round(p.stats.fps, 2) if p else 0.0,
                "tracks": len(p.states) if p else 0,
                "last_frame_age_s": round(now - p.last_frame_ts, 3) if p and p.last_frame_ts else None,
            }
        ok = all(c["status"] in ("online", "ended") for c in cams.values())
        return {"status": "ok" if ok else "degraded", "cameras": cams}

    def healthy(self) -> bool:
        """True while every live pipeline and the age service are making progress (drives WATCHDOG=1)."""
        limit = self.cfg.runtime.heartbeat_timeout_s
        now = time.monotonic()
        for name, p in self.pipelines.items():
            if self.ended[name].is_set() and not p.thread.is_alive():
                continue
            if p.crashed or not p.thread.is_alive() or now - p.heartbeat_s > limit:
                return False
        return now - self.age_service.heartbeat_s <= limit and self.publisher.alive()

    def all_ended(self) -> bool:
        return bool(self.pipelines) and all(e.is_set() and not self.pipelines[n].thread.is_alive()
                                            for n, e in self.ended.items())

    def status_line(self) -> str:
        h = self.health()["cameras"]
        online = sum(1 for c in h.values() if c["status"] == "online")
        tracks = sum(c["tracks"] for c in h.values())
        fps = sum(c["fps"] for c in h.values())
        return f"{online}/{len(h)} cameras online, {tracks} tracks, {fps:.1f} fps, {self.age_service.faces} faces aged"

    # -- stop ------------------------------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Stop everything, joining threads in reverse start order; returns names of threads that did not stop."""
        if not self.started:
            return []
        self.stop_event.set()
        stuck = []
        for c in self.captures.values():
            if not c.join(JOIN_TIMEOUT_S):
                stuck.append(c.name)
        for p in self.pipelines.values():
            if p.thread.ident is not None:
                p.thread.join(JOIN_TIMEOUT_S)
            if p.thread.is_alive():
                stuck.append(p.thread.name)
        age_service = getattr(self, "age_service", None)
        if age_service is not None and not age_service.join(JOIN_TIMEOUT_S):
            stuck.append("age")
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            if not publisher.join(JOIN_TIMEOUT_S):
                stuck.append("publish")
            publisher.drain_and_close()  # the track.end events the pipelines sent while stopping
        for s in reversed(self._servers):
            try:
                s.close()
            except Exception:
                log.exception("closing %s failed", s)
        if getattr(self, "hub", None) is not None:
            self.hub.close()
        if stuck:
            log.error("threads that did not stop within %.0f s: %s", JOIN_TIMEOUT_S, ", ".join(stuck))
        self.started = False
        return stuck


# -- the `agecam run` command -------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    p.add_argument("--config", required=True, type=Path, help="YAML config file")
    p.add_argument("--log-format", choices=["text", "json"], help="override runtime.log_format")
    p.set_defaults(func=run_command)


def _describe(cfg: Config, app: App) -> str:
    lines = [f"events:  {app.publisher.endpoint}  (agecam events --connect {app.publisher.endpoint})"]
    if cfg.preview.bind:
        lines.append(f"preview: http://{cfg.preview.bind}/")
    if cfg.metrics.bind:
        lines.append(f"metrics: http://{cfg.metrics.bind}/metrics")
    lines += [f"camera {c.name}: {secret_free(c.source)}" for c in cfg.cameras if c.enabled]
    return "\n".join(lines)


def run_command(args) -> int:
    from agecam.daemon.systemd import Notifier, WatchdogPinger
    from agecam.logs import add_secret, setup_logging

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    setup_logging(cfg.runtime.log_level, args.log_format or cfg.runtime.log_format)
    add_secret(cfg.preview.token)
    notifier = Notifier()
    terminate = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminate.set())
    signal.signal(signal.SIGINT, lambda *_: terminate.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())

    app = App(cfg, notifier=notifier)
    try:
        app.start()
    except Exception as exc:
        log.error("cannot start: %s", exc)
        app.stop()
        notifier.stopping()
        return 1
    print(_describe(cfg, app), flush=True)
    pinger = WatchdogPinger(notifier, lambda: app.healthy(), terminate)
    pinger.start()
    notifier.ready()
    last_status = ""
    while not terminate.wait(0.5):
        line = app.status_line()
        if line != last_status:
            notifier.status(line)
            last_status = line
        if reload_requested.is_set():
            reload_requested.clear()
            app = _reload(app, args.config, notifier)
            if app is None:
                log.error("no config could be restarted after a failed reload; exiting so the service manager restarts us")
                notifier.stopping()
                pinger.join(2.0)
                return 1
        if app.all_ended():
            log.info("every camera has ended; stopping")
            break
    notifier.stopping()
    log.info("stopping")
    stuck = app.stop()
    pinger.join(2.0)
    return 1 if stuck else 0


def _reload(app: App, path: Path, notifier) -> App | None:
    """SIGHUP: apply a new valid config by restarting the components; keep the old one on any error."""
    from agecam.logs import add_secret

    try:
        new_cfg = load(path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running config: %s", "; ".join(exc.errors))
        return app
    notifier.reloading()
    log.info("reloading config from %s", path)
    add_secret(new_cfg.preview.token)
    try:
        candidate = App(new_cfg, notifier=notifier, events=app.events)
        candidate.load_models()  # refuse broken model paths before touching the running daemon
    except Exception as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        notifier.ready()
        return app
    next_ids = {name: p.tracker.next_id for name, p in app.pipelines.items()}  # track IDs stay unique in the run
    app.stop()
    try:
        candidate.start(first_track_ids=next_ids)
    except Exception as exc:
        log.error("reload failed to start (%s); restarting the previous config", exc)
        candidate.stop()
        candidate = App(app.cfg, notifier=notifier, events=app.events, detector=app._detector, age_model=app._age_model)
        try:
            candidate.start(first_track_ids=next_ids)
        except Exception as exc2:
            log.error("the previous config failed to restart too: %s", exc2)
            candidate.stop()
            return None
    notifier.ready()
    log.info("reload applied")
    return candidate
