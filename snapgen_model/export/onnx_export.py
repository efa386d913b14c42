"""ONNX export of one part: static-shape (mobile) and dynamic-batch variants, optional FP16 weights,
external data past the 2 GB protobuf limit, `onnx.checker` by path.

Exporter choice (`ExportConfig.onnx_exporter`), measured on the toy UNet on a shared 2-core CPU:
the TorchScript exporter (`dynamo=False`, the default here) takes ~5 s and matches PyTorch to
~8e-7; the dynamo exporter (torch 2.13's default) takes ~20-40 s (torch.export, decompositions,
onnxscript optimiser) for the same parity and a graph with ~3x fewer nodes (no shape arithmetic),
which ONNX Runtime runs at the same speed within noise (it folds those nodes at session start).
Both need the module swaps of `swaps.py` (TorchScript has no `aten::rms_norm` symbolic at opset 18).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from snapgen_model.export.config import ExportConfig
from snapgen_model.export.parts import ExportPart

VARIANT_SUFFIX = {"static": "", "dynamic_batch": ".dynamic", "fp16": ".fp16"}


@dataclasses.dataclass
class OnnxArtifact:
    """What one exported ONNX file holds (written into the export report)."""

    part: str
    variant: str  # "static", "dynamic_batch" or "fp16"
    path: Path
    files: list[str]  # the model file and its external data file, if any
    bytes: int
    nodes: int
    op_counts: dict[str, int]
    opset: int
    inputs: list[dict]  # name, shape (ints; strings for symbolic dims), dtype
    outputs: list[dict]
    external_data: bool
    exporter: str
    seconds: float

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = self.path.name
        return d


def onnx_path(out_dir: Path, part: str, variant: str) -> Path:
    return Path(out_dir) / f"{part}{VARIANT_SUFFIX[variant]}.onnx"


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(part: ExportPart, out_dir: Path, cfg: ExportConfig, *, dynamic: bool) -> OnnxArtifact:
    """Export `part` (static batch `cfg.batch`, or a symbolic batch) and check it by path."""
    variant = "dynamic_batch" if dynamic else "static"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = onnx_path(out_dir, part.name, variant)
    module = part.graph_module(cfg.onnx_attention)
    # a symbolic batch is traced at batch 2: a traced batch of 1 can be specialised away
    inputs = part.inputs(2 if dynamic else cfg.batch, cfg.seed)
    external = param_bytes(module) > cfg.external_data_bytes
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{part.name}-onnx-") as tmp:
        raw = Path(tmp) / path.name
        if cfg.onnx_exporter == "dynamo":
            _export_dynamo(module, inputs, part, raw, cfg, dynamic, external)
        else:
            _export_torchscript(module, inputs, part, raw, cfg, dynamic)
        save_model(onnx.load(str(raw)), path, external)
    check(path)
    return describe(path, part.name, variant, cfg.onnx_exporter, time.perf_counter() - start)


def _export_torchscript(module, inputs, part: ExportPart, path: Path, cfg: ExportConfig, dynamic: bool) -> None:
    axes = {name: {0: "batch"} for name in (*part.input_names, *part.output_names)} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=cfg.opset,
                          input_names=list(part.input_names), output_names=list(part.output_names),
                          dynamic_axes=axes, do_constant_folding=True)


def _export_dynamo(module, inputs, part: ExportPart, path: Path, cfg: ExportConfig, dynamic: bool,
                   external: bool) -> None:
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=4096)
        shapes = tuple({0: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=cfg.opset, verbose=False,
                                    input_names=list(part.input_names), output_names=list(part.output_names),
                                    dynamic_shapes=shapes, optimize=True)
    program.save(str(path), external_data=external)


def save_model(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write `model` to `path`; weights in one `<name>.data` file next to it when `external`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def check(path: Path) -> None:
    """`onnx.checker` by path (works past 2 GB and with external data), with shape inference."""
    onnx.checker.check_model(str(path), full_check=True)


def convert_fp16(src: Path, out_dir: Path, part: str, cfg: ExportConfig) -> OnnxArtifact:
    """FP16 weights and compute with FP32 inputs/outputs (onnxruntime's float16 converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    start = time.perf_counter()
    path = onnx_path(out_dir, part, "fp16")
    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
        wrapped = OnnxModel(half)
        wrapped.topological_sort()  # the I/O casts it inserts are appended out of order
        half = wrapped.model
    external = sum(t.ByteSize() for t in half.graph.initializer) > cfg.external_data_bytes
    save_model(half, path, external)
    check(path)
    return describe(path, part, "fp16", cfg.onnx_exporter + "+float16", time.perf_counter() - start)


def _value_info(values) -> list[dict]:
    rows = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        rows.append({"name": v.name, "shape": shape, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower()})
    return rows


def describe(path: Path, part: str, variant: str, exporter: str, seconds: float) -> OnnxArtifact:
    """Summary of a written ONNX file (graph read without its external weights)."""
    model = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    files = [path.name] + ([data.name] if data.exists() else [])
    size = sum(os.path.getsize(path.parent / f) for f in files)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxArtifact(
        part=part, variant=variant, path=path, files=files, bytes=size, nodes=len(model.graph.node),
        op_counts=dict(Counter(n.op_type for n in model.graph.node).most_common()), opset=opset,
        inputs=_value_info(model.graph.input), outputs=_value_info(model.graph.output),
        external_data=data.exists(), exporter=exporter, seconds=round(seconds, 3))
