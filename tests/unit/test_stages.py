"""Progressive resolution stages and aspect buckets: stage switches at the right step with the
stage's batch size and resolution, batches from one bucket at a time, resume across a stage
boundary (bitwise), on the in-memory and the streaming data paths."""
from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from snapgen_model.config_base import ConfigError
from snapgen_model.distill.cache import CacheConfig
from snapgen_model.presets import get_preset
from snapgen_model.training.data import (
    BucketedData,
    CachedData,
    StagedBatches,
    StagePlan,
    bucketed_batch_indices,
    global_batch_indices,
    layout_and_bucket,
    load_cache_folder,
)
from snapgen_model.training.pretrain import PretrainConfig, fit
from snapgen_model.training.stream import StreamData
from tests.fixtures.training import StopAt, same, weights
from tests.unit.test_stream_data import npy, sample, write_cache

PRESET = get_preset("toy-smoke")  # f=4: 8x8 latents at 32 px, 16x16 at 64 px
CACHE = CacheConfig(targets_per_sample=2)



def with_features(s: dict, rng, tokens: int) -> dict:
    for k in range(2):
        s[f"f{k}.block1.npy"] = npy(rng.normal(size=(tokens, 32)))
    return s


def mixed_cache(folder: Path, shapes: dict[tuple, int], features: bool = False, per_shard: int = 4) -> Path:
    """A cache with `count` samples per latent (h, w), interleaved over shards (as a curated
    dataset of mixed sizes caches)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(max(shapes.values())):
        for (h, w), count in shapes.items():
            if i < count:
                s = sample(f"k{len(rows):04d}", rng, latent=(16, h, w))
                rows.append(with_features(s, rng, (h // 2) * (w // 2)) if features else s)
    return write_cache(folder, [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)])


def cfg(**kw) -> PretrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2, log_every=1, accelerator="cpu",
                kd={"feature_kd": False}, stages=[{"steps": 3, "batch_size": 4, "resolution": 32},
                                                  {"steps": 3, "batch_size": 2, "resolution": 64}])
    return PretrainConfig.from_dict(base | kw)


class Seen(pl.Callback):
    """(step, stage, batch rows, latent shape) of every trained batch."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        b = pl_module.batch_data(batch)
        self.rows.append((int(batch["step"]), int(batch.get("stage", 0)), len(b), tuple(b.latent.shape[2:])))


def data_of(mode: str, folder: Path):
    return load_cache_folder(folder, ["clip"]) if mode == "memory" else StreamData.from_folder(folder, ["clip"])


# ---------------------------------------------------------------------------------------------- config

def test_stage_config():
    c = PretrainConfig().with_overrides(["steps=30", 'stages=[{"steps": 20, "batch_size": 64, "resolution": 256}, '
                                         '{"steps": 10, "batch_size": 16, "resolution": 512, "cache": "s3://b/c512"}]'])
    assert [s.resolution for s in c.stages] == [256, 512] and c.stages[1].cache == "s3://b/c512"
    assert PretrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match=r"pretrain.steps: must equal the sum of the stage steps \(30\)"):
        PretrainConfig().with_overrides(['stages=[{"steps": 20, "batch_size": 64}, {"steps": 10, "batch_size": 8}]'])
    with pytest.raises(ConfigError, match=r"stages\[\].batch_size"):
        PretrainConfig.from_dict({"steps": 3, "stages": [{"steps": 3, "batch_size": 0}]})


# ---------------------------------------------------------------------------------------------- buckets

def test_buckets_split_by_latent_shape_and_corrupt_spatial_members_are_caught():
    rng = np.random.default_rng(0)
    from snapgen_model.training.data import decode_members

    def split(s):
        return layout_and_bucket(decode_members(s)[0])

    a, b = split(sample("a", rng, (16, 8, 8))), split(sample("b", rng, (16, 8, 16)))
    assert a[0] == b[0] and (a[1], b[1]) == ((8, 8), (8, 16))
    f = split(with_features(sample("f", rng, (16, 8, 16)), rng, 32))
    assert f[1] == (8, 16, 32)
    bad = sample("c", rng, (16, 8, 8))
    bad["v1.npy"] = npy(rng.normal(size=(16, 8, 16)))  # a target not shaped like its latent
    assert split(bad) is None


