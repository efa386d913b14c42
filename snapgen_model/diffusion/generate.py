"""Image generation: seeded noise per sample, a sampler, the tiny decoder, uint8 images.

Each sample's noise comes from its own seed, so an image does not depend on batch size or on how
many workers share the prompts (the evaluation stage relies on this).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from snapgen_model.configs import SnapGenConfig
from snapgen_model.diffusion.samplers import sample


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, row i drawn from a generator seeded with seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def latents_to_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(unet: nn.Module, decoder: nn.Module, cfg: SnapGenConfig, seeds: Sequence[int], *, cond: dict,
             uncond: dict | None = None, steps: int | None = None) -> np.ndarray:
    """Sample latents with the preset's sampler settings and decode them: (B, H, W, 3) uint8."""
    side = cfg.latent_size
    device = next(unet.parameters()).device
    noise = seeded_noise(seeds, (cfg.latent.channels, side, side), device)
    sampler_gen = torch.Generator(device=device).manual_seed(int(seeds[0]) if len(seeds) else 0)
    latents = sample(unet, noise, cfg.sampler, cond=cond, uncond=uncond, generator=sampler_gen, steps=steps)
    return latents_to_images(decoder(latents))


def null_condition(cfg: SnapGenConfig, batch: int, tokens: int = 8,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The all-zero condition (SD3-style zero null embedding; null label for class-conditional)."""
    u = cfg.unet
    if u.conditioning == "class":
        return {"labels": torch.full((batch,), u.num_classes, dtype=torch.long, device=device)}
    return {"context": torch.zeros(batch, tokens, u.context_dim, device=device),
            "pooled": torch.zeros(batch, u.pooled_dim, device=device)}
