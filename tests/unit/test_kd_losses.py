"""KD loss terms against hand computations; S's per-timestep ratio and stop-gradient."""
from __future__ import annotations

import math

import pytest
import torch

from snapgen_model.distill.losses import (
    DistillationObjective,
    FeatureKDLoss,
    FeatureProjector,
    KDConfig,
    OutputKDLoss,
    TaskLoss,
    TimestepAwareScaling,
)


def test_task_and_output_kd_by_hand():
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    assert torch.allclose(TaskLoss()(v, target), torch.tensor([2.5, 5.0]))
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    out = OutputKDLoss()(v, teacher)
    assert torch.allclose(out, torch.tensor([2.0, 0.5]))
    assert not out.requires_grad  # teacher detached, student constant here


def test_feature_projector_and_loss():
    proj = FeatureProjector(4, 6)
    feat = torch.randn(2, 4, 8, 8)
    tokens = proj(feat, 16)  # teacher grid 4x4
    assert tokens.shape == (2, 16, 6)
    teacher = torch.randn(2, 16, 6)
    loss = FeatureKDLoss()(tokens, teacher)
    assert torch.allclose(loss, ((tokens - teacher) ** 2).mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="not a square grid"):
        proj(feat, 15)


def test_scaling_ratio_per_timestep_and_alpha():
    s = TimestepAwareScaling(KDConfig(alpha="constant", alpha_constant=0.25))
    task = torch.tensor([2.0, 0.5])
    kd = torch.tensor([8.0, 0.1])
    t = torch.tensor([0.2, 0.8])
    loss, diag = s(task, kd, t)
    # per sample: 0.25 * task + 0.75 * (task / kd) * kd = task -> mean 1.25
    assert math.isclose(float(loss), 1.25, rel_tol=1e-6)
    assert torch.allclose(diag["ratio_mean"], torch.tensor((0.25 + 5.0) / 2))


def test_scaling_stops_gradient_through_ratio():
    s = TimestepAwareScaling(KDConfig(alpha="constant", alpha_constant=0.0))
    task = torch.tensor([2.0], requires_grad=True)
    kd = torch.tensor([4.0], requires_grad=True)
    loss, _ = s(task, kd, torch.tensor([0.5]))
    loss.backward()
    # loss = sg(task/kd) * kd: d/dkd = task/kd = 0.5, d/dtask = 0 (ratio is detached)
    assert task.grad is None or float(task.grad) == 0.0
    assert math.isclose(float(kd.grad), 0.5)


def test_density_alpha_peaks_mid_range():
    s = TimestepAwareScaling(KDConfig())
    a = s.alpha(torch.tensor([0.02, 0.5, 0.98]))
    assert a[1] > 0.99 and a[0] < 0.2 and a[2] < 0.2


def test_alpha_follows_the_runs_timestep_density_with_its_shift():
    """a_t is the density of the timesteps training draws (logit-normal, then the flow's shift), over its peak:
    the density integrates to 1 and matches a histogram of `sample_timesteps`; with SD3's shift 3 (the
    full-size preset) the peak moves from t = 0.5 to about 0.85, where the task loss then samples most."""
    from snapgen_model.configs import FlowMatchingConfig
    from snapgen_model.diffusion.flow import sample_timesteps, timestep_density

    shifted = FlowMatchingConfig(shift=3.0)
    grid = torch.linspace(0.0005, 0.9995, 1000)
    assert math.isclose(float(timestep_density(grid, shifted).mean()), 1.0, abs_tol=0.01)
    draws = sample_timesteps(200_000, shifted, torch.Generator().manual_seed(0))
    hist = torch.histc(draws, bins=10, min=0.0, max=1.0) / len(draws) * 10  # density per bin
    per_bin = timestep_density(grid, shifted).view(10, 100).mean(1)  # the density averaged over each bin
    assert torch.allclose(hist, per_bin, atol=0.03)
    plain, sd3 = TimestepAwareScaling(KDConfig()), TimestepAwareScaling(KDConfig(), shifted)
    peak_plain, peak_sd3 = float(grid[plain.alpha(grid).argmax()]), float(grid[sd3.alpha(grid).argmax()])
    assert abs(peak_plain - 0.5) < 0.01 and 0.75 < peak_sd3 < 0.9
    assert float(sd3.alpha(grid).max()) > 0.999 and float(sd3.alpha(torch.tensor([0.5]))) < 0.5


