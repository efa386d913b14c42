"""Step distillation flow on a toy cache: curate -> cache -> pretrain 2 steps -> distill 2 steps."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def one_thread():
    """Tiny models: one thread avoids oversubscription stalls on a shared 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_distill_steps_flow_logs_both_losses(tmp_path, monkeypatch, tiny_bundle, prefect_harness, mlflow_server,
                                             one_thread):
    from mlflow.tracking import MlflowClient

    from flows.cache import CacheParams, cache_teacher_flow
    from flows.curate import CurateParams, curate_flow
    from flows.distill import DistillParams, distill_steps_flow
    from flows.pretrain import PretrainParams, pretrain_flow
    from snapgen_model.storage.checkpoint import read_preset

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path}/storage")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    ds = f"file://{tmp_path}/ds"
    curate_flow(CurateParams(sources=[{"kind": "shapes", "count": 4, "resolution": 32}], out=ds,
                             overrides=["samples_per_shard=4"], track=False))
    cache = cache_teacher_flow(CacheParams(dataset_uri=ds, bundle_uri=f"file://{tiny_bundle}",
                                           overrides=["targets_per_sample=1"], track=False))
    pre = pretrain_flow(PretrainParams(cache_uri=cache["uri"], preset="toy-smoke",
                                       pretrain=["steps=2", "batch_size=2", "checkpoint_every=0", "accelerator=cpu",
                                                 "kd.feature_kd=false"]))
    params = DistillParams(cache_uri=cache["uri"], student_uri=pre["student"]["unet"].rsplit("/", 1)[0],
                           bundle_uri=f"file://{tiny_bundle}",
                           distill=["steps=2", "batch_size=2", "log_every=1", "accelerator=cpu", "sampler_steps=2",
                                    "discriminator.head_width=8", "discriminator.feature_layers=[0,1]"])
    result = distill_steps_flow(params)
    assert result["step"] == 2 and result["sampler"]["kind"] == "few_step"
    sampler = read_preset(result["student"]["unet"][len("file://"):]).sampler
    assert (sampler.kind, sampler.steps) == ("few_step", 2)
    client = MlflowClient(mlflow_server.uri)
    for metric in ("loss/d", "loss/g", "d/acc_real", "d/acc_fake"):
        assert len(client.get_metric_history(result["mlflow_run_id"], metric)) == 2, metric
    for metric in ("weights/rel_change_g", "weights/rel_change_ema"):  # over training (guided teacher target)
        assert len(client.get_metric_history(result["mlflow_run_id"], metric)) == 2, metric
    final = client.get_run(result["mlflow_run_id"]).data.metrics
    assert final["final/generator_rel_change"] > 0 and "final/d_acc_real" in final
    assert result["metrics"]["teacher_guidance"] > 1 and set(result["student"]) >= {"unet", "unet_raw", "conditioner_raw"}
    assert distill_steps_flow(params)["step"] == 2  # resumes at the final checkpoint: nothing left to train
