"""Tiny-decoder training (SNAPGEN_SPEC.md section 2): decode the teacher VAE's latents, encoder frozen.

Loss = w1 L1 + w2 MSE + wp perceptual (pluggable feature network) + wa adversarial (optional
patch discriminator, hinge). Reported against the teacher VAE's own decoder on held-out images:
PSNR and SSIM, parameters, and decode latency of both decoders in the same run.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from snapgen_model.config_base import ConfigBase, check
from snapgen_model.evaluation.image_metrics import psnr, ssim

Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) in [-1, 1] -> scalar


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderTrainConfig(ConfigBase):
    """Optimisation of the tiny decoder."""

    steps: int = 600  # optimiser steps
    batch_size: int = 16  # latents per step
    lr: float = 2e-3  # AdamW learning rate (cosine decay to 10%)
    l1_weight: float = 1.0  # L1 reconstruction weight
    l2_weight: float = 1.0  # MSE reconstruction weight
    perceptual_weight: float = 0.0  # perceptual term weight (needs a feature network)
    adversarial_weight: float = 0.0  # patch-discriminator hinge loss weight (0 = off)
    heldout: int = 32  # images kept out of training for the report
    seed: int = 0  # batch order and initialisation

    def __post_init__(self) -> None:
        check(self.steps >= 1, "decoder_train.steps", "must be >= 1")
        check(self.batch_size >= 1, "decoder_train.batch_size", "must be >= 1")
        check(self.lr > 0, "decoder_train.lr", "must be > 0")
        check(min(self.l1_weight, self.l2_weight, self.perceptual_weight, self.adversarial_weight) >= 0,
              "decoder_train.l1_weight", "loss weights must be >= 0")
        check(self.heldout >= 1, "decoder_train.heldout", "must be >= 1")


class FeaturePerceptual:
    """Perceptual distance as the MSE between a frozen feature network's outputs (e.g. LPIPS-style
    nets or the FID Inception loaded by path); `net` maps images in [-1, 1] to features."""

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.net = net

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.net(target)
        return F.mse_loss(self.net(pred), ref)


class PatchDiscriminator(nn.Module):
    """Small conv patch discriminator for the optional adversarial term."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _losses(decoder, disc, latents, images, cfg: DecoderTrainConfig, perceptual: Perceptual | None):
    pred = decoder(latents)
    terms = {"l1": F.l1_loss(pred, images), "l2": F.mse_loss(pred, images)}
    total = cfg.l1_weight * terms["l1"] + cfg.l2_weight * terms["l2"]
    if perceptual is not None and cfg.perceptual_weight > 0:
        terms["perceptual"] = perceptual(pred, images)
        total = total + cfg.perceptual_weight * terms["perceptual"]
    if disc is not None:
        terms["g_adv"] = -disc(pred).mean()
        total = total + cfg.adversarial_weight * terms["g_adv"]
    return pred, total, terms


def train_tiny_decoder(decoder: nn.Module, latents: torch.Tensor, images: torch.Tensor, cfg: DecoderTrainConfig, *,
                       perceptual: Perceptual | None = None,
                       progress: Callable[[int, dict], None] | None = None) -> list[dict[str, float]]:
    """Train on (latents (N, C, h, w), images (N, 3, H, W) in [-1, 1]); returns the loss history."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.1)
    disc = PatchDiscriminator() if cfg.adversarial_weight > 0 else None
    d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr * 0.5) if disc is not None else None
    history = []
    decoder.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(latents), (min(cfg.batch_size, len(latents)),), generator=g)
        pred, total, terms = _losses(decoder, disc, latents[idx], images[idx], cfg, perceptual)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        if disc is not None and d_opt is not None:
            d_loss = F.relu(1 - disc(images[idx])).mean() + F.relu(1 + disc(pred.detach())).mean()
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            terms["d_loss"] = d_loss
        record = {"step": step, "loss": float(total.detach())} | {k: float(v.detach()) for k, v in terms.items()}
        history.append(record)
        if progress is not None:
            progress(step, record)
    decoder.eval()
    return history


def _latency_ms(fn: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


@torch.no_grad()
def decoder_report(decoder: nn.Module, vae, latents: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """Held-out comparison with the teacher VAE decoder: PSNR/SSIM against it and against the images,
    parameters, and median decode latency of both for one batch."""
    decoder.eval()
    ours, theirs = decoder(latents).clamp(-1, 1), vae.decode(latents).clamp(-1, 1)
    return {
        "psnr_vs_vae_decoder": float(psnr(ours, theirs).mean()), "ssim_vs_vae_decoder": float(ssim(ours, theirs).mean()),
        "psnr_vs_images": float(psnr(ours, images).mean()), "vae_psnr_vs_images": float(psnr(theirs, images).mean()),
        "params": sum(p.numel() for p in decoder.parameters()),
        "vae_decoder_params": sum(p.numel() for p in vae.vae.decoder.parameters()),
        "latency_ms": _latency_ms(lambda: decoder(latents)), "vae_latency_ms": _latency_ms(lambda: vae.decode(latents)),
        "batch": len(latents),
    }
