"""Teacher feature caching (DESIGN.md stage 2, SNAPGEN_SPEC.md section 5).

Per sample: the VAE latent, every text encoder's token states (and pooled vector and mask), and
optionally teacher velocity targets (and, at toy scale, teacher features) for K pre-drawn
(t, noise-seed) pairs. The noise of pair k of a sample is drawn from a seed derived from
(sample key, k, base seed), so any cached target can be recomputed exactly, and a student trained
on cached targets sees the same (x_t, t) the teacher saw.

Images are encoded at their own size, or, with `resolution` > 0, resized (cover + centre crop)
to their aspect-ratio bucket at that resolution first; `cache_samples` groups a shard's samples
by size, so a cache holds one latent shape per bucket (training batches one bucket at a time).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from typing import Literal, Sequence, cast

import numpy as np
import torch

from snapgen_model.config_base import ConfigBase, check, check_choice
from snapgen_model.diffusion.flow import FlowMatchingConfig, interpolate, sample_timesteps


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig(ConfigBase):
    """What the caching stage stores per sample."""

    targets_per_sample: int = 2  # K pre-drawn (t, noise) pairs with teacher velocity targets (0 = none)
    store_features: bool = False  # also store teacher features per pair (toy scale; at 1024^2 KD runs online)
    feature_dtype: str = "float16"  # on-disk dtype of latents, embeddings and targets (float16 or float32)
    batch_size: int = 32  # samples encoded per forward
    seed: int = 0  # base seed of the per-sample (t, noise) draws
    teacher_clip_encoders: tuple[str, ...] = ("clip",)  # encoders whose states form the teacher's condition
    teacher_t5_encoder: str = ""  # optional T5-style encoder appended on the sequence (SD3)
    flow: FlowMatchingConfig = dataclasses.field(default_factory=FlowMatchingConfig)  # t distribution of the pairs
    # > 0: resize each image to its aspect bucket at this resolution (pixels, area ~ resolution^2) before
    # encoding; 0: encode images at their own size (each distinct size is then a bucket of its own)
    resolution: int = 0
    bucket_aspects: tuple[float, ...] = (0.5, 0.75, 1.0, 1.333, 2.0)  # bucket centres (w/h), as curation's
    size_multiple: int = 32  # bucket sides are multiples of this (VAE factor x UNet down-sampling)
    # what the cached teacher targets are conditioned on: "text" (the SD3 teacher on the captions), or
    # "class" (a class-conditional teacher called teacher(x_t, t, labels=...)); a class-conditional
    # student distils only from "class" targets (with "text" ones it trains on the task loss alone)
    target_condition: Literal["text", "class"] = "text"

    def __post_init__(self) -> None:
        check_choice(self.target_condition, "cache.target_condition", ("text", "class"))
        check(self.resolution >= 0, "cache.resolution", "must be >= 0 (0 = keep each image's size)")
        check(len(self.bucket_aspects) >= 1 and all(a > 0 for a in self.bucket_aspects), "cache.bucket_aspects",
              "needs at least one aspect ratio > 0")
        check(self.size_multiple >= 1, "cache.size_multiple", "must be >= 1")
        check(self.targets_per_sample >= 0, "cache.targets_per_sample", "must be >= 0")
        check(self.feature_dtype in ("float16", "float32"), "cache.feature_dtype", "choose float16 or float32")
        check(self.batch_size >= 1, "cache.batch_size", "must be >= 1")


def pair_seed(key: str, k: int, base: int) -> int:
    """Seed of pair k of sample `key` (stable across processes, shards and machines)."""
    digest = hashlib.sha256(f"{base}:{key}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def draw_pair(key: str, k: int, latent_shape: Sequence[int], cfg: CacheConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(t scalar tensor, noise of `latent_shape`) for pair k of sample `key`."""
    g = torch.Generator().manual_seed(pair_seed(key, k, cfg.seed))
    t = sample_timesteps(1, cfg.flow, g)[0]
    noise = torch.randn(tuple(latent_shape), generator=g)
    return t, noise


