"""Toy teacher bootstrap: train the toy world's autoencoder, then its SD3-style teacher (plain PyTorch).

DESIGN.md "One code path, two scales": at toy scale the pipeline trains its own teacher, a tiny
diffusers `AutoencoderKL` (f=4, 16 latent channels; TOY_CALIBRATION.md: f=8 loses the objects) and a
tiny `SD3Transformer2DModel` with a jointly trained tiny CLIP text encoder, on the shapes world. The
bundle is then loaded through the production adapters (`bootstrap_bundle.load_bundle`).

* AE: L1 + MSE + a small KL on a seeded posterior sample; afterwards SD3's latent normalisation
  z = (mean - shift) * scale is fitted (shift = latent mean, scale = 1 / latent std) and stored in
  the VAE config, where `VAEAdapter` reads it.
* Teacher: rectified flow (SNAPGEN_SPEC.md section 4): x_t = (1 - t) x0 + t eps, v = eps - x0,
  t ~ logit-normal; captions replaced by the empty caption with probability `cfg_dropout`, which
  is the classifier-free-guidance null condition at sampling time. Latents of a fixed pool of
  train-split scenes are encoded once; batches are drawn from the pool.

* adaLN-Zero (DiT; edm2 does the same for its outputs): every adaLN modulation, `norm_out` and
  `proj_out` of the SD3 transformer start at zero, so each block starts as the identity and the
  output as zero (diffusers' SD3 blocks are not zero-initialised).
* One EMA (`snapgen_model.training.ema.ModuleEMA`) over the transformer *and* its text encoder, with a
  window tied to the run length; the bundle ships the EMA pair, the checkpoint keeps both.
* Resumable: with a checkpoint folder, the teacher loop writes its whole state (models, EMA,
  optimiser, the batch/noise generator, step, elapsed seconds, loss curve) every `checkpoint_every`
  steps and at the end; a rerun continues from it (bitwise, for a step-limited run), and a finished
  run returns its models without training.

Both loops stop at their step count or their wall-clock budget, whichever comes first, and report
progress through `progress_cb(phase, step, total_steps, info)`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from snapgen_model.config_base import ConfigError
from snapgen_model.configs import FlowMatchingConfig
from snapgen_model.data.shapes import ShapesWorld, enumerate_prompts
from snapgen_model.diffusion.flow import FlowMatchingLoss, sample_timesteps
from snapgen_model.distill.text import Encoded, sd3_teacher_condition
from snapgen_model.distill.vae import VAEAdapter
from snapgen_model.artifacts.teacher_bundle import (  # noqa: F401  (the bundle API, re-exported)
    BUNDLE_FILE, TeacherBundle, autoencoder_roundtrip, evaluate_bundle, evaluation_prompts, load_bundle,
    read_bundle_record, reference_rows, sample_grid, sample_teacher, save_bundle, teacher_diagnostics,
    update_bundle_record)
from snapgen_model.artifacts.teacher_recipe import (  # noqa: F401  (re-exported)
    BOOTSTRAP_PRESETS, ToyBootstrapConfig, get_bootstrap_config)
from snapgen_model.nn.attention import use_fast_attention
from snapgen_model.training.cpu import cpu_has_native_bf16, tune_allocator
from snapgen_model.training.ema import ModuleEMA, decay_for_run

TEACHER_STATE = "teacher_state.pt"  # the teacher loop's checkpoint file inside its checkpoint folder

ProgressFn = Callable[[str, int, int, dict[str, float]], None]
ProbeFn = Callable[[int, dict[str, "TeacherModels"]], None]  # (step, {"raw"|"ema": TeacherModels})


@dataclasses.dataclass
class ScenePool:
    """Train-split scenes rendered once: images and captions."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    captions: list[str]  # N captions (templates and paraphrases)


@dataclasses.dataclass
class TrainResult:
    """What a training phase reports."""

    metrics: dict[str, float | str]  # final figures (steps, seconds, losses, ...)
    curve: list[dict[str, float]]  # {step, elapsed_s, <loss terms>} every `log_every` steps (interval means)


