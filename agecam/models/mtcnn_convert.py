"""MTCNN P/R/O-Net weights (facenet-pytorch .pt state dicts) to ONNX graphs, without torch."""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_TENSOR_ELEMENTS = 1 << 26  # 64 Mi elements: far above any MTCNN weight, far below exhausting memory
MAX_TENSOR_DIMS = 8


class StateDictError(ValueError):
    """A .pt file that is not a plain tensor state dict this reader accepts."""


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: type


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _StorageType:
    """Stands in for torch.<X>Storage in the pickle: only its dtype matters."""

    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict; refuses every global except the few a plain tensor dict needs."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise StateDictError(f"refusing to load global {module}.{name}: only plain tensor state dicts are accepted")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise StateDictError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise StateDictError(f"unexpected storage type {storage_type!r}")
        return _StorageRef(key, storage_type.dtype)


def _materialise(obj, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise StateDictError(f"expected a dict of tensors, found {type(obj).__name__}")
    out, total = {}, 0
    for name, ref in obj.items():
        if not isinstance(ref, _TensorRef):
            raise StateDictError(f"entry {name!r} is not a tensor")
        buf = storages.get(ref.storage.key)
        if buf is None:
            raise StateDictError(f"entry {name!r} refers to missing storage {ref.storage.key}")
        _check_view(str(name), ref, buf.size)
        total += int(np.prod(ref.size, dtype=np.int64)) if ref.size else 1
        if total > MAX_TENSOR_ELEMENTS:
            raise StateDictError(f"the tensors hold more than {MAX_TENSOR_ELEMENTS} elements in all")
        item = buf.itemsize
        arr = np.lib.stride_tricks.as_strided(
            buf[ref.offset:], shape=ref.size, strides=tuple(s * item for s in ref.stride)
        )
        out[str(name)] = np.array(arr, copy=True)
    return out


def _check_view(name: str, ref: _TensorRef, storage_numel: int) -> None:
    """Refuse a tensor view that would read outside its storage or allocate without bound (before numpy sees it)."""
    size, stride, offset = ref.size, ref.stride, ref.offset
    if not all(isinstance(v, int) for v in (*size, *stride, offset)):
        raise StateDictError(f"entry {name!r}: size, stride and offset must be integers")
    if len(size) != len(stride) or len(size) > MAX_TENSOR_DIMS:
        raise StateDictError(f"entry {name!r}: {len(size)} sizes and {len(stride)} strides (at most {MAX_TENSOR_DIMS})")
    if offset < 0 or any(s < 0 for s in size) or any(st < 0 or (st == 0 and s > 1) for s, st in zip(size, stride)):
        raise StateDictError(f"entry {name!r}: negative offset, size or stride, or a repeating (0) stride "
                             f"(offset {offset}, size {size}, stride {stride})")
    numel = 1
    for s in size:
        numel *= s
    if numel > MAX_TENSOR_ELEMENTS:
        raise StateDictError(f"entry {name!r}: {numel} elements is more than the {MAX_TENSOR_ELEMENTS} allowed")
    if numel and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= storage_numel:
        raise StateDictError(f"entry {name!r} reads past the end of its storage ({storage_numel} elements)")


def _load_legacy(data: bytes) -> dict[str, np.ndarray]:
    f = io.BytesIO(data)
    magic = _RestrictedUnpickler(f).load()
    if magic != _LEGACY_MAGIC:
        raise StateDictError("not a torch legacy serialization (bad magic number)")
    _RestrictedUnpickler(f).load()  # protocol version
    _RestrictedUnpickler(f).load()  # sys_info: a plain dict
    obj = _RestrictedUnpickler(f).load()
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list):
        raise StateDictError("storage key list missing")
    dtypes = {}

    def collect(o):
        for v in o.values():
            if isinstance(v, _TensorRef):
                dtypes[v.storage.key] = v.storage.dtype

    collect(obj)
    storages = {}
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        if not 0 <= numel <= MAX_TENSOR_ELEMENTS:
            raise StateDictError(f"storage {key}: {numel} elements is outside 0..{MAX_TENSOR_ELEMENTS}")
        dtype = np.dtype(dtypes.get(key, np.float32))
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise StateDictError(f"storage {key} truncated")
        storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    return _materialise(obj, storages)


