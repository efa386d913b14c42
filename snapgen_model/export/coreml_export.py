"""Core ML export of one part: an ML Program `.mlpackage` (FP16 compute, iOS 17 / macOS 14 target),
the Neural-Engine attention swap, optional k-means palettization, spec checks and prediction parity.

On Linux coremltools converts and saves packages but cannot run them (no Core ML framework), so
the checks here are: (1) the swapped PyTorch module matches the original (the numerics that get
converted), (2) the saved package's spec has the expected inputs, outputs, shapes, deployment
target, precision and op counts. Prediction parity runs through the same code as ONNX parity
when `sys.platform == "darwin"`; elsewhere it is reported as "requires macOS", never faked.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from snapgen_model.export.config import ExportConfig
from snapgen_model.export.parity import ParityFailure, compare_all, parity_record, thresholds
from snapgen_model.export.parts import ExportPart
from snapgen_model.export.swaps import count_swaps

SPEC_VERSION = {"iOS17": 8, "macOS14": 8, "iOS18": 9, "macOS15": 9}  # Core ML specification versions
REQUIRES_MACOS = "requires macOS"


class SpecCheckError(RuntimeError):
    """A converted Core ML package does not have the expected interface or precision."""


@dataclasses.dataclass
class CoremlArtifact:
    part: str
    path: Path
    bytes: int
    spec: dict  # spec_summary() of the package
    seconds: float
    swap_parity: dict  # swapped PyTorch module vs the original (checked on every platform)
    prediction_parity: dict  # Core ML prediction vs PyTorch ({"status": "requires macOS"} off macOS)
    palettized: dict | None = None  # {"bits", "path", "bytes", "ratio", "spec", "prediction_parity"}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = self.path.name
        return d


def package_bytes(path: Path) -> int:
    """Size of an `.mlpackage` folder (all files)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _ct():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


def _tensor_types(names, tensors) -> list:
    ct = _ct()
    types = []
    for name, x in zip(names, tensors):
        dtype = np.int32 if not x.is_floating_point() else np.float32
        types.append(ct.TensorType(name=name, shape=tuple(x.shape), dtype=dtype))
    return types


def convert(part: ExportPart, out_dir: Path, cfg: ExportConfig) -> tuple[CoremlArtifact | None, list[ParityFailure]]:
    """Convert `part` to `<out_dir>/<part>.mlpackage` (plus a palettized copy when configured).

    The swapped PyTorch module is checked against the original first; if it drifted, nothing is
    converted and (None, failures) comes back."""
    start = time.perf_counter()
    module = part.graph_module(cfg.coreml_attention)
    inputs = part.inputs(cfg.batch, cfg.seed)
    with torch.no_grad():
        swapped = module(*inputs)
    swapped = list(swapped) if isinstance(swapped, (tuple, list)) else [swapped]
    record, failures = parity_record(part.name, f"coreml torch-swap ({cfg.coreml_attention})",
                                     compare_all(swapped, part.reference(inputs)), thresholds(cfg, "fp32"))
    record["swaps"] = count_swaps(module)
    if failures:
        return None, failures
    model = _convert(module, part, inputs, cfg)
    path = Path(out_dir) / f"{part.name}.mlpackage"
    model.save(str(path))
    spec = spec_summary(path)
    check_spec(spec, part, inputs, cfg)
    prediction, failures = prediction_parity(path, part, inputs, cfg, "coreml predict")
    artifact = CoremlArtifact(part=part.name, path=path, bytes=package_bytes(path), spec=spec,
                              seconds=0.0, swap_parity=record, prediction_parity=prediction)
    if cfg.palettize_bits:
        artifact.palettized, pal_failures = palettize(model, path, part, inputs, cfg)
        failures += pal_failures
    artifact.seconds = round(time.perf_counter() - start, 3)
    return artifact, failures


def _convert(module: torch.nn.Module, part: ExportPart, inputs, cfg: ExportConfig):
    """torch.jit.trace + coremltools ML Program conversion (fp32 I/O, FP16 or FP32 compute)."""
    ct = _ct()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, inputs, check_trace=False)
        model = ct.convert(
            traced, inputs=_tensor_types(part.input_names, inputs),
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in part.output_names],
            convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, cfg.coreml_target),
            compute_precision=ct.precision.FLOAT16 if cfg.coreml_precision == "fp16" else ct.precision.FLOAT32)
    model.short_description = f"snapgen {part.name} ({part.resolution})"
    model.user_defined_metadata["snapgen.part"] = part.name
    model.user_defined_metadata["snapgen.attention"] = cfg.coreml_attention if part.attention_swappable else "original"
    return model


