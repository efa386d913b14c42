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


def test_shipped_release_is_verified_published_registered_once_and_tamper_refused(tmp_path, monkeypatch, mlflow_server,
                                                                                   prefect_harness):
    """register_teacher_release_flow: a release (a toy-smoke bundle packaged like releases/toy-teacher/v1)
    is verified, published and registered; a second call publishes and registers nothing; a tampered
    file stops the flow with an error naming it."""
    from mlflow.tracking import MlflowClient

    from flows.bootstrap import register_teacher_release_flow
    from snapgen_model.distill.teacher import LoadError
    from snapgen_model.training import bootstrap as bs
    from snapgen_model.training import release as rel

    cfg = bs.get_bootstrap_config("toy-smoke")
    vae, ae = bs.train_autoencoder(cfg)
    models, teacher = bs.train_teacher(cfg, None, vae)
    bs.save_bundle(tmp_path / "bundle", cfg, vae, models.transformer, models.text_model, models.tokenizer,
                   ae.metrics | teacher.metrics, {"autoencoder": ae.curve, "teacher": teacher.curve})
    releases = tmp_path / "releases"
    rel.package_release(tmp_path / "bundle", "toy-teacher/v1", card="# test card\n", releases_dir=releases)
    monkeypatch.setattr(rel, "RELEASES_DIR", releases)
    storage = tmp_path / "storage"
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{storage}")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)

    first = register_teacher_release_flow("toy-teacher/v1")
    assert first["cache_hit"] is False and first["release"] == "toy-teacher/v1"
    published = storage / "teachers" / cfg.content_hash()
    assert (published / "MODEL_CARD.md").read_text() == "# test card\n"
    assert bs.load_bundle(published).config == cfg
    version = MlflowClient(mlflow_server.uri).get_model_version("snapgen-toy-teacher", first["model_version"])
    assert version.tags["snapgen.release"] == "toy-teacher/v1"

    again = register_teacher_release_flow("toy-teacher/v1")
    assert again["cache_hit"] is True and again["model_version"] == first["model_version"]
    # a card corrected after release (snapgen release-card) is the same teacher: nothing republished or registered
    assert rel.amend_card("toy-teacher/v1", "# corrected test card\n", "typo", releases) is True
    amended = register_teacher_release_flow("toy-teacher/v1")
    assert amended["cache_hit"] is True and amended["model_version"] == first["model_version"]

    weights = releases / "toy-teacher" / "v1" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(LoadError, match="transformer/diffusion_pytorch_model.safetensors does not match"):
        register_teacher_release_flow("toy-teacher/v1")
