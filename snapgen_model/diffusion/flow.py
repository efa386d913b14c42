"""Rectified flow / flow matching (SNAPGEN_SPEC.md section 4).

x_t = (1 - t) x0 + t eps,  target v = eps - x0,  loss = ||v_theta(x_t, t, c) - v||^2,
t ~ logit-normal(mean, std), optionally shifted: t' = s t / (1 + (s - 1) t) (SD3's resolution shift).
t = 0 is data, t = 1 is noise.
"""
from __future__ import annotations

import math

import torch

from snapgen_model.configs import FlowMatchingConfig


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t (B,) broadcast over the remaining dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return noise - x0


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift: t' = s t / (1 + (s - 1) t); identity for s = 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(batch: int, cfg: FlowMatchingConfig, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ logit-normal(mean, std) (SnapGen: (0, 1)), then the configured shift. Shape (B,)."""
    u = torch.randn(batch, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
    return shift_timesteps(torch.sigmoid(u), cfg.shift)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution at t in (0, 1)."""
    t = t.clamp(1e-6, 1 - 1e-6)
    logit = torch.log(t) - torch.log1p(-t)
    norm = std * math.sqrt(2 * math.pi) * t * (1 - t)
    return torch.exp(-0.5 * ((logit - mean) / std) ** 2) / norm


def timestep_density(t: torch.Tensor, cfg: FlowMatchingConfig) -> torch.Tensor:
    """Density at t of the timesteps `sample_timesteps` draws: the logit-normal, pushed through the shift
    t' = s u / (1 + (s - 1) u), so p(t') = p_ln(u) du/dt' with u = t' / (s - (s - 1) t')."""
    if cfg.shift == 1.0:
        return logit_normal_density(t, cfg.logit_mean, cfg.logit_std)
    s = cfg.shift
    t = t.clamp(1e-6, 1 - 1e-6)
    denominator = s - (s - 1.0) * t
    return logit_normal_density(t / denominator, cfg.logit_mean, cfg.logit_std) * s / denominator ** 2


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v (exact for the linear path)."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps = x_t + (1 - t) v."""
    return x_t + (1.0 - t.view(-1, *([1] * (x_t.dim() - 1)))) * v


class FlowMatchingLoss:
    """Task loss L_task (SPEC 5): per-sample MSE between predicted and target velocity."""

    def __init__(self, cfg: FlowMatchingConfig) -> None:
        self.cfg = cfg

    def __call__(self, model, x0: torch.Tensor, cond: dict, *, noise: torch.Tensor | None = None,
                 t: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns the per-sample loss (B,); the caller reduces (the KD scaling needs it per t)."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if t is None:
            t = sample_timesteps(x0.shape[0], self.cfg, generator, x0.device)
        v = model(interpolate(x0, noise, t), t, **cond)
        return (v.float() - velocity_target(x0, noise).float()).pow(2).flatten(1).mean(1)
