"""Teacher-feature discriminator for adversarial step distillation (SNAPGEN_SPEC.md section 6).

LADD-style (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial
Diffusion Distillation"): the discriminator is the frozen teacher DiT run on a re-noised latent
x_t = (1 - t) x0 + t eps, whose image tokens at several blocks feed small trainable heads, one
per block, conditioned on the pooled text vector. Gradients flow through the teacher into the
(generated) latent, never into the teacher's weights (they have requires_grad False and are not
in any optimiser). Head design, loss and re-noising distribution are unpublished for SnapGen [U].

Losses are small callables over logits (STYLE.md 6):

    hinge:          L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))],   L_G = -E[D(fake)]
    non-saturating: L_D = E[softplus(-D(real))] + E[softplus(D(fake))],  L_G = E[softplus(-D(fake))]
    R1:             E_real[ ||grad_x sum D(x)||^2 ]  (the caller applies weight / 2)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from snapgen_model.config_base import ConfigBase, check, check_choice
from snapgen_model.diffusion.flow import interpolate, shift_timesteps


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig(ConfigBase):
    """The teacher-feature discriminator: which teacher blocks, head size, loss, re-noising."""

    feature_layers: tuple[int, ...] = (-1,)  # teacher blocks whose image tokens feed a head (several allowed; -1 = last) [U]
    head_width: int = 64  # channels of each head's conv layers [U]
    loss: Literal["hinge", "non_saturating"] = "hinge"  # adversarial loss pair [U]
    r1_weight: float = 0.0  # R1 penalty weight on re-noised real latents (0 = off) [U]
    renoise: Literal["logit_normal", "uniform"] = "logit_normal"  # distribution of the re-noising t [U]
    renoise_mean: float = 0.0  # logit-normal mean (LADD shifts toward high noise at high resolution)
    renoise_std: float = 1.0  # logit-normal std
    renoise_shift: float = 1.0  # SD3-style shift applied to the drawn t (1 = none)
    renoise_max: float = 0.999  # t is clamped to [1e-3, renoise_max] so some signal always remains

    def __post_init__(self) -> None:
        check(len(self.feature_layers) >= 1, "discriminator.feature_layers", "needs at least one teacher block")
        check(self.head_width >= 1, "discriminator.head_width", "must be >= 1")
        check_choice(self.loss, "discriminator.loss", ("hinge", "non_saturating"))
        check(self.r1_weight >= 0, "discriminator.r1_weight", "must be >= 0")
        check_choice(self.renoise, "discriminator.renoise", ("logit_normal", "uniform"))
        check(self.renoise_std > 0, "discriminator.renoise_std", "must be > 0")
        check(self.renoise_shift > 0, "discriminator.renoise_shift", "must be > 0")
        check(1e-3 < self.renoise_max <= 1.0, "discriminator.renoise_max", "must be in (1e-3, 1]")


def sample_renoise_t(batch: int, cfg: DiscriminatorConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Re-noising timesteps (B,) for the discriminator input."""
    if cfg.renoise == "uniform":
        t = torch.rand(batch, generator=generator)
    else:
        t = torch.sigmoid(torch.randn(batch, generator=generator) * cfg.renoise_std + cfg.renoise_mean)
    return shift_timesteps(t, cfg.renoise_shift).clamp(1e-3, cfg.renoise_max)


class FeatureHead(nn.Module):
    """One head: token grid (B, N, D) -> conv stack -> per-position logits with projection
    conditioning on the pooled text vector (Miyato & Koyama 2018): logit = w.h + <h, E c>."""

    def __init__(self, feature_dim: int, pooled_dim: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(feature_dim, width, 3, padding=1), nn.GroupNorm(math.gcd(8, width), width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.out = nn.Conv2d(width, 1, 1)
        self.embed = nn.Linear(pooled_dim, width)

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"discriminator head: {n} teacher tokens are not a square grid")
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)  # (B, D, s, s)
        h = self.body(grid)  # (B, W, s, s)
        proj = (h * self.embed(pooled)[:, :, None, None]).sum(1, keepdim=True)  # (B, 1, s, s)
        return (self.out(h) + proj / math.sqrt(h.shape[1])).flatten(1)  # (B, s*s)


class DiscriminatorHeads(nn.Module):
    """The trainable part of the discriminator: one `FeatureHead` per captured teacher block."""

    def __init__(self, names: list[str], feature_dim: int, pooled_dim: int, width: int) -> None:
        super().__init__()
        self.names = list(names)
        self.heads = nn.ModuleDict({n: FeatureHead(feature_dim, pooled_dim, width) for n in self.names})

    def forward(self, features: dict[str, torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
        """Logits of every head's positions, concatenated: (B, sum_l N_l)."""
        return torch.cat([self.heads[n](features[n], pooled) for n in self.names], dim=1)


class TeacherFeatureDiscriminator(nn.Module):
    """Frozen teacher + trainable heads. `forward(x0, t, noise, context, pooled)` re-noises the
    clean latent x0 to x_t and returns head logits (B, M); gradients reach x0, not the teacher."""

    def __init__(self, teacher: nn.Module, cfg: DiscriminatorConfig, pooled_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.heads = DiscriminatorHeads(teacher.feature_names, teacher.feature_dim, pooled_dim, cfg.head_width)

    def features(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        x_t = interpolate(x0, noise, t)  # (B, C, H, W)
        return self.teacher(x_t, t, context, pooled).features  # name -> (B, N, D)

    def forward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x0, t, noise, context, pooled), pooled)  # (B, M)


class HingeDLoss:
    """L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""

    def __call__(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


class HingeGLoss:
    """L_G = -E[D(fake)]."""

    def __call__(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean()


class NonSaturatingDLoss:
    """L_D = E[softplus(-D(real))] + E[softplus(D(fake))] (= BCE with real 1, fake 0)."""

    def __call__(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-real).mean() + F.softplus(fake).mean()


class NonSaturatingGLoss:
    """L_G = E[softplus(-D(fake))] (= -log sigmoid D(fake))."""

    def __call__(self, fake: torch.Tensor) -> torch.Tensor:
        return F.softplus(-fake).mean()


ADV_LOSSES = {"hinge": (HingeDLoss, HingeGLoss), "non_saturating": (NonSaturatingDLoss, NonSaturatingGLoss)}


def adversarial_losses(kind: str) -> tuple:
    """(D loss, G loss) callables for `discriminator.loss`."""
    d, g = ADV_LOSSES[kind]
    return d(), g()


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """E_batch ||d sum(logits) / d inputs||^2 (Mescheder et al. 2018); differentiable (create_graph)."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def discriminator_accuracy(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractions of samples classified correctly (mean logit > 0 for real, < 0 for fake)."""
    return (real.mean(1) > 0).float().mean(), (fake.mean(1) < 0).float().mean()
