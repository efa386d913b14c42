"""Mobile export (DESIGN.md 6): ONNX and Core ML packages of the UNet, tiny decoder and on-device text
encoder, gated on numeric parity, idempotent by content hash, with an export report.

The only subpackage that imports onnx, onnxruntime, onnxscript and coremltools. Entry points:

    inputs = load_inputs("unet.safetensors", preset="toy", decoder="decoder.safetensors")
    report = export_model(inputs, "out/export", ExportConfig(palettize_bits=6), formats=("onnx", "coreml"))
"""
from snapgen_model.export.config import EXPORT_CODE_VERSION, FORMATS, PARTS, ExportConfig
from snapgen_model.export.coreml_export import REQUIRES_MACOS, SpecCheckError
from snapgen_model.export.parity import ParityError, ParityFailure, ParityMetrics, compare, psnr
from snapgen_model.export.pipeline import (
    ExportInputs,
    export_key,
    export_model,
    load_inputs,
    load_text_encoder,
    read_manifest,
)

__all__ = [
    "EXPORT_CODE_VERSION",
    "FORMATS",
    "PARTS",
    "REQUIRES_MACOS",
    "SpecCheckError",
    "ExportConfig",
    "ExportInputs",
    "ParityError",
    "ParityFailure",
    "ParityMetrics",
    "compare",
    "export_key",
    "export_model",
    "load_inputs",
    "load_text_encoder",
    "psnr",
    "read_manifest",
]
