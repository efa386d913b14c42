"""Student pretraining with multi-level knowledge distillation (SNAPGEN_SPEC.md sections 4-5).

`PretrainModule` holds the student UNet, the trainable text conditioner and feature projector, one
EMA (`training.ema.ModuleEMA`) over every module the saved student is made of (UNet + conditioner),
and either cached teacher targets (cached mode) or a frozen teacher (online mode). `training_step`
only combines the named loss terms of `snapgen_model.distill.losses`.

Cached mode: the KD terms use one of the K cached (t, noise) pairs of each sample, drawn uniformly
per sample and step; the task (flow-matching) term gets a fresh (t, noise) every step, independent
of that pair (both go through the student in one batched forward). Online mode: one fresh pair per
step, on which the teacher runs, serves both. Which KD levels a run actually trains ("output",
"output+feature", "none") is decided once, logged and returned (`kd_levels`).
All randomness of a step (timesteps, noise, target pair, condition dropout) comes from a generator
seeded by (seed, step, rank), so a resumed run is bitwise identical to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch

from snapgen_model.config_base import ConfigBase, check, check_choice
from snapgen_model.configs import SnapGenConfig
from snapgen_model.diffusion.flow import interpolate, sample_timesteps
from snapgen_model.distill.cache import CacheConfig, draw_pair
from snapgen_model.distill.losses import (
    DistillationObjective,
    FeatureKDLoss,
    FeatureProjector,
    KDConfig,
    OutputKDLoss,
    TaskLoss,
)
from snapgen_model.distill.text import Encoded, TextConditioner, TextConditionerConfig
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.training.cpu import tune_allocator
from snapgen_model.training.data import CachedData
from snapgen_model.training.ema import ModuleEMA, decay_for_run
from snapgen_model.training.feed import DataFeed, as_sources, summed_stats
from snapgen_model.training.stages import StageConfig, stage_configs
from snapgen_model.training.state import load_state, save_state
from snapgen_model.training.stream import StreamData

if TYPE_CHECKING:
    from snapgen_model.training.distill_steps import StepDistillConfig


log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig(ConfigBase):
    """Optimisation, distillation and runtime settings of the pretraining stage."""

    steps: int = 1000  # total optimiser steps (with `stages`: their sum)
    batch_size: int = 32  # global batch (split over ranks); with `stages`, each stage has its own
    lr: float = 1e-3  # peak AdamW learning rate (SnapGen++: Adam 1e-4 at scale)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 50  # linear LR warm-up
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    grad_clip: float = 1.0  # gradient-norm clipping (0 = off)
    # EMA decay of the saved student (UNet + conditioner together); 0 = tied to the run length,
    # `decay_for_run(steps)` (a window of ~10% of the run); either way with the warm-up (1 + s) / (10 + s)
    ema_decay: float = 0.0
    mode: Literal["cached", "online"] = "cached"  # cached teacher targets, or the teacher run online
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)  # distillation terms
    encoder_dropout: float = 0.1  # per-encoder condition dropout probability (SPEC 3)
    label_dropout: float = 0.1  # class-conditional students: probability a label is replaced by the null label (CFG)
    seed: int = 0  # seeds init, batches and every per-step draw
    checkpoint_every: int = 100  # steps between full-state checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # retention: the newest full states kept, locally and in storage (uploads)
    max_nonfinite: int = 5  # consecutive non-finite losses tolerated (skipped) before stopping
    precision: Literal["32-true", "bf16-mixed"] = "32-true"  # bf16 autocast (GPU, and CPU: bench/student_speed.py)
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = "auto"  # Lightning strategy
    devices: int = 1  # devices per node
    num_nodes: int = 1  # nodes
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    compile: bool = False  # torch.compile the student, and the online teacher (mode=online)
    # start from a trained student instead of random weights: a student folder, file://..., or
    # release://<name> (a shipped one, sha256-verified); its EMA UNet and conditioner become the initial
    # weights (raw and EMA). A resumed run loads its saved state instead. "" = random init (SnapGen's)
    init: str = ""
    channels_last: bool = False  # the student's conv weights (and so its activations) in channels_last memory format
    fused_optimizer: bool = False  # AdamW's fused kernel (one pass over all parameters; same update up to rounding)
    log_every: int = 10  # metric logging interval
    sample_every: int = 0  # steps between preview grids, student beside teacher (0 = only at the end)
    # training data: the whole cache in memory (toy scale), or its shards streamed (training/stream.py)
    data: Literal["memory", "stream"] = "memory"
    shuffle_buffer: int = 256  # stream: samples in the shuffle buffer (per rank)
    data_workers: int = 0  # stream: 0 = read in the training process, 1 = a background reader process
    # progressive resolution schedule (training/stages.py): [{steps, batch_size, resolution, cache}, ...];
    # empty = one stage of `steps` x `batch_size` over every bucket of the run cache
    stages: tuple[StageConfig, ...] = ()

    def __post_init__(self) -> None:
        check(self.sample_every >= 0, "pretrain.sample_every", "must be >= 0 (0 = only at the end)")
        check_choice(self.data, "pretrain.data", ("memory", "stream"))
        check(self.shuffle_buffer >= 1, "pretrain.shuffle_buffer", "must be >= 1 (1 = no shuffling)")
        check(self.data_workers in (0, 1), "pretrain.data_workers",
              "must be 0 or 1 (more reader processes would split the stream and change its order)")
        total = sum(s.steps for s in self.stages)
        check(not self.stages or self.steps == total, "pretrain.steps",
              f"must equal the sum of the stage steps ({total}) when pretrain.stages is set")
        check(self.steps >= 1, "pretrain.steps", "must be >= 1")
        check(self.batch_size >= 1, "pretrain.batch_size", "must be >= 1")
        check(self.lr > 0, "pretrain.lr", "must be > 0")
        check(0 <= self.ema_decay < 1, "pretrain.ema_decay", "must be in [0, 1) (0 = tied to the run length)")
        check(0 <= self.encoder_dropout <= 1, "pretrain.encoder_dropout", "must be in [0, 1]")
        check(0 <= self.label_dropout <= 1, "pretrain.label_dropout", "must be in [0, 1]")
        check_choice(self.mode, "pretrain.mode", ("cached", "online"))
        check(self.max_nonfinite >= 0, "pretrain.max_nonfinite", "must be >= 0")
        check(self.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "pretrain.warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "pretrain.min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, "pretrain.grad_clip", "must be >= 0 (0 = off)")
        check(self.checkpoint_every >= 0, "pretrain.checkpoint_every", "must be >= 0 (0 = only at the end)")
        check(self.keep_checkpoints >= 1, "pretrain.keep_checkpoints", "must be >= 1")
        check(self.devices >= 1, "pretrain.devices", "must be >= 1")
        check(not (self.strategy == "fsdp" and self.devices * self.num_nodes < 2), "pretrain.strategy",
              "fsdp shards over several processes: set pretrain.devices (per node) x pretrain.num_nodes >= 2")
        check(not (self.strategy == "fsdp" and self.compile), "pretrain.compile",
              "cannot be combined with strategy=fsdp here (the student is sharded after it would be compiled)")
        check(self.num_nodes >= 1, "pretrain.num_nodes", "must be >= 1")
        check(self.log_every >= 1, "pretrain.log_every", "must be >= 1")
        check(not (self.fused_optimizer and self.precision != "32-true" and self.grad_clip > 0),
              "pretrain.fused_optimizer", f"cannot be combined with precision={self.precision} and gradient clipping "
              "(Lightning's mixed precision clips unscaled gradients; a fused AdamW unscales inside its step): use "
              "precision=32-true or grad_clip=0")


def ema_decay(cfg: PretrainConfig) -> float:
    """The EMA decay of a run: `cfg.ema_decay`, or (0) the one tied to the run length."""
    return cfg.ema_decay or decay_for_run(cfg.steps)


@dataclasses.dataclass
class KDTargets:
    """The KD pair of a step: timesteps, noise, teacher velocity and teacher tokens (None: not used).
    `shared`: the pair is the task term's own fresh pair (online teacher), not a cached one."""

    t: torch.Tensor
    noise: torch.Tensor
    v: torch.Tensor | None
    features: torch.Tensor | None
    shared: bool


