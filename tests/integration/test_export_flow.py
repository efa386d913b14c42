"""export_flow against a real Prefect API and a real MLflow server: the export lands beside the model
in storage with its manifest last, the report and files are logged, a rerun is a cache hit, a
a models:/ alias resolves through the registry, and a parity failure blocks the upload."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytestmark = pytest.mark.integration

SMALL_UNET = ["unet.channels=[16,32]", "unet.transformer_depth=[0,1]", "unet.self_attention=[false,true]",
              "unet.down_blocks=1", "unet.up_blocks=2", "unet.mid_transformer_depth=1"]
FAST = ["text_length=8", "threads=1", "latency_warmup=1", "latency_runs=3"]


@pytest.fixture
def env(tmp_path, monkeypatch, mlflow_server, prefect_harness):
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    return tmp_path


@pytest.fixture
def checkpoint(env) -> Path:
    from snapgen_model.nn.decoder import TinyDecoder
    from snapgen_model.nn.unet import SnapGenUNet
    from snapgen_model.presets import get_preset
    from snapgen_model.storage.checkpoint import save_model
    from tests.fixtures.checkpoints import randomize_zero_init

    cfg = get_preset("toy-smoke", SMALL_UNET)
    torch.manual_seed(0)
    folder = env / "storage" / "models" / "m1"
    save_model(TinyDecoder(cfg.decoder), folder / "decoder.safetensors", preset=cfg)
    return save_model(randomize_zero_init(SnapGenUNet(cfg.unet)), folder / "unet.safetensors", preset=cfg)


def _runs(client, experiment="snapgen"):
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_export_flow_uploads_logs_and_skips_an_unchanged_checkpoint(env, checkpoint, mlflow_server):
    import typer
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli_export import export
    from flows.export import ExportParams, export_flow

    params = ExportParams(model=str(checkpoint), decoder=str(checkpoint.with_name("decoder.safetensors")),
                          formats=["onnx"], parts=["unet", "decoder"], export_overrides=FAST)
    result = export_flow(params)
    dest = checkpoint.parent / "export"
    assert result["uri"] == f"file://{dest}" and not result["cache_hit"] and result["passed"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["export_key"] == result["export_key"]
    for name in ("unet.onnx", "unet.dynamic.onnx", "decoder.onnx", "report.json", "report.md"):
        assert manifest["sizes"][name] == (dest / name).stat().st_size
    onnx.checker.check_model(str(dest / "unet.onnx"))
    assert result["parts"]["decoder"]["source"]["kind"] == "checkpoint"
    assert result["generation"]["passed"] and result["generation"]["image_psnr"] >= 40
    assert result["parts"]["unet"]["onnx"]["dynamic_batch"]["inputs"][0]["shape"] == ["batch", 16, 8, 8]

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["snapgen.stage"] == "export" and run.data.tags["snapgen.export_parity"] == "passed"
    assert run.data.params["formats"] == "onnx" and run.data.params["export.text_length"] == "8"
    assert run.data.params["export.latency_runs"] == "3" and run.data.params["model_ref"] == str(checkpoint)
    assert run.data.metrics["unet.onnx.static.psnr"] == pytest.approx(
        result["parts"]["unet"]["onnx"]["static"]["parity"]["psnr"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"export_report.json", "report.md", "export"} <= top
    files = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert "export/unet.onnx" in files and "export/manifest.json" in files
    runs_before = len(_runs(client))

    again = export_flow(params)
    assert again["cache_hit"] and again["export_key"] == result["export_key"]
    assert json.loads((dest / "manifest.json").read_text()) == manifest
    assert len(_runs(client)) == runs_before  # nothing exported or logged again

    # the CLI sub-command on the same inputs: a cache hit, as JSON and as a table
    app = typer.Typer()
    app.command("export")(export)
    app.command("noop")(lambda: None)  # two commands: typer keeps the "export" sub-command name
    args = ["export", "--model", str(checkpoint), "--formats", "onnx", "--parts", "unet,decoder"] + [
        x for item in FAST for x in ("--set", f"export.{item}")]
    as_json = CliRunner().invoke(app, args + ["--json"])
    assert as_json.exit_code == 0, as_json.output
    shown = json.loads(as_json.stdout[as_json.stdout.index("{"):])
    assert shown["cache_hit"] and shown["export_key"] == result["export_key"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "unet.dynamic.onnx" in table.output and "cache hit" in table.output and "274 ms/step" in table.output
    bad = CliRunner().invoke(app, ["export", "--model", str(checkpoint), "--palettize", "6"])
    assert bad.exit_code == 2 and "coreml" in bad.output


def test_export_by_registry_alias(env, checkpoint, mlflow_server):
    """A models:/NAME@ALIAS ref resolves through the registry to the version's checkpoint folder."""
    from mlflow.tracking import MlflowClient

    from flows.export import ExportParams, export_flow
    from tasks.settings import get_settings
    from tasks.registry import CHECKPOINT_TAG, register_model_version
    from tasks.tracking import start_run

    settings = get_settings()
    with start_run(settings, "register-for-export") as run:
        run_id = run.run_id
    version = register_model_version(settings, "snapgen-export-test", f"runs:/{run_id}/model", run_id=run_id,
                                     tags={CHECKPOINT_TAG: f"file://{checkpoint.parent}"})
    MlflowClient(mlflow_server.uri).set_registered_model_alias("snapgen-export-test", "candidate", version)
    result = export_flow(ExportParams(model="models:/snapgen-export-test@candidate", formats=["onnx"],
                                      parts=["unet"], export_overrides=FAST, track=False))
    assert result["passed"] and (checkpoint.parent / "export" / "unet.onnx").is_file()
    with pytest.raises(LookupError, match="not found in the registry"):
        export_flow(ExportParams(model="models:/snapgen-export-test@champion", track=False))


