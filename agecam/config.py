"""The one typed configuration schema, loaded from YAML, with errors that name their field."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from agecam.netcheck import check_host_port, check_token, is_loopback_host
from agecam.secrets import resolve_refs, secret_free, url_secrets
from agecam.sinkconfig import NAME_PATTERN, SinkConfig, check_sink_names, default_instance

DEFAULT_MODELS_DIR = Path(os.environ.get("AGECAM_MODELS_DIR", Path.home() / ".cache" / "agecam" / "models"))


class _Section(BaseModel):
    """Base for every section: unknown keys are refused, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class CameraConfig(_Section):
    """One frame source and how to read it."""

    name: str = Field(
        description="Short unique name; used in event topics, metric labels, preview URLs and recording folders.",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
    )
    source: StrictInt | StrictStr = Field(
        description="'demo' (synthetic scene of real faces), a video file path, a camera index, /dev/videoN or "
        "/dev/v4l/by-id|by-path/..., or an rtsp:// URL (credentials never logged; keep them out of the file with "
        "${env:NAME} or ${cred:NAME}).",
    )
    loop: StrictBool = Field(False, description="Replay a video file from the start when it ends instead of ending the camera.")
    enabled: StrictBool = Field(True, description="Skip this camera without deleting its section.")
    max_fps: float | None = Field(
        None, gt=0, le=240, description="Process at most this many frames per second; extra frames are skipped. None: source rate."
    )
    width: int | None = Field(None, gt=0, le=8192, description="Requested capture width for USB cameras; None keeps the driver's.")
    height: int | None = Field(None, gt=0, le=8192, description="Requested capture height for USB cameras; None keeps the driver's.")
    decode_threads: int = Field(1, ge=0, le=64, description="FFmpeg decoder threads for files and streams. 1 "
                                "decodes on the capture thread (least CPU: measured 0.7 against 1.0 ms per 640x480 "
                                "H.264 frame); 0 lets FFmpeg choose (all cores), for 4K streams one core cannot keep up with.")
    open_timeout_s: float = Field(10.0, gt=0, le=300, description="Give up opening a source after this long; longer tolerates slow RTSP servers.")
    read_timeout_s: float = Field(5.0, gt=0, le=300, description="Watchdog: no frame for this long marks the camera offline and reconnects.")
    reconnect_min_s: float = Field(0.5, gt=0, le=3600, description="First reconnect delay; doubled after each failure.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Cap on the reconnect delay; lower reconnects faster but hammers a dead server.")
    demo_seed: int = Field(0, ge=0, description="Seed of the demo scene (only for source 'demo').")
    demo_duration_s: float | None = Field(
        None, gt=0, le=86400, description="Length of the demo scene; it ends the camera afterwards unless loop is true. None: endless."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if set(v) == {"."}:
            raise ValueError("must not be only dots: the name is also a folder name (recordings)")
        return v

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str | int) -> str | int:
        if isinstance(v, int):
            if v < 0:
                raise ValueError("a camera index must be 0 or more")
            return v
        if not v.strip():
            raise ValueError("must not be empty; use 'demo', a file path, a camera index, /dev/videoN or rtsp://...")
        if re.fullmatch(r"\d+", v):
            return int(v)
        return v

    @model_validator(mode="after")
    def _check_backoff(self) -> "CameraConfig":
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(f"reconnect_min_s ({self.reconnect_min_s:g}) must not exceed reconnect_max_s "
                             f"({self.reconnect_max_s:g})")
        return self