def lr_lambda(cfg: PretrainConfig | StepDistillConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class PretrainModule(DataFeed, pl.LightningModule):
    def __init__(self, preset: SnapGenConfig, cfg: PretrainConfig, data, cache_cfg: CacheConfig, *, teacher=None,
                 teacher_dim: int | None = None, start_step: int = 0, resume_position: dict | None = None) -> None:
        """`data`: the whole cache in memory (CachedData or BucketedData, `cfg.data="memory"`) or a
        streamed one (StreamData, `cfg.data="stream"`), or {cache name: data} when stages name other
        caches ("" = the run's cache); `resume_position`: the stream position of the checkpoint."""
        super().__init__()
        if cfg.mode == "online" and teacher is None:
            raise ValueError("pretrain.mode=online needs a teacher")
        self.sources = as_sources(data)
        data = self.sources[""]
        if (cfg.data == "stream") != isinstance(data, StreamData):
            raise ValueError(f"pretrain.data={cfg.data} needs {'a StreamData' if cfg.data == 'stream' else 'a CachedData'}"
                             f" (got {type(data).__name__})")
        self.preset, self.cfg, self.data, self.cache_cfg = preset, cfg, data, cache_cfg
        self.teacher, self.start_step, self.resume_position = teacher, start_step, resume_position
        torch.manual_seed(cfg.seed)
        self.student = SnapGenUNet(preset.unet)
        ref = self.reference_data()
        self.class_cond = preset.unet.conditioning == "class"
        self.class_kd = self._check_class_mode(ref) if self.class_cond else False
        if self.class_cond:  # labels condition the UNet directly (class embedding with a null label for CFG)
            self.conditioner = None
        else:
            dims = {e: (ref.tokens[e].shape[-1], ref.pooled[e].shape[-1] if e in ref.pooled else 0) for e in ref.tokens}
            self.conditioner = TextConditioner(TextConditionerConfig(width=preset.unet.context_dim,
                                                                     pooled_dim=preset.unet.pooled_dim), dims)
        self.feature_name = cfg.kd.teacher_feature or (sorted(ref.features)[-1] if ref.features else "")
        tdim = teacher_dim or (ref.features[self.feature_name].shape[-1] if self.feature_name else 0)
        if not tdim and cfg.mode == "online":  # the online teacher's own tokens
            tdim = int(getattr(teacher, "feature_dim", 0) or 0)
        self.use_feat = (cfg.kd.feature_kd and cfg.kd.combine != "task_only" and bool(tdim)
                         and (self.class_kd or not self.class_cond))
        ch = self.student.feature_channels()[cfg.kd.student_feature]
        self.projector = FeatureProjector(ch, tdim) if self.use_feat else torch.nn.Identity()
        self.kd_levels, self.kd_levels_note, self.kd_levels_warning = self._kd_levels(ref)
        self._check_cached_density(ref)
        self.init_folder = init_student(cfg.init, preset, self.student, self.conditioner) if cfg.init and not start_step else None
        # one EMA over every module of the saved student (not the projector: training only); the copies are
        # registered (ema_models) so they follow the module's device and are part of the training state
        self.ema = ModuleEMA(self.student_modules(), ema_decay(cfg))
        self.ema_models = torch.nn.ModuleDict(self.ema.copies)
        self.objective = DistillationObjective(cfg.kd, preset.flow)  # a_t from the run's own timestep density
        self.task_loss, self.out_loss, self.feat_loss = TaskLoss(), OutputKDLoss(), FeatureKDLoss()
        self.nonfinite_total, self.nonfinite_run = 0, 0
        self._t0: tuple[float, int] | None = None
        self.setup_plan(stage_configs(cfg.stages, cfg.steps, cfg.batch_size), preset.latent.downsample)

    def _check_class_mode(self, ref: CachedData) -> bool:
        """Class-conditional student: labels must be cached; returns whether KD targets apply (the
        cached targets are class-conditional), logging the choice."""
        if self.cfg.mode == "online":
            raise ValueError("pretrain.mode=online: the online teacher is text-conditioned; a class-conditional "
                             "student (unet.conditioning=class) trains on cached latents (mode=cached)")
        if ref.labels is None:
            raise ValueError("class-conditional training (unet.conditioning=class) needs class labels in the cache "
                             "(label.npy per sample, cached from the dataset's `cls` labels); this cache has none")
        targets = ref.targets
        kd = targets > 0 and self.cache_cfg.target_condition == "class" and self.cfg.kd.combine != "task_only"
        if kd:
            self.kd_note = (f"class-conditional training: KD from {targets} cached class-conditional teacher targets "
                            f"per sample (kd.combine={self.cfg.kd.combine}) + the task loss, label dropout "
                            f"{self.cfg.label_dropout:.2f}")
            log.info(self.kd_note)
        else:
            why = ("the cache holds no teacher targets" if not targets else
                   f"the cached teacher targets are {self.cache_cfg.target_condition}-conditioned "
                   "(cache.target_condition), not class-conditional" if self.cache_cfg.target_condition != "class"
                   else "kd.combine=task_only")
            self.kd_note = (f"class-conditional training: task loss only, no KD terms ({why}); label dropout "
                            f"{self.cfg.label_dropout:.2f}")
            log.warning(self.kd_note)
        return kd

    def _check_cached_density(self, ref: CachedData) -> None:
        """KD from cached pairs needs them drawn from the run's own timestep density: the task term draws
        its t from `preset.flow` and the scaling a_t divides by that density, so pairs from another one
        would weight every KD term wrongly without a sign. Refused with both densities named."""
        if self.cfg.mode == "online" or not ref.targets or self.kd_levels == "none":
            return
        if self.cache_cfg.flow != self.preset.flow:
            raise ValueError(f"pretrain: the cache's (t, noise) pairs were drawn from {self.cache_cfg.flow} (cache.flow), "
                             f"but the student preset trains on {self.preset.flow} (its flow): re-cache with the "
                             "preset's flow (the pipeline sets it; by hand: cache.flow.shift=...), or train with "
                             "pretrain.mode=online, or kd.combine=task_only")

    kd_note: str = ""  # how a class-conditional student is trained (logged; in the fit result)

    def _kd_active(self) -> bool:
        return self.cfg.kd.combine != "task_only" and (self.class_kd or not self.class_cond)

    def _kd_levels(self, ref: CachedData) -> tuple[str, str, bool]:
        """("output" | "feature" | "output+feature" | "none", the sentence saying why, whether fewer levels
        run than were asked for), logged once: a run whose feature KD was asked for but cannot run (no
        cached teacher features) says so in a warning."""
        kd = self.cfg.kd
        targets = self.cfg.mode == "online" or ref.targets > 0
        active = self._kd_active() and targets
        out, feat = active and kd.output_kd, active and self.use_feat
        levels = "+".join(name for name, on in (("output", out), ("feature", feat)) if on) or "none"
        source = ("the online teacher" if self.cfg.mode == "online" else
                  f"{ref.targets} cached teacher (t, noise) pairs per sample, one drawn per sample and step; the task "
                  "term on a fresh (t, noise)")
        warn = False
        if not self._kd_active():
            why = f"kd.combine={kd.combine}" if kd.combine == "task_only" else "the targets are not class-conditional"
            note = f"KD levels: none ({why}); task loss only"
        elif not targets:
            note, warn = "KD levels: none (the cache holds no teacher targets: cache.targets_per_sample=0); task loss only", True
        elif kd.feature_kd and not feat:
            note, warn = (f"KD levels: {levels} (feature KD requested, kd.feature_kd=true, but the cache holds no teacher "
                          "features: cache with cache.store_features=true for multi-level KD); KD from " + source), True
        else:
            off = [] if kd.feature_kd else ["feature KD off: kd.feature_kd=false"]
            off += [] if kd.output_kd else ["output KD off: kd.output_kd=false"]
            note = f"KD levels: {levels}{' (' + '; '.join(off) + ')' if off else ''}; KD from {source}"
        (log.warning if warn else log.info)(note)
        return levels, note, warn

    def student_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules the saved student is made of (the EMA averages exactly these)."""
        modules = {"student": self.student, "conditioner": self.conditioner}
        return {k: m for k, m in modules.items() if m is not None}

    @property
    def ema_unet(self) -> torch.nn.Module:
        return self.ema["student"]

    @property
    def ema_conditioner(self) -> torch.nn.Module | None:
        return self.ema.copies.get("conditioner")

    def preview_modules(self) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        """(UNet, conditioner) a preview renders: the EMA pair, as saved. Collective in a sharded run
        (`student_parts`: the pair on rank 0, (None, None) on the other ranks)."""
        if not self._sharded:
            return self.ema_unet, self.ema_conditioner
        parts = self.student_parts()
        return parts["ema_unet"], parts["ema_conditioner"]

    def current_step(self) -> int:
        return self.start_step + self.global_step

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(("ema_models.", "teacher."))]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                fused=True if self.cfg.fused_optimizer else None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 7919 + step * 104_729 + self.global_rank)

    def _kd_targets(self, b: CachedData, latent: torch.Tensor, g: torch.Generator, t: torch.Tensor,
                    noise: torch.Tensor, cond_teacher: dict | None) -> KDTargets | None:
        """The KD pair of the batch `b` (None: no KD this run). Cached: pair k ~ U{0..K-1} per sample
        (from `g`); online: the teacher on the task term's fresh (t, noise)."""
        if self.kd_levels == "none":
            return None
        n = len(b)
        if self.cfg.mode == "cached":
            if not b.targets:
                return None
            if b.t is None or b.v is None:
                raise RuntimeError("cached KD: the batch has cached timesteps but no velocity targets")
            k = torch.randint(b.targets, (n,), generator=g)
            rows = torch.arange(n)
            pairs = [draw_pair(key, int(kk), latent.shape[1:], self.cache_cfg) for key, kk in zip(b.keys, k)]
            feats = b.features[self.feature_name][rows, k] if self.use_feat else None
            return KDTargets(b.t[rows, k], torch.stack([p[1] for p in pairs]), b.v[rows, k], feats, shared=False)
        if cond_teacher is None:
            raise RuntimeError("online KD: training_step built no teacher condition for this batch")
        with torch.no_grad():
            out = self.teacher(interpolate(latent, noise, t), t, cond_teacher["context"], cond_teacher["pooled"])
        feats = out.features.get(self.feature_name or next(iter(out.features))) if self.use_feat else None
        return KDTargets(t, noise, out.velocity, feats, shared=True)

    @staticmethod
    def _encoded(b: CachedData) -> dict[str, Encoded]:
        return {e: Encoded(b.tokens[e], b.pooled.get(e), b.mask[e]) for e in b.tokens}

    def _condition(self, b: CachedData, encoded: dict[str, Encoded], g: torch.Generator):
        """(UNet condition kwargs, (B,) bool: condition dropped). Text: per-encoder dropout (SPEC 3);
        class: each label replaced by the null label (num_classes) with probability label_dropout."""
        if self.class_cond:
            num = self.preset.unet.num_classes
            labels = b.labels
            if labels is None:
                raise ValueError("class-conditional training: a batch without class labels (label.npy)")
            if labels.min() < 0 or labels.max() >= num:
                raise ValueError(f"class labels out of range [0, {num}) in this batch (min {int(labels.min())}, "
                                 f"max {int(labels.max())}): set unet.num_classes to the dataset's class count")
            drop = torch.rand(len(b), generator=g) < self.cfg.label_dropout
            return {"labels": torch.where(drop, num, labels).to(self.device)}, drop
        if self.conditioner is None:
            raise RuntimeError("text conditioning: the module was built without a text conditioner")
        drop = self.conditioner.sample_drop(len(b), {e: self.cfg.encoder_dropout for e in encoded}, g)
        cond = self.conditioner({e: Encoded(x.tokens.to(self.device), None if x.pooled is None else x.pooled.to(self.device),
                                            x.mask) for e, x in encoded.items()}, drop)
        return cond, drop.any(1)

    def project(self, feat: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Student feature map (B, C, h, w) onto the teacher's token grid (B, T, D). A non-square
        bucket's grid keeps the feature map's aspect (FeatureProjector handles square grids)."""
        n = tokens.shape[1]
        if math.isqrt(n) ** 2 == n and feat.shape[-1] == feat.shape[-2]:
            return self.projector(feat, n)
        gh = max(1, round(math.sqrt(n * feat.shape[-2] / feat.shape[-1])))
        if n % gh:
            raise ValueError(f"feature KD: {n} teacher tokens do not form a grid of the student map's aspect "
                             f"{tuple(feat.shape[-2:])}")
        h = torch.nn.functional.adaptive_avg_pool2d(self.projector.proj(feat), (gh, n // gh))
        return h.flatten(2).transpose(1, 2)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        step, b = int(batch["step"]), self.batch_data(batch)
        if self.stage_changed(batch):
            self._t0 = None  # step time across a stage switch compares different batch sizes
        g = self._generator(step)
        latent = b.latent.to(self.device)
        encoded = self._encoded(b)
        teacher_cond = None
        if self.cfg.mode == "online" and self.kd_levels != "none":
            teacher_cond = self.teacher_condition(encoded)
        n = len(b)
        # the task term's fresh (t, noise), then the KD pair, then the condition dropout (all from g)
        t = sample_timesteps(n, self.preset.flow, g).to(self.device)
        noise = torch.randn(latent.shape, generator=g).to(self.device)
        kd = self._kd_targets(b, latent, g, t, noise, teacher_cond)
        cond, dropped = self._condition(b, encoded, g)
        x_t = interpolate(latent, noise, t)
        kd_extra = {}
        if kd is None or kd.shared:  # one forward: the task term (and the online teacher's KD) on the fresh pair
            v, feats = self.student(x_t, t, **cond, return_features=True)
            v_kd, feats_kd = v, feats
        else:  # the cached KD pair and the fresh task pair in one batched forward, rows [KD; task]
            t_kd, noise_kd = kd.t.to(self.device), kd.noise.to(self.device)
            both = {k: torch.cat([c, c]) for k, c in cond.items()}
            v2, feats2 = self.student(torch.cat([interpolate(latent, noise_kd, t_kd), x_t]), torch.cat([t_kd, t]),
                                      **both, return_features=True)
            v_kd, v = v2[:n], v2[n:]
            feats_kd = {k: f[:n] for k, f in feats2.items()}
            kd_extra = {"t_task": t, "task_at_kd": self.task_loss(v_kd, noise_kd - latent).detach()}
        terms = {"task": self.task_loss(v, noise - latent)}
        if kd is not None and self.cfg.kd.output_kd and kd.v is not None:
            terms["out"] = self.out_loss(v_kd, kd.v.to(self.device))
        if kd is not None and self.use_feat and kd.features is not None:
            proj = self.project(feats_kd[self.cfg.kd.student_feature], kd.features)
            terms["feat"] = self.feat_loss(proj, kd.features.to(self.device))
        t_kd = t if kd is None or kd.shared else kd.t.to(self.device)
        loss, logs = self.objective(terms, t_kd, mask=~dropped.to(self.device), **kd_extra)
        if "task_at_kd" in kd_extra:
            logs["loss/task_at_kd_pair"] = kd_extra["task_at_kd"].mean()
        if not torch.isfinite(loss):
            return self._skip_nonfinite(step)
        self.nonfinite_run = 0
        if step % self.cfg.log_every == 0:
            self._log(step, loss, logs, len(b))
        return loss

    def teacher_condition(self, encoded: dict[str, Encoded]) -> dict[str, torch.Tensor]:
        """The online teacher's condition, built exactly as the caching stage builds it (every text
        encoder the teacher uses: its CLIPs, and the T5 appended on the sequence when it has one)."""
        from snapgen_model.distill.cache import teacher_condition

        encoded = {e: Encoded(x.tokens.to(self.device), None if x.pooled is None else x.pooled.to(self.device),
                              x.mask.to(self.device)) for e, x in encoded.items()}
        return teacher_condition(encoded, self.cache_cfg, self.teacher.transformer.config.joint_attention_dim)

    def _skip_nonfinite(self, step: int):
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        if self.nonfinite_run > self.cfg.max_nonfinite:
            raise NonFiniteLossError(f"step {step}: {self.nonfinite_run} consecutive non-finite losses "
                                     f"(limit pretrain.max_nonfinite={self.cfg.max_nonfinite}); last checkpoint is usable")
        return None  # Lightning skips the optimiser step

    def _log(self, step: int, loss: torch.Tensor, logs: dict, batch: int) -> None:
        now = time.perf_counter()
        metrics = {"loss/total": loss.detach(), **logs, "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                   "nonfinite/total": float(self.nonfinite_total), "data/stage": float(self._stage or 0)}
        if self._t0 is not None:
            dt = (now - self._t0[0]) / max(1, step - self._t0[1])
            metrics |= {"perf/step_time_s": dt, "perf/images_per_s": batch * self.trainer.world_size / dt}
        self._t0 = (now, step)
        self.log_dict({k: float(v) for k, v in metrics.items()}, on_step=True, batch_size=batch)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA update, before any callback sees the step (checkpoints
        taken in on_train_batch_end must include this step's EMA)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_ema()

    def update_ema(self) -> None:
        self.ema.update(self.current_step())

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Everything a full-state checkpoint holds: raw modules, their EMA copies ("ema/<name>.*"), the projector."""
        # the compiled student's own module: its keys without torch.compile's "_orig_mod." prefix, so a state
        # resumes with or without compile (the state is loaded before the student is compiled)
        modules = {"student": getattr(self.student, "_orig_mod", self.student), "ema": self.ema_models,
                   "conditioner": self.conditioner, "projector": self.projector}
        return {k: m for k, m in modules.items() if m is not None}

    @property
    def sharded(self) -> bool:
        """Whether this run shards its modules over the ranks (`strategy=fsdp`, after `configure_model`)."""
        return self._sharded

    _sharded = False
    _gathered: tuple[dict[str, dict], dict] | None = None

    def configure_model(self) -> None:
        """Lightning hook, run on every rank before the optimiser is built: with `strategy=fsdp`, shard the
        trained modules and their EMA copies over the data-parallel mesh (training/fsdp.py); else nothing."""
        if self.cfg.strategy != "fsdp" or self._sharded:
            return
        from snapgen_model.training.fsdp import shard_pretraining

        shard_pretraining(self.student, self.conditioner, self.projector, self.ema.copies,
                          self.device_mesh["data_parallel"])
        self._sharded = True

    def before_state_save(self, trainer) -> None:
        """Collective, before global rank 0 writes a checkpoint: the stream position of every rank, and in
        a sharded run the full module and optimiser states (gathered onto rank 0)."""
        super().before_state_save(trainer)
        if self._sharded:
            from snapgen_model.training.fsdp import full_module_state, full_optimizer_state

            modules = {name: full_module_state(m) for name, m in self.trainable_modules().items()}
            self._gathered = (modules, full_optimizer_state(self, trainer.optimizers[0]))

    def save_training_state(self, folder, trainer) -> Any:
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        modules: dict[str, Any] = dict(self.trainable_modules())
        optimizer: Any = trainer.optimizers[0]
        if self._sharded:
            if self._gathered is None:
                raise RuntimeError("sharded checkpoint: before_state_save did not gather the states on every rank")
            (modules, optimizer), self._gathered = self._gathered, None
        return save_state(folder, modules=modules, optimizer=optimizer, scheduler=sched,
                          step=self.current_step(), extra={"nonfinite_total": self.nonfinite_total,
                                                           "preset": self.preset.to_dict(), "pretrain": self.cfg.to_dict(),
                                                           "data_position": self.data_position()})

    def restore(self, folder) -> None:
        """Called from on_train_start when resuming: modules, optimiser, scheduler, RNG, counters (a
        sharded run loads the full state onto its shards)."""
        trainer = self.trainer
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        loaders: dict[str, Any] = {}
        if self._sharded:
            from snapgen_model.training.fsdp import load_module_state, load_optimizer_state

            loaders = {"load_module": load_module_state,
                       "load_optimizer": lambda opt, state: load_optimizer_state(self, opt, state)}
        meta = load_state(folder, modules=self.trainable_modules(), optimizer=trainer.optimizers[0], scheduler=sched,
                          **loaders)
        self.nonfinite_total = meta.get("nonfinite_total", 0)

    def student_parts(self) -> dict[str, torch.nn.Module | None]:
        """The saved student's modules as plain (unsharded, uncompiled) modules: {"ema_unet", "ema_conditioner",
        "raw_unet", "raw_conditioner"}. Collective in a sharded run (every rank calls it; the modules are
        rebuilt from the gathered weights on rank 0, None elsewhere)."""
        raw_unet = getattr(self.student, "_orig_mod", self.student)  # (torch.compile)
        parts = {"ema_unet": self.ema_unet, "ema_conditioner": self.ema_conditioner, "raw_unet": raw_unet,
                 "raw_conditioner": self.conditioner}
        if not self._sharded:
            return parts
        from snapgen_model.training.fsdp import full_module_state

        states = {name: full_module_state(m) if m is not None else None for name, m in parts.items()}
        if self.global_rank != 0:
            return dict.fromkeys(parts)
        out: dict[str, torch.nn.Module | None] = {}
        cond = self.conditioner
        for name, state in states.items():
            if state is None:
                out[name] = None
                continue
            if name.endswith("unet"):
                fresh: torch.nn.Module = SnapGenUNet(self.preset.unet)
            elif isinstance(cond, TextConditioner):
                fresh = TextConditioner(cond.cfg, cond.encoder_dims())
            else:
                raise RuntimeError(f"student_parts: {name} has weights but the module has no text conditioner")
            fresh.load_state_dict(state, strict=True)
            out[name] = fresh.eval() if name.startswith("ema") else fresh
        return out

    resume_from: Any = None

    def on_train_start(self) -> None:
        if self.resume_from is not None:
            self.restore(self.resume_from)



def fit(preset: SnapGenConfig, cfg: PretrainConfig, data, cache_cfg: CacheConfig, state_root, *,
        teacher=None, loggers=None, upload=None, resume: str = "latest", callbacks=(),
        progress_bar: bool = False) -> dict[str, Any]:
    """Train (or resume) to `cfg.steps`; returns {"step", "state", "resumed_from", "nonfinite_total"}.
    A SIGTERM saves the state and raises `training.state.TrainingInterrupted` (the next call resumes)."""
    from pathlib import Path

    from snapgen_model.training.state import StateCheckpoint, latest_state, read_state_meta

    root = Path(state_root)
    start_path = latest_state(root) if resume == "latest" else (Path(resume) if resume not in ("none", "") else None)
    meta = read_state_meta(start_path) if start_path else {}
    start = int(meta.get("step", 0))
    module = PretrainModule(preset, cfg, data, cache_cfg, teacher=teacher, start_step=start,
                            resume_position=meta.get("data_position"))
    if start >= cfg.steps:  # finished before: the trained weights, nothing to train
        if start_path is None:
            raise RuntimeError("pretrain: a finished run needs its saved state (pretrain.steps must be >= 1)")
        load_state(start_path, modules=module.trainable_modules())
        if module.streaming and module.resume_position:
            module.data.skipped = summed_stats(module.resume_position["ranks"])
        return {"step": start, "state": str(start_path), "resumed_from": str(start_path), "nonfinite_total": None,
                "module": module, "data_skipped": module.data_skipped(), "kd_note": module.kd_note,
                "kd_levels": module.kd_levels, "kd_levels_note": module.kd_levels_note,
                "kd_levels_warning": module.kd_levels_warning}
    module.resume_from = start_path
    ckpt = StateCheckpoint(root, cfg.checkpoint_every, cfg.keep_checkpoints, upload=upload)
    trainer = pl.Trainer(
        max_steps=cfg.steps - start, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=lightning_strategy(cfg), precision=cfg.precision, logger=loggers or False, callbacks=[ckpt, *callbacks],
        enable_checkpointing=False, gradient_clip_val=cfg.grad_clip or None, enable_progress_bar=progress_bar,
        enable_model_summary=False, use_distributed_sampler=False, log_every_n_steps=cfg.log_every,
    )
    if cfg.accelerator == "cpu" or not torch.cuda.is_available():
        tune_allocator()  # keep freed heap memory for the next step (training/cpu.py): speed only
    if cfg.channels_last:
        module.student = module.student.to(memory_format=torch.channels_last)
    if cfg.compile:
        module.student = torch.compile(module.student)
        if module.teacher is not None:  # the online teacher's forward too (no grad): a fifth of an online step
            module.teacher = torch.compile(module.teacher)
    trainer.fit(module)
    ckpt.raise_if_interrupted("pretrain", module.current_step(), cfg.steps)  # SIGTERM: stop, do not save a student
    if cfg.channels_last:  # saved weights in the standard layout (safetensors stores contiguous tensors)
        module.student.to(memory_format=torch.contiguous_format)
    final = latest_state(root)
    return {"step": module.current_step(), "state": str(final) if final else None,
            "resumed_from": str(start_path) if start_path else None, "nonfinite_total": module.nonfinite_total,
            "sharded": module.sharded,
            "module": module, "data_skipped": module.data_skipped(), "kd_note": module.kd_note,
            "kd_levels": module.kd_levels, "kd_levels_note": module.kd_levels_note,
            "kd_levels_warning": module.kd_levels_warning}


def init_student(uri: str, preset: SnapGenConfig, unet: torch.nn.Module, conditioner: torch.nn.Module | None):
    """Load the EMA weights of the student at `uri` (a local folder, file://..., or release://<name>) into
    `unet` and `conditioner` (`pretrain.init`); returns the folder. A ValueError names the init and what
    does not fit: a missing folder, another architecture (the preset fields that differ), text encoders of
    other names or widths (the conditioner's weights do not fit)."""
    from pathlib import Path

    from snapgen_model.artifacts import student as st
    from snapgen_model.storage.checkpoint import CheckpointError, load_weights, read_preset
    from snapgen_model.training.release import is_release_uri, release_folder

    where = f"pretrain.init={uri}"
    if "://" in uri and not uri.startswith(("file://", "release://")):
        raise ValueError(f"{where}: only a local folder, file:// or release:// can be loaded here (the task layer "
                         "downloads other storage first)")
    folder = release_folder(uri) if is_release_uri(uri) else Path(uri.removeprefix("file://"))
    if not (folder / st.UNET).is_file():
        raise ValueError(f"{where}: {folder / st.UNET} does not exist (a student folder holds {st.UNET}, "
                         f"{st.CONDITIONER} and {st.CARD})")
    saved = read_preset(folder / st.UNET)
    try:
        load_weights(unet, folder / st.UNET)
        if conditioner is not None:
            if not (folder / st.CONDITIONER).is_file():
                raise CheckpointError(f"{folder / st.CONDITIONER} does not exist: a class-conditional student cannot "
                                      "start a text-conditioned run")
            load_weights(conditioner, folder / st.CONDITIONER)
    except CheckpointError as exc:
        differs = ([f"unet.{k}: {v} here, {saved.unet.to_dict()[k]} there" for k, v in preset.unet.to_dict().items()
                    if saved is not None and saved.unet.to_dict().get(k) != v] if saved is not None else [])
        raise ValueError(f"{where}: its weights do not fit this run's student "
                         f"({'; '.join(differs[:4]) or 'same UNet preset: the text encoders differ'}): {exc}") from exc
    log.info("pretrain: starting from the student at %s (its EMA UNet and conditioner)", uri)
    return folder


def lightning_strategy(cfg: PretrainConfig) -> Any:
    """The Lightning strategy of `cfg.strategy`: "fsdp" is torch FSDP2 through `ModelParallelStrategy` on a
    data-parallel mesh of every rank (GPU with NCCL, CPU with gloo; `PretrainModule.configure_model` shards);
    the other names are Lightning's own."""
    if cfg.strategy != "fsdp":
        return cfg.strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=cfg.devices * cfg.num_nodes, tensor_parallel_size=1,
                                 save_distributed_checkpoint=False)


