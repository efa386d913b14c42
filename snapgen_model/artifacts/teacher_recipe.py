"""Configuration of the toy teacher bootstrap (DESIGN.md "One code path, two scales"; TOY_CALIBRATION.md).

One typed config holds the shapes world, the toy autoencoder (diffusers `AutoencoderKL`), the toy
teacher (diffusers `SD3Transformer2DModel`), its jointly trained tiny CLIP text encoder, the
training budgets and the evaluation sampling settings. `BOOTSTRAP_PRESETS` names the sizes:

| preset    | use                               | world      | AE steps / budget | teacher          | budget  |
|-----------|-----------------------------------|------------|-------------------|------------------|---------|
| toy-smoke | tests: seconds, losses fall       | 32 px      | 40                | 2 x (2x16), 81k  | 40 steps|
| toy       | CPU demo: proves the mechanics    | 64 px      | 600 / 300 s cap   | 6 x (4x32), 3.5M | 240 s   |
| toy-gpu   | one GPU: proves quality (>= 0.6)  | 64 px      | 3000 / 45 s       | 6 x (4x64), 14M  | 240 s   |
| toy-release | the shipped teacher (2 CPU cores) | 64 px    | 1500 / 900 s cap  | 6 x (4x32), 3.8M | 11000 x 256 bf16, 8400 s cap |

A budget of 0 s means "no time limit" (the step count alone stops training; tests rely on it for
bit-for-bit reproducible runs). The config hash (`content_hash`) keys the bootstrap cache.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, cast

from snapgen_model.config_base import ConfigBase, ConfigError, check, check_choice
from snapgen_model.data.shapes import ShapesWorldConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyBootstrapConfig(ConfigBase):
    """World, model sizes, budgets and evaluation of one toy teacher bootstrap; validated at construction."""

    name: str = "toy"  # preset name (recorded in bundle.json; part of the hash)
    recipe_version: int = 4  # bumped whenever the training code changes what a config produces (cache key)
    # --- shapes world (snapgen_model.data.shapes.ShapesWorldConfig)
    resolution: int = 64  # image side in pixels
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # shape classes of the world
    colours: tuple[str, ...] = ("red", "yellow", "green", "blue", "white")  # colour names of the world
    # (min, max) object side in pixels (typed `...`: ConfigBase.coerce mishandles fixed-length tuples)
    object_size_px: tuple[int, ...] = (14, 22)
    max_objects: int = 4  # most objects per scene (1-4)
    # (colour, shape) pairs the teacher never sees (images or captions); the AE, a generic codec, does
    held_out_pairs: tuple[tuple[str, ...], ...] = (("yellow", "triangle"),)
    world_seed: int = 0  # seed of the world's scenes
    pool_size: int = 8192  # scenes rendered once per phase (AE: "all" split, teacher: "train" split)
    # --- autoencoder (diffusers AutoencoderKL; TOY_CALIBRATION: (16, 32, 64), f=4, 16 latent channels)
    ae_channels: tuple[int, ...] = (16, 32, 64)  # block_out_channels; downsampling f = 2^(len - 1)
    ae_layers_per_block: int = 1  # ResNet layers per encoder/decoder block
    ae_latent_channels: int = 16  # latent channels (SD3 has 16)
    ae_norm_groups: int = 8  # GroupNorm groups (must divide every channel count)
    ae_mid_attention: bool = False  # self-attention in the mid blocks (TOY_CALIBRATION's 0.67M AE has none)
    ae_steps: int = 600  # most optimiser steps (the toy AE is step-limited: reproducible under CPU contention)
    ae_batch: int = 16  # images per step
    ae_lr: float = 3e-3  # AdamW peak learning rate
    ae_kl_weight: float = 1e-5  # weight of the KL term beside L1 + MSE
    ae_sample_posterior: bool = False  # decode a posterior sample (True) or the mean (False; better in few steps)
    ae_time_budget_s: float = 300.0  # wall-clock safety cap of AE training (0 = none)
    # --- teacher (diffusers SD3Transformer2DModel over the AE latents)
    patch_size: int = 2  # latent patch side: (latent side / patch)^2 image tokens
    teacher_layers: int = 6  # joint transformer blocks
    teacher_heads: int = 4  # attention heads
    teacher_head_dim: int = 32  # width per head; inner width = heads x head_dim = caption projection
    joint_dim: int = 128  # joint_attention_dim: text token width the context embedder takes (>= text_hidden)
    pooled_dim: int = 128  # pooled_projection_dim (= the text encoder's projection width)
    qk_norm: Literal["none", "rms_norm"] = "none"  # query/key normalisation (SD3.5 uses rms_norm)
    # --- text encoder (tiny CLIPTextModelWithProjection, word-level tokenizer of the world's vocabulary)
    text_hidden: int = 128  # hidden width
    text_layers: int = 2  # transformer layers
    text_heads: int = 4  # attention heads
    text_max_length: int = 16  # tokens incl. <bos>/<eos>; every caption of the world must fit
    # --- teacher training (flow matching, SNAPGEN_SPEC.md section 4)
    teacher_steps: int = 5000  # most optimiser steps
    teacher_batch: int = 64  # latents per step
    teacher_lr: float = 1e-3  # AdamW peak learning rate (transformer and text encoder)
    teacher_warmup_steps: int = 100  # linear warm-up steps, then cosine decay to 10% over the run
    teacher_weight_decay: float = 0.01  # AdamW weight decay
    teacher_grad_clip: float = 1.0  # gradient-norm clip (0 = off)
    teacher_time_budget_s: float = 240.0  # wall-clock limit of teacher training (0 = none)
    cfg_dropout: float = 0.1  # probability of training on the empty caption (the CFG null condition)
    logit_mean: float = 0.0  # logit-normal timestep mean
    logit_std: float = 1.0  # logit-normal timestep std
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 autocast of transformer + text encoder (CUDA and CPU)
    teacher_zero_init: bool = True  # adaLN-Zero: zero adaLN modulation, norm_out and proj_out at init (DiT)
    teacher_ema: bool = True  # ship the EMA of transformer + text encoder (one EMA over both)
    teacher_ema_decay: float = 0.0  # EMA decay; 0 = a window of 10% of teacher_steps (ema.decay_for_run)
    checkpoint_every: int = 500  # teacher steps between resumable checkpoints (0 = only at the end)
    seed: int = 0  # seeds initialisation, batches, noise and timesteps
    log_every: int = 25  # steps between recorded loss points (mean over the interval)
    # --- evaluation sampling (Euler + classifier-free guidance)
    eval_steps: int = 24  # Euler steps
    eval_guidance: float = 4.0  # CFG scale (1 = off)
    eval_prompts_per_task: int = 16  # seen prompts per GenEval task (held-out prompts: half as many)
    eval_images_per_prompt: int = 2  # samples per prompt
    eval_seed: int = 1000  # base seed of the evaluation samples

    def __post_init__(self) -> None:
        self._check_world()
        self._check_models()
        for name in ("ae_steps", "ae_batch", "teacher_steps", "teacher_batch", "log_every", "eval_steps",
                     "eval_images_per_prompt", "pool_size", "eval_prompts_per_task"):
            check(getattr(self, name) >= 1, f"bootstrap.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("ae_lr", "teacher_lr", "logit_std"):
            check(getattr(self, name) > 0, f"bootstrap.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("ae_time_budget_s", "teacher_time_budget_s", "ae_kl_weight", "teacher_grad_clip",
                     "teacher_weight_decay", "teacher_warmup_steps"):
            check(getattr(self, name) >= 0, f"bootstrap.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(0.0 <= self.teacher_ema_decay < 1.0, "bootstrap.teacher_ema_decay",
              f"must be in [0, 1) (0 = tied to the run length), got {self.teacher_ema_decay}")
        check(self.checkpoint_every >= 0 and self.checkpoint_every % self.log_every == 0, "bootstrap.checkpoint_every",
              f"must be >= 0 and a multiple of log_every {self.log_every}, got {self.checkpoint_every}")
        check(0.0 <= self.cfg_dropout < 1.0, "bootstrap.cfg_dropout", f"must be in [0, 1), got {self.cfg_dropout}")
        check(self.eval_guidance >= 1.0, "bootstrap.eval_guidance", f"must be >= 1, got {self.eval_guidance}")
        check_choice(self.mixed_precision, "bootstrap.mixed_precision", ("no", "bf16"))
        check_choice(self.qk_norm, "bootstrap.qk_norm", ("none", "rms_norm"))

    def _check_world(self) -> None:
        check(len(self.object_size_px) == 2, "bootstrap.object_size_px", f"must be (min, max), got {self.object_size_px}")
        try:
            self.world()
        except ValueError as exc:  # ShapesWorldConfig names its field; map it to ours
            raise ConfigError(f"bootstrap world: {exc}") from None
        check(self.pool_size >= self.ae_batch and self.pool_size >= self.teacher_batch, "bootstrap.pool_size",
              f"must hold at least one batch (ae_batch {self.ae_batch}, teacher_batch {self.teacher_batch})")

    def _check_models(self) -> None:
        check(len(self.ae_channels) >= 2, "bootstrap.ae_channels", "needs >= 2 blocks (f = 2^(blocks - 1))")
        check(all(c % self.ae_norm_groups == 0 for c in self.ae_channels), "bootstrap.ae_norm_groups",
              f"{self.ae_norm_groups} must divide every entry of ae_channels {self.ae_channels}")
        check(self.resolution % self.downsample == 0, "bootstrap.ae_channels",
              f"downsampling {self.downsample} must divide the resolution {self.resolution}")
        check(self.latent_size % self.patch_size == 0, "bootstrap.patch_size",
              f"must divide the latent side {self.latent_size}")
        check(self.joint_dim >= self.text_hidden, "bootstrap.joint_dim",
              f"must be >= text_hidden {self.text_hidden} (SD3 zero-pads CLIP tokens to it)")
        check(self.text_hidden % self.text_heads == 0, "bootstrap.text_heads",
              f"must divide text_hidden {self.text_hidden}")
        for name in ("ae_layers_per_block", "ae_latent_channels", "teacher_layers", "teacher_heads",
                     "teacher_head_dim", "pooled_dim", "text_layers", "text_max_length", "patch_size"):
            check(getattr(self, name) >= 1, f"bootstrap.{name}", f"must be >= 1, got {getattr(self, name)}")

    # ------------------------------------------------------------------ derived
    def content_hash(self) -> str:
        """sha256 (16 hex digits) of what decides the trained models: every field except the evaluation
        settings and the checkpoint interval (NOT_TRAINING), so a finished or half-trained run can be
        re-evaluated at another guidance, or checkpointed more often, without retraining."""
        import hashlib
        import json

        keep = {k: v for k, v in self.to_dict().items() if k not in NOT_TRAINING}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def world(self) -> ShapesWorldConfig:
        """The shapes world this bootstrap trains on."""
        # typed `...` here (see the fields); ShapesWorldConfig checks both are pairs
        return ShapesWorldConfig(resolution=self.resolution, shapes=self.shapes, colours=self.colours,
                                 object_size_px=cast(tuple[int, int], self.object_size_px),
                                 max_objects=self.max_objects,
                                 held_out_pairs=cast(tuple[tuple[str, str], ...], self.held_out_pairs),
                                 seed=self.world_seed)

    @property
    def downsample(self) -> int:
        """Autoencoder downsampling factor f."""
        return 2 ** (len(self.ae_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Latent side in pixels (resolution / f)."""
        return self.resolution // self.downsample

    @property
    def inner_dim(self) -> int:
        """Teacher width (= caption_projection_dim, as SD3 requires)."""
        return self.teacher_heads * self.teacher_head_dim


