"""PyTorch checkpoint -> fp32 ONNX: softmax in the graph, dynamic batch, the agecam contract in metadata_props."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from agecam.models.checkpoint import CheckpointMeta
from agecam.models.contract import AgeModelSpec, ChipSpec, write_metadata

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
DEFAULT_OPSET = 17  # runs on onnxruntime's CPU and CUDA providers alike


class ProbabilitiesModel(torch.nn.Module):
    """The trained network followed by softmax, so the exported output is a distribution over the age bins."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(images), dim=1)


def load_checkpoint(path: str | Path):
    """(model in eval mode, checkpoint dict) via the training package's loader."""
    from agecam.training.model import load_checkpoint as load

    # checkpoints that stored `torch.__version__` as is hold a TorchVersion (a str subclass) that weights-only
    # loading refuses by default; allowing that one harmless class keeps such files loadable
    torch.serialization.add_safe_globals([torch.torch_version.TorchVersion])
    return load(str(path), map_location="cpu")


def _json_safe(value):
    """The value as something json.dumps accepts (tensors and numpy scalars become numbers/lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def spec_from_checkpoint(ckpt: dict, precision: str = "fp32", checkpoint_sha256: str = "") -> AgeModelSpec:
    """The contract of a model exported from `ckpt` (agecam.ckpt/v1): preprocessing, chip, bins, provenance."""
    meta = CheckpointMeta.from_checkpoint(ckpt)
    data = ckpt.get("data") or {}
    name = ckpt.get("name") or f"{meta.arch}-{str(data.get('name', 'custom')).lower()}"
    stamp = str(ckpt.get("created_utc", "")).replace(":", "").replace("-", "")
    version = ckpt.get("version") or f"{stamp or 'unknown'}-e{ckpt.get('epoch', 0)}"
    split = ckpt.get("split") or {}
    extra = {
        "precision": precision,
        "arch": meta.arch,
        "training_data": _json_safe(data),
        "metrics": _json_safe(ckpt.get("metrics", {})),
        "best_val_mae_years": _json_safe(ckpt.get("best_val_mae")),
        "epoch": _json_safe(ckpt.get("epoch")),
        "split": _json_safe({"file": Path(str(split.get("file", ""))).name, "sha256": split.get("sha256"),
                             "counts": split.get("counts")}),
        "train_args": _json_safe(ckpt.get("train_args", {})),
        "created_utc": str(ckpt.get("created_utc", "")),
        "torch_version": str(ckpt.get("torch_version", "")),
        "checkpoint_sha256": checkpoint_sha256,
    }
    spec = AgeModelSpec(
        name=str(name), version=str(version), input_name=INPUT_NAME, output_name=OUTPUT_NAME,
        output_kind="probabilities", input_size_hw=(meta.img_size, meta.img_size), color_order=meta.color_order,
        mean=meta.mean, std=meta.std,
        chip=ChipSpec(kind=meta.chip_kind, template_unit=meta.chip_template_unit, landmarks=meta.chip_landmarks),
        bins_years=meta.bins_years, extra=extra,
    )
    spec.validate("checkpoint")
    return spec


def torch_probabilities(model: torch.nn.Module, batch: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Softmax outputs of the PyTorch model (eval mode, fp32, CPU) on a preprocessed batch."""
    wrapped = ProbabilitiesModel(model).eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(batch), batch_size):
            outs.append(wrapped(torch.from_numpy(batch[i:i + batch_size])).numpy())
    return np.concatenate(outs, 0).astype(np.float32)


def export_fp32(model: torch.nn.Module, spec: AgeModelSpec, dst: str | Path, opset: int = DEFAULT_OPSET) -> float:
    """Write the fp32 ONNX with metadata to `dst`; returns the export time in seconds."""
    import warnings

    import onnx

    wrapped = ProbabilitiesModel(model).eval()
    dummy = torch.zeros(2, 3, *spec.input_size_hw, dtype=torch.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        wrapped(dummy)  # warm-up: lazy modules and cudnn/cpu kernels settle before tracing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated but 10x faster
        torch.onnx.export(
            wrapped, (dummy,), str(dst), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    onnx_model = onnx.load(str(dst))
    onnx_model.producer_name = "agecam export"
    inline_identity_constants(onnx_model)
    write_metadata(onnx_model, spec)
    onnx.save(onnx_model, str(dst))
    return time.perf_counter() - t0


def inline_identity_constants(model) -> int:
    """Replace `Identity(initializer)` nodes by a copy of the initializer under the node's output name.

    The legacy exporter shares equal constants (e.g. identical fused Conv biases) through Identity nodes; the
    int8 quantiser then cannot see those biases as initializers. Returns the number of nodes removed.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep, removed = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]),
                                                                   node.output[0]))
            removed += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return removed
