"""bootstrap_teacher_flow (toy-smoke) as a real Prefect flow run against a real MLflow server: the bundle
lands in storage with bundle.json, the run carries curves, diagnostics and the sample grid, a version of
`snapgen-toy-teacher` is registered, and a rerun with the same config is a fast cache hit."""
from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.integration


def test_bootstrap_flow_publishes_logs_registers_and_caches(tmp_path, monkeypatch, mlflow_server, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.bootstrap import bootstrap_teacher_flow
    from snapgen_model.training.bootstrap import get_bootstrap_config, load_bundle

    storage = tmp_path / "storage"
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{storage}")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    config_hash = get_bootstrap_config("toy-smoke").content_hash()

    result = bootstrap_teacher_flow(preset="toy-smoke")
    assert result["cache_hit"] is False and result["config_hash"] == config_hash
    folder = storage / "teachers" / config_hash
    assert result["bundle_uri"] == f"file://{folder}"
    for name in ("vae/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "text_encoder/tokenizer.json", "bundle.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "bundle.json").read_text())
    assert record["config_hash"] == config_hash and set(record["files"]) >= {"vae/config.json"}
    assert record["evaluation"]["reference"]["clean"]["overall"] == pytest.approx(1.0)
    assert load_bundle(folder).config.name == "toy-smoke"  # the published copy loads

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["teacher_layers"] == "2" and run.data.tags["snapgen.config_hash"] == config_hash
    assert run.data.tags["snapgen.preset"] == "toy-smoke"
    history = client.get_metric_history(run.info.run_id, "teacher/loss")
    assert len(history) == 8 and history[-1].value < history[0].value
    assert "eval.teacher.colour_present" in run.data.metrics and "teacher_steps" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bundle", "bundle.json", "samples"} <= names
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/teacher_samples.png", "samples/grid_prompts.json"} <= samples

    version = client.get_model_version("snapgen-toy-teacher", result["model_version"])
    assert version.run_id == run.info.run_id and version.source.endswith("bundle")
    assert version.tags["snapgen.config_hash"] == config_hash and version.tags["snapgen.preset"] == "toy-smoke"
    assert "snapgen.git_commit" in version.tags

    started = time.monotonic()
    again = bootstrap_teacher_flow(preset="toy-smoke")
    assert again["cache_hit"] is True and time.monotonic() - started < 15
    assert again["bundle_uri"] == result["bundle_uri"] and again["model_version"] == result["model_version"]
    assert again["mlflow_run_id"] == result["mlflow_run_id"]
    assert again["metrics"]["teacher_loss"] == pytest.approx(result["metrics"]["teacher_loss"])
