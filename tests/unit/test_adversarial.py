"""Teacher-feature discriminator: feature shapes, gradient routing, loss values, which parameters move."""
from __future__ import annotations

import math

import pytest
import torch

from snapgen_model.distill.adversarial import (
    DiscriminatorConfig,
    HingeDLoss,
    HingeGLoss,
    NonSaturatingDLoss,
    NonSaturatingGLoss,
    TeacherFeatureDiscriminator,
    discriminator_accuracy,
    r1_penalty,
    sample_renoise_t,
)
from snapgen_model.config_base import ConfigError
from tests.fixtures.memory_data import tiny_teacher


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 16, 8, 8, generator=g), torch.rand(b, generator=g), torch.randn(b, 16, 8, 8, generator=g),
            torch.randn(b, 6, 32, generator=g), torch.randn(b, 32, generator=g))


def test_heads_see_teacher_features_and_gradients_skip_the_teacher():
    disc = TeacherFeatureDiscriminator(tiny_teacher(), DiscriminatorConfig(feature_layers=(0, -1), head_width=8), 32)
    x0, t, noise, ctx, pooled = inputs()
    feats = disc.features(x0, t, noise, ctx, pooled)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"block0": (2, 16, 32), "block1": (2, 16, 32)}
    x0.requires_grad_(True)
    logits = disc(x0, t, noise, ctx, pooled)
    assert logits.shape == (2, 32)  # 16 positions per head, two heads
    logits.sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in disc.teacher.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())


def test_losses_against_hand_computations():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.5], [1.0, -0.5]])
    # hinge: mean relu(1 - real) = (0 + .5 + 2 + 1) / 4; mean relu(1 + fake) = (0 + 1.5 + 2 + .5) / 4
    assert HingeDLoss()(real, fake).item() == pytest.approx(0.875 + 1.0)
    assert HingeGLoss()(fake).item() == pytest.approx(0.25)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    ns_d = sum(sp(-r) for r in real.flatten().tolist()) / 4 + sum(sp(f) for f in fake.flatten().tolist()) / 4
    assert NonSaturatingDLoss()(real, fake).item() == pytest.approx(ns_d, rel=1e-6)
    assert NonSaturatingGLoss()(fake).item() == pytest.approx(sum(sp(-f) for f in fake.flatten().tolist()) / 4, rel=1e-6)
    acc_real, acc_fake = discriminator_accuracy(real, fake)  # mean logits: real (1.25, -0.5), fake (-0.75, 0.25)
    assert acc_real.item() == 0.5 and acc_fake.item() == 0.5


def test_r1_penalty_against_hand_computation():
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], requires_grad=True)
    w = torch.tensor([0.5, -1.0, 2.0])
    assert r1_penalty(x @ w, x).item() == pytest.approx(0.25 + 1 + 4)  # grad = w for every sample
    logits = (x ** 2).sum(1, keepdim=True)  # grad = 2x: mean over samples of sum 4 x^2
    penalty = r1_penalty(logits, x)
    assert penalty.item() == pytest.approx((4 * (1 + 4 + 0.25) + 4 * (9 + 0 + 1)) / 2)
    penalty.backward()  # differentiable (create_graph): d/dx mean_b sum 4x^2 = 4x
    assert torch.allclose(x.grad, 4 * x.detach())


def test_renoise_t_and_config_validation():
    t = sample_renoise_t(1000, DiscriminatorConfig(renoise_shift=3.0), torch.Generator().manual_seed(0))
    assert 1e-3 <= t.min() and t.max() <= 0.999 and t.mean() > 0.6  # the shift pushes t toward noise
    assert DiscriminatorConfig.from_dict({"feature_layers": [0, 1], "loss": "non_saturating"}).feature_layers == (0, 1)
    with pytest.raises(ConfigError, match="discriminator.loss"):
        DiscriminatorConfig(loss="wasserstein")


def test_one_manual_step_updates_exactly_the_intended_parameters():
    from tests.unit.test_distill_steps import make_module, synthetic_data

    module = make_module(synthetic_data(n=4), steps=1)
    opt_g, opt_d = module.configure_optimizers()
    groups = {"student": module.student, "conditioner": module.conditioner, "heads": module.discriminator.heads,
              "teacher": module.discriminator.teacher, "ema": module.ema_models}
    snap = lambda: {n: [p.detach().clone() for p in m.parameters()] for n, m in groups.items()}  # noqa: E731
    changed = lambda a, b: {n for n in a if any(not torch.equal(x, y) for x, y in zip(a[n], b[n]))}  # noqa: E731
    idx = torch.arange(4)
    latent, encoded = module.data.latent[idx], module._encoded(idx)
    from snapgen_model.distill.text import sd3_teacher_condition
    tcond = sd3_teacher_condition(encoded, ["clip"], 32)
    before = snap()
    d_loss, logs = module.discriminator_loss(latent, encoded, tcond, torch.Generator().manual_seed(0))
    d_loss.backward()
    assert all(p.grad is None for n in ("student", "conditioner", "teacher") for p in groups[n].parameters())
    opt_d.step()
    after_d = snap()
    assert changed(before, after_d) == {"heads"}
    opt_d.zero_grad(set_to_none=True)
    g_loss, g_logs = module.generator_loss(idx, latent, encoded, tcond, torch.Generator().manual_seed(1))
    assert {"loss/g_adv", "loss/kd"} <= set(g_logs) and torch.isfinite(g_loss)
    g_loss.backward()
    assert all(p.grad is None for p in groups["teacher"].parameters())
    opt_g.step()
    assert changed(after_d, snap()) == {"student", "conditioner"}
