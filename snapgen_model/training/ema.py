"""One exponential moving average for every trained module of a run (plain PyTorch).

The EMA is over a *set* of modules (a UNet and the conditioner trained with it; a transformer and its
text encoder), so the saved model never pairs averaged weights with raw ones. The decay is tied to
the run length: `decay_for_run(steps)` gives an averaging window of about `fraction` of the run, and
the warm-up `(1 + s) / (10 + s)` keeps the average close to the raw weights early on (an EMA whose
window is longer than the run stays near its initialisation, TOY_CALIBRATION.md).

Buffers (norm statistics and the like) are copied, not averaged.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
from torch import nn


def decay_for_run(steps: int, fraction: float = 0.1, lo: float = 0.9, hi: float = 0.9999) -> float:
    """EMA decay whose averaging window (1 / (1 - decay) steps) is `fraction` of a run of `steps` steps,
    clamped to [lo, hi]. `decay_for_run(20_000)` = 0.9995; `decay_for_run(300)` = 0.9667."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    window = max(1.0, fraction * steps)
    return float(min(hi, max(lo, 1.0 - 1.0 / window)))


class ModuleEMA:
    """EMA copies of named modules, updated together with one decay.

    `modules` maps a name to a trained module; `ema[name]` is its frozen averaged copy (eval mode).
    `update(step)` after each optimiser step uses min(decay, (1 + step) / (10 + step)).
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.sources = dict(modules)
        self.copies: dict[str, nn.Module] = {
            name: copy.deepcopy(m).requires_grad_(False).eval() for name, m in self.sources.items()}

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def names(self) -> list[str]:
        return list(self.copies)

    def current_decay(self, step: int) -> float:
        """The decay applied at `step` (0-based count of updates before this one)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Blend every source module into its copy; returns the decay used."""
        d = self.current_decay(step)
        for name, src in self.sources.items():
            dst = self.copies[name]
            e_params = [p for p in dst.parameters()]
            s_params = [p.detach() for p in src.parameters()]
            if e_params:
                torch._foreach_lerp_(e_params, s_params, 1.0 - d)
            for eb, sb in zip(dst.buffers(), src.buffers()):
                eb.copy_(sb)
        return d

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: m.state_dict() for name, m in self.copies.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        missing = set(self.copies) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks modules {sorted(missing)} (has {sorted(state)})")
        for name, m in self.copies.items():
            m.load_state_dict(state[name])

    def to(self, device: torch.device | str) -> "ModuleEMA":
        for m in self.copies.values():
            m.to(device)
        return self


def relative_change(before: Iterable[torch.Tensor], after: Iterable[torch.Tensor]) -> float:
    """||after - before|| / ||before|| over all tensors together (how far training moved the weights)."""
    num = den = 0.0
    for b, a in zip(before, after):
        b, a = b.detach().float(), a.detach().float()
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("inf") if num > 0 else 0.0
