"""SnapGen tiny decoder (SNAPGEN_SPEC.md section 2).

Decodes 16-channel latents of the teacher's VAE to RGB: about 1.38M parameters (36x smaller than
SD3's 49.5M decoder), no attention, expanded separable convolutions, nearest 2x up-sampling per
level. Input latents are in the *scaled* space the UNet works in; `latent_scaling` and
`latent_shift` undo the VAE's scaling before decoding so that the decoder and the VAE decoder see
the same inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snapgen_model.configs import TinyDecoderConfig
from snapgen_model.nn.blocks import ResBlock, Upsample, group_norm


class TinyDecoder(nn.Module):
    """latent (B, 16, h, w) -> image (B, 3, h*up, w*up) in [-1, 1] (unclamped)."""

    def __init__(self, cfg: TinyDecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks = [ResBlock(c, c, time_dim=None, separable=True, expansion=cfg.expansion, norm_groups=8)
                      for _ in range(cfg.blocks[i])]
            self.levels.append(nn.Sequential(*blocks))
            if i < len(ch) - 1:
                self.ups.append(Upsample(c, ch[i + 1], separable=True))
        self.norm_out = group_norm(ch[-1], 8)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C0, h, w)
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.ups):
                h = self.ups[i](h)  # (B, C_{i+1}, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)
