"""Sample grids: prompts through a model's own generator (`sample_prompts`), or a preset's UNet (fresh or a
bare checkpoint) with the null condition (`sample_grid`: shows the sampler and decoder run end to end)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

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


def sample_prompts(generator: Callable[[Sequence[str], Sequence[int]], np.ndarray], prompts: Sequence[str],
                   seeds: Sequence[int], out: str | Path) -> dict:
    """Generate every prompt at every seed with `generator` (prompts, seeds -> (N, H, W, 3) uint8), write a
    grid (one row per prompt, one column per seed) to `out` and each image beside it, `<out stem>/NN-seedS.png`.
    Same prompt and seed, same image (the generators draw noise per image from its seed)."""
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("--prompt: every prompt must be a non-empty string")
    pairs = [(p, s) for p in prompts for s in seeds]
    images = np.asarray(generator([p for p, _ in pairs], [s for _, s in pairs]), dtype=np.uint8)
    out = Path(out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    make_grid(images, cols=len(seeds)).save(out)
    rows = []
    for i, ((prompt, seed), image) in enumerate(zip(pairs, images)):
        path = folder / f"{i:02d}-seed{seed}.png"
        Image.fromarray(image).save(path)
        rows.append({"prompt": prompt, "seed": seed, "path": str(path)})
    return {"images": len(pairs), "size": int(images.shape[1]), "path": str(out), "samples": rows}