def test_objective_modes_and_mask():
    terms = {"task": torch.tensor([1.0, 1.0]), "out": torch.tensor([3.0, 5.0]), "feat": torch.tensor([2.0, 2.0])}
    t = torch.tensor([0.5, 0.5])
    only, _ = DistillationObjective(KDConfig(combine="task_only"))(terms, t)
    assert float(only) == 1.0
    weighted, _ = DistillationObjective(KDConfig(combine="weighted", out_weight=0.5, feat_weight=1.0))(terms, t)
    assert math.isclose(float(weighted), 1.0 + 0.5 * 4.0 + 2.0)
    scaled, logs = DistillationObjective(KDConfig(alpha="constant", alpha_constant=0.5))(terms, t)
    assert math.isclose(float(scaled), 2.0)  # each S(.) equals the task loss when ratios match magnitudes
    masked, _ = DistillationObjective(KDConfig(alpha="constant", alpha_constant=0.5))(
        terms, t, mask=torch.tensor([True, False]))
    # sample 2 has no KD target: counts as task only in both S terms
    assert math.isclose(float(masked), 2 * (0.5 * (0.5 + 0.5) + 0.5 * 1.0))
    assert "scale/out_alpha_mean" in logs


def test_scaling_with_a_task_term_drawn_apart_from_the_kd_pair():
    """Cached KD pair at t, fresh task pair at t_task: a_t of the task term at t_task, (1 - a_t) of the KD
    term at t, and the magnitude ratio from the task loss on the KD pair's own x_t (task_at_kd)."""
    cfg = KDConfig()
    s = TimestepAwareScaling(cfg)
    task = torch.tensor([1.0, 3.0], requires_grad=True)  # on the fresh pair
    at_kd = torch.tensor([2.0, 0.5])  # on the KD pair (detached magnitudes)
    kd = torch.tensor([4.0, 1.0], requires_grad=True)
    t, t_task = torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.3])
    loss, diag = s(task, kd, t, t_task=t_task, task_at_kd=at_kd)
    a_task, a_kd = s.alpha(t_task), s.alpha(t)
    want = (a_task * task + (1 - a_kd) * (at_kd / kd) * kd).mean()
    assert torch.allclose(loss, want) and torch.allclose(diag["ratio_mean"], (at_kd / kd).mean())
    loss.backward()
    assert torch.allclose(task.grad, a_task / 2) and torch.allclose(kd.grad, (1 - a_kd) * at_kd / kd.detach() / 2)
    # the objective passes both through; without them it is the shared-pair formula
    obj = DistillationObjective(cfg)
    split, _ = obj({"task": task.detach(), "out": kd.detach()}, t, t_task=t_task, task_at_kd=at_kd)
    shared, _ = obj({"task": task.detach(), "out": kd.detach()}, t)
    assert torch.allclose(split, want.detach()) and not torch.allclose(split, shared)


def test_ratio_per_timestep_pools_the_samples_at_nearby_t_by_hand():
    """kd.ratio=timestep: r(t_i) = sum_j K_ij task_j / sum_j K_ij kd_j with a Gaussian kernel in t, so samples at
    one t share one ratio (the losses' conditional means at t); kd.ratio=sample divides each sample's own."""
    task, kd = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([1.0, 1.0, 4.0])
    t = torch.tensor([0.5, 0.5, 0.9])  # 0.4 apart = 8 bandwidths: exp(-32), nothing shared with the third
    pooled = TimestepAwareScaling(KDConfig(ratio="timestep", ratio_bandwidth=0.05))
    assert torch.allclose(pooled.ratio(task, kd, t), torch.tensor([2.0, 2.0, 0.5]))
    per_sample = TimestepAwareScaling(KDConfig(ratio="sample"))
    assert torch.allclose(per_sample.ratio(task, kd, t), torch.tensor([1.0, 3.0, 0.5]))
    # one bandwidth apart: weight exp(-1/2) on the neighbour
    w = math.exp(-0.5)
    near = pooled.ratio(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.55]))
    assert torch.allclose(near, torch.tensor([(1 + 3 * w) / (1 + w), (3 + w) / (1 + w)]))
    # a masked sample (no KD target) enters neither mean
    masked = pooled.ratio(task, kd, t, mask=torch.tensor([True, False, True]))
    assert torch.allclose(masked, torch.tensor([1.0, 1.0, 0.5]))
    # the loss: a * task + (1 - a) * r(t) * kd, r detached
    loss, diag = TimestepAwareScaling(KDConfig(alpha="constant", alpha_constant=0.5))(task, kd, t)
    assert math.isclose(float(loss), float((0.5 * task + 0.5 * torch.tensor([2.0, 2.0, 0.5]) * kd).mean()), rel_tol=1e-6)
    assert torch.allclose(diag["ratio_mean"], torch.tensor((2.0 + 2.0 + 0.5) / 3))


def test_ratio_settings_are_checked():
    from snapgen_model.config_base import ConfigError

    with pytest.raises(ConfigError, match="kd.ratio_bandwidth"):
        KDConfig(ratio_bandwidth=0.0)
    with pytest.raises(ConfigError, match="kd.ratio"):
        KDConfig(ratio="batch")
