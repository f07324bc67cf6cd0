"""MTCNN (P-, R-, O-Net) on onnxruntime: the fetched offline default detector, with a region mode around tracks."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from agecam.config import RuntimeConfig
from agecam.daemon.detect import DetectorModelError, load_session, nms, shape_dims
from agecam.daemon.types import Detections

log = logging.getLogger(__name__)


class MtcnnDetector:
    """Full MTCNN (P-Net pyramid, R-Net, O-Net with 5 landmarks) on onnxruntime, after facenet-pytorch.

    Differences from facenet-pytorch, for speed: pyramid levels are resized with OpenCV's INTER_AREA (torch uses
    adaptive average pooling); R/O-Net crops are cut and resized for all boxes at once with one `cv2.remap` per
    octave of a pyrDown pyramid (bilinear, zero beyond the image edge as in the original MTCNN) instead of a loop;
    R-Net and O-Net each run once per call on every candidate.

    `detect_regions(image, rois_xyxy)` searches only near expected face boxes (e.g. predicted track boxes):
      1. every ROI, made square, is given straight to O-Net; where its regressed box moved off the crop (IoU below
         `aligned_iou`), a second pass runs on that box. A face still there is confirmed at a cost of one or two
         48x48 O-Net crops;
      2. ROIs O-Net rejects (those `scan_missed` allows) are searched properly: a square `region_context` times the ROI side around it is scanned
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
    aligned_iou = 0.85  # O-Net's regressed box this close to its crop: the crop was aligned, no second pass

    def __init__(self, pnet: Path, rnet: Path, onet: Path, runtime: RuntimeConfig, min_face_px: int = 20,
                 score_threshold: float = 0.7):
        self.pnet = load_session(pnet, runtime, "MTCNN P-Net")
        self.rnet = load_session(rnet, runtime, "MTCNN R-Net")
        self.onet = load_session(onet, runtime, "MTCNN O-Net")
        self._check(self.pnet, pnet, [None, 3, None, None], ["reg", "prob"])
        self._check(self.rnet, rnet, [None, 3, 24, 24], ["reg", "prob"])
        self._check(self.onet, onet, [None, 3, 48, 48], ["reg", "landmarks", "prob"])
        self.min_face_px = int(min_face_px)
        self.score_threshold = float(score_threshold)

    @staticmethod
    def _check(sess, path: Path, in_shape: list, out_names: list[str]) -> None:
        ins, outs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
        found_in = [(i.name, shape_dims(i.shape)) for i in ins]
        ok = len(ins) == 1 and ins[0].name == "input" and len(ins[0].shape) == 4 and all(
            e is None or e == f for e, f in zip(in_shape, shape_dims(ins[0].shape)))
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

    def detect_regions(self, image_bgr: np.ndarray, rois_xyxy: np.ndarray,
                       scan_missed: np.ndarray | None = None) -> Detections:
        """Faces near each expected face box in `rois_xyxy` (N, 4), in image coordinates (see class docstring);
        with `scan_missed` (N,) bool, only those ROIs go on to step 2 when O-Net misses them."""
        rois = np.asarray(rois_xyxy, np.float32).reshape(-1, 4)
        scan = np.ones(len(rois), bool) if scan_missed is None else np.asarray(scan_missed, bool).reshape(-1)
        valid = (rois[:, 2] > rois[:, 0]) & (rois[:, 3] > rois[:, 1])
        rois, scan = rois[valid], scan[valid]
        if len(rois) == 0:
            return Detections.empty()
        octaves = _octaves(image_bgr)
        # 1. O-Net straight on the expected boxes, twice
        boxes = _rerec(np.concatenate([rois, np.zeros((len(rois), 1), np.float32)], 1))
        b1, s1, lm1, _ = self._onet(octaves, boxes)
        hit = s1 > self.thresholds[2]
        sq1 = _rerec(b1)
        # a crop O-Net hardly moved was already on the face: a second pass would see the same crop again
        aligned = hit & (_paired_iou(sq1, boxes) >= self.aligned_iou)
        redo = hit & ~aligned
        b2, s2, lm2, _ = self._onet(octaves, sq1[redo])
        good = s2 > self.thresholds[2]
        found = [Detections(b1[aligned, :4], s1[aligned], lm1[aligned]), Detections(b2[good, :4], s2[good], lm2[good])]
        hit[np.nonzero(redo)[0][~good]] = False
        # 2. P-Net scan of a wider square around each ROI O-Net did not confirm
        miss = rois[~hit & scan]
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


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] and b[i] for each row (boxes x1 y1 x2 y2 in the first four columns)."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


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