class DetectorConfig(_Section):
    """Face detector choice and its cadence."""

    kind: Literal["mtcnn", "scrfd"] = Field("mtcnn", description="mtcnn: the fetched offline default. scrfd: an "
                                            "insightface SCRFD ONNX you bring (set model).")
    model: Path | None = Field(None, description="Detector ONNX file (required for scrfd); None uses the fetched MTCNN models.")
    min_face_px: int = Field(40, ge=12, le=1024, description="Smallest face side searched for; smaller finds distant "
                             "faces but costs more CPU.")
    score_threshold: float = Field(0.7, ge=0.0, le=1.0, description="Minimum detection score; lower finds more faces "
                                   "and more false positives.")
    full_frame_interval_s: float = Field(
        3.0, ge=0.0, le=60.0, description="A full-frame search at most this often: the safety net for faces that "
        "appear without moving (new faces are otherwise found where the picture changed). 0 searches every frame in "
        "full (most CPU).")
    track_check_interval_s: float = Field(
        0.2, ge=0.0, le=5.0, description="Tracked faces are confirmed by the detector this often (and on every frame "
        "while a new track needs confirming); in between they follow their predicted motion, and age samples wait "
        "for the next check. 0 checks every frame. At most half of tracker.lost_track_buffer_s.")
    motion_interval_s: float = Field(
        0.2, ge=0.0, le=5.0, description="How often the picture is compared with the last comparison's to find "
        "changed regions away from tracked faces, which are then searched for new faces. 0 turns it off (new faces "
        "are then found by the full-frame search only).")
    cut_check_interval_s: float | None = Field(
        0.0, ge=0.0, le=5.0, description="How often the picture is checked for a cut: most of it changed at once (a "
        "switched feed, a PTZ preset move, the lights, a new frame size), after which the whole frame is searched at "
        "once (at most every 0.2 s, as during a pan every frame is a cut). 0 checks every frame: each frame is then "
        "converted to BGR (~0.15 ms at 640x480) and compared on a 40 px wide copy (0.03 ms; 0.3 ms at 1080p). null "
        "turns it off: frames no stage needs are not converted, and a cut is found by the motion comparison.")
    motion_threshold: int = Field(16, ge=1, le=255, description="Grey-level change (0-255, on a 4x smaller copy) "
                                  "that counts as movement (and, over most of the picture, as a cut); higher ignores "
                                  "more noise and flicker.")
    input_max_px: int = Field(640, ge=64, le=4096, description="Frames are downscaled so their long side is at most "
                              "this before detection.")


class TrackerConfig(_Section):
    """ByteTrack-style association settings."""

    high_score: float = Field(0.8, ge=0, le=1, description="Detections at or above this score can start tracks.")
    low_score: float = Field(0.5, ge=0, le=1, description="Detections between low and high only extend existing tracks.")
    match_iou: float = Field(0.2, gt=0, le=1, description="Minimum IoU to match a detection to a track; lower follows fast motion, risks swaps.")
    confirm_hits: int = Field(3, ge=1, le=100, description="Matched detections needed before a track is confirmed "
                              "and announced (fewer for a face the detector is sure of: see sure_score).")
    sure_score: float | None = Field(
        0.95, ge=0, le=1, description="A new track whose detections all scored at least this (above high_score) is "
        "confirmed on its second match instead of its confirm_hits-th, and at once on the first frame of a cut: a "
        "face the detector is sure of is announced (and aged) sooner, while doubtful detections still need "
        "confirm_hits. null: always confirm_hits.")
    lost_track_buffer_s: float = Field(
        1.5, ge=0, le=60, description="Seconds a lost track is kept for re-identification; longer bridges occlusions, risks swaps."
    )


class AgeConfig(_Section):
    """Age model and how often tracks are sampled."""

    model: Path | None = Field(None, description="Age model ONNX following the agecam contract; None uses the fetched reference model.")
    landmarks: Literal["auto", "detector", "dlib5"] = Field(
        "auto",
        description="Where chip landmarks come from. auto: dlib5 when the model carries a dlib chip template (the "
        "reference model does), else the detector's. dlib5: dlib's 5-point predictor in the detector's box (reproduces the "
        "reference model's training chips: within ~1 year of its own pipeline; needs dlib, ~1-3 ms per face), or the "
        "detector's 5 points (no dlib; ~2.3 years from the reference pipeline on the sample faces).",
    )
    first_sample_s: float = Field(0.0, ge=0, le=60, description="Delay after a track is confirmed before its first sample.")
    unconverged_interval_s: float = Field(0.3, gt=0, le=3600, description="Sample interval while the estimate is not yet stable.")
    converged_interval_s: float = Field(3.0, gt=0, le=3600, description="Sample interval once stable; higher saves CPU.")
    stable_std_years: float = Field(4.0, gt=0, le=100, description="A track is stable once the std of its mean age is at or below this.")
    stable_min_samples: int = Field(5, ge=1, le=10000, description="...and it has at least this many samples.")
    max_samples: int = Field(60, ge=1, le=10000, description="Samples kept per track (oldest forgotten first).")
    min_face_px: int = Field(32, ge=8, le=1024, description="Faces smaller than this are not sampled.")
    min_quality: float = Field(0.15, ge=0, le=1, description="Crops at or above this quality (size, sharpness, pose, "
                               "detector score) are aged at once; poorer ones wait (see max_wait_s).")
    max_wait_s: float = Field(0.5, ge=0, le=60, description="A track with no crop at min_quality for this long is "
                              "aged from its best poorer crop, weighted by its quality (a wide interval); better crops "
                              "take over later. Lower ages turned or blurred faces sooner but noisier.")
    max_batch: int = Field(16, ge=1, le=256, description="Largest age batch across cameras; bigger is faster per face but adds latency.")

    @model_validator(mode="after")
    def _check_samples(self) -> "AgeConfig":
        if self.stable_min_samples > self.max_samples:
            raise ValueError(f"stable_min_samples ({self.stable_min_samples}) must not exceed max_samples "
                             f"({self.max_samples}): a track could never become stable")
        return self