def online_teacher(cfg: PretrainConfig, bundle_folder, feature_layers=(-1,)):
    """The frozen teacher an online run needs (`cfg.mode == "online"`), loaded from the local bundle
    folder the cache was made with (capturing `feature_layers`, as the cache's manifest names them);
    None for a cached run. A missing folder is named, not a deep load error."""
    from pathlib import Path

    from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig

    if cfg.mode != "online":
        return None
    if not bundle_folder or not Path(bundle_folder).is_dir():
        raise ValueError(f"pretrain.mode=online runs the teacher each step, and its bundle folder {bundle_folder!r} "
                         "does not exist: cache with a teacher bundle (the cache manifest's bundle_uri), or use "
                         "pretrain.mode=cached")
    return SD3Teacher.from_pretrained(TeacherConfig(path=str(bundle_folder), feature_layers=tuple(feature_layers)))


def save_student(module: PretrainModule, folder, parts: dict[str, torch.nn.Module | None] | None = None
                 ) -> dict[str, str]:
    """The trained student for evaluation and export (`artifacts.student`): the EMA UNet (preset in its
    metadata) with the EMA text conditioner (one EMA over both), and beside them the raw (last-step) pair.
    `parts`: `module.student_parts()` when the caller gathered them (a sharded run: collectively, before
    rank 0 saves)."""
    from snapgen_model.artifacts.student import save_student as save_folder

    parts = parts if parts is not None else module.student_parts()
    ema_unet = parts["ema_unet"]
    if ema_unet is None:
        raise RuntimeError("save_student: no gathered weights on this rank (a sharded run saves on global rank 0)")
    return save_folder(folder, module.preset, ema_unet, parts["ema_conditioner"], raw_unet=parts["raw_unet"],
                       raw_conditioner=parts["raw_conditioner"])