NOT_TRAINING = ("eval_steps", "eval_guidance", "eval_prompts_per_task", "eval_images_per_prompt", "eval_seed",
                "checkpoint_every")  # fields that do not change the trained models (outside content_hash)

_TOY = ToyBootstrapConfig()

BOOTSTRAP_PRESETS: dict[str, ToyBootstrapConfig] = {
    # tests: a 32 px world, tiny models, step-limited (deterministic), seconds on 2 cores
    "toy-smoke": dataclasses.replace(
        _TOY, name="toy-smoke", resolution=32, shapes=("circle", "square"), colours=("red", "green", "blue"),
        object_size_px=(8, 12), max_objects=2, held_out_pairs=(("green", "square"),), pool_size=256,
        ae_channels=(8, 16, 16), ae_steps=40, ae_batch=8, ae_time_budget_s=0.0,
        teacher_layers=2, teacher_heads=2, teacher_head_dim=16, joint_dim=32, pooled_dim=32,
        text_hidden=32, text_layers=1, text_heads=2, text_max_length=16,
        teacher_steps=40, teacher_batch=16, teacher_warmup_steps=5, teacher_time_budget_s=0.0, log_every=5,
        eval_steps=4, eval_guidance=2.0, eval_prompts_per_task=1, eval_images_per_prompt=1),
    # the CPU demo (TOY_CALIBRATION: AE 150 s reaches 0.979; teacher 3.8M at ~0.35 s/step, batch 64)
    "toy": _TOY,
    # one GPU, <= 5 minutes of training: more steps, a wider teacher, bigger batches [U: not yet measured]
    "toy-gpu": dataclasses.replace(
        _TOY, name="toy-gpu", pool_size=50_000, ae_steps=3000, ae_batch=32, ae_time_budget_s=45.0,
        teacher_layers=6, teacher_heads=4, teacher_head_dim=64, joint_dim=256, pooled_dim=256, qk_norm="rms_norm",
        text_hidden=256, text_layers=2, text_heads=4, teacher_steps=40_000, teacher_batch=256, teacher_lr=6e-4,
        teacher_warmup_steps=300, teacher_time_budget_s=240.0, mixed_precision="bf16", log_every=100,
        eval_prompts_per_task=32, eval_images_per_prompt=4),
    # the shipped toy teacher (releases/toy-teacher/v2): a CPU-affordable recipe (2.82M images: ~1.7 h of
    # teacher training on 2 cores at 0.54 s/step with bf16 autocast and the explicit attention form,
    # bench/RESULTS.md "Teacher step on CPU"; capped at 8400 s; resumable every 250 steps), the AE trained
    # to its ceiling, every toy prompt x 4 images scored. Batch 256 at lr 3e-3 is the GPU sweep's choice
    # of 2026-12-04 (bench/gpu_teacher_sweep.json: at equal images it matched batch 128 and beat batch 64,
    # and quality still rose with images seen); v1 was the same recipe at 3000 steps (768k images).
    "toy-release": dataclasses.replace(
        _TOY, name="toy-release", pool_size=50_000, ae_steps=1500, ae_time_budget_s=900.0,
        teacher_steps=11_000, teacher_batch=256, teacher_lr=3e-3, teacher_warmup_steps=200,
        teacher_time_budget_s=8400.0, mixed_precision="bf16", log_every=50, checkpoint_every=250,
        eval_prompts_per_task=1000,
        eval_images_per_prompt=4),
}


def get_bootstrap_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> ToyBootstrapConfig:
    """The named bootstrap preset with `key=value` overrides applied and validated."""
    if preset not in BOOTSTRAP_PRESETS:
        raise ConfigError(f"preset: unknown bootstrap preset {preset!r}; choose one of {list(BOOTSTRAP_PRESETS)}")
    cfg = BOOTSTRAP_PRESETS[preset]
    return cfg.with_overrides(list(overrides)) if overrides else cfg