class CurveConfig(_Section):
    """ZeroMQ CURVE: encrypted events, delivered only to subscribers whose public key is in the allow-list."""

    server_secret_key: Path = Field(
        description="The daemon's secret certificate (NAME.key_secret from `agecam keys generate`); keep it 0600.")
    authorized_clients: Path = Field(
        description="Folder of subscribers' public certificates (*.key); re-read on SIGHUP, so adding or revoking a "
        "subscriber needs no restart.")


class EventsConfig(_Section):
    """ZeroMQ event publisher."""

    bind: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB endpoint; loopback by default. Any other "
                      "TCP address needs `curve` (anyone on the network could subscribe).")
    curve: CurveConfig | None = Field(None, description="CURVE encryption and client allow-list; null: plain (loopback only).")
    hwm: int = Field(10000, ge=1, le=1_000_000, description="Messages queued per subscriber; beyond it a slow subscriber's copies are dropped (it sees gaps in seq). Higher costs memory per slow subscriber.")
    queue_size: int = Field(10000, ge=1, le=1_000_000, description="Internal publish queue; when full, events are dropped and counted.")
    update_min_delta_years: float = Field(1.0, ge=0, le=100, description="A track.update is sent when the age moves by at least this much...")
    update_max_interval_s: float = Field(5.0, gt=0, le=3600, description="...or at least this often while the track lives.")

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, v: str) -> str:
        m = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})|ipc://\S+|inproc://\S+", v)
        if not m or (m.group(2) is not None and not 0 <= int(m.group(2)) <= 65535):
            raise ValueError("expected tcp://HOST:PORT (port 0-65535), ipc://PATH or inproc://NAME, e.g. tcp://127.0.0.1:5556")
        return v

    @property
    def tcp_host(self) -> str | None:
        """The host of a tcp:// bind, else None (ipc and inproc stay on this machine)."""
        m = re.fullmatch(r"tcp://(.+):\d+", self.bind)
        return m.group(1) if m else None

    @model_validator(mode="after")
    def _curve_off_loopback(self) -> "EventsConfig":
        host = self.tcp_host
        if host is not None and self.curve is None and (host == "*" or not is_loopback_host(host)):
            raise ValueError("bind: a non-loopback address needs events.curve (encryption and a client allow-list): "
                             "events carry per-person ages, boxes and times")
        return self


class _HttpSurface(_Section):
    """An HTTP listener: HOST:PORT (loopback by default), and a token that is mandatory off loopback."""

    bind: str | None = Field(None, description="HOST:PORT to listen on; null disables it.")
    token: str | None = Field(None, description="Required from every client when set; mandatory off loopback.")
    allowed_hosts: list[str] = Field(default_factory=list, description="Extra Host header names to serve (this "
                                     "machine's DNS name, a proxy's name). Loopback names, IP addresses and the bind "
                                     "host are always allowed; any other name is refused (DNS rebinding).")

    _v = field_validator("bind")(classmethod(lambda cls, v: check_host_port(v)))
    _t = field_validator("token")(classmethod(lambda cls, v: check_token(v)))

    @model_validator(mode="after")
    def _token_off_loopback(self):
        if self.bind and not is_loopback_host(self.bind.rsplit(":", 1)[0]) and not self.token:
            raise ValueError("token: required when bind is not a loopback address (anyone on the network could "
                             "reach it)")
        return self


