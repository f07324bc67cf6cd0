"""Tests of the face detectors: MTCNN on real photos (full frame and regions), SCRFD decoding, model refusal."""
from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agecam.config import DetectorConfig, RuntimeConfig
from agecam.daemon.detect import DetectorModelError, build_detector, nms
from agecam.daemon.mtcnn import MtcnnDetector
from agecam.daemon.scrfd import ScrfdDetector
from tests.helpers import iou

RUNTIME = RuntimeConfig(intra_op_threads=1)


def match(found: np.ndarray, want: np.ndarray) -> list[float]:
    """For each wanted box, the best IoU among found boxes."""
    return [max((iou(f, w) for f in found), default=0.0) for w in want]


@pytest.fixture(scope="module")
def mtcnn(default_models) -> MtcnnDetector:
    return build_detector(DetectorConfig(min_face_px=40, score_threshold=0.7), RUNTIME, default_models)


def check_landmarks(d, where: str) -> None:
    for box, lm in zip(d.boxes_xyxy, d.landmarks):
        x1, y1, x2, y2 = box
        assert np.all((lm[:, 0] >= x1) & (lm[:, 0] <= x2) & (lm[:, 1] >= y1) & (lm[:, 1] <= y2)), \
            f"{where}: landmarks {lm.tolist()} outside box {box.tolist()}"
        eyes_y, mouth_y = lm[:2, 1].max(), lm[3:, 1].min()
        assert eyes_y < lm[2, 1] < mouth_y, f"{where}: expected eyes above nose above mouth, got {lm.tolist()}"
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0], f"{where}: left/right swapped in {lm.tolist()}"


# ---- MTCNN on real photos ------------------------------------------------------------------------------------


def test_mtcnn_finds_the_six_faces_of_t1(mtcnn, t1_bgr):
    # when the group photo is searched in full
    d = mtcnn.detect(t1_bgr)
    # then the 6 people are found, each with plausible landmarks
    assert len(d) == 6, f"expected 6 faces in t1.jpg, found {len(d)}: {d.boxes_xyxy.round().tolist()}"
    assert d.boxes_xyxy.dtype == np.float32 and d.landmarks.shape == (6, 5, 2)
    assert np.all(d.scores >= 0.7), d.scores
    sides = d.boxes_xyxy[:, 2:] - d.boxes_xyxy[:, :2]
    assert np.all((sides > 60) & (sides < 200)), f"implausible face sizes {sides.tolist()}"
    check_landmarks(d, "t1.jpg")


@pytest.mark.parametrize("arena", [True, False])
def test_memory_arena_setting_reaches_every_session_and_finds_the_same_faces(default_models, t1_bgr, arena):
    # given runtime.onnx_memory_arena, when the detector and the age model are built
    from agecam.daemon.age import AgeModel

    rt = RuntimeConfig(intra_op_threads=1, onnx_memory_arena=arena)
    det = build_detector(DetectorConfig(), rt, default_models)
    age = AgeModel(default_models.age, rt, models=default_models)
    # then each of their sessions runs with it, and detection does not depend on it
    for sess in (det.pnet, det.rnet, det.onet, age.session):
        assert sess.get_session_options().enable_cpu_mem_arena is arena
    assert len(det.detect(t1_bgr)) == 6


def test_mtcnn_finds_the_astronaut(default_models, astronaut_bgr):
    # given the default minimum face size of 20 px
    det = build_detector(DetectorConfig(min_face_px=20), RUNTIME, default_models)
    d = det.detect(astronaut_bgr)
    # then exactly one face, centred where her face is (hand-marked: x 170..280, y 50..190)
    assert len(d) == 1, f"expected one face, found {d.boxes_xyxy.round().tolist()}"
    cx, cy = (d.boxes_xyxy[0, :2] + d.boxes_xyxy[0, 2:]) / 2
    assert 170 < cx < 280 and 50 < cy < 190, f"face centre ({cx:.0f}, {cy:.0f}) is not on her face"
    check_landmarks(d, "astronaut")


