"""The pretrain flow on a class-conditional cache (latents + integer labels) with a tiny
class-conditional preset override of toy-smoke: the UNet alone is saved, the run says in its logs
and MLflow tag `snapgen.kd` whether KD applied (class-conditional teacher targets) or not."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

CLASS_OVERRIDES = ["task=class-conditional", "unet.conditioning=class", "unet.num_classes=4"]


def write_manifest(folder, target_condition: str) -> None:
    shards = [{"name": f"shards/{p.name}", "samples": 4} for p in sorted((folder / "shards").glob("*.tar"))]
    (folder / "manifest.json").write_text(json.dumps({
        "key": f"class-cache-{target_condition}", "dataset_hash": "d" * 16, "bundle_id": "class-teacher",
        "encoders": [{"name": "clip"}], "config": {"targets_per_sample": 2, "target_condition": target_condition},
        "shards": shards, "samples": 8}))


@pytest.mark.parametrize("target_condition", ["text", "class"])
def test_pretrain_flow_class_conditional(tmp_path, monkeypatch, prefect_harness, mlflow_server, target_condition):
    import torch
    from mlflow.tracking import MlflowClient

    from flows.pretrain import PretrainParams, pretrain_flow
    from snapgen_model.storage.checkpoint import load_model
    from tests.unit.test_class_conditional import labelled_cache

    torch.set_num_threads(1)
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path}/storage")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    folder = labelled_cache(tmp_path / "cache")
    write_manifest(folder, target_condition)
    result = pretrain_flow(PretrainParams(cache_uri=f"file://{folder}", preset="toy-smoke", overrides=CLASS_OVERRIDES,
                                          pretrain=["steps=3", "batch_size=4", "checkpoint_every=0", "log_every=1",
                                                    "accelerator=cpu", "kd.feature_kd=false", "label_dropout=0.25"]))
    assert result["step"] == 3 and set(result["student"]) == {"unet", "unet_raw"}
    assert load_model(result["student"]["unet"][len("file://"):]).config.conditioning == "class"
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result["mlflow_run_id"])
    kd = target_condition == "class"
    assert ("KD from 2 cached class-conditional teacher targets" if kd else "task loss only") in run.data.tags["snapgen.kd"]
    assert len(client.get_metric_history(run.info.run_id, "loss/task")) == 3
    assert bool(client.get_metric_history(run.info.run_id, "loss/out")) == kd
