"""Tiny decoder size/shape, flow-matching maths and the samplers."""
from __future__ import annotations

import math

import torch

from snapgen_model.configs import FlowMatchingConfig, SamplerConfig, TinyDecoderConfig
from snapgen_model.diffusion.flow import (
    FlowMatchingLoss,
    interpolate,
    logit_normal_density,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
    x0_from_velocity,
)
from snapgen_model.diffusion.generate import seeded_noise
from snapgen_model.diffusion.samplers import guided_velocity, make_timesteps, sample, sample_euler, sample_few_step
from snapgen_model.inspect import count_params
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.presets import get_preset


def test_tiny_decoder_size_and_shape():
    with torch.device("meta"):
        dec = TinyDecoder(TinyDecoderConfig())
        n = count_params(dec)
        y = dec(torch.randn(1, 16, 16, 16))
    assert abs(n / 1.38e6 - 1) < 0.2, n
    assert y.shape == (1, 3, 128, 128)
    assert not any("attn" in name for name, _ in dec.named_modules())


def test_toy_decoder_upsamples_by_four():
    cfg = get_preset("toy")
    dec = TinyDecoder(cfg.decoder)
    assert dec(torch.randn(2, 16, 16, 16)).shape == (2, 3, 64, 64)


def test_interpolation_and_target():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = interpolate(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.5 * (x0[1] + eps[1]))
    v = velocity_target(x0, eps)
    assert torch.allclose(x0_from_velocity(xt, v, t), x0, atol=1e-6)


def test_logit_normal_timesteps_match_the_distribution():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, FlowMatchingConfig(), g)
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01
    # the density integrates to one
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001)
    assert abs(torch.trapezoid(logit_normal_density(grid), grid).item() - 1) < 1e-3


def test_shift_moves_mass_to_noise():
    t = torch.linspace(0.01, 0.99, 50)
    shifted = shift_timesteps(t, 3.0)
    assert torch.all(shifted >= t) and torch.allclose(shift_timesteps(t, 1.0), t)
    assert math.isclose(shift_timesteps(torch.tensor(0.5), 3.0).item(), 0.75, rel_tol=1e-6)


def _point_mass_model(target: torch.Tensor):
    """Exact velocity field of a point-mass data distribution at `target`: v = (x_t - target) / t."""
    def fn(x, t, **_):
        return (x - target) / t.view(-1, 1).clamp_min(1e-8)
    return fn


def test_euler_and_few_step_recover_a_point_mass():
    target = torch.tensor([[2.0, -1.0, 0.5]])
    x = torch.randn(1, 3)
    for sampler in (sample_euler, sample_few_step):
        out = sampler(_point_mass_model(target), x.clone(), make_timesteps(4), cond={},
                      generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, target, atol=1e-5), sampler.__name__


def test_cfg_combines_branches():
    def model(x, t, flag):
        return flag.view(-1, 1).float().expand_as(x)
    x = torch.zeros(2, 3)
    v = guided_velocity(model, x, 0.5, {"flag": torch.ones(2)}, {"flag": torch.zeros(2)}, guidance=3.0)
    assert torch.allclose(v, torch.full_like(x, 3.0))  # 0 + 3 * (1 - 0)


def test_sample_uses_configured_steps():
    calls = []
    def model(x, t, **_):
        calls.append(float(t[0]))
        return torch.zeros_like(x)
    sample(model, torch.zeros(1, 2), SamplerConfig(steps=5, guidance=1.0), cond={})
    assert len(calls) == 5 and calls[0] == 1.0


def test_flow_matching_loss_is_zero_for_the_exact_velocity():
    x0 = torch.randn(4, 3)
    eps = torch.randn(4, 3)
    t = torch.rand(4)
    def perfect(xt, tt):
        return eps - x0
    loss = FlowMatchingLoss(FlowMatchingConfig())(perfect, x0, {}, noise=eps, t=t)
    assert loss.shape == (4,) and torch.allclose(loss, torch.zeros(4))


def test_seeded_noise_is_independent_of_batching():
    a = seeded_noise([5, 6, 7], (2, 2))
    b = seeded_noise([7], (2, 2))
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