def test_nothing_is_found_in_a_blank_or_noise_image(mtcnn):
    rng = np.random.default_rng(1)
    for name, img in (("grey", np.full((240, 320, 3), 128, np.uint8)),
                      ("noise", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))):
        d = mtcnn.detect(img)
        assert len(d) == 0, f"{name}: found {len(d)} faces in an image without any"
        assert mtcnn.detect_regions(img, np.float32([[100, 80, 160, 140]])).boxes_xyxy.shape == (0, 4)


@pytest.mark.parametrize("shift,grow", [
    (0.0, 1.0),  # the track is where the face is: O-Net confirms it directly
    (0.15, 1.0),  # the face moved by 15% of its side since the prediction
    (0.45, 1.0),  # moved by almost half its side: O-Net rejects the box, the P-Net region scan finds the face
    (0.0, 1.8),  # the predicted box is far too large: found by the scan
    (0.3, 0.6),  # ... or far too small
])
def test_region_search_agrees_with_full_frame(mtcnn, t1_bgr, shift, grow):
    # given the full-frame faces of t1.jpg and predicted boxes off by `shift` of the side and scaled by `grow`
    full = mtcnn.detect(t1_bgr)
    side = (full.boxes_xyxy[:, 2:] - full.boxes_xyxy[:, :2]).max(1, keepdims=True)
    c = (full.boxes_xyxy[:, :2] + full.boxes_xyxy[:, 2:]) / 2 + shift * side
    half = side * grow / 2
    rois = np.concatenate([c - half, c + half], 1)
    # when only those regions are searched
    reg = mtcnn.detect_regions(t1_bgr, rois)
    # then the same faces come back, once each, in image coordinates
    assert len(reg) == len(full), f"regions found {len(reg)} faces, full frame {len(full)}"
    ious = match(reg.boxes_xyxy, full.boxes_xyxy)
    assert min(ious) > 0.6, f"region boxes disagree with full-frame ones: IoUs {np.round(ious, 2)}"
    lm_err = [np.abs(reg.landmarks[np.argmax([iou(r, f) for r in reg.boxes_xyxy])] - l).max()
              for f, l in zip(full.boxes_xyxy, full.landmarks)]
    assert max(lm_err) < 0.12 * side.min(), f"landmarks moved by up to {max(lm_err):.1f} px"
    check_landmarks(reg, f"regions shift={shift}")


def test_region_search_only_looks_near_its_rois(mtcnn, t1_bgr):
    # given one ROI on the left-most face only
    full = mtcnn.detect(t1_bgr)
    left = full.boxes_xyxy[np.argmin(full.boxes_xyxy[:, 0])]
    reg = mtcnn.detect_regions(t1_bgr, left[None])
    # then that face alone is found
    assert len(reg) == 1 and iou(reg.boxes_xyxy[0], left) > 0.6, reg.boxes_xyxy.round().tolist()


def test_detector_is_safe_from_several_threads(mtcnn, t1_bgr, astronaut_bgr):
    # given the serial results for two images
    small = cv2.resize(t1_bgr, (640, 443), interpolation=cv2.INTER_AREA)
    want = {0: mtcnn.detect(small), 1: mtcnn.detect(astronaut_bgr)}
    got, errors = {}, []

    def work(i: int) -> None:
        try:
            img = small if i % 2 == 0 else astronaut_bgr
            got[i] = (mtcnn.detect(img), mtcnn.detect_regions(img, want[i % 2].boxes_xyxy))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # when 4 threads (4 cameras) run at once
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # then every thread finished and got exactly the serial answer
    assert not errors, errors
    assert sorted(got) == [0, 1, 2, 3] and not any(t.is_alive() for t in threads), f"threads finished: {sorted(got)}"
    serial_regions = {k: mtcnn.detect_regions(img, want[k].boxes_xyxy) for k, img in ((0, small), (1, astronaut_bgr))}
    for i, (full, reg) in got.items():
        ref = want[i % 2]
        assert np.array_equal(full.boxes_xyxy, ref.boxes_xyxy), f"thread {i}: full-frame result differs from serial"
        assert np.array_equal(reg.boxes_xyxy, serial_regions[i % 2].boxes_xyxy), f"thread {i}: region result differs"


