"""2-process DDP pretraining through `snapgen pretrain`, as complete as one process: metrics in a real MLflow
server (written from rank 0), checkpoints uploaded to SeaweedFS, the EMA student saved and uploaded, and the
student evaluates; a kill -9 of such a run, then the same command resumes from its last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SNAPGEN = Path(sys.executable).parent / "snapgen"


@pytest.fixture
def ddp_env(tmp_path, seaweed_s3, mlflow_server, tiny_bundle, prefect_harness, monkeypatch):
    """(environment of the CLI runs, cache URI): storage on SeaweedFS, tracking on the MLflow server, and a
    cache of the tiny teacher bundle (one cached pair per image) made by the caching flow."""
    from tests.integration.test_cache_flow import curate, run

    if not seaweed_s3.is_running:
        seaweed_s3.start()
    bucket = seaweed_s3.new_bucket()
    settings = {"SNAPGEN_HOME": str(tmp_path / "home"), "SNAPGEN_STORAGE_ROOT": f"s3://{bucket}/root",
                "SNAPGEN_S3_ENDPOINT_URL": seaweed_s3.endpoint_url, "AWS_ACCESS_KEY_ID": seaweed_s3.access_key,
                "AWS_SECRET_ACCESS_KEY": seaweed_s3.secret_key, "SNAPGEN_MLFLOW_TRACKING_URI": mlflow_server.uri}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    curate(f"file://{tmp_path}/ds", count=8, per_shard=8)
    cache = run(f"file://{tmp_path}/ds", tiny_bundle, overrides=["targets_per_sample=1"], track=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPGEN_", "MLFLOW_"))}
    return env | settings | {"OMP_NUM_THREADS": "1"}, cache["uri"]


def command(cache_uri: str, steps: int, every: int, strategy: str = "ddp") -> list[str]:
    train = [f"steps={steps}", "batch_size=4", f"checkpoint_every={every}", "log_every=1", "devices=2",
             f"strategy={strategy}", "accelerator=cpu", "kd.feature_kd=false"]
    return [str(SNAPGEN), "pretrain", "--cache", cache_uri, "--preset", "toy-smoke", "--preset-set",
            "unet.context_dim=32", "--preset-set", "unet.pooled_dim=32", *[a for t in train for a in ("--set", t)],
            "--json"]


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = proc.stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_through_the_cli_logs_uploads_and_saves_an_evaluable_student(ddp_env, mlflow_server, strategy):
    """`fsdp`: the same run with the student sharded over the two processes (torch FSDP2 on gloo)."""
    from mlflow.tracking import MlflowClient

    from flows.evaluate import EvaluateParams, evaluate_flow
    from tasks.settings import get_settings
    from tasks.storage import Storage

    env, cache_uri = ddp_env
    result = result_of(subprocess.run(command(cache_uri, 4, 2, strategy), env=env, capture_output=True, text=True,
                                      timeout=900))
    assert result["step"] == 4 and result["student_uri"].startswith("s3://")
    store = Storage.from_settings(get_settings())
    uploaded = store.list(result["checkpoints"] + "/")
    assert {f"step-0000000{s}/state.json" for s in (2, 4)} <= {o[len(result["checkpoints"]) + 1:] for o in uploaded}
    files = {o.rsplit("/", 1)[-1] for o in store.list(result["student_uri"] + "/")}
    assert {"unet_ema.safetensors", "conditioner.safetensors", "unet_raw.safetensors", "student.json"} <= files
    history = MlflowClient(mlflow_server.uri).get_metric_history(result["mlflow_run_id"], "loss/total")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # every step, logged once (rank 0 only)
    scored = evaluate_flow(EvaluateParams(model=result["student_uri"], benchmarks=["geneval"], images_per_prompt=1,
                                          max_prompts_per_task=1, steps=2, reference_rows=False))
    assert 0.0 <= scored["benchmarks"]["geneval"]["overall"] <= 1.0


def test_a_killed_ddp_run_resumes_from_its_last_checkpoint(ddp_env, tmp_path):
    env, cache_uri = ddp_env
    cmd = command(cache_uri, 60, 4)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    states = Path(env["SNAPGEN_HOME"]) / "runs"
    deadline = time.monotonic() + 600
    try:
        while not list(states.glob("pretrain-*/state/step-*/state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and both ranks
        proc.wait(timeout=60)
    done = sorted(p.parent.name for p in states.glob("pretrain-*/state/step-*/state.json"))
    assert done and done[-1] < "step-00000060", done
    result = result_of(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900))
    assert result["step"] == 60 and result["resumed_from"] and Path(result["resumed_from"]).name >= done[-1]
    assert result["student_uri"].startswith("s3://")


def test_ddp_step_distillation_through_the_cli_is_as_complete_as_one_process(ddp_env, mlflow_server, tiny_bundle):
    """`snapgen distill` on 2 processes: metrics in the stage's MLflow run from rank 0 (every step once),
    checkpoints uploaded to SeaweedFS, the EMA student saved with its few-step sampler, and it evaluates."""
    from mlflow.tracking import MlflowClient

    from flows.evaluate import EvaluateParams, evaluate_flow
    from tasks.settings import get_settings
    from tasks.storage import Storage

    env, cache_uri = ddp_env
    student = result_of(subprocess.run(command(cache_uri, 2, 2), env=env, capture_output=True, text=True,
                                       timeout=900))["student_uri"]
    train = ["steps=4", "batch_size=2", "checkpoint_every=2", "log_every=1", "accelerator=cpu", "devices=2",
             "strategy=ddp", "sampler_steps=2", "discriminator.head_width=8", "discriminator.feature_layers=[0,1]"]
    proc = subprocess.run([str(SNAPGEN), "distill", "--cache", cache_uri, "--student", student, "--bundle", str(tiny_bundle),
                           *[a for t in train for a in ("--set", t)], "--json"],
                          env=env, capture_output=True, text=True, timeout=900)
    result = result_of(proc)
    assert result["step"] == 4 and result["student_uri"].startswith("s3://") and result["sampler"]["steps"] == 2
    store = Storage.from_settings(get_settings())
    uploaded = {o[len(result["checkpoints"]) + 1:] for o in store.list(result["checkpoints"] + "/")}
    assert {f"step-0000000{s}/state.json" for s in (2, 4)} <= uploaded
    files = {o.rsplit("/", 1)[-1] for o in store.list(result["student_uri"] + "/")}
    assert {"unet_ema.safetensors", "conditioner.safetensors", "unet_raw.safetensors", "student.json"} <= files
    client = MlflowClient(mlflow_server.uri)
    assert sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], "loss/g")) == [0, 1, 2, 3]
    assert result["metrics"]["generator_rel_change"] > 0
    scored = evaluate_flow(EvaluateParams(model=result["student_uri"], benchmarks=["geneval"], images_per_prompt=1,
                                          max_prompts_per_task=1, reference_rows=False))
    assert 0.0 <= scored["benchmarks"]["geneval"]["overall"] <= 1.0
