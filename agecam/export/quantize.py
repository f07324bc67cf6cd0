"""Precision variants of an exported fp32 ONNX: float16 (float32 I/O kept) and static int8 (QDQ, per-channel)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np


def to_fp16(src: str | Path, dst: str | Path) -> None:
    """Convert weights and compute to float16, keeping float32 input/output and Softmax in float32.

    Uses the converter that ships inside onnxruntime (`onnxruntime.transformers.float16`, the same code as
    onnxconverter-common's), so no extra package is needed.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Softmax"])
    topological_sort(fp16.graph)  # the converter appends its input Casts after their consumers
    onnx.save(fp16, str(dst))


def topological_sort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(x in available for x in n.input)]
        if not ready:
            names = [n.name for n in pending[:5]]
            raise ValueError(f"graph has a cycle or a missing input around nodes {names}")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [type(n)() for n in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


CALIB_CHUNK = 8  # images per calibration run


class _BatchReader:
    """Feeds a preprocessed calibration batch to onnxruntime's calibrator, a few images at a time."""

    def __init__(self, input_name: str, batch: np.ndarray, chunk: int = CALIB_CHUNK):
        self._feeds = iter([{input_name: batch[i:i + chunk]} for i in range(0, len(batch), chunk)])

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # not needed for MinMax; part of onnxruntime's reader interface
        raise NotImplementedError


def to_int8(src: str | Path, dst: str | Path, calib_batch: np.ndarray, input_name: str = "images") -> None:
    """Static int8 quantisation (QDQ, per-channel signed weights, unsigned activations, MinMax calibration).

    The Softmax and the classifier head (Gemm) stay in float: quantising probabilities to 1/255 steps would
    coarsen the age expectation, and the head's error goes straight into the logits while it costs ~0.005% of
    ResNet50's multiply-adds (on a random-init 224-px ResNet50: largest age change on the packaged faces 5.9 ->
    4.0 years; the first Conv in float, Percentile or Entropy calibration did not help).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if len(calib_batch) == 0:
        raise ValueError("int8 calibration needs at least one face image")
    reader = type("Reader", (_BatchReader, CalibrationDataReader), {})(input_name, calib_batch)
    keep_float = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
                  if n.op_type in ("Softmax", "Gemm")]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice ("consider pre-processing") on the root logger
    try:
        # memory stays flat in the number of images: the calibrator's augmented graph outputs only per-tensor
        # min/max (measured: 2.1 GB peak for the whole 224-px export with 16 or 32 calibration images)
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep_float)
    finally:
        root.setLevel(level)
