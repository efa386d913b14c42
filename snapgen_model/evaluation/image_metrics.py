"""Pixel-level metrics, the project's one implementation: PSNR and SSIM (Wang et al. 2004, 11x11
Gaussian window, sigma 1.5).

PSNR = 10 log10(peak^2 / MSE) dB, in two reductions:

- `psnr`: per image of a (B, C, H, W) batch, `peak` = the data range (2 for images in [-1, 1]):
  the decoder's training and evaluation figures;
- `psnr_total`: one figure over whole arrays, `peak` = max |reference| by default (torch2coreml's
  definition, for graph outputs of any range): export parity (`export.parity`).

The MSE is floored at `MSE_FLOOR`, so identical inputs give a large finite figure, not inf.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MSE_FLOOR = 1e-20


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) tensors (default range [-1, 1])."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return 10 * torch.log10(data_range ** 2 / mse)


def psnr_total(actual: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
               peak: float | None = None) -> float:
    """PSNR in dB of two whole arrays (float64); `peak` defaults to max |reference| (0 for an empty or
    all-zero reference: then any error gives a very low figure)."""
    a = actual.detach().cpu().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    r = (reference.detach().cpu().double().numpy() if isinstance(reference, torch.Tensor)
         else np.asarray(reference, np.float64))
    mse = max(float(np.mean((a - r) ** 2)) if a.size else 0.0, MSE_FLOOR)
    top = float(np.abs(r).max()) if peak is None and r.size else float(peak or 0.0)
    return 10.0 * math.log10(max(top, 1e-12) ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 3) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())[:, None] @ (g / g.sum())[None, :]
    return g.expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image mean SSIM of (B, C, H, W) tensors (valid convolution, as in the reference code)."""
    c = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size, 1.5, c).to(a.device)
    a, b = a.float(), b.float()
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a ** 2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b ** 2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