@pytest.mark.parametrize("method,expected", [("union", [0, 2]), ("min", [0])])
def test_nms_methods(method, expected):
    # box 1 overlaps box 0 by IoU ~0.8; box 2 lies inside box 0 (IoU 0.25, but 'min' overlap 1.0)
    boxes = np.float32([[0, 0, 99, 99], [5, 5, 104, 104], [25, 25, 74, 74]])
    keep = nms(boxes, np.float32([0.9, 0.8, 0.7]), 0.5, method)
    assert keep.tolist() == expected


# ---- SCRFD ---------------------------------------------------------------------------------------------------

SIDE = 64
STRIDES = (8, 16, 32)
ANCHORS = 2


def _row(stride: int, gx: int, gy: int, anchor: int) -> int:
    return (gy * (SIDE // stride) + gx) * ANCHORS + anchor


# (stride, gx, gy, anchor, score, distances l t r b in stride units); the anchor centre is (gx, gy) * stride
PLANTED = [
    (8, 3, 2, 1, 0.90, (1.0, 1.5, 2.0, 2.5)),  # box (16, 4, 40, 36) at input scale
    (8, 3, 2, 0, 0.70, (1.0, 1.5, 2.0, 2.5)),  # same box, lower score: removed by NMS
    (16, 1, 1, 0, 0.80, (1.0, 1.0, 1.0, 1.0)),  # box (0, 0, 32, 32)
    (32, 1, 1, 1, 0.30, (0.5, 0.5, 0.5, 0.5)),  # below the 0.5 threshold
]


def _kps(stride, gx, gy):
    return np.float32([[-0.5, -0.5], [0.5, -0.5], [0.0, 0.0], [-0.4, 0.6], [0.4, 0.6]])  # stride units


def make_scrfd(path: Path, kps: bool, batched: bool) -> None:
    """An SCRFD-shaped ONNX over a 64x64 input whose outputs are the PLANTED values (plus 0 * mean(input))."""
    outs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        n = (SIDE // s) ** 2 * ANCHORS
        sc, bb, kp = np.zeros((n, 1), np.float32), np.full((n, 4), 0.1, np.float32), np.zeros((n, 10), np.float32)
        for st, gx, gy, a, score, dist in PLANTED:
            if st == s:
                r = _row(s, gx, gy, a)
                sc[r, 0], bb[r] = score, dist
                kp[r] = _kps(s, gx, gy).ravel()
        outs["score"].append(sc), outs["bbox"].append(bb), outs["kps"].append(kp)
    names = ["score", "bbox"] + (["kps"] if kps else [])
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outs = []
    for kind in names:
        for s, arr in zip(STRIDES, outs[kind]):
            arr = arr[None] if batched else arr
            c = f"{kind}_{s}_const"
            inits.append(numpy_helper.from_array(arr, c))
            nodes.append(helper.make_node("Add", [c, "z"], [f"{kind}_{s}"]))
            graph_outs.append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, list(arr.shape)))
    g = helper.make_graph(nodes, "scrfd_like", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT,
                                                                               [1, 3, SIDE, SIDE])], graph_outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def expected_planted(det_scale: float):
    """Boxes and landmarks the planted outputs decode to, by hand, in image pixels."""
    boxes = np.float32([[16, 4, 40, 36], [0, 0, 32, 32]]) / det_scale
    kps = np.stack([np.float32([24, 16]) + _kps(8, 3, 2) * 8, np.float32([16, 16]) + _kps(16, 1, 1) * 16]) / det_scale
    return boxes, np.float32([0.9, 0.8]), kps


