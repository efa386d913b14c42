"""Image generation: seeded noise per sample, a sampler, the tiny decoder, uint8 images.

Each sample's randomness comes from its own seed: a CPU generator per sample draws the sample's
initial noise and then, in the few-step sampler, its re-noising noise at every step. An image thus
depends only on (its condition, its seed), not on batch size or on how many workers share the
prompts (the evaluation stage relies on this).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from snapgen_model.configs import SnapGenConfig
from snapgen_model.diffusion.samplers import sample


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with its seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...],
               device: str | torch.device = "cpu") -> torch.Tensor:
    """(len(generators), *shape) standard normal noise, row i drawn from generators[i] (advancing it)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, row i drawn from a generator seeded with seeds[i]."""
    return draw_noise(seeded_generators(seeds), shape, device)


def seeded_start(seeds: Sequence[int], shape: tuple[int, ...],
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[torch.Generator]]:
    """(initial noise, per-sample generators to sample with): row i's noise is `seeded_noise`'s, and
    generator i continues the stream it was drawn from (the few-step sampler's re-noising)."""
    generators = seeded_generators(seeds)
    return draw_noise(generators, shape, device), generators


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
    noise, generators = seeded_start(seeds, (cfg.latent.channels, side, side), device)
    latents = sample(unet, noise, cfg.sampler, cond=cond, uncond=uncond, generator=generators, steps=steps)
    return latents_to_images(decoder(latents))


def null_condition(cfg: SnapGenConfig, batch: int, tokens: int = 8,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The all-zero condition (null label for class-conditional). Not the null a text student was
    trained with (that is `conditioner_null`); only for a UNet that comes without its conditioner."""
    u = cfg.unet
    if u.conditioning == "class":
        return {"labels": torch.full((batch,), u.num_classes, dtype=torch.long, device=device)}
    return {"context": torch.zeros(batch, tokens, u.context_dim, device=device),
            "pooled": torch.zeros(batch, u.pooled_dim, device=device)}


def conditioner_null(conditioner: nn.Module, batch: int, tokens: int | Mapping[str, int] = 8) -> dict[str, torch.Tensor]:
    """The null condition a text student was trained with: every encoder of its `TextConditioner`
    dropped (its zero or learned null embedding in place of the encoder's output, then the trained
    projections), exactly as training's condition dropout and `TextConditioner.null_condition`.
    `tokens`: tokens per encoder (one count for all, or name -> count); the null tokens of an encoder
    are all equal, so the count only matters for the shape (and between encoders)."""
    from snapgen_model.distill.text import Encoded

    device = next(conditioner.parameters()).device
    counts = {n: tokens[n] if isinstance(tokens, Mapping) else int(tokens) for n in conditioner.names}
    encoded = {n: Encoded(tokens=torch.zeros(batch, counts[n], conditioner.proj[n].in_features, device=device),
                          pooled=(torch.zeros(batch, conditioner.null_pooled[n].numel(), device=device)
                                  if n in conditioner.null_pooled else None),
                          mask=torch.ones(batch, counts[n], device=device)) for n in conditioner.names}
    return conditioner.null_condition(encoded)


def split_tokens(total: int, names: Sequence[str]) -> dict[str, int]:
    """`total` context tokens shared out over encoders in order (the first ones get the remainder)."""
    base, extra = divmod(int(total), len(names))
    if base < 1:
        raise ValueError(f"{total} context tokens cannot hold {len(names)} encoders")
    return {n: base + (i < extra) for i, n in enumerate(names)}