def test_mixed_cache_loads_as_buckets_and_counts_corruption(tmp_path):
    folder = mixed_cache(tmp_path / "c", {(8, 8): 5, (8, 16): 3})
    shard = folder / "shards" / "shard-000000.tar"
    data = load_cache_folder(folder, ["clip"])
    assert isinstance(data, BucketedData) and data.bucket_keys == [(8, 8), (8, 16)]
    assert [len(d) for d in data.buckets.values()] == [5, 3] and data.skipped == {"bad_samples": 0, "bad_shards": 0}
    rng = np.random.default_rng(1)
    rows = [sample(f"x{i}", rng, (16, 8, 8)) for i in range(3)] + [sample("odd", rng, (16, 8, 8), tokens=7)]
    write_cache(tmp_path / "d", [rows])
    one = load_cache_folder(tmp_path / "d", ["clip"])
    assert isinstance(one, CachedData) and len(one) == 3 and one.skipped["bad_samples"] == 1  # foreign layout
    assert shard.exists()


def test_bucketed_batches_are_single_bucket_and_cover_each_bucket():
    sizes = [5, 3]
    draw = lambda s: (lambda b, i: (b, i.tolist()))(*bucketed_batch_indices(sizes, 2, s, seed=1))  # noqa: E731
    epoch = [draw(s) for s in range(3 + 2)]  # ceil(5/2) + ceil(3/2) batches
    assert epoch == [draw(s) for s in range(5)] and epoch != [draw(s) for s in range(5, 10)]
    for b in (0, 1):
        seen = {i for bucket, idx in epoch if bucket == b for i in idx}
        assert seen == set(range(sizes[b]))
    assert len({tuple(idx) for _, idx in epoch}) == 5


