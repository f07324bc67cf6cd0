"""The `agecam run` command: signals, systemd notifications, SIGHUP reloads and the one stop path."""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from agecam import exits
from agecam.config import Config, ConfigError, load, load_or_report
from agecam.daemon.app import App
from agecam.secrets import secret_free

log = logging.getLogger("agecam")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT (SIGHUP reloads the config)")
    p.add_argument("--config", required=True, type=Path, help="YAML config file (see config/example.yaml)")
    p.add_argument("--log-format", choices=["text", "json"], help="override runtime.log_format (default: the config's)")
    p.set_defaults(func=run_command)


def _describe(cfg: Config, app: App) -> str:
    lines = [f"events:  {app.publisher.endpoint}  (agecam events --connect {app.publisher.endpoint})"]
    if cfg.preview.bind:
        lines.append(f"preview: http://{cfg.preview.bind}/")
    if cfg.metrics.bind:
        lines.append(f"metrics: http://{cfg.metrics.bind}/metrics")
    lines += [f"sink {c.label}: {secret_free(c.url)}" for c in cfg.sinks]
    lines += [f"camera {c.name}: {secret_free(c.source)}" for c in cfg.cameras if c.enabled]
    return "\n".join(lines)


def run_command(args) -> int:
    from agecam.daemon.systemd import Notifier, WatchdogPinger
    from agecam.logs import add_secret, setup_logging

    cfg = load_or_report(args.config)
    if cfg is None:
        return exits.USAGE
    setup_logging(cfg.runtime.log_level, args.log_format or cfg.runtime.log_format)
    from agecam.daemon import memory
    from agecam.daemon.sources import quiet_native_logs

    quiet_native_logs()
    memory.limit_arenas()  # before any thread starts: reloads replace threads, and their arenas must not pile up
    for secret in cfg.secrets():
        add_secret(secret)
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
        return exits.USAGE if _is_refused_input(exc) else exits.FAILURE
    print(_describe(cfg, app), flush=True)
    pinging = threading.Event()  # the pinger's own stop: it ends before STOPPING=1, whatever ends the run
    reloading = threading.Event()  # while set, the App being replaced is not judged (its threads are stopping)
    pinger = WatchdogPinger(notifier, lambda: (True, "") if reloading.is_set() else app.healthy(), pinging)
    pinger.start()
    notifier.ready()

    def shut_down(current: App | None, code: int) -> int:
        pinging.set()
        pinger.join(1.0)  # no WATCHDOG=1 after STOPPING=1
        notifier.stopping()
        log.info("stopping")
        stuck = current.stop() if current is not None else []
        return exits.FAILURE if stuck else code

    last_status = ""
    while not terminate.wait(0.5):
        line = app.status_line()
        if line != last_status:
            notifier.status(line)
            last_status = line
        if reload_requested.is_set():
            reload_requested.clear()
            reloading.set()
            try:
                reloaded = _reload(app, args.config, notifier, terminate)
            finally:
                reloading.clear()
            memory.trim()  # what the old App's threads freed goes back to the system
            if reloaded is None:
                log.error("no config could be restarted after a failed reload; exiting so the service manager restarts us")
                return shut_down(None, exits.FAILURE)
            app = reloaded
        if app.all_ended():
            log.info("every camera has ended; stopping")
            break
    return shut_down(app, exits.OK)


def _is_refused_input(exc: Exception) -> bool:
    """A model or key file that is missing or wrong: the operator must fix it, a restart will not help."""
    from agecam.daemon.detect import DetectorModelError
    from agecam.keys import CertificateError
    from agecam.models.contract import ModelContractError
    from agecam.models.fetch import MissingModelsError

    return isinstance(exc, (DetectorModelError, ModelContractError, MissingModelsError, CertificateError,
                            FileNotFoundError))


def _file_key(path) -> tuple | None:
    """A model file's identity for reuse: path, size and mtime (a file replaced in place is loaded again)."""
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns)


def _detector_key(cfg: Config) -> tuple:
    """What the detector object is built from; equal keys let a reload keep the loaded detector."""
    r = cfg.runtime
    return (cfg.detector.model_dump_json(), _file_key(cfg.detector.model), str(r.models_dir), tuple(r.providers),
            r.intra_op_threads, r.onnx_memory_arena)


def _age_key(cfg: Config) -> tuple:
    """What the age model object is built from (the model, its landmarks mode, the runtime)."""
    r = cfg.runtime
    return (_file_key(cfg.age.model), cfg.age.landmarks, str(r.models_dir), tuple(r.providers), r.intra_op_threads,
            r.onnx_memory_arena)


def _reload(app: App, path: Path, notifier, terminate: threading.Event | None = None) -> App | None:
    """SIGHUP: apply a new valid config by restarting the components; keep the old one on any error."""
    from agecam.logs import add_secret

    try:
        new_cfg = load(path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running config: %s", "; ".join(exc.errors))
        return app
    except Exception as exc:  # whatever a reload meets, the running daemon keeps running
        log.exception("reload refused, keeping the running config: %s", exc)
        return app
    notifier.reloading()
    log.info("reloading config from %s", path)
    for secret in new_cfg.secrets():
        add_secret(secret)
    reuse = {}  # unchanged models keep their sessions: no reload latency, and no native memory left behind per reload
    try:
        keep_publisher = (new_cfg.events == app.cfg.events and app.publisher is not None
                          and app.publisher.keeps_clients())
    except Exception as exc:  # an unreadable allow-list: a new publisher reads it again, or refuses with the reason
        log.warning("events: cannot re-read the CURVE allow-list (%s); the publisher is rebuilt", exc)
        keep_publisher = False
    if keep_publisher:
        reuse["publisher"] = app.publisher  # subscribers stay connected: nothing is lost across the reload
    if _detector_key(new_cfg) == _detector_key(app.cfg):
        reuse["detector"] = app._detector
    if _age_key(new_cfg) == _age_key(app.cfg):
        reuse["age_model"] = app._age_model
    from agecam.daemon.sinks import sink_key

    wanted = {sink_key(c, new_cfg.runtime.instance) for c in new_cfg.sinks}
    reuse["sinks"] = {k: s for k, s in app.sinks.items() if k in wanted}  # connections and backlogs carry over
    try:
        candidate = App(new_cfg, notifier=notifier, events=app.events, track_ids=app.track_ids, **reuse)
        candidate.load_models()  # refuse broken model paths before touching the running daemon
    except Exception as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        notifier.ready()
        return app
    if terminate is not None and terminate.is_set():  # SIGTERM while the new models loaded: stop, do not switch
        log.info("reload abandoned: stopping")
        return app
    if keep_publisher:
        app.hand_over_publisher()
    app.hand_over_sinks(reuse["sinks"])
    app.stop()
    try:
        candidate.start()
    except Exception as exc:
        log.error("reload failed to start (%s); restarting the previous config", exc)
        kept = candidate.hand_over_publisher() if keep_publisher else None
        kept_sinks = candidate.hand_over_sinks(list(candidate.sinks))
        candidate.stop()
        candidate = App(app.cfg, notifier=notifier, events=app.events, track_ids=app.track_ids,
                        detector=app._detector, age_model=app._age_model, publisher=kept, sinks=kept_sinks)
        try:
            candidate.start()
        except Exception as exc2:
            log.error("the previous config failed to restart too: %s", exc2)
            candidate.stop()
            return None
    notifier.ready()
    log.info("reload applied")
    return candidate
