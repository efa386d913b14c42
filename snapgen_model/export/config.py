"""`ExportConfig`: what the export stage writes and the parity thresholds that gate it (DESIGN.md 6).

Thresholds follow apple/ml-stable-diffusion `torch2coreml.py` (a PSNR floor of 35 dB for FP16
conversions), tightened for FP32 ONNX where the runtime should agree with PyTorch to float
round-off. Metrics are defined in `snapgen_model.export.parity`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from snapgen_model.config_base import ConfigBase, check, check_choice

# Bumped whenever export code changes what it writes: part of the export key (idempotence).
EXPORT_CODE_VERSION = "export-1"
PARTS = ("unet", "decoder", "text_encoder")
FORMATS = ("onnx", "coreml")
ATTENTION_IMPLS = ("original", "matmul", "split_einsum")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig(ConfigBase):
    """One export run: ONNX and Core ML settings, parity thresholds, benchmark sizes."""

    # ---- inputs of the exported graphs
    batch: int = 1  # static batch of the mobile (static-shape) variants
    # tokens in the UNet's text context and the text encoder's input (CLIP: 77); not "text_tokens":
    # tasks.tracking masks params whose key contains "token" as secrets
    text_length: int = 77
    seed: int = 0  # seed of every parity input and of the generation check

    # ---- ONNX
    opset: int = 18  # ONNX opset (>= 18)
    # "torchscript": torch.onnx.export(dynamo=False), 4-5x faster to export here, same parity and ORT
    # speed; "dynamo": torch.export + onnxscript (torch 2.13's default), a 3x smaller graph (docs/export.md)
    onnx_exporter: Literal["torchscript", "dynamo"] = "torchscript"
    onnx_attention: Literal["original", "matmul", "split_einsum"] = "matmul"  # attention swap for ONNX
    dynamic_batch: bool = True  # also write a dynamic-batch ONNX variant ("batch" symbolic dim)
    dynamic_batch_check: int = 3  # batch size the dynamic variant is checked at (!= batch)
    onnx_fp16: bool = False  # also write an FP16-weight ONNX variant (fp32 I/O), gated by the fp16 thresholds
    external_data_bytes: int = 2_000_000_000  # weights above this are written as ONNX external data (2 GB limit)

    # ---- Core ML
    coreml_target: Literal["iOS17", "macOS14", "iOS18", "macOS15"] = "iOS17"  # minimum deployment target
    coreml_precision: Literal["fp16", "fp32"] = "fp16"  # ML Program compute precision
    # attention for the Neural Engine: "split_einsum" (per-head einsums in (B, C, 1, S) layout, as Apple's
    # ml-stable-diffusion SPLIT_EINSUM), "matmul" or "original" (SDPA); a module swap that keeps numerics
    coreml_attention: Literal["original", "matmul", "split_einsum"] = "split_einsum"
    palettize_bits: int = 0  # 0 = off; 1-4, 6 or 8: k-means weight palettization (coremltools.optimize.coreml)
    palettize_min_elements: int = 2048  # weights with fewer elements stay FP16 (coremltools weight_threshold)

    # ---- parity thresholds (all must hold; see parity.py for the metric definitions)
    max_abs: float = 1e-3  # FP32: largest |runtime - torch| over all outputs
    max_rel: float = 1e-3  # FP32: relative L2 error ||runtime - torch|| / ||torch||
    min_psnr: float = 60.0  # FP32: PSNR in dB (peak = max |torch|)
    fp16_max_abs: float = 0.1  # FP16 (ONNX fp16, Core ML): largest absolute difference
    fp16_max_rel: float = 2e-2  # FP16: relative L2 error
    fp16_min_psnr: float = 35.0  # FP16: PSNR floor (apple/ml-stable-diffusion: 35 dB)
    generation_steps: int = 4  # steps of the few-step ONNX Runtime generation check (paper: 4)
    generation_seeds: tuple[int, ...] = (0, 1)  # per-image seeds of the generation check
    generation_min_psnr: float = 40.0  # uint8 image PSNR (dB, peak 255) of ORT vs PyTorch generation

    # ---- CPU latency (ONNX Runtime vs PyTorch eager, on the exporting machine)
    latency_warmup: int = 2  # untimed runs before timing
    latency_runs: int = 10  # timed runs (median reported)
    threads: int = 0  # torch and ORT intra-op threads for the whole export (0 = torch.get_num_threads())

    def __post_init__(self) -> None:
        check(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")
        check(self.text_length >= 1, "text_length", f"must be >= 1, got {self.text_length}")
        check(self.opset >= 18, "opset", f"must be >= 18, got {self.opset}")
        check_choice(self.onnx_exporter, "onnx_exporter", ("torchscript", "dynamo"))
        check_choice(self.onnx_attention, "onnx_attention", ATTENTION_IMPLS)
        check_choice(self.coreml_attention, "coreml_attention", ATTENTION_IMPLS)
        check(self.dynamic_batch_check >= 1 and self.dynamic_batch_check != self.batch, "dynamic_batch_check",
              f"must be >= 1 and differ from batch ({self.batch}), got {self.dynamic_batch_check}")
        check(self.external_data_bytes > 0, "external_data_bytes", "must be > 0")
        check_choice(self.coreml_target, "coreml_target", ("iOS17", "macOS14", "iOS18", "macOS15"))
        check_choice(self.coreml_precision, "coreml_precision", ("fp16", "fp32"))
        check_choice(self.palettize_bits, "palettize_bits", (0, 1, 2, 3, 4, 6, 8))
        check(self.palettize_min_elements >= 1, "palettize_min_elements", "must be >= 1")
        for name in ("max_abs", "max_rel", "fp16_max_abs", "fp16_max_rel"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("min_psnr", "fp16_min_psnr", "generation_min_psnr"):
            check(getattr(self, name) > 0, name, f"must be > 0 dB, got {getattr(self, name)}")
        check(1 <= self.generation_steps <= 50, "generation_steps", f"must be in [1, 50], got {self.generation_steps}")
        check(len(self.generation_seeds) >= 1, "generation_seeds", "needs at least one seed")
        check(self.latency_warmup >= 0, "latency_warmup", "must be >= 0")
        check(self.latency_runs >= 1, "latency_runs", f"must be >= 1, got {self.latency_runs}")
        check(self.threads >= 0, "threads", "must be >= 0 (0 = torch's current thread count)")