def teacher_condition(encoded: dict, cfg: CacheConfig, joint_dim: int) -> dict[str, torch.Tensor]:
    """The text teacher's condition from per-encoder outputs, in SD3's layout: every encoder the teacher
    uses (`cfg.teacher_clip_encoders`, then `cfg.teacher_t5_encoder` on the sequence when set). The one
    builder of it, for cached targets and for the teacher run online alike."""
    from snapgen_model.distill.text import sd3_teacher_condition

    missing = [n for n in (*cfg.teacher_clip_encoders, cfg.teacher_t5_encoder) if n and n not in encoded]
    if missing:
        raise ValueError(f"teacher condition: text encoders {missing} (cache.teacher_clip_encoders / "
                         f"cache.teacher_t5_encoder) are not among the encoded ones {sorted(encoded)}")
    return sd3_teacher_condition(encoded, cfg.teacher_clip_encoders, joint_dim, cfg.teacher_t5_encoder or None)


def bucket_size(width: int, height: int, cfg: CacheConfig) -> tuple[int, int]:
    """(w, h) of the aspect bucket nearest to width / height (in log space) at `cfg.resolution`:
    area about resolution^2, sides multiples of `cfg.size_multiple`."""
    ratio = width / height
    aspect = min(cfg.bucket_aspects, key=lambda a: (abs(math.log(a / ratio)), a))
    m = cfg.size_multiple
    side = lambda x: max(m, int(round(x / m)) * m)  # noqa: E731
    return side(cfg.resolution * math.sqrt(aspect)), side(cfg.resolution / math.sqrt(aspect))


def fit_to_bucket(image: np.ndarray, cfg: CacheConfig) -> np.ndarray:
    """The uint8 (H, W, 3) image resized to cover its bucket and centre-cropped to it (as is when
    `cfg.resolution` is 0)."""
    if not cfg.resolution:
        return image
    from PIL import Image

    h0, w0 = image.shape[:2]
    w, h = bucket_size(w0, h0, cfg)
    if (w, h) == (w0, h0):
        return image
    scale = max(w / w0, h / h0)
    size = (max(w, int(round(w0 * scale))), max(h, int(round(h0 * scale))))
    im = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return np.asarray(im.crop((left, top, left + w, top + h)))


def cache_samples(keys: Sequence[str], images: Sequence[np.ndarray], captions: Sequence[str], *, vae, encoders: dict,
                  teacher=None, cfg: CacheConfig, encode=None,
                  labels: Sequence[int | None] | None = None) -> list[dict[str, bytes]]:
    """`cache_batch` (or `encode`, same signature) over samples of any sizes: images fitted to their
    buckets, grouped by size, encoded `cfg.batch_size` at a time; members in the samples' order.
    `labels`: class labels (ImageNet-style datasets), stored per sample."""
    encode = encode or cache_batch
    fitted = [fit_to_bucket(im, cfg) for im in images]
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(fitted):
        groups.setdefault(im.shape, []).append(i)
    out: list[dict[str, bytes] | None] = [None] * len(fitted)
    for rows in groups.values():
        for j in range(0, len(rows), cfg.batch_size):
            part = rows[j:j + cfg.batch_size]
            kw = {"labels": [labels[i] for i in part]} if labels is not None else {}
            members = encode([keys[i] for i in part], [fitted[i] for i in part], [captions[i] for i in part],
                             vae=vae, encoders=encoders, teacher=teacher, cfg=cfg, **kw)
            for i, m in zip(part, members):
                out[i] = m
    return out  # type: ignore[return-value]


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _npy(array: torch.Tensor | np.ndarray, dtype: str) -> bytes:
    buf = io.BytesIO()
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
    np.save(buf, arr.astype(dtype) if arr.dtype.kind == "f" else arr)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@torch.no_grad()
