"""Age model runner: reads the model's contract, cuts chips, runs batched ONNX inference shared by all cameras."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from agecam.config import AgeConfig, RuntimeConfig
from agecam.daemon.chip import make_chip
from agecam.models.contract import ModelContractError, read_spec

log = logging.getLogger(__name__)

DLIB5_PREDICTOR_RELPATH = Path("dlib") / "shape_predictor_5_face_landmarks.dat"
REFERENCE_MODEL_RELPATH = Path("age") / "cydral-age-v1.onnx"


# dlib's shape predictor starts from its mean shape placed in the box, so it wants the box its own frontal-face
# detector draws: square, about 0.88 of an MTCNN box's mean side, centred 0.07 of a side lower (MTCNN boxes are
# taller than wide and reach higher up the forehead). Measured on the parity faces; x kept centred by symmetry.
DLIB_BOX_SCALE = 0.88
DLIB_BOX_DY = 0.07


def dlib_box_from_detector_box(box_xyxy) -> tuple[float, float, float, float]:
    """The square box dlib's frontal-face detector would draw for an MTCNN-style detector box."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    side = 0.5 * ((x2 - x1) + (y2 - y1))
    cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2) + DLIB_BOX_DY * side
    half = 0.5 * DLIB_BOX_SCALE * side
    return cx - half, cy - half, cx + half, cy + half


def box_from_landmarks(landmarks5) -> tuple[float, float, float, float]:
    """A rough MTCNN-style box around 5 landmarks (for callers that lost the detector's box)."""
    p = np.asarray(landmarks5, np.float64).reshape(5, 2)
    eye_mid, mouth_mid = p[:2].mean(0), p[3:].mean(0)
    side = 2.2 * max(np.linalg.norm(p[1] - p[0]), np.linalg.norm(mouth_mid - eye_mid))
    cx, cy = p[:, 0].mean(), 0.5 * (eye_mid[1] + mouth_mid[1]) - 0.05 * side
    return cx - 0.4 * side, cy - 0.5 * side, cx + 0.4 * side, cy + 0.5 * side


