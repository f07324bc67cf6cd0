"""The age-model contract: an ONNX file whose metadata_props say how to feed it and read it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONTRACT_VERSION = "1"
PREFIX = "agecam."
# Order of the 5 landmarks everywhere in agecam (image coordinates, subject's right eye is on the image left):
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class ModelContractError(ValueError):
    """An ONNX file that does not carry a usable agecam contract; the message says expected vs found."""


@dataclass(frozen=True)
class ChipSpec:
    """How a face chip is cut: a similarity fit of 5 landmarks onto `template_unit` (x, y in 0..1 of the chip side)."""

    kind: str = "similarity5"
    template_unit: tuple[tuple[float, float], ...] = ()
    landmarks: tuple[str, ...] = LANDMARK_NAMES


@dataclass(frozen=True)
class AgeModelSpec:
    """Everything the daemon needs to run an age model, read from (or written to) its metadata_props."""

    name: str
    version: str
    input_name: str
    output_name: str
    output_kind: str  # "probabilities" (softmax in graph) or "logits"
    input_size_hw: tuple[int, int]
    color_order: str  # "RGB" or "BGR"
    mean: tuple[float, float, float]  # in 0..255 pixel units, per channel in color_order
    std: tuple[float, float, float]  # in 0..255 pixel units
    chip: ChipSpec
    bins_years: tuple[float, ...]
    layout: str = "NCHW"
    extra: dict = field(default_factory=dict)  # training data, metrics, licence...

    def to_metadata(self) -> dict[str, str]:
        """The metadata_props entries (all strings, JSON values) for this spec."""
        d = asdict(self)
        extra = d.pop("extra")
        md = {PREFIX + "contract": CONTRACT_VERSION}
        for k, v in d.items():
            md[PREFIX + k] = v if isinstance(v, str) else json.dumps(v)
        for k, v in extra.items():
            md[PREFIX + "extra." + k] = v if isinstance(v, str) else json.dumps(v)
        return md

    @classmethod
    def from_metadata(cls, md: dict[str, str], where: str = "model") -> "AgeModelSpec":
        """Parse metadata_props; raises ModelContractError naming each missing or bad key."""
        if md.get(PREFIX + "contract") != CONTRACT_VERSION:
            found = md.get(PREFIX + "contract")
            raise ModelContractError(
                f"{where}: expected metadata_props '{PREFIX}contract' = '{CONTRACT_VERSION}' (an agecam age model, "
                f"e.g. from `agecam export` or `agecam models fetch`), found {found!r}"
                + ("" if found else f"; keys present: {sorted(md)[:12]}")
            )
        required = ("name", "version", "input_name", "output_name", "output_kind", "input_size_hw", "color_order",
                    "mean", "std", "chip", "bins_years")
        missing = [PREFIX + k for k in required if PREFIX + k not in md]
        if missing:
            raise ModelContractError(f"{where}: metadata_props is missing {', '.join(missing)}")

        def j(key: str):
            try:
                return json.loads(md[PREFIX + key])
            except json.JSONDecodeError:
                raise ModelContractError(f"{where}: metadata '{PREFIX}{key}' is not JSON: {md[PREFIX + key]!r}") from None

        chip = j("chip")
        spec = cls(
            name=md[PREFIX + "name"],
            version=md[PREFIX + "version"],
            input_name=md[PREFIX + "input_name"],
            output_name=md[PREFIX + "output_name"],
            output_kind=md[PREFIX + "output_kind"],
            input_size_hw=tuple(j("input_size_hw")),
            color_order=md[PREFIX + "color_order"],
            mean=tuple(float(x) for x in j("mean")),
            std=tuple(float(x) for x in j("std")),
            chip=ChipSpec(
                kind=chip.get("kind", ""),
                template_unit=tuple(tuple(float(c) for c in p) for p in chip.get("template_unit", ())),
                landmarks=tuple(chip.get("landmarks", ())),
            ),
            bins_years=tuple(float(x) for x in j("bins_years")),
            layout=md.get(PREFIX + "layout", "NCHW"),
            extra={k[len(PREFIX) + 6:]: v for k, v in md.items() if k.startswith(PREFIX + "extra.")},
        )
        spec.validate(where)
        return spec

    def validate(self, where: str = "model") -> None:
        """Check the spec is self-consistent; raises ModelContractError with expected vs found."""
        problems = []
        if self.output_kind not in ("probabilities", "logits"):
            problems.append(f"output_kind must be 'probabilities' or 'logits', found {self.output_kind!r}")
        if self.color_order not in ("RGB", "BGR"):
            problems.append(f"color_order must be 'RGB' or 'BGR', found {self.color_order!r}")
        if self.layout != "NCHW":
            problems.append(f"layout must be 'NCHW', found {self.layout!r}")
        if len(self.input_size_hw) != 2 or min(self.input_size_hw) < 8:
            problems.append(f"input_size_hw must be [H, W] with sides >= 8, found {list(self.input_size_hw)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean and std must have 3 values and std > 0, found mean={self.mean} std={self.std}")
        if self.chip.kind != "similarity5" or len(self.chip.template_unit) != 5:
            problems.append(f"chip must be kind 'similarity5' with 5 template points, found {self.chip}")
        if len(self.bins_years) < 2 or any(b2 <= b1 for b1, b2 in zip(self.bins_years, self.bins_years[1:])):
            problems.append("bins_years must be at least 2 increasing ages")
        if problems:
            raise ModelContractError(f"{where}: " + "; ".join(problems))


def read_spec(path: str | Path) -> AgeModelSpec:
    """Read an ONNX file's contract and check its graph agrees with it (input name/size, output name/width)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelContractError(f"age model {path}: file not found (run `agecam models fetch` or set age.model)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for corrupt files
        raise ModelContractError(f"age model {path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    md = {p.key: p.value for p in model.metadata_props}
    spec = AgeModelSpec.from_metadata(md, where=f"age model {path}")
    check_graph(spec, model, where=f"age model {path}")
    return spec


def check_graph(spec: AgeModelSpec, model, where: str) -> None:
    """Refuse a graph whose input/output disagree with its metadata."""
    inits = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    outputs = {o.name: o for o in model.graph.output}
    if spec.input_name not in inputs:
        raise ModelContractError(f"{where}: metadata names input {spec.input_name!r}, graph has {sorted(inputs)}")
    if spec.output_name not in outputs:
        raise ModelContractError(f"{where}: metadata names output {spec.output_name!r}, graph has {sorted(outputs)}")
    for kind, name, value in (("input", spec.input_name, inputs.get(spec.input_name)),
                              ("output", spec.output_name, outputs.get(spec.output_name))):
        elem = value.type.tensor_type.elem_type
        if elem != 1:  # onnx.TensorProto.FLOAT: the daemon feeds and reads float32
            import onnx

            raise ModelContractError(f"{where}: expected a float32 {kind} {name!r}, graph {kind} is "
                                     f"{onnx.TensorProto.DataType.Name(elem).lower()}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[spec.input_name].type.tensor_type.shape.dim]
    expected = [None, 3, *spec.input_size_hw]
    if len(dims) != 4 or any(d is not None and e is not None and d != e for d, e in zip(dims[1:], expected[1:])):
        raise ModelContractError(
            f"{where}: metadata says input [N, 3, {spec.input_size_hw[0]}, {spec.input_size_hw[1]}], graph input is {dims}"
        )
    odims = [d.dim_value if d.HasField("dim_value") else None for d in outputs[spec.output_name].type.tensor_type.shape.dim]
    if len(odims) != 2 or (odims[1] is not None and odims[1] != len(spec.bins_years)):
        raise ModelContractError(
            f"{where}: metadata lists {len(spec.bins_years)} age bins, graph output shape is {odims}"
        )


def write_metadata(model, spec: AgeModelSpec) -> None:
    """Replace the agecam entries of an onnx.ModelProto's metadata_props with `spec`."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for k, v in keep + sorted(spec.to_metadata().items()):
        p = model.metadata_props.add()
        p.key, p.value = k, v
