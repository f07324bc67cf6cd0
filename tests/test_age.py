"""Age runner: contract refusal, batching, preprocessing, chips and quality, on small real ONNX models."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agecam.config import RuntimeConfig
from agecam.daemon.age import AgeModel
from agecam.daemon.chip import chip_quality, make_chip, similarity_fit
from agecam.models.contract import AgeModelSpec, ChipSpec, ModelContractError, write_metadata
from agecam.models.reference import CYDRAL_TEMPLATE_UNIT

RUNTIME = RuntimeConfig(intra_op_threads=1)
BINS = (0.0, 10.0, 20.0, 30.0, 40.0)


def spec(**over) -> AgeModelSpec:
    base = dict(name="tiny", version="1", input_name="images", output_name="scores", output_kind="logits",
                input_size_hw=(16, 16), color_order="RGB", mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0),
                chip=ChipSpec(template_unit=CYDRAL_TEMPLATE_UNIT), bins_years=BINS)
    base.update(over)
    return AgeModelSpec(**base)


def tiny_model(path, md_spec: AgeModelSpec | None, *, side: int = 16, bins: int = len(BINS), out_name="scores"):
    """A real ONNX graph: global average per channel -> MatMul -> logits over `bins` (per-sample, batch-dynamic)."""
    rng = np.random.default_rng(1)
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, bins], rng.normal(size=(3, bins)).astype(np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], [out_name])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", bins])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if md_spec is not None:
        write_metadata(model, md_spec)
    onnx.save(model, str(path))
    return path


def test_batch_equals_one_by_one(tmp_path):
    # given a contract-carrying model and 7 random chips
    m = AgeModel(tiny_model(tmp_path / "m.onnx", spec()), RUNTIME, landmarks="detector")
    chips = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    # when run as one batch and one at a time
    batch = m.predict(chips)
    single = np.concatenate([m.predict(c[None]) for c in chips])
    # then the answers agree, and each row is the softmax of the graph's own logits (computed here independently)
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-6, err_msg="batching changed the result")
    import onnxruntime as ort
    from scipy.special import softmax

    raw = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"]).run(None, {"images": m.preprocess(chips)})[0]
    np.testing.assert_allclose(batch, softmax(raw, axis=1), rtol=1e-5, atol=1e-7,
                               err_msg="logits were not turned into their softmax")
    assert np.ptp(raw, axis=0).max() > 0.1, "every chip got the same logits: the input is ignored"
    assert m.predict(chips[:0]).shape == (0, len(BINS)), "an empty batch must give an empty (0, bins) array"


def test_preprocessing_follows_the_contract(tmp_path):
    # given a contract with per-channel mean/std
    m = AgeModel(tiny_model(tmp_path / "m.onnx", spec()), RUNTIME, landmarks="detector")
    chip = np.zeros((16, 16, 3), np.uint8)
    chip[..., 0], chip[..., 1], chip[..., 2] = 12, 28, 54
    # when preprocessed
    x = m.preprocess(chip[None])
    # then the tensor is NCHW, (pixel - mean) / std per channel
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [(12 - 10) / 2, (28 - 20) / 4, (54 - 30) / 8], rtol=1e-6)
    # and the age is the expectation of the bins under the softmax of the tiny graph, worked out by hand here:
    # the graph averages each channel (x is constant per channel) and multiplies by its seeded weight matrix
    from scipy.special import softmax

    w = np.random.default_rng(1).normal(size=(3, len(BINS))).astype(np.float32)
    pooled = np.array([(12 - 10) / 2, (28 - 20) / 4, (54 - 30) / 8], np.float32)  # chips are in the model's order
    expected = float(softmax(pooled @ w) @ np.asarray(BINS))
    assert m.expected_years(m.predict(chip[None]))[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "md_spec, kwargs, message",
    [
        (None, {}, "expected metadata_props 'agecam.contract'"),
        (spec(input_name="pixels"), {}, "metadata names input 'pixels'"),
        (spec(bins_years=(0.0, 10.0, 20.0)), {}, "metadata lists 3 age bins, graph output shape is [None, 5]"),
        (spec(input_size_hw=(32, 32)), {}, "metadata says input [N, 3, 32, 32]"),
        (spec(color_order="GBR"), {}, "color_order must be 'RGB' or 'BGR'"),
        (spec(output_name="probs"), {}, "metadata names output 'probs'"),
    ],
    ids=["no-metadata", "wrong-input-name", "bins-vs-output", "size-vs-graph", "bad-colour", "wrong-output"],
)
def test_model_without_or_with_contradictory_metadata_is_refused(tmp_path, md_spec, kwargs, message):
    # given an ONNX file whose metadata is missing or disagrees with its graph
    path = tiny_model(tmp_path / "bad.onnx", md_spec, **kwargs)
    # when the runner loads it, then it refuses at start-up naming expected vs found
    with pytest.raises(ModelContractError) as err:
        AgeModel(path, RUNTIME, landmarks="detector")
    assert message in str(err.value), f"unclear refusal: {err.value}"


def test_dlib5_mode_needs_its_template(tmp_path):
    # given a valid model without the dlib5 template in its metadata
    path = tiny_model(tmp_path / "m.onnx", spec())
    # then asking for dlib5 landmarks is refused with the remedy
    with pytest.raises(ModelContractError, match="chip_dlib5"):
        AgeModel(path, RUNTIME, landmarks="dlib5")


def test_chip_puts_landmarks_on_the_template():
    # given an image with 5 bright dots at rotated, scaled template positions
    tpl = np.asarray(CYDRAL_TEMPLATE_UNIT) * 64
    angle, scale, shift = math.radians(20), 2.5, np.array([150.0, 90.0])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = tpl @ rot.T + shift
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in pts:
        img[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    # when a 64-px chip is cut from those landmarks
    chip = make_chip(img, pts, np.asarray(CYDRAL_TEMPLATE_UNIT), (64, 64))
    # then each dot lands within a pixel of its template point
    for (tx, ty) in tpl:
        y0, x0 = int(round(ty)), int(round(tx))
        patch = chip[max(0, y0 - 3):y0 + 4, max(0, x0 - 3):x0 + 4, 0].astype(float)
        assert patch.max() > 60, f"no dot near template point ({tx:.1f}, {ty:.1f}): the chip is misaligned"
    fit = similarity_fit(pts, tpl)
    assert abs(math.hypot(fit[0, 0], fit[1, 0]) - 1 / scale) < 1e-9, "similarity fit lost the scale"


def test_quality_ranks_good_over_poor_crops():
    # given a real face (the astronaut) with hand-placed landmarks and box
    import cv2
    import skimage.data as skdata

    img = np.ascontiguousarray(skdata.astronaut()[:, :, ::-1])
    box = (170, 70, 270, 190)
    lm = np.array([[199, 112], [244, 113], [222, 135], [204, 160], [240, 161]], float)
    good = chip_quality(img, box, lm, 0.99)
    blurred = chip_quality(cv2.GaussianBlur(img, (0, 0), 6), box, lm, 0.99)
    small = chip_quality(cv2.resize(img, None, fx=0.25, fy=0.25), np.array(box) * 0.25, lm * 0.25, 0.99)
    turned = lm.copy()
    turned[2, 0] = 244  # nose over the right eye: a profile
    profile = chip_quality(img, box, turned, 0.99)
    weak = chip_quality(img, box, lm, 0.55)
    # then the good crop scores high and each defect lowers it
    assert good > 0.6, f"a sharp, frontal 100-px face should score high, got {good:.2f}"
    for label, q in [("blurred", blurred), ("small", small), ("profile", profile), ("weak detection", weak)]:
        assert q < good * 0.7, f"{label} crop scored {q:.2f}, not clearly below the good crop's {good:.2f}"
    # and a profile is weak but not vetoed: it is a person to age (last, from its best crop, with a wide interval)
    assert 0 < profile <= 0.1, f"a sharp profile should keep a small weight, got {profile:.3f}"