class AgeModel:
    """One ONNX Runtime session around an agecam age model; `predict` is thread-safe and shared by every camera.

    landmarks='dlib5' re-locates 5 points with dlib's shape predictor inside the detector's box and cuts the chip
    from the model's `chip_dlib5` template (metadata extra), which reproduces dlib-trained models' chips exactly.
    """

    def __init__(self, path: str | Path, runtime: RuntimeConfig, age_cfg: AgeConfig | None = None, models=None, *,
                 landmarks: str | None = None, dlib_predictor: str | Path | None = None):
        """`models` (agecam.models.fetch.DefaultModels) supplies the dlib predictor path for landmarks='dlib5'."""
        import onnxruntime as ort

        landmarks = landmarks or (age_cfg.landmarks if age_cfg is not None else "auto")
        if dlib_predictor is None and models is not None:
            dlib_predictor = getattr(models, "shape5", None)

        self.path = Path(path)
        self.spec = read_spec(self.path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = runtime.intra_op_threads
        so.enable_cpu_mem_arena = runtime.onnx_memory_arena
        self.session = ort.InferenceSession(str(self.path), so, providers=list(runtime.providers))
        self._check_session()
        s = self.spec
        self.chip_hw = (int(s.input_size_hw[0]), int(s.input_size_hw[1]))
        self.bins_years = np.asarray(s.bins_years, np.float32)
        self._mean = np.asarray(s.mean, np.float32).reshape(1, 3, 1, 1)
        self._inv_std = (1.0 / np.asarray(s.std, np.float32)).reshape(1, 3, 1, 1)
        self._bgr_to_model = s.color_order == "RGB"
        if landmarks == "auto":  # the model says which chips it was trained on
            landmarks = "dlib5" if s.extra.get("chip_dlib5") else "detector"
        self.landmarks = landmarks
        self._template = np.asarray(s.chip.template_unit, np.float64)
        self._sp = None
        self._sp_lock = threading.Lock()
        if landmarks == "dlib5":
            self._init_dlib5(dlib_predictor or runtime.models_dir / DLIB5_PREDICTOR_RELPATH)
        elif landmarks != "detector":
            raise ValueError(f"landmarks must be 'auto', 'detector' or 'dlib5', found {landmarks!r}")

    @classmethod
    def from_config(cls, cfg: AgeConfig, runtime: RuntimeConfig) -> "AgeModel":
        """Build from the age section: its model or the fetched reference model under runtime.models_dir."""
        path = cfg.model or runtime.models_dir / REFERENCE_MODEL_RELPATH
        return cls(path, runtime, cfg)

    def _check_session(self) -> None:
        s, where = self.spec, f"age model {self.path}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if s.input_name not in inputs or s.output_name not in outputs:
            raise ModelContractError(f"{where}: metadata names input {s.input_name!r} / output {s.output_name!r}, "
                                     f"session has inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        if inputs[s.input_name].type != "tensor(float)":
            raise ModelContractError(f"{where}: expected a float32 input, found {inputs[s.input_name].type}")

    def _init_dlib5(self, predictor_path: str | Path) -> None:
        raw = self.spec.extra.get("chip_dlib5")
        if not raw:
            raise ModelContractError(f"age model {self.path}: age.landmarks is 'dlib5' but the model's metadata has no "
                                     "'agecam.extra.chip_dlib5' template; use age.landmarks: detector")
        tpl = json.loads(raw) if isinstance(raw, str) else raw
        self._template = np.asarray(tpl["template_unit"], np.float64)
        if self._template.shape != (5, 2):
            raise ModelContractError(f"age model {self.path}: chip_dlib5 template must be 5 (x, y) points, "
                                     f"found shape {self._template.shape}")
        predictor_path = Path(predictor_path)
        if not predictor_path.is_file():
            raise FileNotFoundError(f"dlib 5-point predictor {predictor_path} not found (run `agecam models fetch`)")
        import dlib  # lazy: only this optional mode needs it

        self._dlib = dlib
        self._sp = dlib.shape_predictor(str(predictor_path))

    # ---- chips --------------------------------------------------------------------------------------------------

    def dlib5_points(self, image_bgr: np.ndarray, box_xyxy) -> np.ndarray:
        """dlib's 5 points (eye corners, nose bottom) inside `box_xyxy`, from a small RGB crop around the box."""
        x1, y1, x2, y2 = dlib_box_from_detector_box(box_xyxy)
        m = 0.3 * max(x2 - x1, y2 - y1)
        h, w = image_bgr.shape[:2]
        xa, ya = max(0, int(x1 - m)), max(0, int(y1 - m))
        xb, yb = min(w, int(x2 + m) + 1), min(h, int(y2 + m) + 1)
        crop = np.ascontiguousarray(image_bgr[ya:yb, xa:xb, ::-1])
        rect = self._dlib.rectangle(int(round(x1)) - xa, int(round(y1)) - ya, int(round(x2)) - xa, int(round(y2)) - ya)
        with self._sp_lock:  # dlib objects are not documented as thread-safe
            shape = self._sp(crop, rect)
        return np.array([(p.x + xa, p.y + ya) for p in shape.parts()], np.float64)

    def make_chip(self, image_bgr: np.ndarray, landmarks5, box_xyxy=None) -> np.ndarray:
        """A uint8 (H, W, 3) chip in the model's colour order; dlib5 mode needs `box_xyxy` (the detector's box)."""
        if self._sp is not None:
            if box_xyxy is None:  # callers should pass the detector's box; this approximates one from the points
                box_xyxy = box_from_landmarks(landmarks5)
            points = self.dlib5_points(image_bgr, box_xyxy)
        else:
            points = np.asarray(landmarks5, np.float64).reshape(5, 2)
        chip = make_chip(image_bgr, points, self._template, self.chip_hw)
        return np.ascontiguousarray(chip[:, :, ::-1]) if self._bgr_to_model else chip

    # ---- inference ----------------------------------------------------------------------------------------------

    def preprocess(self, chips) -> np.ndarray:
        """(N, H, W, 3) uint8 chips -> (N, 3, H, W) float32 input tensor, normalised per the contract."""
        x = np.asarray(chips)
        if x.ndim == 3:
            x = x[None]
        if x.shape[1:] != (*self.chip_hw, 3):
            raise ValueError(f"chips must be (N, {self.chip_hw[0]}, {self.chip_hw[1]}, 3), found {x.shape}")
        x = x.transpose(0, 3, 1, 2).astype(np.float32)
        x -= self._mean
        x *= self._inv_std
        return x

    def predict(self, chips) -> np.ndarray:
        """Age distributions (N, bins) float32 for a batch of chips, one `run` call; softmax applied to logits."""
        if len(chips) == 0:
            return np.zeros((0, len(self.bins_years)), np.float32)
        x = self.preprocess(chips)
        out = self.session.run([self.spec.output_name], {self.spec.input_name: x})[0].astype(np.float32, copy=False)
        if out.shape != (x.shape[0], len(self.bins_years)):
            raise ModelContractError(f"age model {self.path}: expected output ({x.shape[0]}, {len(self.bins_years)}), "
                                     f"found {out.shape}")
        if self.spec.output_kind == "logits":
            out = out - out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
        return out / out.sum(axis=1, keepdims=True)

    def expected_years(self, probs: np.ndarray) -> np.ndarray:
        """The mean age (years) of each distribution."""
        return np.asarray(probs, np.float32) @ self.bins_years

