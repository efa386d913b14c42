"""Convolutional blocks of the SnapGen UNet and tiny decoder (SNAPGEN_SPEC.md sections 1-2).

One parameterised residual block covers the ablation chain: full 3x3 convs (SDXL) or "expanded
separable" convs (SnapGen: DW3x3 -> PW C->eC -> norm/act -> DW3x3 -> PW eC->C, e = 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def separable_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Depthwise 3x3 on c_in channels, then pointwise c_in -> c_out."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in),
        nn.Conv2d(c_in, c_out, 1),
    )


def conv3x3(c_in: int, c_out: int, separable: bool) -> nn.Module:
    return separable_conv(c_in, c_out) if separable else nn.Conv2d(c_in, c_out, 3, padding=1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with `groups` capped to a divisor of `channels`."""
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block with time conditioning (additive, or scale+shift on the inner width)."""

    def __init__(self, c_in: int, c_out: int, *, time_dim: int | None, separable: bool = True,
                 expansion: int = 2, norm_groups: int = 32, scale_shift: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = c_out * expansion if separable else c_out  # SnapGen "expanded" width [P]
        self.norm1 = group_norm(c_in, norm_groups)
        self.conv1 = conv3x3(c_in, inner, separable)
        self.scale_shift = scale_shift
        self.time_proj = None
        if time_dim is not None:
            self.time_proj = nn.Linear(time_dim, inner * (2 if scale_shift else 1))
        self.norm2 = group_norm(inner, norm_groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv3x3(inner, c_out, separable)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, inner, H, W)
        h = self.norm2(h)
        if self.time_proj is not None and temb is not None:
            t = self.time_proj(F.silu(temb))[:, :, None, None]  # (B, inner or 2*inner, 1, 1)
            if self.scale_shift:
                scale, shift = t.chunk(2, dim=1)
                h = h * (1 + scale) + shift
            else:
                h = h + t
        h = self.conv2(self.drop(F.silu(h)))  # (B, c_out, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 conv, 2x down (SDXL-style, spec section 1 [I])."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x up-sampling then a 3x3 conv (full, or separable in the tiny decoder)."""

    def __init__(self, c_in: int, c_out: int, separable: bool = False) -> None:
        super().__init__()
        self.conv = conv3x3(c_in, c_out, separable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
