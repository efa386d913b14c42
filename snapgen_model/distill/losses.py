"""Multi-level knowledge-distillation losses (SNAPGEN_SPEC.md section 5), as small callable objects.

All terms return per-sample losses (B,), because the timestep-aware scaling works per timestep:

    S(L_task, L_kd) = E_t[ a_t L_task + (1 - a_t) sg(|L_task| / |L_kd|) L_kd ]

with sg the stop-gradient, so at every t the KD term is brought to the task loss's magnitude, and
a_t derived from the density of the timesteps training draws (the run's flow config: logit-normal,
then its shift; the exact formula is unpublished [U]; ours: a_t = p(t) / p_max, so the timesteps the
task loss samples most lean on it and rare ones lean on the teacher). Total: S(L_task, L_out) + S(L_task, L_feat).

"The ratio taken per timestep" has two readings. `kd.ratio=sample` (the default, what the toy
evidence of 2026-12-06 ran) divides each sample's own two losses: every sample's KD term is brought to
its own task loss, which makes the gradient of the KD part (1 - a) L_task_i grad(log L_kd_i), largest
where the student already matches the teacher. `kd.ratio=timestep` divides the two losses'
conditional means at t, estimated on the batch with a Gaussian kernel in t (width `kd.ratio_bandwidth`):

    r(t_i) = sg( sum_j K(t_i, t_j) L_task_j / sum_j K(t_i, t_j) L_kd_j )

On the toy world the two train alike (bench/RESULTS.md, "KD objective probe"): what separates the KD
variants there is the feature term, not the ratio.

With cached teacher targets the KD terms live on the K cached (t, noise) pairs while the task term
is drawn fresh every step (`t_task`); the magnitude |L_task| in the ratio is then the (detached)
task loss on the KD pair's own x_t (`task_at_kd`), so the ratio still compares losses at the same t.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from snapgen_model.config_base import ConfigBase, check, check_choice
from snapgen_model.configs import FlowMatchingConfig
from snapgen_model.diffusion.flow import timestep_density


@dataclasses.dataclass(frozen=True, kw_only=True)
class KDConfig(ConfigBase):
    """Which distillation terms and how they are combined."""

    output_kd: bool = True  # L_out: student velocity vs teacher velocity on the same x_t [P]
    feature_kd: bool = True  # L_feat: projected student features vs teacher final-layer tokens [P]
    student_feature: str = "up1"  # student feature map for L_feat (64x64 at 1024^2 for snapgen-1024) [U]
    teacher_feature: str = ""  # teacher feature name ("" = the last captured layer)
    combine: Literal["scaled", "weighted", "task_only"] = "scaled"  # S(.) of the paper, a plain sum, or no KD
    alpha: Literal["density", "constant"] = "density"  # a_t from the run's timestep density (flow config), or a constant
    alpha_constant: float = 0.5  # a_t when alpha = constant
    ratio: Literal["sample", "timestep"] = "sample"  # sg(|L_task|/|L_kd|): per sample, or per timestep (kernel in t)
    ratio_bandwidth: float = 0.05  # ratio=timestep: the Gaussian kernel's width in t
    out_weight: float = 1.0  # weighted mode: weight of L_out
    feat_weight: float = 1.0  # weighted mode: weight of L_feat
    eps: float = 1e-8  # guards the magnitude ratio

    def __post_init__(self) -> None:
        check_choice(self.combine, "kd.combine", ("scaled", "weighted", "task_only"))
        check_choice(self.alpha, "kd.alpha", ("density", "constant"))
        check_choice(self.ratio, "kd.ratio", ("sample", "timestep"))
        check(self.ratio_bandwidth > 0, "kd.ratio_bandwidth", f"must be > 0, got {self.ratio_bandwidth}")
        check(0.0 <= self.alpha_constant <= 1.0, "kd.alpha_constant", "must be in [0, 1]")
        check(self.out_weight >= 0 and self.feat_weight >= 0, "kd.out_weight", "weights must be >= 0")


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class TaskLoss:
    """L_task = ||v_student - (eps - x0)||^2 per sample."""

    def __call__(self, v_student: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
        return per_sample_mse(v_student, v_target)


class OutputKDLoss:
    """L_out = ||v_student - v_teacher||^2 per sample (teacher detached)."""

    def __call__(self, v_student: torch.Tensor, v_teacher: torch.Tensor) -> torch.Tensor:
        return per_sample_mse(v_student, v_teacher.detach())


class FeatureProjector(nn.Module):
    """Student feature map (B, C, h, w) -> teacher token grid (B, N, D): 1x1 conv, then area pooling
    to the teacher's grid when sizes differ (trainable, SPEC 5)."""

    def __init__(self, student_channels: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_dim, 1)

    def forward(self, feat: torch.Tensor, tokens: int) -> torch.Tensor:
        side = int(math.isqrt(tokens))
        if side * side != tokens:
            raise ValueError(f"feature KD: teacher token count {tokens} is not a square grid")
        h = self.proj(feat)  # (B, D, h, w)
        if h.shape[-1] != side:
            h = F.adaptive_avg_pool2d(h, side)
        return h.flatten(2).transpose(1, 2)  # (B, N, D)