def _load_zip(data: bytes) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise StateDictError("zip without data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        obj = _RestrictedUnpickler(io.BytesIO(z.read(pkl[0]))).load()
        storages = {}
        for v in obj.values() if isinstance(obj, dict) else ():
            if isinstance(v, _TensorRef) and v.storage.key not in storages:
                member = f"{prefix}data/{v.storage.key}"
                if z.getinfo(member).file_size > MAX_TENSOR_ELEMENTS * 8:
                    raise StateDictError(f"storage {v.storage.key} is larger than any allowed tensor")
                raw = z.read(member)
                storages[v.storage.key] = np.frombuffer(raw, dtype=np.dtype(v.storage.dtype).newbyteorder("<"))
        return _materialise(obj, storages)


def load_state_dict(data: bytes) -> dict[str, np.ndarray]:
    """Read a torch-saved state dict (zip or legacy format) into numpy arrays, without torch."""
    try:
        if data[:4] == b"PK\x03\x04":
            return _load_zip(data)
        return _load_legacy(data)
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, KeyError, OverflowError,
            ValueError) as exc:
        if isinstance(exc, StateDictError):
            raise
        raise StateDictError(f"not a readable torch state dict ({type(exc).__name__}: {exc})") from None


# ---- graph building ----------------------------------------------------------------------------------------


