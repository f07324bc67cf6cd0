"""Acceptance: the reference age model through our pipeline agrees with its own (dlib) preprocessing."""
from __future__ import annotations

from pathlib import Path

import cv2
import dlib  # noqa: F401  (required: the reference chip is dlib's)
import insightface
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data as skdata

from agecam.config import AgeConfig, DetectorConfig, RuntimeConfig
from agecam.daemon.age import AgeModel
from agecam.daemon.detect import build_detector
from tests.helpers import iou

MAX_MEAN_ABS_DIFF_YEARS = 2.0
MIN_FACE_PX = 60


def sample_images() -> dict[str, np.ndarray]:
    """BGR sample images with real faces: insightface's t1.jpg and Tom Hanks (padded), scikit-image's astronaut."""
    d = Path(insightface.__file__).parent / "data" / "images"
    hanks = cv2.imread(str(d / "Tom_Hanks_54745.png"))
    return {
        "t1": cv2.imread(str(d / "t1.jpg")),
        # a 112x112 aligned crop: pad it (the same for both pipelines) so both detectors see a whole face
        "hanks": cv2.copyMakeBorder(hanks, 56, 56, 56, 56, cv2.BORDER_CONSTANT, value=(0, 0, 0)),
        "astronaut": np.ascontiguousarray(skdata.astronaut()[:, :, ::-1]),
    }


CYDRAL_MEAN_RGB = np.array([122.781998, 117.000999, 104.297997], np.float32)  # dlib-models' age predictor
CYDRAL_BINS_YEARS = np.array([0.25] + list(range(1, 81)), np.float32)
# the reference pipeline's ages of the sample faces (dlib chip -> model), as published with the model's measurements
KNOWN_REFERENCE_YEARS = {"hanks": (39.5, 42.0), "astronaut": (32.0, 34.5)}


def reference_years(session, chip_rgb: np.ndarray) -> float:
    """The reference model's age of one dlib chip: (RGB - mean) / 256, NCHW, expectation over its 81 bins."""
    x = ((chip_rgb.astype(np.float32) - CYDRAL_MEAN_RGB) / 256.0).transpose(2, 0, 1)[None]
    probs = session.run(None, {"images": x})[0][0]
    return float(probs @ CYDRAL_BINS_YEARS)


@pytest.fixture(scope="module")
def models(default_models, models_dir):
    return RuntimeConfig(intra_op_threads=2, models_dir=models_dir), default_models


@pytest.mark.slow
def test_reference_model_ages_match_dlib_preprocessing(models):
    runtime, paths = models
    # given our default pipeline (MTCNN -> age chip per the default AgeConfig -> batched runner)
    age_cfg = AgeConfig()
    ours = AgeModel(paths.age, runtime, age_cfg, paths)
    detector = build_detector(DetectorConfig(min_face_px=20), runtime, paths)
    # and the reference preprocessing: dlib's detector, dlib's 5 points, dlib's own chip, the same model
    # run by a plain onnxruntime session with the model's documented preprocessing, not by our runner
    raw = ort.InferenceSession(str(paths.age), providers=["CPUExecutionProvider"])
    dlib_detector = dlib.get_frontal_face_detector()
    shape_predictor = dlib.shape_predictor(str(paths.shape5))

    rows, unmatched = [], []
    for name, bgr in sample_images().items():
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        dets = detector.detect(bgr)
        for rect in dlib_detector(rgb, 1):  # upsample once so the padded 112-px crop is found
            if rect.width() < MIN_FACE_PX:
                continue
            ref_chip = dlib.extract_image_chip(rgb, dlib.get_face_chip_details(shape_predictor(rgb, rect), 64, 0.2))
            ref_years = reference_years(raw, ref_chip)
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            ious = [iou(box, b) for b in dets.boxes_xyxy]
            if not ious or max(ious) < 0.3:
                unmatched.append(f"{name} {box} (reference {ref_years:.1f} y)")
                continue
            j = int(np.argmax(ious))
            chip = ours.make_chip(bgr, dets.landmarks[j], dets.boxes_xyxy[j])
            rows.append((name, rect.width(), ref_years, chip))
    # when all our chips go through the runner in one batch
    our_years = ours.expected_years(ours.predict(np.stack([r[3] for r in rows])))
    diffs = np.array([o - r[2] for o, r in zip(our_years, rows)])
    table = "\n".join(f"  {r[0]:>9} face {r[1]:3d}px: reference {r[2]:5.1f} y, ours {o:5.1f} y, diff {d:+5.2f}"
                      for r, o, d in zip(rows, our_years, diffs))
    summary = (f"landmarks={age_cfg.landmarks}: mean |diff| {np.abs(diffs).mean():.2f} y over {len(rows)} faces "
               f"(bound {MAX_MEAN_ABS_DIFF_YEARS})\n{table}\n  reference-only (a dlib detection MTCNN does not "
               f"share, e.g. a false positive): {unmatched}")
    print(summary)
    # then the faces are the expected ones and the ages agree on average within the bound
    assert len(rows) >= 7, f"expected the 6 t1 faces, Tom Hanks and the astronaut (>= 7 matched), got:\n{summary}"
    for name, (lo, hi) in KNOWN_REFERENCE_YEARS.items():
        got = [r[2] for r in rows if r[0] == name]
        assert got and lo <= got[0] <= hi, f"reference age of {name} {got} is not the known {lo}-{hi} years"
    assert np.ptp([r[2] for r in rows]) > 5, f"the faces' reference ages are too alike to test anything:\n{summary}"
    assert np.abs(diffs).mean() <= MAX_MEAN_ABS_DIFF_YEARS, f"ages drift from the reference pipeline:\n{summary}"