@pytest.mark.parametrize("kps", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decoding_matches_hand_and_insightface(tmp_path, kps, batched):
    # given an SCRFD-shaped model with planted outputs and a 128x96 image (letterboxed into 64x64, scale 0.5)
    path = tmp_path / "scrfd.onnx"
    make_scrfd(path, kps, batched)
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    det = ScrfdDetector(path, RUNTIME, min_face_px=12, score_threshold=0.5)
    # then the layout is read from the model
    assert det.strides == list(STRIDES) and det.anchors == ANCHORS and (det.kps_idx is not None) == kps
    # when detected
    d = det.detect(img)
    # then the decoded boxes are the planted ones
    boxes, scores, lms = expected_planted(0.5)
    order = np.argsort(-d.scores)
    assert np.allclose(d.boxes_xyxy[order], boxes, atol=1e-3), d.boxes_xyxy.tolist()
    assert np.allclose(d.scores[order], scores, atol=1e-6), d.scores.tolist()
    if kps:
        assert np.allclose(d.landmarks[order], lms, atol=1e-3), d.landmarks.tolist()
    else:
        assert d.landmarks is None
    # and insightface's own SCRFD decodes the same file the same way
    from insightface.model_zoo import scrfd  # required (make setup installs it): never a skip

    ref = scrfd.SCRFD(model_file=str(path), session=__import__("onnxruntime").InferenceSession(
        str(path), providers=["CPUExecutionProvider"]))
    ref.prepare(-1, det_thresh=0.5, nms_thresh=0.4)
    rdet, rkps = ref.detect(img, input_size=(SIDE, SIDE))
    rorder = np.argsort(-rdet[:, 4])
    assert np.allclose(d.boxes_xyxy[order], rdet[rorder, :4], atol=1e-3), (d.boxes_xyxy, rdet)
    if kps:
        assert np.allclose(d.landmarks[order], rkps[rorder], atol=1e-3)


def test_scrfd_min_face_and_regions(tmp_path):
    path = tmp_path / "scrfd.onnx"
    make_scrfd(path, True, False)
    img = np.zeros((96, 128, 3), np.uint8)
    # a min face above the 64 px planted boxes drops them
    assert len(ScrfdDetector(path, RUNTIME, min_face_px=80).detect(img)) == 0
    # region search on a crop maps boxes back to image coordinates
    det = ScrfdDetector(path, RUNTIME, min_face_px=4)
    d = det.detect_regions(img, np.float32([[40, 30, 60, 50]]))  # ROI grown to 2x: crop (30..70, 20..60), scale 64/40
    boxes, _, _ = expected_planted(64 / 40)
    want = boxes + np.float32([30, 20, 30, 20])  # the planted boxes, scaled to the crop and shifted to its origin
    assert len(d) == 2, d.boxes_xyxy.tolist()
    got = d.boxes_xyxy[np.lexsort((d.boxes_xyxy[:, 1], d.boxes_xyxy[:, 0]))]
    assert np.allclose(got, want[np.lexsort((want[:, 1], want[:, 0]))], atol=1e-2), (got.tolist(), want.tolist())


# ---- refusing unusable models at start-up --------------------------------------------------------------------


def test_broken_scrfd_model_is_refused_with_expected_and_found(tmp_path, default_models):
    garbage = tmp_path / "det.onnx"
    garbage.write_bytes(b"\x00not onnx")
    cases = [
        (tmp_path / "absent.onnx", "found nothing there"),
        (garbage, "expected a loadable ONNX model"),
        (default_models.rnet, "expected an insightface SCRFD ONNX"),  # a real ONNX of the wrong kind
    ]
    for model, needed in cases:
        with pytest.raises(DetectorModelError) as exc:
            build_detector(DetectorConfig(kind="scrfd", model=model), RUNTIME, None)
        assert needed in str(exc.value) and str(model) in str(exc.value), str(exc.value)


def test_mtcnn_needs_fetched_or_valid_models(tmp_path, default_models):
    # no fetched models: the message says how to get them
    with pytest.raises(DetectorModelError, match="agecam models fetch"):
        build_detector(DetectorConfig(), RUNTIME, None)
    # a folder whose P-Net is really an O-Net: refused, naming what was expected
    d = tmp_path / "mtcnn"
    d.mkdir()
    for name, src in (("pnet", default_models.onet), ("rnet", default_models.rnet), ("onet", default_models.onet)):
        (d / f"{name}.onnx").write_bytes(src.read_bytes())
    with pytest.raises(DetectorModelError, match=r"expected input 'input' \[None, 3, None, None\] and outputs"):
        build_detector(DetectorConfig(model=d), RUNTIME, None)