class _Graph:
    def __init__(self, sd: dict[str, np.ndarray], net: str):
        self.sd = dict(sd)
        self.net = net
        self.nodes: list = []
        self.inits: list = []
        self.used: set[str] = set()

    def w(self, key: str, reshape: tuple[int, ...] | None = None) -> str:
        if key not in self.sd:
            raise StateDictError(f"{self.net}: state dict lacks {key!r} (found {sorted(self.sd)})")
        arr = self.sd[key].astype(np.float32)
        if reshape is not None:
            arr = arr.reshape(reshape)
        self.used.add(key)
        self.inits.append(numpy_helper.from_array(arr, key))
        return key

    def node(self, op: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, layer: str) -> str:
        return self.node("Conv", [x, self.w(f"{layer}.weight"), self.w(f"{layer}.bias")], layer)

    def prelu(self, x: str, layer: str, spatial: bool) -> str:
        """PReLU as Relu(x) + slope * Min(x, 0): same values, but onnxruntime's CPU PRelu kernel is slow and breaks
        its blocked-layout conv chain (measured: O-Net batch 45 76 -> 36 ms, R-Net batch 461 112 -> 91 ms)."""
        c = self.sd[f"{layer}.weight"].shape[0]
        slope = self.w(f"{layer}.weight", (c, 1, 1) if spatial else (c,))
        if "zero" not in self.used:
            self.used.add("zero")
            self.inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
        pos = self.node("Relu", [x], f"{layer}.pos")
        neg = self.node("Mul", [self.node("Min", [x, "zero"], f"{layer}.min"), slope], f"{layer}.neg")
        return self.node("Add", [pos, neg], layer)

    def pool(self, x: str, name: str, k: int, s: int) -> str:
        return self.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[s, s], ceil_mode=1)

    def dense(self, x: str, layer: str) -> str:
        return self.node("Gemm", [x, self.w(f"{layer}.weight"), self.w(f"{layer}.bias")], layer, transB=1)

    def finish(self, name: str, inp, outs) -> onnx.ModelProto:
        unused = sorted(set(self.sd) - self.used)  # every weight must be consumed
        if unused:
            raise StateDictError(f"{self.net}: state dict has keys the graph does not use: {unused}")
        g = helper.make_graph(self.nodes, name, [inp], outs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="agecam")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def _vi(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def build_pnet(sd: dict[str, np.ndarray]) -> onnx.ModelProto:
    """P-Net: input [N,3,H,W] (dynamic H/W) -> reg [N,4,h,w], prob [N,2,h,w]."""
    g = _Graph(sd, "pnet")
    x = g.prelu(g.conv("input", "conv1"), "prelu1", True)
    x = g.pool(x, "pool1", 2, 2)
    x = g.prelu(g.conv(x, "conv2"), "prelu2", True)
    x = g.prelu(g.conv(x, "conv3"), "prelu3", True)
    a = g.node("Softmax", [g.conv(x, "conv4_1")], "prob", axis=1)
    g.nodes.append(helper.make_node("Identity", [g.conv(x, "conv4_2")], ["reg"], name="reg"))
    return g.finish("mtcnn_pnet", _vi("input", ["N", 3, "H", "W"]),
                    [_vi("reg", ["N", 4, "h", "w"]), _vi(a, ["N", 2, "h", "w"])])


def build_rnet(sd: dict[str, np.ndarray]) -> onnx.ModelProto:
    """R-Net: input [N,3,24,24] -> reg [N,4], prob [N,2]."""
    g = _Graph(sd, "rnet")
    x = g.prelu(g.conv("input", "conv1"), "prelu1", True)
    x = g.pool(x, "pool1", 3, 2)
    x = g.prelu(g.conv(x, "conv2"), "prelu2", True)
    x = g.pool(x, "pool2", 3, 2)
    x = g.prelu(g.conv(x, "conv3"), "prelu3", True)
    x = g.node("Transpose", [x], "permute", perm=[0, 3, 2, 1])
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.prelu(g.dense(x, "dense4"), "prelu4", False)
    g.node("Softmax", [g.dense(x, "dense5_1")], "prob", axis=1)
    g.nodes.append(helper.make_node("Identity", [g.dense(x, "dense5_2")], ["reg"], name="reg"))
    return g.finish("mtcnn_rnet", _vi("input", ["N", 3, 24, 24]), [_vi("reg", ["N", 4]), _vi("prob", ["N", 2])])


def build_onet(sd: dict[str, np.ndarray]) -> onnx.ModelProto:
    """O-Net: input [N,3,48,48] -> reg [N,4], landmarks [N,10] (x1..x5, y1..y5 in box units), prob [N,2]."""
    g = _Graph(sd, "onet")
    x = g.prelu(g.conv("input", "conv1"), "prelu1", True)
    x = g.pool(x, "pool1", 3, 2)
    x = g.prelu(g.conv(x, "conv2"), "prelu2", True)
    x = g.pool(x, "pool2", 3, 2)
    x = g.prelu(g.conv(x, "conv3"), "prelu3", True)
    x = g.pool(x, "pool3", 2, 2)
    x = g.prelu(g.conv(x, "conv4"), "prelu4", True)
    x = g.node("Transpose", [x], "permute", perm=[0, 3, 2, 1])
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.prelu(g.dense(x, "dense5"), "prelu5", False)
    g.node("Softmax", [g.dense(x, "dense6_1")], "prob", axis=1)
    g.nodes.append(helper.make_node("Identity", [g.dense(x, "dense6_2")], ["reg"], name="reg"))
    g.nodes.append(helper.make_node("Identity", [g.dense(x, "dense6_3")], ["landmarks"], name="landmarks"))
    return g.finish("mtcnn_onet", _vi("input", ["N", 3, 48, 48]),
                    [_vi("reg", ["N", 4]), _vi("landmarks", ["N", 10]), _vi("prob", ["N", 2])])


BUILDERS = {"pnet": build_pnet, "rnet": build_rnet, "onet": build_onet}


def convert(net: str, pt_bytes: bytes) -> bytes:
    """One facenet-pytorch .pt file (pnet/rnet/onet) to serialized ONNX bytes."""
    return BUILDERS[net](load_state_dict(pt_bytes)).SerializeToString()
