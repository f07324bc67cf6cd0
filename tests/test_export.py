"""Export: a trained checkpoint becomes a checked, self-describing ONNX age model the daemon runs."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from agecam.export import checks, faces
from agecam.models.contract import ModelContractError, read_spec

from tests.conftest import TRAIN_IMG_PX as IMG_PX  # the fixtures' training size


# fixtures trained_checkpoint, exported_model and export_once live in tests/conftest.py (shared, run once); they train
# a ResNet50 on the CPU, so every test that uses them is marked slow


# ---- export, parity, variants -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("precision, tolerance_years", [("fp32", 0.05), ("fp16", 0.5), ("int8", 3.0)])
def test_export_matches_pytorch_on_real_faces(precision, tolerance_years, trained_checkpoint, export_once):
    # given a checkpoint trained for a few steps
    from agecam.export.onnx_export import load_checkpoint, torch_probabilities

    ckpt_path, _ = trained_checkpoint
    # when it is exported at this precision
    path, printed = export_once(precision)
    # then the file carries the contract of the checkpoint
    spec = read_spec(path)
    model, ckpt = load_checkpoint(ckpt_path)
    assert spec.input_size_hw == (IMG_PX, IMG_PX), f"input size {spec.input_size_hw}, checkpoint trained at {IMG_PX}"
    assert spec.bins_years == tuple(ckpt["bins_years"]), "bins in metadata differ from the checkpoint's"
    assert spec.mean == tuple(ckpt["mean"]) and spec.std == tuple(ckpt["std"]), "mean/std differ from checkpoint"
    assert spec.output_kind == "probabilities" and spec.input_name == "images" and spec.output_name == "probabilities"
    assert spec.extra["precision"] == precision, f"metadata precision {spec.extra.get('precision')}"
    assert json.loads(spec.extra["training_data"])["name"] == "UTKFace", "training data missing from metadata"
    assert "val_mae" in json.loads(spec.extra["metrics"]), f"metrics missing: {spec.extra.get('metrics')}"
    # and onnxruntime agrees with PyTorch on real faces (recomputed here, not read from the report)
    face_set = faces.packaged_faces()
    batch = faces.preprocess(face_set.images, spec)
    ort_probs = checks.run_session(checks.ort_session(path), batch)
    ref = torch_probabilities(model, batch)
    p = checks.parity(ref, ort_probs, spec.bins_years, face_set.names)
    assert p.max_age_diff_years <= tolerance_years, f"{precision}: {p}"
    # (the faces' ages span decades: a graph that ignored its input could not agree on all of them)
    ref_years = checks.expected_age_years(ref, spec.bins_years)
    assert np.ptp(ref_years) > 4 * tolerance_years + 10, f"reference ages too alike to prove parity: {ref_years}"
    # and the answers follow the faces: the batch reversed gives the same ages reversed
    reversed_years = checks.expected_age_years(checks.run_session(checks.ort_session(path), batch[::-1].copy()),
                                               spec.bins_years)[::-1]
    np.testing.assert_allclose(reversed_years, checks.expected_age_years(ort_probs, spec.bins_years), atol=1e-3,
                               err_msg="ages do not follow the faces through the batch")
    # and a dynamic batch: one face alone gives the same answer as in the batch
    single = checks.run_session(checks.ort_session(path), batch[3:4])
    assert np.abs(single - ort_probs[3:4]).max() < 1e-4, "batch of 1 differs from the same face in a batch of 8"
    # and the command printed its figures (parity and, for variants, the held-out MAE change against fp32)
    assert "largest age difference" in printed, printed
    assert "held-out MAE" in printed and "(the checkpoint's test split)" in printed, printed
    if precision == "int8":
        assert "(the checkpoint's train split)" in printed, f"int8 not calibrated on the train split: {printed}"
    if precision != "fp32":
        assert "change" in printed and "fp32" in printed, printed
        held = json.loads(spec.extra["export"])["heldout"]
        change = held.get("mae_change_vs_fp32_years")
        assert held["labelled"] and change is not None and np.isfinite(change), f"held-out figures missing: {held}"
        assert abs(change) <= 2 * tolerance_years, f"{precision} held-out MAE moved {change} years against fp32"


@pytest.mark.slow
def test_export_refuses_disagreement_and_leaves_no_file(trained_checkpoint, tmp_path, capsys):
    # given a tolerance no fp16 conversion can meet
    from agecam.cli import main

    ckpt, _ = trained_checkpoint
    out = tmp_path / "strict.onnx"
    # when `agecam export` runs
    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--precision", "fp16", "--tolerance-years", "0"])
    # then it refuses with a clear message and leaves neither the output nor its work files
    err = capsys.readouterr().err
    assert rc == 2, f"expected exit code 2 for a refused export, got {rc}; stderr: {err}"
    assert "refused" in err and "largest age difference" in err and "allowed 0.0 years" in err, err
    assert not out.exists(), "a refused export left its output file"
    assert list(tmp_path.iterdir()) == [], f"work files left behind: {list(tmp_path.iterdir())}"


def test_cli_registration_does_not_import_torch():
    # given a fresh interpreter / when the full `agecam` parser is built / then torch is not loaded
    import subprocess
    import sys

    code = "import sys; from agecam.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False", "building the CLI parser imported torch (register() must not)"


@pytest.mark.slow
def test_preprocessing_matches_training(trained_checkpoint):
    # given the training's own preprocessing of image files (what evaluation feeds the model)
    from agecam.export.onnx_export import spec_from_checkpoint
    from agecam.training.data import preprocessed_batches
    from agecam.training.model import load_checkpoint

    ckpt_path, data = trained_checkpoint
    _, ckpt = load_checkpoint(ckpt_path)
    paths = sorted(data.glob("*.jpg"))[:4]
    # when the export's checks preprocess the same files
    ours = faces.preprocess(faces.folder_faces(data, [p.name for p in paths]).images, spec_from_checkpoint(ckpt))
    theirs = np.concatenate([b.numpy() for b in preprocessed_batches(ckpt, paths)])
    # then both give the same tensors
    assert np.abs(ours - theirs).max() < 1e-4, "export parity inputs differ from the training's preprocessing"


@pytest.mark.parametrize("case, change, expected", [
    ("format", {"format": "other/v0"}, "expected 'agecam.ckpt/v1', found 'other/v0'"),
    ("no bins", {"bins_years": None}, "checkpoint is missing ['bins_years']"),
    ("chip points", {"chip": {"kind": "similarity5", "template_unit": [[0.3, 0.3]] * 4}},
     "chip must be kind 'similarity5' with 5 template points"),
    ("std count", {"std": [58.0, 57.0]}, "mean and std must have 3 values"),
])
def test_checkpoint_without_a_usable_contract_is_refused(case, change, expected):
    # given a checkpoint dict with one field wrong or missing
    from agecam.export.onnx_export import spec_from_checkpoint
    from agecam.training import model as M

    ckpt = {**M.checkpoint_meta(IMG_PX).as_dict(), "model": {}}
    ckpt.update({k: v for k, v in change.items() if v is not None})
    for k in [k for k, v in change.items() if v is None]:
        del ckpt[k]
    # when its contract is built / then it is refused, naming the problem
    with pytest.raises(ValueError) as exc:
        spec_from_checkpoint(ckpt)
    assert expected in str(exc.value), f"{case}: {exc.value}"


def test_packaged_faces_are_real_face_crops(default_models):
    # given the sample images installed with insightface and scikit-image, when cropped, then 8 square RGB crops
    from agecam.config import DetectorConfig, RuntimeConfig
    from agecam.daemon.detect import build_detector

    fs = faces.packaged_faces()
    assert len(fs) == 8, f"expected 8 packaged faces, found {len(fs)}: {fs.names}"
    assert all(im.ndim == 3 and im.shape[0] == im.shape[1] >= 90 for im in fs.images), [im.shape for im in fs.images]
    # and the real detector finds one face filling each crop
    det = build_detector(DetectorConfig(min_face_px=20), RuntimeConfig(intra_op_threads=1), default_models)
    for name, im in zip(fs.names, fs.images):
        bgr = np.ascontiguousarray(im[:, :, ::-1])  # the crops are RGB, the detector reads BGR
        padded = cv2.copyMakeBorder(bgr, *(im.shape[0] // 4,) * 4, cv2.BORDER_CONSTANT)  # room for the whole head
        d = det.detect(padded)
        assert len(d) >= 1, f"{name}: no face found in the crop"
        x1, y1, x2, y2 = d.boxes_xyxy[int(np.argmax(d.scores))]
        assert (x2 - x1) * (y2 - y1) > 0.3 * im.shape[0] * im.shape[1], f"{name}: the face fills too little of the crop"


# ---- contract refusals -------------------------------------------------------------------------------------------

def _md_set(key, value):
    def edit(m):
        for p in m.metadata_props:
            if p.key == key:
                p.value = value
    return edit


def _md_drop(prefix):
    def edit(m):
        keep = [(p.key, p.value) for p in m.metadata_props if not p.key.startswith(prefix)]
        del m.metadata_props[:]
        for k, v in keep:
            q = m.metadata_props.add()
            q.key, q.value = k, v
    return edit


def _input_fp16(m):
    m.graph.input[0].type.tensor_type.elem_type = 10  # FLOAT16


@pytest.mark.parametrize("case, edit, expected_words", [
    ("no metadata", _md_drop("agecam."), ["expected metadata_props 'agecam.contract'", "found None"]),
    ("no bins", _md_drop("agecam.bins_years"), ["missing agecam.bins_years"]),
    ("bins vs output width", _md_set("agecam.bins_years", json.dumps(list(range(1, 100)))),
     ["lists 99 age bins", "graph output shape is [None, 100]"]),
    ("input size", _md_set("agecam.input_size_hw", "[224, 224]"),
     ["metadata says input [N, 3, 224, 224]", f"graph input is [None, 3, {IMG_PX}, {IMG_PX}]"]),
    ("input name", _md_set("agecam.input_name", "input.1"), ["metadata names input 'input.1'", "['images']"]),
    ("mean count", _md_set("agecam.mean", "[120.0, 110.0]"), ["mean and std must have 3 values"]),
    ("colour order", _md_set("agecam.color_order", "RGBA"), ["color_order must be 'RGB' or 'BGR'", "'RGBA'"]),
    ("input dtype", _input_fp16, ["expected a float32 input 'images'", "float16"]),
])
@pytest.mark.slow
def test_contradictory_or_missing_metadata_is_refused(case, edit, expected_words, exported_model, tmp_path):
    # given an exported model whose metadata or graph was altered
    import onnx

    from agecam.config import RuntimeConfig
    from agecam.daemon.age import AgeModel

    m = onnx.load(str(exported_model))
    edit(m)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    # when the contract is read, and when the daemon's age stage starts on it
    for attempt in (lambda: read_spec(bad), lambda: AgeModel(bad, RuntimeConfig(providers=["CPUExecutionProvider"]))):
        with pytest.raises(ModelContractError) as exc:
            attempt()
        # then it is refused, saying what was expected and what was found
        for words in expected_words:
            assert words in str(exc.value), f"{case}: message lacks {words!r}: {exc.value}"


# ---- the daemon runs the exported files ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_daemon_age_model_runs_exported_file(precision, export_once):
    # given an exported model and real face chips at its input size
    import cv2

    from agecam.config import RuntimeConfig
    from agecam.daemon.age import AgeModel

    path, _ = export_once(precision)
    spec = read_spec(path)
    h, w = spec.input_size_hw
    chips = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in faces.packaged_faces().images])
    # when the daemon's age stage loads the file and predicts
    age = AgeModel(path, RuntimeConfig(providers=["CPUExecutionProvider"], intra_op_threads=1))
    probs = age.predict(chips)
    years = age.expected_years(probs)
    # then its ages are the ones onnxruntime gives directly for the same chips
    direct = checks.run_session(checks.ort_session(path), faces.preprocess(list(chips), spec))
    direct_years = checks.expected_age_years(direct, spec.bins_years)
    # (the daemon normalises with x * (1/std), the check with x / std: float rounding that fp16/int8 amplify)
    tol = {"fp32": 1e-3, "fp16": 0.02, "int8": 0.05}[precision]
    assert np.abs(years - direct_years).max() < tol, f"daemon ages {years} differ from ORT direct {direct_years}"
    assert np.ptp(direct_years) > 100 * tol + 5, f"the faces' ages are too alike to tell chips apart: {direct_years}"


def test_checkpoint_meta_round_trips_what_training_writes():
    # given the meta training writes into every checkpoint, when read back as export reads it, then it is the same
    from agecam.models.checkpoint import CheckpointMeta
    from agecam.training import model as M

    meta = M.checkpoint_meta(IMG_PX)
    assert CheckpointMeta.from_checkpoint({**meta.as_dict(), "model": {}}) == meta
