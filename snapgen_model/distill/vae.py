"""The teacher's autoencoder (SNAPGEN_SPEC.md section 2): diffusers `AutoencoderKL`.

SD3's latent normalisation lives here and only here: z = (mean_or_sample - shift) * scale on
encode, and the inverse on decode. The student, the teacher and the tiny decoder all work in the
normalised space.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from snapgen_model.config_base import ConfigBase, check, check_choice
from snapgen_model.distill.teacher import DTYPES, load_pretrained


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig(ConfigBase):
    """Which autoencoder and how latents are drawn."""

    path: str = "stabilityai/stable-diffusion-3.5-large"  # hub id or local folder
    subfolder: str = "vae"  # "" when the folder is the VAE itself
    encode_mode: Literal["mean", "sample"] = "mean"  # latent distribution mean, or a seeded sample
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # GPU dtype (CPU always float32)

    def __post_init__(self) -> None:
        check(bool(self.path), "vae.path", "needs a hub id or a local path")
        check_choice(self.encode_mode, "vae.encode_mode", ("mean", "sample"))
        check_choice(self.dtype, "vae.dtype", tuple(DTYPES))


class VAEAdapter(nn.Module):
    """Frozen AutoencoderKL with the scaling and shift factors from its own config."""

    def __init__(self, vae: nn.Module, encode_mode: str = "mean") -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.encode_mode = encode_mode
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, cfg: VAEConfig, device: str | torch.device = "cpu") -> "VAEAdapter":
        from diffusers import AutoencoderKL

        dtype = DTYPES[cfg.dtype] if torch.device(device).type == "cuda" else torch.float32
        vae = load_pretrained(AutoencoderKL, cfg.path, subfolder=cfg.subfolder, torch_dtype=dtype)
        return cls(vae.to(device), cfg.encode_mode)

    def train(self, mode: bool = True) -> "VAEAdapter":
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f)."""
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(dtype)).latent_dist
        z = dist.mean if self.encode_mode == "mean" else dist.sample(generator)
        return ((z.float() - self.shift_factor) * self.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents -> images (B, 3, H, W) in about [-1, 1]."""
        dtype = next(self.vae.parameters()).dtype
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(dtype)).sample.float()