def test_a_parity_failure_blocks_the_upload_and_is_logged(env, checkpoint, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.export import ExportParams, export_flow
    from snapgen_model.export import ParityError, onnx_export

    original = onnx_export.save_model

    def perturbed(model, path, external):
        init = next(t for t in model.graph.initializer if len(t.dims) == 4)
        array = onnx.numpy_helper.to_array(init) * 1.5
        init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), init.name))
        return original(model, path, external)

    monkeypatch.setattr(onnx_export, "save_model", perturbed)
    out = f"file://{env / 'storage' / 'exports' / 'blocked'}"
    with pytest.raises(ParityError, match=r"decoder \(onnx static\): max_abs"):
        export_flow(ExportParams(model=str(checkpoint), parts=["decoder"], out=out,
                                 export_overrides=FAST + ["dynamic_batch=false"]))
    assert not (env / "storage" / "exports" / "blocked").exists()
    client = MlflowClient(mlflow_server.uri)
    failed = [r for r in _runs(client) if r.data.tags.get("snapgen.export_parity") == "failed"]
    assert failed, "the blocked export's report is logged to MLflow"
    names = {a.path for a in client.list_artifacts(failed[0].info.run_id)}
    assert {"export_report.json", "export_error.txt"} <= names


def test_export_flow_reads_and_writes_s3(env, checkpoint, seaweed_s3, monkeypatch):
    """A checkpoint in S3: downloaded, exported (ONNX + palettized Core ML decoder), and the folder
    uploaded beside it with the manifest last."""
    from flows.export import ExportParams, export_flow
    from tasks.settings import get_settings
    from tasks.storage import Storage

    bucket = seaweed_s3.new_bucket()
    for key, value in {"STORAGE_ROOT": f"s3://{bucket}/root", "S3_ENDPOINT_URL": seaweed_s3.endpoint_url,
                       "S3_REGION": seaweed_s3.region, "AWS_ACCESS_KEY_ID": seaweed_s3.access_key,
                       "AWS_SECRET_ACCESS_KEY": seaweed_s3.secret_key}.items():
        monkeypatch.setenv(f"SNAPGEN_{key}", value)
    store = Storage.from_settings(get_settings())
    model = store.uri("models", "m1")
    for name in ("unet.safetensors", "decoder.safetensors"):
        store.upload_file(checkpoint.with_name(name), store.join(model, name))
    params = ExportParams(model=model, parts=["decoder"], formats=["onnx", "coreml"], palettize=6,
                          export_overrides=FAST + ["palettize_min_elements=256"], track=False)
    result = export_flow(params)
    dest = store.join(model, "export")
    assert result["uri"] == dest and result["parts"]["decoder"]["source"]["kind"] == "checkpoint"
    pal = result["parts"]["decoder"]["coreml"]["palettized"]
    assert pal["bits"] == 6 and pal["bytes"] < pal["bytes_before"]
    listed = {uri[len(dest) + 1:].split("/", 1)[0] for uri in store.list(dest + "/")}
    assert {"decoder.onnx", "decoder.dynamic.onnx", "decoder.mlpackage", "decoder.pal6.mlpackage", "report.json",
            "report.md", "manifest.json"} == listed
    manifest = store.read_json(store.join(dest, "manifest.json"))
    assert manifest["export_key"] == result["export_key"]
    assert manifest["sha256"]["decoder.onnx"] == store.sha256(store.join(dest, "decoder.onnx"))
    assert export_flow(params)["cache_hit"]
