"""Preview grids during training: fixed prompts and seeds, the student (its EMA weights, sampled with
its preset's sampler) beside the teacher (sampled once), every `sample_every` steps and at the end.

The renderer is built by the task layer from the teacher bundle the student trains against (its text
encoders and VAE decoder; the teacher's own samples when it is a toy bundle); the callback hands each
grid to a `log(image, step)` function (an MLflow artifact upload in tasks/). Row 1: teacher (when
available); row 2: student at this step. Image i of each row uses prompt i and seed i.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from snapgen_model.configs import SnapGenConfig
from snapgen_model.diffusion.generate import generate


def tile_rows(rows: Sequence[np.ndarray], pad: int = 2, scale: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 rows -> one (rows*H', N*W', 3) grid, upscaled `scale`x with `pad` px gaps."""
    rows = [np.repeat(np.repeat(r, scale, axis=1), scale, axis=2) for r in rows if len(r)]
    n, h, w = max(len(r) for r in rows), rows[0].shape[1], rows[0].shape[2]
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = image
    return grid


class PreviewRenderer:
    """Samples the student for fixed prompts/seeds through frozen text encoders and a decoder."""

    def __init__(self, preset: SnapGenConfig, prompts: Sequence[str], seeds: Sequence[int],
                 encode: Callable[[Sequence[str]], Mapping[str, object]], decoder: nn.Module,
                 teacher_images: np.ndarray | None = None) -> None:
        self.preset, self.prompts, self.seeds = preset, list(prompts), list(seeds)
        self.encode, self.decoder, self.teacher_images = encode, decoder, teacher_images
        self._encoded: Mapping[str, object] | None = None

    @torch.no_grad()
    def __call__(self, unet: nn.Module, conditioner: nn.Module, preset: SnapGenConfig | None = None) -> np.ndarray:
        """The grid for the current weights; `preset` (the module's: few-step sampler when distilling)."""
        if self._encoded is None:
            self._encoded = self.encode(self.prompts)
        device = next(unet.parameters()).device
        encoded = {k: _to(v, device) for k, v in self._encoded.items()}
        was_training = unet.training, conditioner.training
        unet.eval(), conditioner.eval()
        try:
            cond, uncond = conditioner(encoded), conditioner.null_condition(encoded)
            student = generate(unet, self.decoder.to(device), preset or self.preset, self.seeds, cond=cond, uncond=uncond)
        finally:
            unet.train(was_training[0]), conditioner.train(was_training[1])
        rows = [self.teacher_images, student] if self.teacher_images is not None else [student]
        return tile_rows(rows)


def _to(encoded, device):
    import dataclasses

    return dataclasses.replace(encoded, tokens=encoded.tokens.to(device), mask=encoded.mask.to(device),
                               pooled=None if encoded.pooled is None else encoded.pooled.to(device))


class PreviewCallback(pl.Callback):
    """Render and log a preview grid every `every` steps (0: only at the end), on global rank 0."""

    def __init__(self, render: PreviewRenderer, log: Callable[[np.ndarray, int], None], every: int = 0) -> None:
        self.render, self.sink, self.every = render, log, every
        self.logged: list[int] = []

    def _emit(self, trainer, pl_module) -> None:
        step = pl_module.current_step()
        if step in self.logged:
            return
        self.logged.append(step)
        # the (EMA UNet, EMA conditioner) the module saves; collective in a sharded run (every rank calls it)
        pair = getattr(pl_module, "preview_modules", None)
        unet, conditioner = pair() if pair is not None else (pl_module.ema, pl_module.conditioner)
        if trainer.is_global_zero:
            self.sink(self.render(unet, conditioner, getattr(pl_module, "preset", None)), step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and pl_module.current_step() % self.every == 0:
            self._emit(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._emit(trainer, pl_module)
