"""Adversarial step distillation: 4- and 8-step students (SNAPGEN_SPEC.md section 6).

Lightning's GAN template (STYLE.md 8): manual optimisation with two optimisers, the generator
(student UNet + text conditioner) and the discriminator (the trainable heads on the frozen
teacher's features, `snapgen_model.distill.adversarial`). Per training step:

1. `d_updates` discriminator updates: fake = the student sampled in N few-step steps (no grad),
   real = the cached latent; both re-noised at the same sampled t, through the teacher, into the
   heads; hinge (or non-saturating) loss, optional R1 on the real input.
2. One generator update: L_G = adv_weight * L_adv(D(fake)) + kd_weight * S(L_task, L_out), the
   timestep-aware scaled output KD of pretraining (SPEC 5) against the *guided* teacher (ADD/LADD):
   v_T = v_u + w (v_c - v_u) with w = `teacher_guidance`, v_u the teacher on its null condition (the
   text encoders' encoding of the empty prompt, the caption dropout the teacher was trained with;
   `teacher_null`). The (t, noise) pair is one of the cache's pairs when the cache has targets (else
   drawn); with w = 1 the target is the cached conditional velocity (or the teacher online when the
   cache has none), with w != 1 the teacher runs online on both branches at that pair (the cache holds
   no unconditional targets; mixing cached and online branches would mix their precisions).
3. The EMA update: one `training.ema.ModuleEMA` over every module the saved student is made of (UNet
   and conditioner), decay `ema_decay` or (0) tied to the run length (`decay_for_run(steps)`).
4. The learning rates of both optimisers follow `lr_lambda` (linear warm-up over `warmup_steps`,
   then cosine decay to `min_lr_ratio` at `steps`, as pretraining); the defaults warm up and then
   stay constant (floor 1).

Diagnostics (logged every `log_every` steps, and in `fit_distill`'s result at the end): the relative
weight change of the generator (student + conditioner) and of its EMA against the starting
(pretrained) weights, `weights/rel_change_g` and `weights/rel_change_ema` (a run that barely moves
the weights distils nothing), and the discriminator's accuracy over the interval, `d/acc_real`
(fraction of real samples scored real) and `d/acc_fake` (fake scored fake).

Generator forward [U]: the N-step few-step sampler (x0 prediction, re-noise with seeded noise) is
run without gradients up to a step j, and step j is run with gradients; its x0 prediction is the
generated sample. `backprop=random_step` draws j uniformly per training step (ADD/LADD: every
sampler timestep gets trained, at the cost of one differentiable UNet call); `last_step` always
takes j = N - 1 (the full sampler's output, gradient through the last step only).

All randomness of a step comes from a generator seeded by (seed, step, rank), and the full state
(student, conditioner, their EMA copies, heads, both optimisers, step) is checkpointed, so a resumed
run is bitwise identical to an uninterrupted one on CPU, as in pretraining.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from snapgen_model.config_base import ConfigBase, check, check_choice
from snapgen_model.configs import SamplerConfig, SnapGenConfig
from snapgen_model.diffusion.flow import interpolate, sample_timesteps, x0_from_velocity
from snapgen_model.diffusion.samplers import make_timesteps
from snapgen_model.distill.adversarial import (
    DiscriminatorConfig,
    TeacherFeatureDiscriminator,
    adversarial_losses,
    discriminator_accuracy,
    r1_penalty,
    sample_renoise_t,
)
from snapgen_model.distill.cache import CacheConfig, draw_pair
from snapgen_model.distill.losses import DistillationObjective, KDConfig, OutputKDLoss, TaskLoss
from snapgen_model.distill.text import Encoded, TextConditioner, sd3_teacher_condition
from snapgen_model.nn.attention import use_fast_attention
from snapgen_model.training.cpu import tune_allocator
from snapgen_model.training.data import CachedData
from snapgen_model.training.ema import ModuleEMA, decay_for_run, relative_change
from snapgen_model.training.feed import DataFeed, as_sources, summed_stats
from snapgen_model.training.stages import stage_configs
from snapgen_model.training.pretrain import NonFiniteLossError, lr_lambda
from snapgen_model.training.state import load_state, save_state
from snapgen_model.training.stream import StreamData


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepDistillConfig(ConfigBase):
    """Optimisation, sampler, loss and runtime settings of adversarial step distillation."""

    steps: int = 500  # generator updates (training steps)
    batch_size: int = 16  # batch per step
    # Adam learning rates [U]: large enough to move the weights in a toy-length run (1e-5 for ~60 steps
    # moved them < 1%, TOY_CALIBRATION.md); GAN practice (2e-4, beta1 0.5) for both
    lr_g: float = 2e-4  # generator (student + conditioner)
    lr_d: float = 2e-4  # discriminator heads
    warmup_steps: int = 10  # linear LR warm-up of both optimisers (0 = none) [U]
    min_lr_ratio: float = 1.0  # cosine decay floor of both LRs, as a fraction of lr_g / lr_d (1 = constant) [U]
    adam_beta1: float = 0.5  # Adam beta1 of both optimisers (GAN practice) [U]
    d_updates: int = 1  # discriminator updates per generator update (the update ratio) [U]
    sampler_steps: int = 4  # N: student sampler steps (4 or 8 in the paper) [P]
    shift: float = 1.0  # timestep shift of the N-step schedule make_timesteps(N, shift) [U]
    guidance: float = 1.0  # CFG scale stored with the student (trained without CFG: 1 = off) [U]
    # w of the guided teacher target v_u + w (v_c - v_u) the output KD distils toward (ADD/LADD; 1 = the
    # unguided conditional teacher); 4 = the toy teacher's sampling guidance (bootstrap eval_guidance) [U]
    teacher_guidance: float = 4.0
    backprop: Literal["random_step", "last_step"] = "random_step"  # which sampler step gets gradients (module doc)
    adv_weight: float = 1.0  # weight of the adversarial generator loss [U]
    kd_weight: float = 1.0  # weight of the scaled output-KD term [U]
    # t of the KD term when the cache holds no (t, noise) pairs: "flow" draws from the preset's timestep
    # density (the one the scaling a_t divides by, as in pretraining); "uniform" is the draw of runs
    # before 2026-12-07 (the batch-32 evidence keeps it so its seeds match)
    kd_timesteps: Literal["flow", "uniform"] = "flow"
    kd: KDConfig = dataclasses.field(default_factory=lambda: KDConfig(feature_kd=False))  # scaled output KD (SPEC 5)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)
    grad_clip: float = 1.0  # gradient-norm clipping of both optimisers (0 = off)
    # EMA decay of the saved student (UNet + conditioner together); 0 = tied to the run length,
    # `decay_for_run(steps)` (a window of ~10% of the run); either way with the warm-up (1 + s) / (10 + s)
    ema_decay: float = 0.0
    seed: int = 0  # seeds the heads' init and every per-step draw
    checkpoint_every: int = 100  # steps between full-state checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # retention: the newest full states kept, locally and in storage (uploads)
    max_nonfinite: int = 5  # consecutive non-finite losses tolerated (skipped) before stopping
    precision: Literal["32-true", "bf16-mixed"] = "32-true"
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    # several processes: DDP (as pretraining; FSDP is for the full-size student's pretraining only). The
    # two optimisers update disjoint parameter sets from separate backward passes, so DDP runs with
    # find_unused_parameters (`lightning_strategy`)
    strategy: Literal["auto", "ddp"] = "auto"
    devices: int = 1  # devices per node
    num_nodes: int = 1  # nodes
    log_every: int = 10  # metric logging interval
    sample_every: int = 0  # steps between preview grids, student beside teacher (0 = only at the end)
    # training data: the whole cache in memory, or its shards streamed (as PretrainConfig.data)
    data: Literal["memory", "stream"] = "memory"
    shuffle_buffer: int = 256  # stream: samples in the shuffle buffer
    data_workers: int = 0  # stream: 0 = read in the training process, 1 = a background reader process

    def __post_init__(self) -> None:
        check(self.sample_every >= 0, "distill.sample_every", "must be >= 0 (0 = only at the end)")
        check_choice(self.data, "distill.data", ("memory", "stream"))
        check(self.shuffle_buffer >= 1, "distill.shuffle_buffer", "must be >= 1 (1 = no shuffling)")
        check(self.data_workers in (0, 1), "distill.data_workers",
              "must be 0 or 1 (more reader processes would split the stream and change its order)")
        check(self.steps >= 1, "distill.steps", "must be >= 1")
        check(self.batch_size >= 1, "distill.batch_size", "must be >= 1")
        check(self.lr_g > 0, "distill.lr_g", "must be > 0")
        check(self.lr_d > 0, "distill.lr_d", "must be > 0")
        check(self.warmup_steps >= 0, "distill.warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "distill.min_lr_ratio", "must be in [0, 1] (1 = constant rates)")
        check(0 <= self.adam_beta1 < 1, "distill.adam_beta1", "must be in [0, 1)")
        check(self.d_updates >= 1, "distill.d_updates", "must be >= 1")
        check(1 <= self.sampler_steps <= 64, "distill.sampler_steps", "must be in [1, 64]")
        check(self.guidance >= 1.0, "distill.guidance", "must be >= 1")
        check(self.teacher_guidance >= 1.0, "distill.teacher_guidance", "must be >= 1 (1 = the unguided teacher)")
        check_choice(self.backprop, "distill.backprop", ("random_step", "last_step"))
        check(self.adv_weight >= 0, "distill.adv_weight", "must be >= 0")
        check(self.kd_weight >= 0, "distill.kd_weight", "must be >= 0")
        check(self.shift > 0, "distill.shift", "must be > 0")
        check_choice(self.strategy, "distill.strategy", ("auto", "ddp"))
        check_choice(self.kd_timesteps, "distill.kd_timesteps", ("flow", "uniform"))
        check(self.devices >= 1, "distill.devices", "must be >= 1")
        check(self.num_nodes >= 1, "distill.num_nodes", "must be >= 1")
        check(self.grad_clip >= 0, "distill.grad_clip", "must be >= 0 (0 = off)")
        check(self.checkpoint_every >= 0, "distill.checkpoint_every", "must be >= 0 (0 = only at the end)")
        check(self.keep_checkpoints >= 1, "distill.keep_checkpoints", "must be >= 1")
        check(0 <= self.ema_decay < 1, "distill.ema_decay", "must be in [0, 1) (0 = tied to the run length)")
        check(self.max_nonfinite >= 0, "distill.max_nonfinite", "must be >= 0")
        check(self.log_every >= 1, "distill.log_every", "must be >= 1")

    def sampler(self) -> SamplerConfig:
        """The sampler settings the distilled student carries in its preset."""
        return SamplerConfig(kind="few_step", steps=self.sampler_steps, guidance=self.guidance, shift=self.shift)

    def lightning_strategy(self) -> str:
        """Lightning's strategy name: several processes run DDP with find_unused_parameters, since the
        discriminator's backward leaves the generator's parameters without gradients and vice versa."""
        if self.strategy == "ddp" or (self.strategy == "auto" and self.devices * self.num_nodes > 1):
            return "ddp_find_unused_parameters_true"
        return "auto"

    def ema(self) -> float:
        """The EMA decay of the run: `ema_decay`, or (0) the one tied to the run length."""
        return self.ema_decay or decay_for_run(self.steps)


class OptimizerPair:
    """Two optimisers seen as one by `save_state`/`load_state`: the second's parameter ids are
    offset by the first's parameter count, its param groups appended after the first's."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer) -> None:
        self.first, self.second = first, second

    def _offset(self) -> tuple[int, int]:
        return len(self.first.param_groups), sum(len(g["params"]) for g in self.first.param_groups)

    def state_dict(self) -> dict[str, Any]:
        a, b = self.first.state_dict(), self.second.state_dict()
        _, n = self._offset()
        return {"state": dict(a["state"]) | {pid + n: s for pid, s in b["state"].items()},
                "param_groups": a["param_groups"] + [dict(g, params=[p + n for p in g["params"]])
                                                     for g in b["param_groups"]]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        k, n = self._offset()
        groups = sd["param_groups"]
        self.first.load_state_dict({"state": {p: s for p, s in sd["state"].items() if p < n},
                                    "param_groups": groups[:k]})
        self.second.load_state_dict({"state": {p - n: s for p, s in sd["state"].items() if p >= n},
                                     "param_groups": [dict(g, params=[p - n for p in g["params"]]) for g in groups[k:]]})


class SchedulerPair:
    """The generator's and the discriminator's LR schedulers seen as one by `save_state`/`load_state`."""

    def __init__(self, generator, discriminator) -> None:
        self.generator, self.discriminator = generator, discriminator

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator.load_state_dict(sd["generator"])
        self.discriminator.load_state_dict(sd["discriminator"])


class StepDistillModule(DataFeed, pl.LightningModule):
    def __init__(self, preset: SnapGenConfig, cfg: StepDistillConfig, data: CachedData | StreamData,
                 cache_cfg: CacheConfig, *, teacher, student: torch.nn.Module, conditioner: TextConditioner,
                 teacher_null: dict[str, Encoded] | None = None, start_step: int = 0,
                 resume_position: dict | None = None) -> None:
        """`teacher`: a frozen SD3Teacher capturing `cfg.discriminator.feature_layers`; `student` and
        `conditioner`: the pretrained (EMA) student and its text conditioner (copied, not mutated);
        `data`: CachedData (`cfg.data="memory"`) or StreamData (`cfg.data="stream"`); `teacher_null`:
        every teacher text encoder's output for the empty prompt (batch 1, `encode_teacher_null`), the
        teacher's unconditional condition, needed when `cfg.teacher_guidance` != 1."""
        super().__init__()
        if preset.unet.conditioning != "text":
            raise ValueError("step distillation: class-conditional students (unet.conditioning=class) are not supported "
                             "(the discriminator's teacher and the KD targets are text-conditioned)")
        self.sources = as_sources(data)
        data = self.sources[""]
        if (cfg.data == "stream") != isinstance(data, StreamData):
            raise ValueError(f"distill.data={cfg.data} needs {'a StreamData' if cfg.data == 'stream' else 'a CachedData'}"
                             f" (got {type(data).__name__})")
        self.automatic_optimization = False
        self.preset = dataclasses.replace(preset, sampler=cfg.sampler())
        self.cfg, self.data, self.cache_cfg, self.start_step = cfg, data, cache_cfg, start_step
        self.resume_position = resume_position
        self.student = copy.deepcopy(student).train()
        self.conditioner = copy.deepcopy(conditioner).train()
        # one EMA over every module of the saved student; the copies are registered (ema_models) so they
        # follow the module's device and are part of the training state
        self.ema = ModuleEMA(self.student_modules(), cfg.ema())
        self.ema_models = torch.nn.ModuleDict(self.ema.copies)
        self.start_weights = [p.detach().clone() for p in self.generator_parameters()]  # the pretrained weights
        self.teacher_null = self._check_null(teacher_null, cfg, cache_cfg)
        self.acc_interval: list = [0.0, 0.0, 0]  # real, fake sums and count since the last log
        self.acc_run = {"real": 0.0, "fake": 0.0, "count": 0}  # over the whole run (checkpointed)
        torch.manual_seed(cfg.seed)
        pooled_dim = sum(self.reference_data().pooled[e].shape[-1] for e in cache_cfg.teacher_clip_encoders)
        self.discriminator = TeacherFeatureDiscriminator(teacher, cfg.discriminator, pooled_dim)
        self.d_loss, self.g_loss = adversarial_losses(cfg.discriminator.loss)
        self.objective, self.task_loss, self.out_loss = DistillationObjective(cfg.kd, preset.flow), TaskLoss(), OutputKDLoss()
        self.timesteps = make_timesteps(cfg.sampler_steps, cfg.shift)  # (N + 1,) from 1 to 0
        self.steps_done, self.nonfinite_total, self.nonfinite_run = 0, 0, 0
        self.setup_plan(stage_configs((), cfg.steps, cfg.batch_size), preset.latent.downsample)

    resume_from: Any = None

    @staticmethod
    def _check_null(null: dict[str, Encoded] | None, cfg: StepDistillConfig, cache_cfg: CacheConfig):
        if cfg.teacher_guidance == 1.0:
            return null
        names = [*cache_cfg.teacher_clip_encoders, *([cache_cfg.teacher_t5_encoder] if cache_cfg.teacher_t5_encoder else [])]
        missing = [n for n in names if null is None or n not in null]
        if missing or null is None:
            raise ValueError(f"distill.teacher_guidance={cfg.teacher_guidance} needs the teacher's null condition: "
                             f"pass teacher_null (encode_teacher_null: the empty prompt through the teacher's text "
                             f"encoders {missing}), or set distill.teacher_guidance=1 for the unguided teacher")
        return {n: Encoded(e.tokens.detach().cpu(), None if e.pooled is None else e.pooled.detach().cpu(),
                           e.mask.detach().cpu()) for n, e in null.items()}

    def current_step(self) -> int:
        return self.start_step + self.steps_done

    def student_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules the saved student is made of (the EMA averages exactly these)."""
        return {"student": self.student, "conditioner": self.conditioner}

    @property
    def ema_unet(self) -> torch.nn.Module:
        return self.ema["student"]

    @property
    def ema_conditioner(self) -> torch.nn.Module:
        return self.ema["conditioner"]

    def preview_modules(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(UNet, conditioner) a preview renders: the EMA pair, as saved."""
        return self.ema_unet, self.ema_conditioner

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.student, self.conditioner) for p in m.parameters() if p.requires_grad]

    def ema_generator_parameters(self) -> list[torch.Tensor]:
        """The EMA copies of `generator_parameters()`, in the same order."""
        return [e for name, m in self.student_modules().items()
                for e, p in zip(self.ema[name].parameters(), m.parameters()) if p.requires_grad]

    def weight_change(self) -> dict[str, float]:
        """Relative change ||w - w0|| / ||w0|| of the generator (raw and EMA) against its starting weights."""
        params = self.generator_parameters()
        if params and self.start_weights and self.start_weights[0].device != params[0].device:
            self.start_weights = [w.to(params[0].device) for w in self.start_weights]
        return {"weights/rel_change_g": relative_change(self.start_weights, params),
                "weights/rel_change_ema": relative_change(self.start_weights, self.ema_generator_parameters())}

    def _accuracy_means(self) -> dict[str, float]:
        """The interval's mean discriminator accuracies (and reset); folded into the run totals."""
        real, fake, n = self.acc_interval
        if not n:
            return {}
        real, fake = float(real), float(fake)
        self.acc_run = {"real": self.acc_run["real"] + real, "fake": self.acc_run["fake"] + fake,
                        "count": self.acc_run["count"] + n}
        self.acc_interval = [0.0, 0.0, 0]
        return {"d/acc_real": real / n, "d/acc_fake": fake / n}

    def summary(self) -> dict[str, float | None]:
        """End-of-run diagnostics: weight change (raw, EMA) and the run's mean discriminator accuracies."""
        self._accuracy_means()
        n = self.acc_run["count"]
        change = self.weight_change()
        return {"generator_rel_change": change["weights/rel_change_g"], "ema_rel_change": change["weights/rel_change_ema"],
                "d_acc_real": self.acc_run["real"] / n if n else None, "d_acc_fake": self.acc_run["fake"] / n if n else None,
                "ema_decay": self.ema.decay, "teacher_guidance": self.cfg.teacher_guidance}

    def configure_optimizers(self):
        betas = (self.cfg.adam_beta1, 0.999)
        return [torch.optim.Adam(self.generator_parameters(), lr=self.cfg.lr_g, betas=betas),
                torch.optim.Adam(self.discriminator.heads.parameters(), lr=self.cfg.lr_d, betas=betas)]

    _schedulers: SchedulerPair | None = None

    def schedulers(self) -> SchedulerPair:
        """The two LambdaLR schedulers (made on first use, at train start: manual optimisation steps
        them itself, once per training step)."""
        if self._schedulers is None:
            generator, discriminator = (torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(self.cfg))
                                        for o in self.trainer.optimizers)
            self._schedulers = SchedulerPair(generator, discriminator)
        return self._schedulers

    def _rows(self, batch_or_idx) -> CachedData:
        """A batch's CachedData (an index tensor selects rows of the in-memory data)."""
        return self.data.select(batch_or_idx) if isinstance(batch_or_idx, torch.Tensor) else batch_or_idx

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 7919 + step * 104_729 + self.global_rank + 17)

    def _randn(self, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return torch.randn(like.shape, generator=g).to(like.device, like.dtype)  # drawn on CPU: device-independent

    def _encoded(self, b: CachedData) -> dict[str, Encoded]:
        b, dev = self._rows(b), self.device
        return {e: Encoded(b.tokens[e].to(dev), b.pooled[e].to(dev) if e in b.pooled else None,
                           b.mask[e].to(dev)) for e in b.tokens}

    def generate(self, noise: torch.Tensor, cond: dict[str, torch.Tensor], j: int, g: torch.Generator) -> torch.Tensor:
        """x0 of the few-step sampler (samplers.sample_few_step) after steps 0..j; only step j has gradients."""
        ts, x = self.timesteps.to(noise.device), noise
        full = lambda s: ts[s].expand(x.shape[0])  # noqa: E731
        with torch.no_grad():
            for i in range(j):
                x0 = x0_from_velocity(x, self.student(x, full(i), **cond), full(i))
                x = (1 - ts[i + 1]) * x0 + ts[i + 1] * self._randn(x, g)  # re-noise to t_{i+1} > 0
        return x0_from_velocity(x, self.student(x, full(j), **cond), full(j))  # (B, C, h, w)

    def _draw_step(self, g: torch.Generator) -> int:
        n = self.cfg.sampler_steps
        return n - 1 if self.cfg.backprop == "last_step" else int(torch.randint(n, (1,), generator=g))

    def _disc(self, x0: torch.Tensor, tcond: dict, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.discriminator(x0, t, self._randn(x0, g), tcond["context"], tcond["pooled"])

    def discriminator_loss(self, latent, encoded, tcond, g) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            fake = self.generate(self._randn(latent, g), self.conditioner(encoded), self._draw_step(g), g)
        t = sample_renoise_t(len(latent), self.cfg.discriminator, g).to(self.device)
        r1 = self.cfg.discriminator.r1_weight
        real = latent.detach().requires_grad_(r1 > 0)
        # R1 differentiates through the teacher twice: only the math attention kernel has a double backward
        with sdpa_kernel(SDPBackend.MATH) if r1 > 0 else contextlib.nullcontext():
            real_logits = self._disc(real, tcond, t, g)
        fake_logits = self._disc(fake.detach(), tcond, t, g)
        loss = self.d_loss(real_logits, fake_logits)
        logs = {}
        if r1 > 0:
            penalty = r1_penalty(real_logits, real)
            loss = loss + 0.5 * r1 * penalty
            logs["loss/r1"] = penalty.detach()
        acc_real, acc_fake = discriminator_accuracy(real_logits.detach(), fake_logits.detach())
        return loss, logs | {"loss/d": loss.detach(), "d/acc_real": acc_real, "d/acc_fake": acc_fake}

    def teacher_null_condition(self, batch: int) -> dict[str, torch.Tensor]:
        """The teacher's unconditional condition (the empty prompt's encodings) for `batch` rows."""
        dev = self.device
        encoded = {n: Encoded(e.tokens.to(dev).expand(batch, -1, -1),
                              None if e.pooled is None else e.pooled.to(dev).expand(batch, -1),
                              e.mask.to(dev).expand(batch, -1)) for n, e in self.teacher_null.items()}
        return self.teacher_condition(encoded)

    def teacher_condition(self, encoded: dict[str, Encoded]) -> dict[str, torch.Tensor]:
        return sd3_teacher_condition(encoded, self.cache_cfg.teacher_clip_encoders,
                                     self.discriminator.teacher.transformer.config.joint_attention_dim,
                                     self.cache_cfg.teacher_t5_encoder or None)

    @torch.no_grad()
    def teacher_velocity(self, x_t: torch.Tensor, t: torch.Tensor, tcond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The KD target: the guided teacher v_u + w (v_c - v_u), w = `teacher_guidance` (both branches in
        one batched call; w = 1: the conditional teacher alone)."""
        teacher, w = self.discriminator.teacher, self.cfg.teacher_guidance
        if w == 1.0:
            return teacher(x_t, t, tcond["context"], tcond["pooled"]).velocity
        null = self.teacher_null_condition(len(x_t))
        if null["context"].shape[1:] != tcond["context"].shape[1:]:
            raise ValueError(f"teacher null condition has context {tuple(null['context'].shape[1:])}, the batch "
                             f"{tuple(tcond['context'].shape[1:])}: encode the empty prompt as the cache encoded captions")
        v_u, v_c = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null["context"], tcond["context"]]),
                           torch.cat([null["pooled"], tcond["pooled"]])).velocity.chunk(2)
        return v_u + w * (v_c - v_u)

    def _kd_targets(self, b: CachedData, latent, g, tcond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, noise, v_teacher): one of the cache's (t, noise) pairs when the cache has targets (else drawn);
        v the cached conditional target when unguided (teacher_guidance 1), else the guided teacher online."""
        if b.targets:
            if b.t is None or b.v is None:
                raise RuntimeError("cached KD: the batch has cached timesteps but no velocity targets")
            k = torch.randint(b.targets, (len(b),), generator=g)
            rows = torch.arange(len(b))
            noise = torch.stack([draw_pair(key, int(kk), latent.shape[1:], self.cache_cfg)[1]
                                 for key, kk in zip(b.keys, k)]).to(self.device)
            t = b.t[rows, k].to(self.device)
            if self.cfg.teacher_guidance == 1.0:
                return t, noise, b.v[rows, k].to(self.device)
        elif self.cfg.kd_timesteps == "flow":  # the preset's density, which a_t divides by (as pretraining)
            t = sample_timesteps(len(b), self.preset.flow, g).to(self.device)
            noise = self._randn(latent, g)
        else:  # "uniform": the draw before 2026-12-07 (kept for runs that must match older ones)
            t = torch.rand(len(b), generator=g).to(self.device)
            noise = self._randn(latent, g)
        return t, noise, self.teacher_velocity(interpolate(latent, noise, t), t, tcond)

    def generator_loss(self, b, latent, encoded, tcond, g) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = self._rows(b)
        cond = self.conditioner(encoded)
        fake = self.generate(self._randn(latent, g), cond, self._draw_step(g), g)
        t = sample_renoise_t(len(latent), self.cfg.discriminator, g).to(self.device)
        adv = self.g_loss(self._disc(fake, tcond, t, g))
        t_kd, noise, v_teacher = self._kd_targets(b, latent, g, tcond)
        v = self.student(interpolate(latent, noise, t_kd), t_kd, **cond)
        kd, logs = self.objective({"task": self.task_loss(v, noise - latent), "out": self.out_loss(v, v_teacher)}, t_kd)
        loss = self.cfg.adv_weight * adv + self.cfg.kd_weight * kd
        return loss, logs | {"loss/g": loss.detach(), "loss/g_adv": adv.detach(), "loss/kd": kd.detach()}

    def _update(self, opt, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        try:
            return self._training_step(batch)
        finally:  # every step, skipped ones too: the LRs of step s are lr_lambda(s) on any resume
            sched = self.schedulers()
            sched.generator.step()
            sched.discriminator.step()

    def _training_step(self, batch: dict[str, Any]):
        step, b = int(batch["step"]), self.batch_data(batch)
        self.steps_done = step + 1 - self.start_step
        g, (opt_g, opt_d) = self._generator(step), self.optimizers()
        latent, encoded = b.latent.to(self.device), self._encoded(b)
        tcond = self.teacher_condition(encoded)
        logs: dict[str, torch.Tensor] = {}
        acc = [0.0, 0.0]
        for _ in range(self.cfg.d_updates):
            d_loss, logs = self.discriminator_loss(latent, encoded, tcond, g)
            if not torch.isfinite(d_loss):
                return self._skip_nonfinite(step)
            self._update(opt_d, d_loss)
            acc = [acc[0] + logs["d/acc_real"], acc[1] + logs["d/acc_fake"]]
        g_loss, g_logs = self.generator_loss(b, latent, encoded, tcond, g)
        if not torch.isfinite(g_loss):
            return self._skip_nonfinite(step)
        self._update(opt_g, g_loss)
        self.update_ema(step)
        self.nonfinite_run = 0
        n = self.cfg.d_updates
        self.acc_interval = [self.acc_interval[0] + acc[0], self.acc_interval[1] + acc[1], self.acc_interval[2] + n]
        if step % self.cfg.log_every == 0:
            metrics = logs | g_logs | self._accuracy_means() | self.weight_change() | {
                "nonfinite/total": float(self.nonfinite_total), "lr/g": opt_g.param_groups[0]["lr"],
                "lr/d": opt_d.param_groups[0]["lr"], "ema/decay": self.ema.current_decay(step)}
            self.log_dict({k: float(v) for k, v in metrics.items()}, on_step=True, batch_size=len(b))
        return {"loss_g": g_loss.detach(), "loss_d": logs["loss/d"], "acc_real": logs["d/acc_real"],
                "acc_fake": logs["d/acc_fake"]}

    def _skip_nonfinite(self, step: int) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        if self.nonfinite_run > self.cfg.max_nonfinite:
            raise NonFiniteLossError(f"step {step}: {self.nonfinite_run} consecutive non-finite losses "
                                     f"(limit distill.max_nonfinite={self.cfg.max_nonfinite}); last checkpoint is usable")
        return None

    def update_ema(self, step: int) -> None:
        self.ema.update(step)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Everything a full-state checkpoint holds: raw modules, their EMA copies ("ema/<name>.*"), the heads."""
        return {"student": self.student, "ema": self.ema_models, "conditioner": self.conditioner,
                "heads": self.discriminator.heads}

    def save_training_state(self, folder, trainer) -> Path:
        self._accuracy_means()  # the run's accuracy totals up to this step
        return save_state(folder, modules=self.trainable_modules(), optimizer=OptimizerPair(*trainer.optimizers),
                          scheduler=self.schedulers(), step=self.current_step(),
                          extra={"nonfinite_total": self.nonfinite_total, "preset": self.preset.to_dict(),
                                 "distill": self.cfg.to_dict(), "data_position": self.data_position(),
                                 "d_accuracy": self.acc_run})

    def on_train_start(self) -> None:
        self.schedulers()  # the rates of step 0 (then restored below when resuming)
        if self.resume_from is not None:
            meta = load_state(self.resume_from, modules=self.trainable_modules(),
                              optimizer=OptimizerPair(*self.trainer.optimizers), scheduler=self.schedulers())
            self.nonfinite_total = meta.get("nonfinite_total", 0)
            self.acc_run = dict(meta.get("d_accuracy") or self.acc_run)



def fit_distill(preset: SnapGenConfig, cfg: StepDistillConfig, data, cache_cfg: CacheConfig, state_root,
                *, teacher, student: torch.nn.Module, conditioner: TextConditioner,
                teacher_null: dict[str, Encoded] | None = None, loggers=None, upload=None,
                resume: str = "latest", callbacks=(), progress_bar: bool = False) -> dict[str, Any]:
    """Train (or resume) to `cfg.steps`; returns {"step", "state", "resumed_from", "nonfinite_total", "module",
    "data_skipped", "metrics"}; "metrics" (`StepDistillModule.summary`): the generator's and its EMA's relative
    weight change against the pretrained student, the run's mean discriminator accuracies, the EMA decay."""
    from snapgen_model.training.state import StateCheckpoint, latest_state, read_state_meta

    root = Path(state_root)
    start_path = latest_state(root) if resume == "latest" else (Path(resume) if resume not in ("none", "") else None)
    meta = read_state_meta(start_path) if start_path else {}
    start = int(meta.get("step", 0))
    module = StepDistillModule(preset, cfg, data, cache_cfg, teacher=teacher, student=student,
                               conditioner=conditioner, teacher_null=teacher_null, start_step=start,
                               resume_position=meta.get("data_position"))
    module.resume_from = start_path
    if start >= cfg.steps:
        if start_path is None:
            raise RuntimeError("distill: a finished run needs its saved state (distill.steps must be >= 1)")
        load_state(start_path, modules=module.trainable_modules())
        module.acc_run = dict(meta.get("d_accuracy") or module.acc_run)
        if module.streaming and module.resume_position:
            module.data.skipped = summed_stats(module.resume_position["ranks"])
        return {"step": start, "state": str(start_path), "resumed_from": str(start_path), "nonfinite_total": None,
                "module": module, "data_skipped": module.data_skipped(), "metrics": module.summary()}
    if cfg.accelerator == "cpu" or not torch.cuda.is_available():
        tune_allocator()  # keep freed heap memory for the next step (training/cpu.py): speed only
        transformer = getattr(teacher, "transformer", None)
        if cfg.precision == "bf16-mixed" and hasattr(transformer, "set_attn_processor"):
            use_fast_attention(transformer)  # bf16 attention on CPU: the explicit form (nn/attention.py)
    ckpt = StateCheckpoint(root, cfg.checkpoint_every, cfg.keep_checkpoints, upload=upload)
    trainer = pl.Trainer(
        max_epochs=1, max_steps=-1, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=cfg.lightning_strategy(), precision=cfg.precision,
        logger=loggers or False, enable_checkpointing=False, enable_progress_bar=progress_bar,
        callbacks=[ckpt, *callbacks],
        enable_model_summary=False, use_distributed_sampler=False, log_every_n_steps=1,
    )
    trainer.fit(module)
    ckpt.raise_if_interrupted("distill", module.current_step(), cfg.steps)  # SIGTERM: stop, do not save a student
    final = latest_state(root)
    return {"step": module.current_step(), "state": str(final) if final else None,
            "resumed_from": str(start_path) if start_path else None, "nonfinite_total": module.nonfinite_total,
            "module": module, "data_skipped": module.data_skipped(), "metrics": module.summary()}


def save_distilled(module: StepDistillModule, folder) -> dict[str, str]:
    """The few-step student, as `save_student`: the EMA UNet (its preset carries sampler kind=few_step,
    steps N, shift and guidance: `read_preset(path).sampler`) with the EMA conditioner, and the raw
    pair beside them (the student folder of `artifacts.student`)."""
    from snapgen_model.artifacts.student import save_student

    return save_student(folder, module.preset, module.ema_unet, module.ema_conditioner,
                        raw_unet=getattr(module.student, "_orig_mod", module.student),  # (torch.compile)
                        raw_conditioner=module.conditioner)


@torch.no_grad()
def encode_teacher_null(bundle_folder, encoders: list[dict], names=None,
                        device: str | torch.device = "cpu") -> dict[str, Encoded]:
    """The teacher's null condition: the empty prompt through the bundle's text encoders (`encoders`:
    the cache manifest's TextEncoderSpec dicts, loaded from the bundle as caching does; `names`: only
    these), batch 1 on the CPU. The toy teacher trained its caption dropout on exactly this encoding
    (bootstrap: the empty caption), and SD3 uses the empty prompt as its CFG null."""
    from snapgen_model.distill.text import TextEncoderAdapter, TextEncoderSpec

    out = {}
    for raw in encoders:
        spec = TextEncoderSpec.from_dict(dict(raw) | {"path": str(bundle_folder)})
        if names is not None and spec.name not in names:
            continue
        e = TextEncoderAdapter.from_pretrained(spec, device)([""])
        out[spec.name] = Encoded(e.tokens.cpu(), None if e.pooled is None else e.pooled.cpu(), e.mask.cpu())
    return out


def load_pretrained_student(folder) -> tuple[SnapGenConfig, torch.nn.Module, TextConditioner]:
    """(preset, UNet, conditioner) from a folder written by `save_student` (pretraining)."""
    from snapgen_model.artifacts.student import load_student

    return load_student(folder)


def load_distill_teacher(bundle_folder, cfg: StepDistillConfig, cache_cfg: CacheConfig, encoder_specs: list[dict],
                         device: str | torch.device = "cpu") -> tuple[Any, dict[str, Encoded] | None]:
    """(frozen teacher, its null condition) for `fit_distill`, as every process builds them: the bundle's
    transformer capturing the discriminator's layers and, when the KD target is guided
    (`cfg.teacher_guidance` != 1), the empty prompt through every text encoder the teacher is conditioned on
    (`encoder_specs`: the cache manifest's TextEncoderSpec dicts); None when unguided."""
    teacher = load_teacher(bundle_folder, cfg.discriminator, device)
    if cfg.teacher_guidance == 1.0:
        return teacher, None
    names = [*cache_cfg.teacher_clip_encoders, *([cache_cfg.teacher_t5_encoder] if cache_cfg.teacher_t5_encoder else [])]
    return teacher, encode_teacher_null(bundle_folder, encoder_specs, names)


def load_teacher(bundle_folder, cfg: DiscriminatorConfig, device: str | torch.device = "cpu"):
    """The frozen SD3 teacher of a bundle folder, capturing the discriminator's feature layers."""
    from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig

    return SD3Teacher.from_pretrained(TeacherConfig(path=str(bundle_folder), feature_layers=cfg.feature_layers), device)
