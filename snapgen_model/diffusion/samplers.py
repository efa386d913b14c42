"""Samplers behind one signature (STYLE.md 7, after k-diffusion):

    sampler(model_fn, x, timesteps, *, cond, uncond, guidance, generator, callback) -> x0

`model_fn(x_t, t, **cond) -> v` predicts the flow-matching velocity. `timesteps` runs from 1
(noise) down to 0 (data), with steps + 1 entries. Evaluation and export swap step counts and
samplers freely because all share this signature.

`generator` (the few-step sampler's re-noising) is one torch.Generator for the whole batch, or a
sequence of CPU generators, one per row: row i's fresh noise then comes from generator i alone, so
a sample does not depend on the batch it was drawn in (`generate.seeded_generators`).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, TypeAlias

import torch

from snapgen_model.configs import SamplerConfig
from snapgen_model.diffusion.flow import shift_timesteps, x0_from_velocity

ModelFn = Callable[..., torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
Generators: TypeAlias = torch.Generator | Sequence[torch.Generator]


class Sampler(Protocol):
    def __call__(self, model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, *, cond: dict,
                 uncond: dict | None = None, guidance: float = 1.0,
                 generator: Generators | None = None, callback: Callback | None = None) -> torch.Tensor: ...


def make_timesteps(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """steps + 1 times from 1 to 0, with the SD3 shift applied."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def randn_like_rows(x: torch.Tensor, generator: Generators | None) -> torch.Tensor:
    """Standard normal noise shaped like `x`: from one generator (on x's device), or row i from
    generators[i] (drawn on the CPU, then moved: device-independent up to float rounding)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} per-sample generators for a batch of {x.shape[0]}")
    rows = [torch.randn(tuple(x.shape[1:]), generator=g) for g in generator]
    return torch.stack(rows).to(x.device, x.dtype)


def guided_velocity(model_fn: ModelFn, x: torch.Tensor, t: float | torch.Tensor, cond: dict,
                    uncond: dict | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + w (v_c - v_u), both branches in one batched call."""
    tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
    if uncond is None or guidance == 1.0:
        return model_fn(x, tt, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    v_u, v_c = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), **both).chunk(2)
    return v_u + guidance * (v_c - v_u)


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, *, cond: dict,
                 uncond: dict | None = None, guidance: float = 1.0,
                 generator: Generators | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler ODE integration of dx/dt = v from t=1 to t=0 (SPEC 4: 28 steps for the base model)."""
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = guided_velocity(model_fn, x, t, cond, uncond, guidance)
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i, x, v)
    return x


@torch.no_grad()
def sample_few_step(model_fn: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, *, cond: dict,
                    uncond: dict | None = None, guidance: float = 1.0,
                    generator: Generators | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Few-step sampler for adversarially distilled students (SPEC 6, LADD-style): predict x0 at
    each step, then re-noise it to the next time with fresh seeded noise (per row with per-sample
    generators)."""
    for i in range(len(timesteps) - 1):
        t, t_next = timesteps[i], timesteps[i + 1]
        v = guided_velocity(model_fn, x, t, cond, uncond, guidance)
        x0 = x0_from_velocity(x, v, torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype))
        if float(t_next) > 0:
            x = (1.0 - t_next) * x0 + t_next * randn_like_rows(x, generator)
        else:
            x = x0
        if callback is not None:
            callback(i, x, v)
    return x


SAMPLERS: dict[str, Sampler] = {"euler": sample_euler, "few_step": sample_few_step}


def sample(model_fn: ModelFn, noise: torch.Tensor, cfg: SamplerConfig, *, cond: dict, uncond: dict | None = None,
           generator: Generators | None = None, callback: Callback | None = None,
           steps: int | None = None) -> torch.Tensor:
    """Sample with the settings a checkpoint carries (`steps` overrides the configured count)."""
    timesteps = make_timesteps(steps or cfg.steps, cfg.shift, noise.device)
    return SAMPLERS[cfg.kind](model_fn, noise, timesteps, cond=cond, uncond=uncond, guidance=cfg.guidance,
                              generator=generator, callback=callback)
