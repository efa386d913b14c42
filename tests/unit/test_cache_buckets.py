"""Caching images of several sizes: each image fitted to its aspect bucket (optional), encoded size by
size, members in the shard's order; the cache then loads as buckets for training."""
from __future__ import annotations

import numpy as np
import pytest

from snapgen_model.distill.cache import CacheConfig, bucket_size, cache_samples, fit_to_bucket, load_npy


def test_bucket_sizes_follow_the_curation_buckets():
    cfg = CacheConfig(resolution=256, size_multiple=32)
    assert bucket_size(1024, 1024, cfg) == (256, 256)
    assert bucket_size(1600, 1200, cfg) == (288, 224)  # 4:3 -> the 1.333 bucket
    assert bucket_size(1920, 1080, cfg) == (352, 192)  # 16:9 is nearer 2:1 than 4:3 in log space
    assert bucket_size(500, 1000, cfg) == (192, 352)  # 1:2 -> the 0.5 bucket (sides rounded to 32)
    image = np.zeros((40, 90, 3), np.uint8)
    image[:, 45:] = 255
    fitted = fit_to_bucket(image, CacheConfig(resolution=32, size_multiple=8))
    assert fitted.shape == (24, 48, 3) and fitted[:, :20].max() == 0 and fitted[:, -20:].min() == 255  # centre crop
    assert fit_to_bucket(image, CacheConfig()) is image  # resolution 0: as is


@pytest.fixture
def models(tiny_bundle):
    from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig
    from snapgen_model.distill.text import TextEncoderAdapter, TextEncoderSpec
    from snapgen_model.distill.vae import VAEAdapter, VAEConfig

    vae = VAEAdapter.from_pretrained(VAEConfig(path=str(tiny_bundle), subfolder="vae"))
    enc = TextEncoderAdapter.from_pretrained(TextEncoderSpec(name="clip", kind="clip", path=str(tiny_bundle),
                                                             subfolder="text_encoder", max_length=16))
    return vae, {"clip": enc}, SD3Teacher.from_pretrained(TeacherConfig(path=str(tiny_bundle)))


def test_mixed_sizes_are_encoded_by_size_in_order(models, tmp_path):
    from snapgen_model.data.wds_io import write_shard
    from snapgen_model.training.data import BucketedData, load_cache_folder

    vae, encoders, teacher = models
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (32, 64), (32, 32), (32, 64), (32, 32)]  # (h, w), interleaved as in a curated shard
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    keys = [f"s{i}" for i in range(len(images))]
    cfg = CacheConfig(targets_per_sample=1, batch_size=2, feature_dtype="float32")
    members = cache_samples(keys, images, ["a red circle"] * len(images), vae=vae, encoders=encoders,
                            teacher=teacher, cfg=cfg)
    assert [m["__key__"] for m in members] == keys
    assert [load_npy(m["latent.npy"]).shape for m in members] == [(16, h // 4, w // 4) for h, w in sizes]
    assert all(load_npy(m["v0.npy"]).shape == load_npy(m["latent.npy"]).shape for m in members)
    (tmp_path / "shards").mkdir()
    write_shard(iter(members), tmp_path / "shards" / "shard-000000.tar")
    data = load_cache_folder(tmp_path, ["clip"])
    assert isinstance(data, BucketedData) and data.bucket_keys == [(8, 8), (8, 16)]
    same_size = cache_samples(keys[::2], images[::2], ["a red circle"] * 3, vae=vae, encoders=encoders, cfg=cfg)
    assert all(a["latent.npy"] == b["latent.npy"] for a, b in zip(same_size, members[::2]))
