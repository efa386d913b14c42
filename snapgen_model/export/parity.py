"""Numeric parity of an exported part against PyTorch eager, and the gate that blocks a bad export.

Metrics (worst over a part's outputs), after apple/ml-stable-diffusion `torch2coreml.py`:

    max_abs = max |a - r|
    rel     = ||a - r||_2 / ||r||_2                          (relative L2 error)
    psnr    = 10 log10(max|r|^2 / mse(a, r))   dB, mse floored (evaluation.image_metrics); higher is better

The thresholds come from `ExportConfig`: FP32 ONNX is held to float round-off (`max_abs`,
`max_rel`, `min_psnr`), FP16 graphs (ONNX fp16, Core ML) to `fp16_*`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from snapgen_model.evaluation.image_metrics import psnr_total
from snapgen_model.export.config import ExportConfig


@dataclasses.dataclass(frozen=True)
class ParityMetrics:
    max_abs: float
    rel: float
    psnr: float

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "rel": self.rel, "psnr": self.psnr}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_abs: float
    max_rel: float
    min_psnr: float
    precision: str  # "fp32" or "fp16"

    def to_dict(self) -> dict[str, float | str]:
        return dataclasses.asdict(self)


def thresholds(cfg: ExportConfig, precision: str) -> Thresholds:
    """The configured thresholds for `precision` ("fp32" or "fp16")."""
    if precision == "fp16":
        return Thresholds(cfg.fp16_max_abs, cfg.fp16_max_rel, cfg.fp16_min_psnr, "fp16")
    return Thresholds(cfg.max_abs, cfg.max_rel, cfg.min_psnr, "fp32")


def _numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)


def psnr(actual: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, peak: float | None = None) -> float:
    """PSNR in dB; `peak` defaults to max |reference| (torch2coreml's definition): the project's one
    implementation, `evaluation.image_metrics.psnr_total`."""
    return psnr_total(actual, reference, peak)


def compare(actual: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> ParityMetrics:
    """Metrics of one output against its reference (shapes must match)."""
    a, r = _numpy(actual), _numpy(reference)
    if a.shape != r.shape:
        raise ValueError(f"parity: output shape {a.shape} does not match the reference {r.shape}")
    if not np.isfinite(a).all():
        return ParityMetrics(max_abs=math.inf, rel=math.inf, psnr=-math.inf)
    diff = a - r
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    rel = float(np.linalg.norm(diff) / max(float(np.linalg.norm(r)), 1e-12))
    return ParityMetrics(max_abs=max_abs, rel=rel, psnr=psnr(a, r))


def compare_all(actual: Sequence, reference: Sequence) -> ParityMetrics:
    """Worst metrics over several outputs (largest errors, lowest PSNR)."""
    if len(actual) != len(reference):
        raise ValueError(f"parity: {len(actual)} outputs, {len(reference)} references")
    rows = [compare(a, r) for a, r in zip(actual, reference)]
    return ParityMetrics(max_abs=max(m.max_abs for m in rows), rel=max(m.rel for m in rows),
                         psnr=min(m.psnr for m in rows))


@dataclasses.dataclass(frozen=True)
class ParityFailure:
    part: str  # e.g. "unet"
    variant: str  # e.g. "onnx static", "coreml torch-swap", "generation"
    metric: str  # "max_abs", "rel" or "psnr"
    value: float
    threshold: float

    def message(self) -> str:
        op = "<" if self.metric.endswith("psnr") else ">"
        unit = " dB" if self.metric.endswith("psnr") else ""
        return (f"{self.part} ({self.variant}): {self.metric} {self.value:.4g}{unit} {op} threshold "
                f"{self.threshold:.4g}{unit}")


class ParityError(RuntimeError):
    """An exported part disagrees with PyTorch beyond the configured thresholds: export blocked."""

    def __init__(self, failures: Sequence[ParityFailure], report: dict | None = None) -> None:
        self.failures = list(failures)
        self.report = report
        lines = "; ".join(f.message() for f in self.failures)
        parts = sorted({f.part for f in self.failures})
        super().__init__(f"export blocked: parity gate failed for {', '.join(parts)}: {lines} "
                         "(nothing was written as a successful export)")

    def __reduce__(self):  # picklable (Prefect may serialise a failed task's exception)
        return (type(self), (self.failures, self.report))


def gate(part: str, variant: str, metrics: ParityMetrics, limits: Thresholds) -> list[ParityFailure]:
    """The failed checks of one comparison (empty when it passes)."""
    failures = []
    if not metrics.max_abs <= limits.max_abs:
        failures.append(ParityFailure(part, variant, "max_abs", metrics.max_abs, limits.max_abs))
    if not metrics.rel <= limits.max_rel:
        failures.append(ParityFailure(part, variant, "rel", metrics.rel, limits.max_rel))
    if not metrics.psnr >= limits.min_psnr:
        failures.append(ParityFailure(part, variant, "psnr", metrics.psnr, limits.min_psnr))
    return failures


def parity_record(part: str, variant: str, metrics: ParityMetrics,
                  limits: Thresholds) -> tuple[dict, list[ParityFailure]]:
    """The report entry of one comparison (metrics, thresholds, pass/fail, messages) and its failures."""
    failures = gate(part, variant, metrics, limits)
    record = {**metrics.to_dict(), "thresholds": limits.to_dict(), "passed": not failures,
              "failures": [f.message() for f in failures]}
    return record, failures
