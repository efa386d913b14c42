"""Sample a grid from a preset's UNet (fresh or from a checkpoint) and its tiny decoder."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from snapgen_model.configs import SnapGenConfig
from snapgen_model.diffusion.generate import generate, null_condition
from snapgen_model.imaging import make_grid
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.storage.checkpoint import load_model


def sample_grid(cfg: SnapGenConfig, seeds: Sequence[int], out: str | Path, *, checkpoint: str | Path | None = None,
                steps: int | None = None) -> dict:
    """Write a PNG grid of len(seeds) samples; returns a summary dict."""
    torch.manual_seed(cfg.seed)
    unet = load_model(checkpoint, expected_kind="SnapGenUNet") if checkpoint else SnapGenUNet(cfg.unet)
    decoder = TinyDecoder(cfg.decoder)
    unet.eval(), decoder.eval()
    cond = null_condition(cfg, len(seeds))
    images = generate(unet, decoder, cfg, seeds, cond=cond, steps=steps)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, cols=min(8, len(seeds))).save(out)
    return {"images": len(seeds), "size": cfg.image_size, "steps": steps or cfg.sampler.steps,
            "guidance": cfg.sampler.guidance, "unet": "checkpoint" if checkpoint else "fresh init",
            "path": str(out)}
