"""Teacher caching flow on a curated toy dataset: contents, recomputation, reuse, resume, S3, Dask."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path}/storage")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    return tmp_path


def curate(out: str, count: int = 12, per_shard: int = 4) -> dict:
    from flows.curate import CurateParams, curate_flow

    return curate_flow(CurateParams(sources=[{"kind": "shapes", "count": count, "resolution": 32}], out=out,
                                    overrides=[f"samples_per_shard={per_shard}"], track=False))


def run(dataset: str, bundle, **kw) -> dict:
    from flows.cache import CacheParams, cache_teacher_flow

    return cache_teacher_flow(CacheParams(dataset_uri=dataset, bundle_uri=f"file://{bundle}", **kw))


def read_shard(path) -> list[tuple[str, dict]]:
    from snapgen_model.data.sources import iter_tar_groups

    return list(iter_tar_groups(open(path, "rb")))


def test_cache_contents_and_recomputed_targets(env, tiny_bundle, prefect_harness):
    from snapgen_model.distill.cache import CacheConfig, draw_pair, load_npy
    from snapgen_model.distill.teacher import SD3Teacher, TeacherConfig
    from snapgen_model.diffusion.flow import interpolate

    ds = f"file://{env}/ds"
    curate(ds)
    manifest = run(ds, tiny_bundle, overrides=["targets_per_sample=2", "feature_dtype=float32"])
    assert manifest["samples"] == 12 and len(manifest["shards"]) == 3 and not manifest["cache_hit"]
    assert {"latent.npy", "clip.tokens.npy", "clip.pooled.npy", "vK.npy"} <= set(manifest["storage"])
    assert manifest["mlflow_run_id"]
    key, members = read_shard(f"{manifest['uri'][len('file://'):]}/{manifest['shards'][0]['name']}")[0]
    latent = torch.from_numpy(load_npy(members["latent.npy"]))
    assert latent.shape == (16, 8, 8)
    # a cached target equals the teacher recomputed for the same (t, seed)
    cfg = CacheConfig(targets_per_sample=2, feature_dtype="float32")
    t, noise = draw_pair(key, 1, latent.shape, cfg)
    assert torch.allclose(torch.from_numpy(load_npy(members["t1.npy"])), t.view(1))
    teacher = SD3Teacher.from_pretrained(TeacherConfig(path=str(tiny_bundle)))
    tokens = torch.from_numpy(load_npy(members["clip.tokens.npy"]))[None]
    pooled = torch.from_numpy(load_npy(members["clip.pooled.npy"]))[None]
    cond = {"context": tokens, "pooled": pooled}
    v = teacher(interpolate(latent[None], noise[None], t.view(1)), t.view(1), cond["context"], cond["pooled"]).velocity
    assert torch.allclose(v[0], torch.from_numpy(load_npy(members["v1.npy"])), atol=1e-4)
    again = run(ds, tiny_bundle, overrides=["targets_per_sample=2", "feature_dtype=float32"])
    assert again["cache_hit"] and again["key"] == manifest["key"]
    other = run(ds, tiny_bundle, overrides=["targets_per_sample=1"], track=False)
    assert other["key"] != manifest["key"] and other["uri"] != manifest["uri"]


def test_interrupted_caching_resumes_without_recomputing(env, tiny_bundle, prefect_harness, monkeypatch):
    """Fault injected by patching the library encoder call (a fault no real server produces)."""
    import tasks.cache as tc

    ds = f"file://{env}/ds2"
    curate(ds)
    real, calls = tc.cache_batch, []

    def failing(keys, *a, **k):
        calls.append(keys[0])
        if len(calls) == 2:
            raise RuntimeError("injected crash while caching")
        return real(keys, *a, **k)

    monkeypatch.setattr(tc, "cache_batch", failing)
    with pytest.raises(Exception, match="injected crash"):
        run(ds, tiny_bundle, track=False)
    monkeypatch.setattr(tc, "cache_batch", lambda keys, *a, **k: (calls.append(keys[0]), real(keys, *a, **k))[1])
    calls.clear()
    manifest = run(ds, tiny_bundle, track=False)
    assert manifest["reused_shards"] >= 1 and len(calls) == 3 - manifest["reused_shards"]


def test_cache_on_seaweedfs_with_dask_local_cluster(seaweed_s3, tiny_bundle, tmp_path, monkeypatch, prefect_harness):
    from flows.cache import CacheParams, run_cache

    bucket = seaweed_s3.new_bucket()
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"s3://{bucket}/root")
    monkeypatch.setenv("SNAPGEN_S3_ENDPOINT_URL", seaweed_s3.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    ds = f"s3://{bucket}/ds"
    curate(ds, count=8)
    manifest = run_cache(CacheParams(dataset_uri=ds, bundle_uri=f"file://{tiny_bundle}", track=False),
                         task_runner="dask", workers=2)
    assert manifest["samples"] == 8 and manifest["uri"].startswith(f"s3://{bucket}/ds/cache/")
    from tasks.storage import Storage
    from tasks.settings import get_settings

    store = Storage.from_settings(get_settings())
    assert store.exists(manifest["uri"] + "/manifest.json")
    assert sum(o.endswith(".tar") for o in store.list(manifest["uri"] + "/shards/")) == 2


def test_train_decoder_flow_on_cached_latents(env, tiny_bundle, prefect_harness):
    from flows.decoder import DecoderParams, train_decoder_flow

    ds = f"file://{env}/ds3"
    curate(ds, count=24, per_shard=12)
    cache = run(ds, tiny_bundle, overrides=["targets_per_sample=0"], track=False)
    params = DecoderParams(cache_uri=cache["uri"], bundle_uri=f"file://{tiny_bundle}", preset="toy-smoke",
                           train_overrides=["steps=40", "batch_size=8", "heldout=4"])
    result = train_decoder_flow(params)
    assert result["report"]["batch"] == 4 and result["mlflow_run_id"]
    assert result["loss_curve"][-1] < result["loss_curve"][0]
    from snapgen_model.storage.checkpoint import load_model
    assert type(load_model(result["checkpoint"][len("file://"):])).__name__ == "TinyDecoder"
    assert train_decoder_flow(params)["cache_hit"]


def test_pretrain_flow_on_cached_targets(env, tiny_bundle, prefect_harness, mlflow_server):
    from mlflow.tracking import MlflowClient

    from flows.pretrain import PretrainParams, pretrain_flow
    from snapgen_model.storage.checkpoint import load_model
    from snapgen_model.artifacts.student import load_conditioner

    ds = f"file://{env}/ds4"
    curate(ds, count=8, per_shard=8)
    cache = run(ds, tiny_bundle, overrides=["targets_per_sample=1", "store_features=true"], track=False)
    params = PretrainParams(cache_uri=cache["uri"], preset="toy-smoke",
                            overrides=["unet.context_dim=32", "unet.pooled_dim=32"],
                            pretrain=["steps=4", "batch_size=4", "checkpoint_every=2", "log_every=1", "accelerator=cpu"])
    result = pretrain_flow(params)
    assert result["step"] == 4
    unet = load_model(result["student"]["unet"][len("file://"):])
    cond = load_conditioner(result["student"]["conditioner"][len("file://"):])
    assert unet.config.context_dim == 32 and "clip" in cond.proj
    ckpts = sorted(p.name for p in Path(result["checkpoints"][len("file://"):]).glob("step-*"))
    assert ckpts == ["step-00000002", "step-00000004"]
    history = MlflowClient(mlflow_server.uri).get_metric_history(result["mlflow_run_id"], "loss/total")
    assert len(history) >= 3
    # multi-level KD from the cached features, said in the run's tags; the raw pair saved beside the EMA one
    tags = MlflowClient(mlflow_server.uri).get_run(result["mlflow_run_id"]).data.tags
    assert tags["snapgen.kd_levels"] == "output+feature" and result["kd_levels"] == "output+feature"
    assert {"unet_raw", "conditioner_raw"} <= set(result["student"])
    again = pretrain_flow(params)  # resumes at the final checkpoint: nothing left to train
    assert again["step"] == 4


def test_pretrain_flow_online_teacher_on_a_cache_without_targets(env, tiny_bundle, prefect_harness, mlflow_server):
    """pretrain.mode=online: the flow loads the cache's teacher bundle and KD runs from it (output + feature)
    on a cache that holds no targets; the same cache in cached mode has no KD at all (the levels differ)."""
    from mlflow.tracking import MlflowClient

    from flows.pretrain import PretrainParams, pretrain_flow

    ds = f"file://{env}/ds5"
    curate(ds, count=8, per_shard=8)
    cache = run(ds, tiny_bundle, overrides=["targets_per_sample=0", "store_features=false"], track=False)
    base = ["steps=2", "batch_size=4", "log_every=1", "accelerator=cpu"]

    def params(mode: str) -> PretrainParams:
        return PretrainParams(cache_uri=cache["uri"], preset="toy-smoke",
                              overrides=["unet.context_dim=32", "unet.pooled_dim=32"], pretrain=[*base, f"mode={mode}"])

    online = pretrain_flow(params("online"))
    assert online["step"] == 2 and online["kd_levels"] == "output+feature"
    tags = MlflowClient(mlflow_server.uri).get_run(online["mlflow_run_id"]).data.tags
    assert "online teacher" in tags["snapgen.kd_levels_note"]
    history = MlflowClient(mlflow_server.uri).get_metric_history(online["mlflow_run_id"], "loss/out")
    assert history and all(m.value > 0 for m in history)
    assert pretrain_flow(params("cached"))["kd_levels"] == "none"


def test_online_pretraining_names_a_missing_teacher(tmp_path):
    from snapgen_model.training.pretrain import PretrainConfig, online_teacher
    from tasks.pretrain import teacher_folder

    online = PretrainConfig(mode="online")
    assert online_teacher(PretrainConfig(), None) is None and teacher_folder(PretrainConfig(), {}) is None
    with pytest.raises(ValueError, match="names no teacher bundle"):
        teacher_folder(online, {"key": "k"})
    with pytest.raises(ValueError, match=r"bundle folder .*gone.* does not exist"):
        online_teacher(online, tmp_path / "gone")