class FeatureKDLoss:
    """L_feat = ||f_teacher - proj(f_student)||^2 per sample (teacher detached)."""

    def __call__(self, projected: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        return per_sample_mse(projected, teacher_tokens.detach())


class TimestepAwareScaling:
    """S(L_task, L_kd): per-timestep magnitude matching with stop-gradient (see module docstring).
    `flow`: the run's timestep distribution (the preset's `flow`), whose density gives a_t."""

    def __init__(self, cfg: KDConfig, flow: FlowMatchingConfig | None = None) -> None:
        self.cfg, self.flow = cfg, flow or FlowMatchingConfig()
        grid = torch.linspace(1e-3, 1 - 1e-3, 2001)
        self.peak = float(timestep_density(grid, self.flow).max())  # the density's mode, numerically on a grid

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.alpha == "constant":
            return torch.full_like(t, self.cfg.alpha_constant)
        return (timestep_density(t, self.flow) / self.peak).clamp(0, 1)

    def ratio(self, l_task: torch.Tensor, l_kd: torch.Tensor, t: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """sg(|L_task| / |L_kd|) at each sample's t (B,): per sample, or the ratio of the kernel-weighted
        means of the samples at nearby t (`mask`: only samples with a KD target enter the means)."""
        task, kd = l_task.detach().abs().float(), l_kd.detach().abs().float()
        if self.cfg.ratio == "sample":
            return task / (kd + self.cfg.eps)
        t = t.detach().float()
        w = torch.exp(-0.5 * ((t[:, None] - t[None, :]) / self.cfg.ratio_bandwidth) ** 2)  # (B, B) K(t_i, t_j)
        if mask is not None:
            w = w * mask.float()[None, :]
        return (w @ task) / (w @ kd + self.cfg.eps)

    def __call__(self, l_task: torch.Tensor, l_kd: torch.Tensor, t: torch.Tensor,
                 mask: torch.Tensor | None = None, *, t_task: torch.Tensor | None = None,
                 task_at_kd: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, diagnostics); `mask` (B,) excludes samples without a KD target (e.g. dropped condition).
        `t`: timesteps of the KD pair; `t_task`: those of the task term when it is drawn apart (default `t`);
        `task_at_kd`: the task loss on the KD pair's x_t, for the magnitude ratio (default `l_task`)."""
        a_kd = self.alpha(t.float())
        a = a_kd if t_task is None else self.alpha(t_task.float())
        ref = l_task if task_at_kd is None else task_at_kd
        ratio = self.ratio(ref, l_kd, t, mask).detach()  # sg(|L_task| / |L_kd|), stop-gradient here
        kd_part = (1 - a_kd) * ratio * l_kd
        if mask is not None:
            kd_part = torch.where(mask, kd_part, torch.zeros_like(kd_part))
            a = torch.where(mask, a, torch.ones_like(a))
        loss = (a * l_task + kd_part).mean()
        return loss, {"alpha_mean": a.mean().detach(), "ratio_mean": ratio.mean()}


class DistillationObjective:
    """Combines the named terms as configured: scaled (paper), weighted (ablation) or task only.
    `flow`: the run's timestep distribution (a_t of the scaling)."""

    def __init__(self, cfg: KDConfig, flow: FlowMatchingConfig | None = None) -> None:
        self.cfg = cfg
        self.scaling = TimestepAwareScaling(cfg, flow)

    def __call__(self, terms: dict[str, torch.Tensor], t: torch.Tensor,
                 mask: torch.Tensor | None = None, *, t_task: torch.Tensor | None = None,
                 task_at_kd: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`terms`: per-sample "task" and optionally "out", "feat" (B,). Returns (loss, logs). `t`: timesteps of
        the KD terms; `t_task`, `task_at_kd`: a task term drawn apart from the KD pair (TimestepAwareScaling)."""
        task = terms["task"]
        logs = {f"loss/{k}": v.mean().detach() for k, v in terms.items()}
        kd = [k for k in ("out", "feat") if k in terms] if self.cfg.combine != "task_only" else []
        if not kd:
            return task.mean(), logs
        m = mask.float() if mask is not None else torch.ones_like(task)
        if self.cfg.combine == "weighted":
            weights = {"out": self.cfg.out_weight, "feat": self.cfg.feat_weight}
            loss = task.mean() + sum(weights[k] * (terms[k] * m).sum() / m.sum().clamp_min(1) for k in kd)
            return loss, logs
        total = 0.0
        for k in kd:
            part, diag = self.scaling(task, terms[k], t, mask, t_task=t_task, task_at_kd=task_at_kd)
            total = total + part
            logs |= {f"scale/{k}_{n}": v for n, v in diag.items()}
        return total, logs