class MetricsConfig(_HttpSurface):
    """Prometheus endpoint."""

    bind: str | None = Field("127.0.0.1:9108", description="HOST:PORT serving /metrics; null disables it.")
    token: str | None = Field(
        None, description="Bearer token Prometheus must send (scrape config `authorization: {credentials: ...}`); "
        "mandatory when bind is not loopback. Use ${env:NAME} or ${cred:NAME} to keep it out of this file.")


class PreviewConfig(_HttpSurface):
    """Annotated live preview over HTTP."""

    bind: str | None = Field("127.0.0.1:8080", description="HOST:PORT serving the preview; null disables it.")
    token: str | None = Field(
        None, description="Required as ?token= or Authorization: Bearer when set; mandatory when bind is not loopback. "
        "Use ${env:NAME} or ${cred:NAME} to keep it out of this file.")
    max_fps: float = Field(10.0, gt=0, le=60, description="Cap on MJPEG frames per second per viewer; lower saves CPU.")
    jpeg_quality: int = Field(80, ge=10, le=100, description="JPEG quality of preview frames.")
    max_connections: int = Field(32, ge=1, le=1024, description="Open connections served at once; more get 503.")
    max_viewers: int = Field(8, ge=1, le=256, description="MJPEG streams at once (each costs an encode per frame); more get 503.")
    client_timeout_s: float = Field(10.0, gt=0, le=300, description="A client silent this long (idle keep-alive, slow "
                                    "request) or not reading this long (a stalled viewer) is disconnected.")
    record_path: Path | None = Field(
        None, description="Also record each camera's annotated stream under this folder, as <camera>/<UTC start>.mkv "
        "segments (Matroska: playable after a crash); null disables.")
    record_segment_s: float = Field(300.0, ge=1, le=86400, description="Length of one recording segment; shorter "
                                    "loses less to a crash and deletes in finer steps, longer makes fewer files.")
    record_keep_hours: float = Field(168.0, gt=0, le=24 * 3650, description="Segments older than this are deleted.")
    record_max_gb: float = Field(10.0, gt=0, le=100_000, description="Per camera: the oldest segments are deleted "
                                 "while its folder holds more than this.")
    record_codec: Literal["auto", "mp4v", "vp8", "h264", "mjpg"] = Field(
        "auto", description="auto: H.264 where OpenCV's FFmpeg has an encoder, else mp4v (~1 ms a frame; plays in "
        "VLC, mpv, ffplay). vp8 also plays in browsers but costs ~20 ms of CPU a frame.")


class RuntimeConfig(_Section):
    """Process-wide settings: this daemon's name, model cache, inference providers, logging."""

    instance: str = Field(default_factory=default_instance, pattern=NAME_PATTERN, description="Names this daemon in "
                          "every event and MQTT topic, so many hosts' cameras stay apart; default: the host name.")
    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="Where `agecam models fetch` puts the default models.")
    providers: list[Literal["CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"]] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], description="onnxruntime execution providers, preferred first.")
    intra_op_threads: int = Field(1, ge=0, le=64, description="Threads per inference call. 1: cameras run side by "
                                  "side, each call on one core (least CPU). 0 lets onnxruntime choose (all cores): "
                                  "lower latency for one camera, ~25 % more CPU in all.")
    onnx_memory_arena: StrictBool = Field(False, description="onnxruntime's CPU memory arena per model. Off: "
                                          "each call allocates from malloc, and RSS stays flat. On: it keeps the "
                                          "peak of every input shape met and grows in steps (measured +4 %/h over a "
                                          "soak); no CPU difference was measured with the default detector schedule.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log verbosity.")
    log_format: Literal["text", "json"] = Field("text", description="text suits journald; json writes one object per line.")
    heartbeat_timeout_s: float = Field(10.0, gt=0, le=600, description="A pipeline that has not completed a loop for "
                                       "this long stops the systemd watchdog pings.")


