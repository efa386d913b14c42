"""CLIP score (Hessel et al. 2021, as torchmetrics computes it): mean over images of
max(100 * cos(E_image, E_prompt), 0), with a transformers CLIP model loaded from a local folder.

Without a model the result is an explicit "not available" row with the reason; no number is
ever made up.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from snapgen_model.config_base import ConfigBase, check
from snapgen_model.evaluation.hf_backends import BackendUnavailable, ClipEmbedder


@dataclass(frozen=True, kw_only=True)
class ClipScoreConfig(ConfigBase):
    """Where the CLIP model is and how to run it."""

    model_path: str = ""  # local transformers CLIP folder (ViT-L/14 for the standard); "" = not available
    batch_size: int = 32  # images per forward pass
    device: str = "cpu"  # torch device

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "ClipScoreConfig.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ClipScoreResult:
    """A CLIP score, or why there is none."""

    available: bool  # False: no model; value is None and reason says why
    value: float | None  # mean CLIP score (0-100 scale)
    images: int  # images scored
    reason: str = ""  # why not available
    model: str = ""  # the model folder used

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "value": self.value, "images": self.images,
                "reason": self.reason, "model": self.model}


def not_available(reason: str, images: int = 0) -> ClipScoreResult:
    """The "not available" row."""
    return ClipScoreResult(False, None, images, reason=reason)


def clip_score(images: Sequence[np.ndarray | Image.Image], prompts: Sequence[str],
               cfg: ClipScoreConfig | None = None, embedder: ClipEmbedder | None = None) -> ClipScoreResult:
    """CLIP score of images against their prompts; "not available" when no model can be loaded."""
    cfg = cfg or ClipScoreConfig()
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    if embedder is None:
        try:
            embedder = ClipEmbedder(cfg.model_path, cfg.device, cfg.batch_size)
        except BackendUnavailable as exc:
            return not_available(str(exc), len(images))
    pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    cos = (embedder.images(pil) * embedder.texts(list(prompts))).sum(-1)  # (N,)
    value = float((100.0 * cos).clamp(min=0).mean()) if len(pil) else float("nan")
    return ClipScoreResult(True, value, len(pil), model=embedder.path)