def palettize(model, path: Path, part: ExportPart, inputs, cfg: ExportConfig) -> tuple[dict, list[ParityFailure]]:
    """k-means palettization of weights with >= `palettize_min_elements` elements (coremltools.optimize)."""
    _ct()
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    op_config = OpPalettizerConfig(mode="kmeans", nbits=cfg.palettize_bits,
                                   weight_threshold=cfg.palettize_min_elements)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed = palettize_weights(model, OptimizationConfig(global_config=op_config))
    target = path.with_name(f"{part.name}.pal{cfg.palettize_bits}.mlpackage")
    compressed.save(str(target))
    spec = spec_summary(target)
    check_spec(spec, part, inputs, cfg, palettized=True)
    before, after = package_bytes(path), package_bytes(target)
    prediction, failures = prediction_parity(target, part, inputs, cfg, f"coreml predict pal{cfg.palettize_bits}")
    return ({"bits": cfg.palettize_bits, "path": target.name, "bytes": after, "bytes_before": before,
             "ratio": round(after / before, 4) if before else None, "spec": spec,
             "prediction_parity": prediction}, failures)


def spec_summary(path: Path) -> dict:
    """Inputs, outputs, deployment spec version, op counts and FP16 share of a saved `.mlpackage`."""
    ct = _ct()
    from coremltools.proto import MIL_pb2

    model = ct.models.MLModel(str(path), skip_model_load=True)  # loadable on any platform
    spec = model.get_spec()
    array_type = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def io(features) -> list[dict]:
        return [{"name": f.name, "shape": list(f.type.multiArrayType.shape),
                 "dtype": array_type.Name(f.type.multiArrayType.dataType).lower()} for f in features]

    summary = {"type": spec.WhichOneof("Type"), "specification_version": spec.specificationVersion,
               "inputs": io(spec.description.input), "outputs": io(spec.description.output)}
    if summary["type"] != "mlProgram":
        return summary | {"ops": {}, "op_total": 0, "fp16_fraction": 0.0}
    main = spec.mlProgram.functions["main"]
    ops = main.block_specializations[main.opset].operations
    kinds = Counter(op.type for op in ops)
    float_dtypes: Counter[str] = Counter()
    for op in ops:
        if op.type == "const":
            continue
        for out in op.outputs:
            name = MIL_pb2.DataType.Name(out.type.tensorType.dataType)
            if name in ("FLOAT16", "FLOAT32"):
                float_dtypes[name] += 1
    floats = sum(float_dtypes.values())
    return summary | {"opset": main.opset, "ops": dict(kinds.most_common()), "op_total": sum(kinds.values()),
                      "compute_ops": sum(n for k, n in kinds.items() if k != "const"),
                      "fp16_fraction": round(float_dtypes["FLOAT16"] / floats, 4) if floats else 0.0,
                      "metadata": dict(spec.description.metadata.userDefined)}


def check_spec(spec: dict, part: ExportPart, inputs, cfg: ExportConfig, palettized: bool = False) -> None:
    """Raise `SpecCheckError` naming every mismatch of the package's interface or precision."""
    problems = []
    if spec["type"] != "mlProgram":
        problems.append(f"type {spec['type']!r} is not an ML Program")
    if spec["specification_version"] < SPEC_VERSION[cfg.coreml_target]:
        problems.append(f"specification version {spec['specification_version']} < "
                        f"{SPEC_VERSION[cfg.coreml_target]} ({cfg.coreml_target})")
    want_in = [(n, list(x.shape)) for n, x in zip(part.input_names, inputs)]
    got_in = [(f["name"], f["shape"]) for f in spec["inputs"]]
    if got_in != want_in:
        problems.append(f"inputs {got_in} != expected {want_in}")
    got_out = [f["name"] for f in spec["outputs"]]
    if got_out != list(part.output_names):
        problems.append(f"outputs {got_out} != expected {list(part.output_names)}")
    if cfg.coreml_precision == "fp16" and spec.get("fp16_fraction", 0.0) < 0.9:
        problems.append(f"FP16 compute precision expected, but only {spec.get('fp16_fraction')} of ops are FP16")
    if palettized and not spec.get("ops", {}).get("constexpr_lut_to_dense"):
        problems.append("palettized package holds no constexpr_lut_to_dense ops")
    if problems:
        raise SpecCheckError(f"Core ML package of {part.name!r} failed its spec check: " + "; ".join(problems))


def prediction_parity(path: Path, part: ExportPart, inputs, cfg: ExportConfig,
                      variant: str) -> tuple[dict, list[ParityFailure]]:
    """Core ML prediction vs PyTorch with the FP16 thresholds; `requires macOS` elsewhere."""
    if sys.platform != "darwin":
        return {"status": REQUIRES_MACOS, "platform": sys.platform}, []
    ct = _ct()
    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
    feed = {n: x.numpy().astype(np.int32 if not x.is_floating_point() else np.float32)
            for n, x in zip(part.input_names, inputs)}
    out = model.predict(feed)
    record, failures = parity_record(part.name, variant, compare_all([out[n] for n in part.output_names],
                                                                     part.reference(inputs)),
                                     thresholds(cfg, "fp16"))
    return {"status": "checked", "platform": sys.platform, **record}, failures
