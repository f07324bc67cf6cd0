"""Real sample face photos available offline: insightface's t1.jpg and Tom_Hanks_54745.png.

They come from the installed insightface package when it is there (the development set-up), else from the copies
`agecam models fetch` extracts from the pinned insightface wheel into <models_dir>/samples (a service install).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SAMPLE_NAMES = ("t1.jpg", "Tom_Hanks_54745.png")


def _insightface_images() -> Path | None:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "images"


def sample_image(name: str, models_dir: str | Path | None = None) -> Path:
    """Path of a sample photo; FileNotFoundError saying how to get it when neither place has it."""
    from agecam.config import DEFAULT_MODELS_DIR

    if name not in SAMPLE_NAMES:
        raise ValueError(f"unknown sample image {name!r}; expected one of {SAMPLE_NAMES}")
    candidates = [d / name for d in (_insightface_images(), Path(models_dir or DEFAULT_MODELS_DIR) / "samples") if d]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"sample image {name} not found (looked in {', '.join(map(str, candidates))}): "
                            "run `agecam models fetch`")