def test_one_stage_one_bucket_draws_the_batches_of_earlier_versions():
    plan = [StagePlan(index=0, start=0, end=7, batch=4, buckets=(0,), sizes=(10,))]
    got = [b["idx"] for b in StagedBatches(plan, seed=3, start=2, end=7)]
    assert all(torch.equal(g, global_batch_indices(10, 4, s, 3)) for g, s in zip(got, range(2, 7)))
    ranks = [list(StagedBatches(plan, seed=3, start=0, end=2, rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat([ranks[0][0]["idx"], ranks[1][0]["idx"]]).sort().values,
                       global_batch_indices(10, 4, 0, 3).sort().values)


# ---------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_stages_switch_resolution_and_batch_size_at_the_right_step(tmp_path, mode):
    folder = mixed_cache(tmp_path / "c", {(8, 8): 6, (16, 16): 4})
    seen = Seen()
    result = fit(PRESET, cfg(data=mode), data_of(mode, folder), CACHE, tmp_path / "s", callbacks=[seen])
    assert result["step"] == 6
    assert seen.rows == [(s, 0, 4, (8, 8)) for s in range(3)] + [(s, 1, 2, (16, 16)) for s in range(3, 6)]


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("stop", [2, 3])
def test_resume_across_a_stage_boundary_is_bitwise_identical(tmp_path, mode, stop):
    """Stopped inside stage 0 (step 2) or exactly at the switch (step 3), resumed to the end."""
    folder = mixed_cache(tmp_path / "c", {(8, 8): 6, (16, 16): 4})
    fit(PRESET, cfg(data=mode), data_of(mode, folder), CACHE, tmp_path / "full")
    assert fit(PRESET, cfg(data=mode), data_of(mode, folder), CACHE, tmp_path / "part",
               callbacks=[StopAt(stop)])["step"] == stop
    seen = Seen()
    resumed = fit(PRESET, cfg(data=mode), data_of(mode, folder), CACHE, tmp_path / "part", callbacks=[seen])
    assert resumed["resumed_from"].endswith(f"step-{stop:08d}") and resumed["step"] == 6
    assert [r[:2] for r in seen.rows] == [(s, 0 if s < 3 else 1) for s in range(stop, 6)]
    for name in ("modules.safetensors", "optimizer.safetensors"):
        assert same(weights(tmp_path / "full", name), weights(tmp_path / "part", name)), name


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_aspect_buckets_one_bucket_per_batch_with_feature_kd(tmp_path, mode):
    """A cache of square (8x8) and 1:2 (8x16) latents with cached teacher features (16 and 32
    tokens): every batch holds one shape, both shapes are trained, feature KD runs on both grids."""
    folder = mixed_cache(tmp_path / "c", {(8, 8): 4, (8, 16): 4}, features=True, per_shard=3)
    seen = Seen()
    c = cfg(data=mode, steps=8, batch_size=2, stages=[], kd={"student_feature": "up1"}, shuffle_buffer=3)
    result = fit(PRESET, c, data_of(mode, folder), CACHE, tmp_path / "s", callbacks=[seen])
    assert result["step"] == 8 and result["module"].use_feat
    shapes = [r[3] for r in seen.rows]
    assert set(shapes) == {(8, 8), (8, 16)} and all(r[2] == 2 for r in seen.rows)
    assert torch.isfinite(torch.cat([p.flatten() for p in result["module"].projector.parameters()])).all()


def test_a_stage_can_train_on_its_own_cache(tmp_path):
    low = mixed_cache(tmp_path / "low", {(8, 8): 4})
    high = mixed_cache(tmp_path / "high", {(16, 16): 4})
    seen = Seen()
    c = cfg(steps=4, stages=[{"steps": 2, "batch_size": 2}, {"steps": 2, "batch_size": 2, "cache": "hi"}])
    fit(PRESET, c, {"": load_cache_folder(low, ["clip"]), "hi": load_cache_folder(high, ["clip"])}, CACHE,
        tmp_path / "s", callbacks=[seen])
    assert [r[3] for r in seen.rows] == [(8, 8), (8, 8), (16, 16), (16, 16)]


def test_a_stage_without_matching_buckets_is_an_error_naming_it(tmp_path):
    folder = mixed_cache(tmp_path / "c", {(8, 8): 4})
    c = cfg(stages=[{"steps": 3, "batch_size": 4, "resolution": 32}, {"steps": 3, "batch_size": 2, "resolution": 64}])
    with pytest.raises(ValueError, match=r"pretrain.stages\[1\].resolution: no cached samples near 64 px.*8x8 \(~32 px\)"):
        fit(PRESET, c, load_cache_folder(folder, ["clip"]), CACHE, tmp_path / "s")
    with pytest.raises(RuntimeError, match="no valid sample of the stage's buckets"):
        fit(PRESET, cfg(data="stream", stages=c.stages), StreamData.from_folder(folder, ["clip"]), CACHE,
            tmp_path / "t")


def test_state_records_the_stage(tmp_path):
    folder = mixed_cache(tmp_path / "c", {(8, 8): 6, (16, 16): 4})
    fit(PRESET, cfg(data="stream", checkpoint_every=4), StreamData.from_folder(folder, ["clip"]), CACHE, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "step-00000004" / "state.json").read_text())
    assert meta["data_position"]["ranks"][0]["stage"] == 1


def test_task_layer_resolves_the_caches_stages_name(tmp_path, monkeypatch):
    from tasks.pretrain import fetch_stage_caches, run_key, training_data

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    low = mixed_cache(tmp_path / "low", {(8, 8): 4})
    high = mixed_cache(tmp_path / "high", {(16, 16): 4})
    (high / "manifest.json").write_text(json.dumps({"key": "k-high", "shards": []}))
    for mode in ("memory", "stream"):
        c = cfg(data=mode, steps=4, stages=[{"steps": 2, "batch_size": 2}, {"steps": 2, "batch_size": 2,
                                                                             "cache": f"file://{high}"}])
        locations, manifests = fetch_stage_caches(c)
        assert locations == {f"file://{high}": str(high)} and manifests[f"file://{high}"]["key"] == "k-high"
        data = training_data(str(low), ["clip"], mode, locations)
        assert set(data) == {"", f"file://{high}"} and isinstance(data[""], StreamData) == (mode == "stream")
        from snapgen_model.training.launch import training_data as launch_data  # the multi-process path's twin

        spec = {"cache_dir": str(low), "encoders": ["clip"], "stage_caches": locations}
        assert {k: type(v) for k, v in launch_data(spec, c).items()} == {k: type(v) for k, v in data.items()}
        seen = Seen()
        fit(PRESET, c, data, CACHE, tmp_path / f"s-{mode}", callbacks=[seen])
        assert [r[3] for r in seen.rows] == [(8, 8), (8, 8), (16, 16), (16, 16)]
        base = {"key": "k-low"}
        assert run_key(base, "toy-smoke", [], c, manifests) != run_key(base, "toy-smoke", [], c, {f"file://{high}": {"key": "x"}})
