"""The pretrain and distill flows on the streaming data path (`data=stream`): curate -> cache ->
pretrain 3 steps -> distill 2 steps, the cache read in place (not copied) and the data position
in every checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_pretrain_and_distill_flows_stream_the_cache(tmp_path, monkeypatch, tiny_bundle, prefect_harness,
                                                     mlflow_server):
    from mlflow.tracking import MlflowClient

    from flows.cache import CacheParams, cache_teacher_flow
    from flows.curate import CurateParams, curate_flow
    from flows.distill import DistillParams, distill_steps_flow
    from flows.pretrain import PretrainParams, pretrain_flow

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path}/storage")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    ds = f"file://{tmp_path}/ds"
    curate_flow(CurateParams(sources=[{"kind": "shapes", "count": 6, "resolution": 32}], out=ds,
                             overrides=["samples_per_shard=2"], track=False))
    cache = cache_teacher_flow(CacheParams(dataset_uri=ds, bundle_uri=f"file://{tiny_bundle}",
                                           overrides=["targets_per_sample=1"], track=False))
    pre = pretrain_flow(PretrainParams(cache_uri=cache["uri"], preset="toy-smoke",
                                       pretrain=["steps=3", "batch_size=2", "checkpoint_every=2", "accelerator=cpu",
                                                 "kd.feature_kd=false", "data=stream", "shuffle_buffer=2"]))
    assert pre["step"] == 3 and pre["data_skipped"] == {"bad_samples": 0, "bad_shards": 0}
    state = tmp_path / "home" / "runs" / f"pretrain-{pre['key']}" / "state"
    meta = json.loads((state / "step-00000002" / "state.json").read_text())
    assert meta["pretrain"]["data"] == "stream" and meta["data_position"]["ranks"][0]["stream"]["emitted"] == 4
    metrics = MlflowClient(mlflow_server.uri).get_run(pre["mlflow_run_id"]).data.metrics
    assert metrics["data/bad_samples"] == 0
    params = DistillParams(cache_uri=cache["uri"], student_uri=pre["student"]["unet"].rsplit("/", 1)[0],
                           bundle_uri=f"file://{tiny_bundle}",
                           distill=["steps=2", "batch_size=2", "log_every=1", "accelerator=cpu", "sampler_steps=2",
                                    "discriminator.head_width=8", "discriminator.feature_layers=[0,1]",
                                    "data=stream", "shuffle_buffer=2"])
    result = distill_steps_flow(params)
    assert result["step"] == 2 and result["data_skipped"] == {"bad_samples": 0, "bad_shards": 0}
    assert not (Path(tmp_path) / "home" / "cache" / "models").exists()  # file:// caches are read in place