def cache_batch(keys: Sequence[str], images: Sequence[np.ndarray], captions: Sequence[str], *, vae, encoders: dict,
                teacher=None, cfg: CacheConfig,
                labels: Sequence[int | None] | None = None) -> list[dict[str, str | bytes]]:
    """Cached WebDataset members for one batch of samples (see module docstring); `labels`: class
    labels stored as `label.npy` (int64), and the condition of "class" teacher targets."""
    device = next(vae.parameters()).device
    latents = vae.encode(images_to_tensor(images).to(device)).cpu()  # (B, C, h, w)
    encoded = {name: enc(list(captions)) for name, enc in encoders.items()}
    out: list[dict[str, str | bytes]] = []
    for i, key in enumerate(keys):
        members: dict[str, str | bytes] = {"__key__": key, "latent.npy": _npy(latents[i], cfg.feature_dtype)}
        if labels is not None and (label := labels[i]) is not None:
            members["label.npy"] = _npy(np.asarray(int(label), dtype=np.int64), "int64")
        for name, e in encoded.items():
            members[f"{name}.tokens.npy"] = _npy(e.tokens[i], cfg.feature_dtype)
            members[f"{name}.mask.npy"] = _npy(e.mask[i].to(torch.int8), "int8")
            if e.pooled is not None:
                members[f"{name}.pooled.npy"] = _npy(e.pooled[i], cfg.feature_dtype)
        out.append(members)
    if teacher is None or cfg.targets_per_sample == 0:
        return out
    if cfg.target_condition == "class":
        if labels is None or any(label is None for label in labels):
            raise ValueError("cache.target_condition=class: every sample needs a class label")
        y = torch.tensor([int(label) for label in cast(Sequence[int], labels)], device=device)  # no None: checked above
        run = lambda x, t: teacher(x, t, labels=y)  # noqa: E731
    else:
        cond = teacher_condition(encoded, cfg, teacher.transformer.config.joint_attention_dim)
        run = lambda x, t: teacher(x, t, cond["context"], cond["pooled"])  # noqa: E731
    for k in range(cfg.targets_per_sample):
        pairs = [draw_pair(key, k, latents.shape[1:], cfg) for key in keys]
        t = torch.stack([p[0] for p in pairs])
        x_t = interpolate(latents, torch.stack([p[1] for p in pairs]), t)
        res = run(x_t.to(device), t.to(device))
        for i, members in enumerate(out):
            members[f"t{k}.npy"] = _npy(t[i:i + 1], "float32")
            members[f"v{k}.npy"] = _npy(res.velocity[i], cfg.feature_dtype)
            if cfg.store_features:
                for name, f in res.features.items():
                    members[f"f{k}.{name}.npy"] = _npy(f[i], cfg.feature_dtype)
    return out


def storage_report(members: dict[str, bytes]) -> dict[str, dict[str, float]]:
    """Bytes per sample per field (field = member name with the pair index folded), and per 1M samples (GB)."""
    fields: dict[str, int] = {}
    for name, data in members.items():
        if name.startswith("__"):
            continue
        field = name[0] + "K" + name[name.index("."):] if name[0] in "tvf" and name[1:2].isdigit() else name
        fields[field] = fields.get(field, 0) + len(data)
    return {f: {"bytes_per_sample": b, "gb_per_1m_samples": b * 1e6 / 1e9} for f, b in sorted(fields.items())}


def full_scale_estimate(latent_side: int = 128, channels: int = 16, teacher_width: int = 2432, patch: int = 2,
                        encoders: dict[str, tuple[int, int]] | None = None, k: int = 4) -> dict[str, int]:
    """Analytic bytes/sample at fp16 for SD3.5-Large at 1024^2 (width 38 x 64 = 2432, patch 2)."""
    encoders = encoders or {"clip_l": (77, 768), "clip_g": (77, 1280), "gemma": (256, 2304)}
    tokens = (latent_side // patch) ** 2
    est = {"latent": latent_side ** 2 * channels * 2,
           "text": sum(l * d * 2 for l, d in encoders.values()),
           "targets_vK": k * latent_side ** 2 * channels * 2,
           "features_fK_final_layer": k * tokens * teacher_width * 2}
    est["total_without_features"] = est["latent"] + est["text"] + est["targets_vK"]
    return est