class Config(BaseModel):
    """The whole daemon configuration."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cameras: list[CameraConfig] = Field(min_length=1, max_length=256, description="Frame sources; one or more enabled.")
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    age: AgeConfig = Field(default_factory=AgeConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    sinks: list[SinkConfig] = Field(default_factory=list, max_length=16, description="Brokers that also receive "
                                    "every event (kind: mqtt or redis), each behind its own bounded backlog.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        seen: dict[str, int] = {}
        for i, cam in enumerate(self.cameras):
            if cam.name in seen:
                raise ValueError(f"cameras[{i}].name: duplicate camera name {cam.name!r} (also cameras[{seen[cam.name]}]); names must be unique")
            seen[cam.name] = i
        if self.detector.kind == "scrfd" and self.detector.model is None:
            raise ValueError("detector.model: required when detector.kind is 'scrfd' (bring an insightface SCRFD ONNX)")
        if self.tracker.low_score > self.tracker.high_score:
            raise ValueError("tracker.low_score: must not exceed tracker.high_score")
        if self.tracker.sure_score is not None and self.tracker.sure_score <= self.tracker.high_score:
            raise ValueError(f"tracker.sure_score: must be above tracker.high_score ({self.tracker.sure_score:g} <= "
                             f"{self.tracker.high_score:g}), else every new track is sure and confirm_hits has no "
                             f"effect; or null to always need confirm_hits")
        if self.tracker.lost_track_buffer_s < 2 * self.detector.track_check_interval_s:
            raise ValueError(f"tracker.lost_track_buffer_s: must be at least twice detector.track_check_interval_s "
                             f"({self.tracker.lost_track_buffer_s:g} < 2 x {self.detector.track_check_interval_s:g}): "
                             f"tracks are only seen at checks, so they would end between two of them")
        if not any(cam.enabled for cam in self.cameras):
            raise ValueError("cameras: every camera is disabled; enable at least one (the daemon would idle and look healthy)")
        return check_sink_names(self.sinks) or self

    _secrets: list[str] = PrivateAttr(default_factory=list)

    def secrets(self) -> list[str]:
        """Every secret this config holds (tokens, URL credentials, resolved ${env:}/${cred:} values): for scrubbing."""
        found = [t for t in (self.preview.token, self.metrics.token) if t]
        for cam in self.cameras:
            found += url_secrets(cam.source)
        for sink in self.sinks:
            found += url_secrets(sink.url) + ([sink.password] if sink.password else [])
        return sorted(set(found + self._secrets), key=len, reverse=True)


class ConfigError(Exception):
    """A config file that cannot be used; `errors` lists one 'path: message' per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def report(self) -> str:
        """The file, how many problems, one 'path: message' per line."""
        return "\n".join([f"{self.source}: {len(self.errors)} error(s)"] + [f"  {e}" for e in self.errors])


def _loc_to_path(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i and isinstance(loc[i - 1], int) and part in ("mqtt", "redis"):
            continue  # the tag pydantic adds inside a discriminated list item (sinks)
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "str") or "[" in str(part) or str(part).startswith("function-"):
            continue  # union branch names pydantic adds; not part of the user's path
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_error(err: dict) -> str:
    path = _loc_to_path(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown field"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a sink's kind
        got = err.get("ctx", {}).get("tag")
        return f"{path}.kind: must be one of 'mqtt', 'redis'" + (f" (got {secret_free(repr(got))})" if got else "")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if re.match(r"^[\w.\[\]]+: ", msg):  # a cross-field check that names its own path
            return f"{path}.{msg}" if err["loc"] else msg
    if err["type"] in ("literal_error", "enum"):
        msg = msg.replace("Input should be", "must be one of")
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        if re.search(r"(token|password|secret)$", path):
            msg += " (value not shown: it is a secret)"
        else:
            msg += f" (got {secret_free(repr(err['input']))})"
    return f"{path}: {msg}"


def parse(data: object, source: str = "<config>") -> Config:
    """Validate a parsed YAML document; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(data).__name__}"])
    data, ref_errors, resolved = resolve_refs(data)
    if ref_errors:
        raise ConfigError(source, ref_errors)
    try:
        cfg = Config.model_validate(data)
        cfg._secrets = resolved
        return cfg
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            line = _format_error(err)
            if line not in errors:
                errors.append(line)
        raise ConfigError(source, errors) from None


def load(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.start}): a YAML config must be UTF-8"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"YAML syntax error at {where}{problem}"]) from None
    return parse(data, str(path))


def load_or_report(path: str | Path, stream=None) -> Config | None:
    """The config at `path`, or None after printing every problem to `stream` (stderr) for a command to exit 2."""
    import sys

    try:
        return load(path)
    except ConfigError as exc:
        print(exc.report(), file=stream or sys.stderr)
        return None
