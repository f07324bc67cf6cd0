"""SCRFD (insightface's detector, a user-supplied ONNX): layout read from the model, letterboxed input, decoding."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from agecam.config import RuntimeConfig
from agecam.daemon.detect import DetectorModelError, load_session, nms, pick, shape_dims
from agecam.daemon.types import Detections

log = logging.getLogger(__name__)


class ScrfdDetector:
    """An insightface SCRFD ONNX (det_500m, det_10g, ...): letterboxed input, distance decoding, NMS.

    The layout is read from the model: outputs are grouped by their last dimension (1 scores, 4 box distances,
    10 landmark distances), strides and anchors per location come from a probe run's row counts. Input is
    (RGB - 127.5) / 128 like insightface. A fixed-size model is fed its size; a dynamic one the image scaled so its
    long side is `input_max_px`, padded to a multiple of the largest stride.
    """

    nms_threshold = 0.4

    def __init__(self, model: Path, runtime: RuntimeConfig, min_face_px: int = 20, score_threshold: float = 0.5,
                 input_max_px: int = 640):
        self.path = Path(model)
        self.session = load_session(self.path, runtime, "SCRFD detector")
        self.min_face_px = int(min_face_px)
        self.score_threshold = float(score_threshold)
        self.input_max_px = int(input_max_px)
        ins = self.session.get_inputs()
        outs = self.session.get_outputs()
        expected = ("expected an insightface SCRFD ONNX: one input [1, 3, H, W] and 6 or 9 (or 10 or 15) outputs "
                    "of scores [K, 1], box distances [K, 4] and optionally landmark distances [K, 10]")
        found = f"found inputs {[(i.name, i.shape) for i in ins]} and outputs {[(o.name, o.shape) for o in outs]}"
        if len(ins) != 1 or len(ins[0].shape) != 4 or shape_dims(ins[0].shape)[1] not in (3, None):
            raise DetectorModelError(f"SCRFD model {self.path}: {expected}; {found}")
        self.input_name = ins[0].name
        hw = shape_dims(ins[0].shape)[2:]
        self.fixed_hw = tuple(hw) if all(hw) else None
        self.output_names = [o.name for o in outs]
        try:
            self._read_layout()
        except (ValueError, IndexError) as exc:
            raise DetectorModelError(f"SCRFD model {self.path}: {expected}; {found} ({exc})") from None

    def _read_layout(self) -> None:
        ph, pw = self.fixed_hw or (128, 128)
        outs = self.session.run(None, {self.input_name: np.zeros((1, 3, ph, pw), np.float32)})
        outs = [o[0] if o.ndim == 3 else o for o in outs]
        groups = {1: [], 4: [], 10: []}
        for i, o in enumerate(outs):
            if o.ndim != 2 or o.shape[1] not in groups:
                raise ValueError(f"output {self.output_names[i]} has shape {list(o.shape)}")
            groups[o.shape[1]].append(i)
        n = len(groups[1])
        if n == 0 or len(groups[4]) != n or len(groups[10]) not in (0, n):
            raise ValueError(f"{n} score outputs, {len(groups[4])} box outputs, {len(groups[10])} landmark outputs")
        rows = lambda idx: sorted(idx, key=lambda i: -outs[i].shape[0])  # noqa: E731 - finest stride first
        self.score_idx, self.box_idx = rows(groups[1]), rows(groups[4])
        self.kps_idx = rows(groups[10]) if groups[10] else None
        r0 = outs[self.score_idx[0]].shape[0]
        stride, anchors = 1, None
        while stride <= 64:  # the smallest power-of-2 stride giving a whole number of anchors per location
            cells = (ph // stride) * (pw // stride)
            if cells and r0 % cells == 0 and r0 // cells >= 1:
                anchors = r0 // cells
                if anchors <= 4:
                    break
            stride *= 2
        if anchors is None or anchors > 4:
            raise ValueError(f"cannot infer strides from {r0} rows at input {pw}x{ph}")
        self.anchors = anchors
        self.strides = [stride * 2 ** i for i in range(n)]
        for i, s in zip(self.score_idx, self.strides):
            want = (ph // s) * (pw // s) * anchors
            if outs[i].shape[0] != want:
                raise ValueError(f"output {self.output_names[i]} has {outs[i].shape[0]} rows, stride {s} needs {want}")

    def _input_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.fixed_hw:
            return self.fixed_hw
        s = min(1.0, self.input_max_px / max(h, w))  # never upscaled: a crop costs what its pixels cost
        m = self.strides[-1]
        return (max(m, int(np.ceil(h * s / m)) * m), max(m, int(np.ceil(w * s / m)) * m))

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """All faces in the image whose longer box side is at least min_face_px."""
        h, w = image_bgr.shape[:2]
        ih, iw = self._input_hw(h, w)
        if h / w > ih / iw:
            nh, nw = ih, int(ih * w / h)
        else:
            nw, nh = iw, int(iw * h / w)
        det_scale = nh / h
        canvas = np.zeros((ih, iw, 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(image_bgr, (nw, nh))
        blob = cv2.dnn.blobFromImage(canvas, 1.0 / 128, (iw, ih), (127.5, 127.5, 127.5), swapRB=True)
        outs = self.session.run(None, {self.input_name: blob})
        outs = [o[0] if o.ndim == 3 else o for o in outs]
        return self._decode(outs, ih, iw, det_scale)

    def _decode(self, outs: list[np.ndarray], ih: int, iw: int, det_scale: float) -> Detections:
        boxes, scores, kpss = [], [], []
        for lvl, stride in enumerate(self.strides):
            sc = outs[self.score_idx[lvl]][:, 0]
            pos = np.nonzero(sc >= self.score_threshold)[0]
            if not len(pos):
                continue
            gw = iw // stride
            cell = pos // self.anchors
            centres = np.stack([cell % gw, cell // gw], 1).astype(np.float32) * stride
            d = outs[self.box_idx[lvl]][pos] * stride
            boxes.append(np.concatenate([centres - d[:, :2], centres + d[:, 2:]], 1))
            scores.append(sc[pos])
            if self.kps_idx is not None:
                k = outs[self.kps_idx[lvl]][pos].reshape(-1, 5, 2) * stride
                kpss.append(centres[:, None, :] + k)
        if not boxes:
            return Detections.empty()
        b = np.concatenate(boxes) / det_scale
        s = np.concatenate(scores)
        keep = nms(b, s, self.nms_threshold)
        keep = keep[np.maximum(b[keep, 2] - b[keep, 0], b[keep, 3] - b[keep, 1]) >= self.min_face_px]
        lm = (np.concatenate(kpss) / det_scale)[keep].astype(np.float32) if kpss else None  # None: model has no kps
        return Detections(b[keep].astype(np.float32), s[keep].astype(np.float32), lm)

    def detect_regions(self, image_bgr: np.ndarray, rois_xyxy: np.ndarray,
                       scan_missed: np.ndarray | None = None) -> Detections:
        """Faces near each expected face box: each ROI grown to 2x its side is detected on its own, then merged.

        SCRFD has no lighter check than this search, so scan_missed changes nothing."""
        h, w = image_bgr.shape[:2]
        parts = []
        for x1, y1, x2, y2 in np.asarray(rois_xyxy, np.float32).reshape(-1, 4):
            side = max(x2 - x1, y2 - y1)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            a0, b0 = int(max(0, cx - side)), int(max(0, cy - side))
            a1, b1 = int(min(w, cx + side)), int(min(h, cy + side))
            if a1 - a0 < 8 or b1 - b0 < 8:
                continue
            d = self.detect(np.ascontiguousarray(image_bgr[b0:b1, a0:a1]))
            if len(d):
                lm = d.landmarks + np.float32([a0, b0]) if d.landmarks is not None else None
                parts.append(Detections(d.boxes_xyxy + np.float32([a0, b0, a0, b0]), d.scores, lm))
        if not parts:
            return Detections.empty() if self.kps_idx is not None else Detections(
                np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), None)
        lms = [p.landmarks for p in parts]
        merged = Detections(np.concatenate([p.boxes_xyxy for p in parts]), np.concatenate([p.scores for p in parts]),
                            np.concatenate(lms) if self.kps_idx is not None else None)
        return pick(merged, nms(merged.boxes_xyxy, merged.scores, self.nms_threshold))