@dataclasses.dataclass
class TeacherModels:
    """The trained teacher and its text encoder."""

    transformer: nn.Module  # diffusers SD3Transformer2DModel
    text_model: nn.Module  # transformers CLIPTextModelWithProjection
    tokenizer: Any  # its word-level PreTrainedTokenizerFast


def render_pool(cfg: ToyBootstrapConfig, world: ShapesWorld | None = None, split: str = "train") -> ScenePool:
    """A fixed training pool: scenes 0..pool_size-1 of `split` (a pure function of the config). The teacher
    trains on the "train" split; the AE on "all", since a codec must also encode the held-out pairs."""
    world = world or ShapesWorld(cfg.world())
    images, scenes = world.batch(range(cfg.pool_size), split)
    return ScenePool(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes])


def _to_unit(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float in [-1, 1] on `device`."""
    return images.to(device).float() / 127.5 - 1.0


class _Budget:
    """Stops a loop at `steps` or after `budget_s` seconds (0 = no limit); progress in [0, 1].
    `offset_s`: seconds already spent by an earlier, resumed part of the same run."""

    def __init__(self, steps: int, budget_s: float, offset_s: float = 0.0) -> None:
        self.steps, self.budget_s, self.start = steps, budget_s, time.monotonic() - offset_s

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, step: int) -> float:
        by_time = self.elapsed / self.budget_s if self.budget_s > 0 else 0.0
        return min(1.0, max(step / self.steps, by_time))

    def done(self, step: int) -> bool:
        return step >= self.steps or (self.budget_s > 0 and self.elapsed >= self.budget_s)


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


class _Curve:
    """Interval means of named loss terms, recorded every `every` steps. Terms stay tensors between
    records (no device sync per step); a non-finite interval mean stops training with a clear error."""

    def __init__(self, phase: str, every: int) -> None:
        self.phase, self.every = phase, every
        self.points: list[dict[str, float]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._n = 0

    def add(self, step: int, elapsed: float, terms: dict[str, torch.Tensor], force: bool = False) -> dict[str, float] | None:
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + v.detach().float()
        self._n += 1
        if not force and step % self.every != 0:
            return None
        means = {k: float(s) / self._n for k, s in self._sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(f"{self.phase} loss is not finite by step {step} ({means}): lower the learning rate")
        point = {"step": step, "elapsed_s": round(elapsed, 2)} | means
        self.points.append(point)
        self._sums, self._n = {}, 0
        return point


# ----------------------------------------------------------------------------- autoencoder

def build_autoencoder(cfg: ToyBootstrapConfig) -> nn.Module:
    """A randomly initialised diffusers AutoencoderKL of the config's size."""
    from diffusers import AutoencoderKL

    blocks = len(cfg.ae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=cfg.ae_channels,
                         layers_per_block=cfg.ae_layers_per_block, latent_channels=cfg.ae_latent_channels,
                         norm_num_groups=cfg.ae_norm_groups, sample_size=cfg.resolution,
                         scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=cfg.ae_mid_attention)


class AutoencoderLoss:
    """L1 + MSE reconstruction of a posterior sample, plus `kl_weight` x KL(q(z|x) || N(0, I))."""

    def __init__(self, kl_weight: float, sample_posterior: bool = True) -> None:
        self.kl_weight, self.sample_posterior = kl_weight, sample_posterior

    def __call__(self, vae: nn.Module, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        posterior = vae.encode(x).latent_dist  # mean/std (B, C, h, w)
        z = posterior.mean
        if self.sample_posterior:
            z = z + posterior.std * torch.randn(z.shape, generator=generator).to(x.device)
        recon = vae.decode(z).sample  # (B, 3, H, W)
        l1, mse = (recon - x).abs().mean(), (recon - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = l1 + mse + self.kl_weight * kl
        return loss, {"l1": l1, "mse": mse, "kl": kl, "loss": loss}


@torch.no_grad()
def fit_latent_normalisation(vae: nn.Module, images: torch.Tensor, device: torch.device | str,
                             batch: int = 256) -> tuple[float, float]:
    """Set SD3's shift_factor = mean and scaling_factor = 1 / std of the latent means into the VAE config."""
    vae.eval()
    z = torch.cat([vae.encode(_to_unit(images[i:i + batch], device)).latent_dist.mean.float().cpu()
                   for i in range(0, len(images), batch)])  # (N, C, h, w)
    mean, std = float(z.mean()), float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    return mean, std


def train_autoencoder(cfg: ToyBootstrapConfig, world: ShapesWorld | None = None, device: str | torch.device = "cpu",
                      progress_cb: ProgressFn | None = None, pool: ScenePool | None = None) -> tuple[nn.Module, TrainResult]:
    """Train the toy AE on a pool of the "all" split, then fit its latent normalisation. Returns (AutoencoderKL, result)."""
    torch.manual_seed(cfg.seed)
    if torch.device(device).type == "cpu":
        tune_allocator()
    pool = pool or render_pool(cfg, world, "all")
    vae = build_autoencoder(cfg).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    loss_fn, gen = AutoencoderLoss(cfg.ae_kl_weight, cfg.ae_sample_posterior), torch.Generator().manual_seed(cfg.seed)
    budget, curve, step = _Budget(cfg.ae_steps, cfg.ae_time_budget_s), _Curve("autoencoder", cfg.log_every), 0
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = cfg.ae_lr * lr_factor(step, budget.progress(step), warmup=20)
        idx = torch.randint(len(pool.captions), (cfg.ae_batch,), generator=gen)
        loss, terms = loss_fn(vae, _to_unit(pool.images[idx], device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        point = curve.add(step, budget.elapsed, terms, force=budget.done(step))
        if point and progress_cb:
            progress_cb("autoencoder", step, cfg.ae_steps, point | {"budget_s": cfg.ae_time_budget_s})
    seconds = budget.elapsed
    mean, std = fit_latent_normalisation(vae, pool.images[:1024], device)
    psnr = _heldout_psnr(vae, cfg, device)
    last = curve.points[-1]
    metrics = {"ae_steps": step, "ae_seconds": round(seconds, 2), "ae_l1": last["l1"], "ae_mse": last["mse"],
               "ae_psnr_heldout": psnr, "latent_mean": mean, "latent_std": std, "ae_params": _params(vae)}
    return vae.eval(), TrainResult(metrics, curve.points)


@torch.no_grad()
def _heldout_psnr(vae: nn.Module, cfg: ToyBootstrapConfig, device: torch.device | str, count: int = 256) -> float:
    """PSNR (dB) of AE reconstructions (latent means) of "all"-split scenes past the AE's pool."""
    images, _ = ShapesWorld(cfg.world()).batch(range(cfg.pool_size, cfg.pool_size + count), "all")
    x = _to_unit(torch.from_numpy(images).permute(0, 3, 1, 2), device)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = float((recon - x).pow(2).mean()) / 4.0  # on a [0, 1] scale
    return round(10 * math.log10(1.0 / max(mse, 1e-12)), 3)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- teacher

def world_vocabulary(cfg: ToyBootstrapConfig, captions: list[str]) -> list[str]:
    """Sorted words (letters and digits) of the pool's captions and every template prompt of the world."""
    texts = captions + [r["prompt"] for r in enumerate_prompts(cfg.world(), "all")]
    return sorted({w for text in texts for w in re.findall(r"[a-z0-9]+", text.lower())})


def build_text_encoder(cfg: ToyBootstrapConfig, vocabulary: list[str]) -> tuple[Any, nn.Module]:
    """(tokenizer, tiny CLIPTextModelWithProjection) for the world's vocabulary."""
    from snapgen_model.distill.toy_text import build_tiny_clip, build_tokenizer

    tokenizer = build_tokenizer(vocabulary, max_length=cfg.text_max_length)
    model = build_tiny_clip(tokenizer, hidden=cfg.text_hidden, layers=cfg.text_layers, heads=cfg.text_heads,
                            projection=cfg.pooled_dim, max_length=cfg.text_max_length, seed=cfg.seed)
    return tokenizer, model


ADALN_ZERO_SUFFIXES = ("norm1.linear", "norm1_context.linear")  # adaLN modulation of every joint block


@torch.no_grad()
def adaln_zero_init(transformer: nn.Module) -> list[str]:
    """DiT's adaLN-Zero on a diffusers SD3Transformer2DModel: zero every block's adaLN modulation (shift,
    scale and gate of image and context streams), the final `norm_out` modulation and `proj_out`.
    Each block then starts as the identity and the output velocity as zero. Returns the zeroed names."""
    zeroed = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and (name.endswith(ADALN_ZERO_SUFFIXES) or name in ("norm_out.linear", "proj_out")):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
            zeroed.append(name)
    return zeroed


def build_teacher(cfg: ToyBootstrapConfig) -> nn.Module:
    """A randomly initialised diffusers SD3Transformer2DModel over the AE's latents (adaLN-Zero when
    `teacher_zero_init`)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(cfg.seed)
    model = SD3Transformer2DModel(
        sample_size=cfg.latent_size, patch_size=cfg.patch_size, in_channels=cfg.ae_latent_channels,
        out_channels=cfg.ae_latent_channels, num_layers=cfg.teacher_layers, attention_head_dim=cfg.teacher_head_dim,
        num_attention_heads=cfg.teacher_heads, joint_attention_dim=cfg.joint_dim, caption_projection_dim=cfg.inner_dim,
        pooled_projection_dim=cfg.pooled_dim, pos_embed_max_size=cfg.latent_size // cfg.patch_size,
        qk_norm=None if cfg.qk_norm == "none" else cfg.qk_norm)
    if cfg.teacher_zero_init:
        adaln_zero_init(model)
    return model


def tokenize(tokenizer: Any, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, max_length), as TextEncoderAdapter tokenizes."""
    unique = sorted(set(captions))
    too_long = [c for c, ids in zip(unique, tokenizer(unique)["input_ids"]) if len(ids) > max_length]
    if too_long:
        raise ConfigError(f"bootstrap.text_max_length: {max_length} tokens do not fit {too_long[0]!r}")
    batch = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def text_condition(text_model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, joint_dim: int) -> dict[str, torch.Tensor]:
    """SD3's condition from the tiny CLIP, exactly as TextEncoderAdapter + sd3_teacher_condition compute it."""
    out = text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    encoded = Encoded(tokens=out.hidden_states[-1], pooled=out.text_embeds, mask=mask)  # (B, L, D), (B, P)
    return sd3_teacher_condition({"clip": encoded}, ["clip"], joint_dim)


@torch.no_grad()
def encode_pool(vae: nn.Module, pool: ScenePool, device: torch.device | str, batch: int = 256) -> torch.Tensor:
    """Normalised latents (N, C, h, w) of the pool, through the production VAEAdapter (latent means)."""
    adapter = VAEAdapter(vae)
    return torch.cat([adapter.encode(_to_unit(pool.images[i:i + batch], device))
                      for i in range(0, len(pool.captions), batch)])


def teacher_ema_decay(cfg: ToyBootstrapConfig) -> float:
    """The teacher EMA's decay: `teacher_ema_decay` if set (> 0), else a window of 10% of the run."""
    return cfg.teacher_ema_decay if cfg.teacher_ema_decay > 0 else decay_for_run(cfg.teacher_steps, 0.1)


def train_teacher(cfg: ToyBootstrapConfig, world: ShapesWorld | None, vae: nn.Module, device: str | torch.device = "cpu",
                  progress_cb: ProgressFn | None = None, pool: ScenePool | None = None,
                  checkpoint_dir: str | Path | None = None, probe: ProbeFn | None = None,
                  probe_every: int = 0) -> tuple[TeacherModels, TrainResult]:
    """Train the SD3 teacher and its text encoder jointly with flow matching on the pool's latents.

    Returns the EMA pair (transformer, text encoder) when `teacher_ema`, else the raw pair; the result's
    metrics say which. With `checkpoint_dir`, the run resumes from (and keeps writing) its state there.
    `probe(step, models)` is called every `probe_every` steps (and never changes training: it sees the
    models in eval mode under no_grad, and training mode is restored) with {"raw": TeacherModels,
    "ema": TeacherModels (when kept)}, to judge quality while the run goes on."""
    started = time.monotonic()
    pool = pool or render_pool(cfg, world)
    latents = encode_pool(vae, pool, device)  # (N, C, h, w)
    tokenizer, text_model = build_text_encoder(cfg, world_vocabulary(cfg, pool.captions))
    ids, mask = tokenize(tokenizer, pool.captions, cfg.text_max_length)
    null_ids, null_mask = tokenize(tokenizer, [""], cfg.text_max_length)
    transformer, text_model = build_teacher(cfg).to(device).train(), text_model.to(device).train()
    if torch.device(device).type == "cpu":
        tune_allocator()
        if cfg.mixed_precision == "bf16":  # the explicit attention forms: bf16 on CPU is slow in the fused kernels
            use_fast_attention(transformer)
            text_model.set_attn_implementation("eager")
            if not cpu_has_native_bf16():
                warnings.warn("bootstrap.mixed_precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): "
                              "bf16 is emulated and slower than fp32 here, so the time budget may stop training "
                              "before teacher_steps; set mixed_precision=no", stacklevel=2)
    params = list(transformer.parameters()) + list(text_model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=cfg.teacher_weight_decay)
    ema = ModuleEMA({"transformer": transformer, "text_model": text_model}, teacher_ema_decay(cfg)) if cfg.teacher_ema else None
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    state_path = Path(checkpoint_dir) / TEACHER_STATE if checkpoint_dir else None
    step, offset_s = 0, 0.0
    points: list[dict[str, float]] = []
    if state_path is not None and state_path.is_file():
        step, offset_s, points = _load_teacher_state(state_path, cfg, transformer, text_model, ema, opt, gen)
    prep_s = time.monotonic() - started
    step_fn = _TeacherStep(cfg, transformer, text_model, device)
    budget, curve = _Budget(cfg.teacher_steps, cfg.teacher_time_budget_s, offset_s), _Curve("teacher", cfg.log_every)
    curve.points = list(points)
    resumed_at = step
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = cfg.teacher_lr * lr_factor(step, budget.progress(step), cfg.teacher_warmup_steps)
        idx = torch.randint(len(pool.captions), (cfg.teacher_batch,), generator=gen)
        drop = (torch.rand(cfg.teacher_batch, generator=gen) < cfg.cfg_dropout)[:, None]  # (B, 1)
        b_ids, b_mask = torch.where(drop, null_ids, ids[idx]), torch.where(drop, null_mask, mask[idx])
        loss = step_fn(latents[idx], b_ids.to(device), b_mask.to(device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.teacher_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.teacher_grad_clip)
        opt.step()
        if ema is not None:
            ema.update(step)
        step += 1
        finished = budget.done(step)
        point = curve.add(step, budget.elapsed, {"loss": loss}, force=finished)
        if point and progress_cb:
            progress_cb("teacher", step, cfg.teacher_steps, point | {"budget_s": cfg.teacher_time_budget_s})
        if state_path is not None and (finished or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            _save_teacher_state(state_path, cfg, step, budget.elapsed, curve.points, transformer, text_model, ema, opt, gen)
        if probe is not None and probe_every and step % probe_every == 0:
            _run_probe(probe, step, transformer, text_model, ema, tokenizer)
    seconds = budget.elapsed
    trained = max(step - resumed_at, 0)
    run_s = max(seconds - offset_s, 1e-9)
    metrics = {"teacher_steps": step, "teacher_seconds": round(seconds, 2), "teacher_prep_seconds": round(prep_s, 2),
               "teacher_loss": curve.points[-1]["loss"] if curve.points else float("nan"),
               "teacher_images_per_s": round(trained * cfg.teacher_batch / run_s, 1) if trained else float("nan"),
               "teacher_resumed_at_step": resumed_at, "teacher_weights": "ema" if ema is not None else "raw",
               "teacher_ema_decay": ema.decay if ema is not None else 0.0,
               "teacher_params": _params(transformer), "text_encoder_params": _params(text_model),
               "vocabulary": len(tokenizer)}
    if ema is not None:
        return TeacherModels(ema["transformer"].eval(), ema["text_model"].eval(), tokenizer), TrainResult(metrics, curve.points)
    return TeacherModels(transformer.eval(), text_model.eval(), tokenizer), TrainResult(metrics, curve.points)


def _run_probe(probe: ProbeFn, step: int, transformer: nn.Module, text_model: nn.Module, ema: ModuleEMA | None,
               tokenizer: Any) -> None:
    """Call `probe` with the raw (and EMA) models in eval mode, without gradients; restore training mode."""
    models = {"raw": TeacherModels(transformer.eval(), text_model.eval(), tokenizer)}
    if ema is not None:
        models["ema"] = TeacherModels(ema["transformer"].eval(), ema["text_model"].eval(), tokenizer)
    try:
        with torch.no_grad():
            probe(step, models)
    finally:
        transformer.train()
        text_model.train()


def _save_teacher_state(path: Path, cfg: ToyBootstrapConfig, step: int, elapsed: float, points: list[dict[str, float]],
                        transformer: nn.Module, text_model: nn.Module, ema: ModuleEMA | None,
                        opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """The teacher loop's whole state, written atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config_hash": cfg.content_hash(), "step": step, "elapsed_s": float(elapsed), "curve": list(points),
             "transformer": transformer.state_dict(), "text_model": text_model.state_dict(),
             "ema": ema.state_dict() if ema is not None else {}, "optimizer": opt.state_dict(),
             "generator": gen.get_state()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_teacher_state(path: Path, cfg: ToyBootstrapConfig, transformer: nn.Module, text_model: nn.Module,
                        ema: ModuleEMA | None, opt: torch.optim.Optimizer,
                        gen: torch.Generator) -> tuple[int, float, list[dict[str, float]]]:
    """Restore a checkpoint written by `_save_teacher_state`; (step, elapsed seconds, curve points).
    A checkpoint of another config is refused with an error naming both hashes."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise ValueError(f"{path}: not a readable teacher checkpoint ({type(exc).__name__}: {exc}); "
                         "delete it to train from scratch") from None
    if state.get("config_hash") != cfg.content_hash():
        raise ValueError(f"{path}: checkpoint of config {state.get('config_hash')}, not of this config "
                         f"{cfg.content_hash()}; delete it or use another folder")
    transformer.load_state_dict(state["transformer"])
    text_model.load_state_dict(state["text_model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return int(state["step"]), float(state["elapsed_s"]), list(state["curve"])


class _TeacherStep:
    """One flow-matching loss evaluation (SPEC 4) with seeded noise and logit-normal timesteps."""

    def __init__(self, cfg: ToyBootstrapConfig, transformer: nn.Module, text_model: nn.Module,
                 device: torch.device | str) -> None:
        self.cfg, self.transformer, self.text_model, self.device = cfg, transformer, text_model, torch.device(device)
        self.flow = FlowMatchingConfig(logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
        self.loss = FlowMatchingLoss(self.flow)
        # bf16 autocast on CUDA and on CPU (AVX-512 BF16: 2.9x the fp32 images/s of the toy teacher
        # with the explicit attention and the allocator settings; bench/RESULTS.md "Teacher step on CPU")
        self.amp = cfg.mixed_precision == "bf16" and self.device.type in ("cuda", "cpu")
        # noise is drawn where it is used (no per-step host-to-device copy of a batch of noise)
        self.noise_gen = None if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(cfg.seed + 2)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.transformer(hidden_states=x_t, encoder_hidden_states=context, pooled_projections=pooled,
                                    timestep=t * 1000.0, return_dict=False)[0]  # (B, C, h, w)

    def __call__(self, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=self.noise_gen or gen, device=self.device)  # (B, C, h, w)
        t = sample_timesteps(x0.shape[0], self.flow, gen).to(self.device)  # (B,)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            cond = text_condition(self.text_model, ids, mask, self.cfg.joint_dim)
        return self.loss(self.velocity, x0, cond, noise=noise, t=t).mean()
