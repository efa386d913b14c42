"""prefect.yaml against a real `prefect server` (SQLite, 127.0.0.1) and a process worker: deploy every
deployment, trigger the re-evaluation deployment with `prefect deployment run`, wait for it, check the
MLflow records; the evaluation-completed event then runs the promotion deployment (its trigger), whose
decision lands on the model version."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import save_toy_checkpoint
from tests.fixtures.processes import stop_process_tree

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


def _cli(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _register_toy_checkpoint(tmp_path: Path, tracking_uri: str) -> str:
    from tasks.settings import get_settings
    from tasks.registry import CHECKPOINT_TAG, register_model_version
    from tasks.tracking import start_run

    folder = save_toy_checkpoint(tmp_path / "ckpt", "toy")
    settings = get_settings()
    with start_run(settings, "deployment-test-model") as run:
        run.log_dict({"checkpoint": str(folder)}, "model/checkpoint.json")
    return register_model_version(settings, "snapgen-deploy", f"runs:/{run.run_id}/model", run_id=run.run_id,
                                  tags={CHECKPOINT_TAG: f"file://{folder}"})


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = dict(os.environ) | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_API_HOST": "127.0.0.1",
                              "PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                              "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PWD": str(ROOT),
                              "PREFECT_LOGGING_LEVEL": "INFO", "COLUMNS": "250"}
    env.pop("PREFECT_SERVER_EPHEMERAL_ENABLED", None)
    Path(env["PREFECT_HOME"]).mkdir()
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 150)
        yield env
    finally:
        assert stop_process_tree(server) == [], "the prefect server outlived SIGKILL"


def test_reevaluate_deployment_runs_on_a_worker_and_triggers_promotion(tmp_path, monkeypatch, mlflow_server,
                                                                      prefect_server):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    version = _register_toy_checkpoint(tmp_path, mlflow_server.uri)
    env = prefect_server | {"SNAPGEN_HOME": str(tmp_path / "home"), "SNAPGEN_MLFLOW_TRACKING_URI": mlflow_server.uri,
                            "SNAPGEN_STORAGE_ROOT": f"file://{tmp_path}/storage", "OMP_NUM_THREADS": "1"}

    _cli(env, "work-pool", "create", "snapgen-process", "--type", "process")
    out = _cli(env, "--no-prompt", "deploy", "--all")
    for name in ("snapgen-nightly", "snapgen-reevaluate", "snapgen-export", "snapgen-promote"):
        assert name in out, out
    listed = _cli(env, "deployment", "ls")
    assert "reevaluate/snapgen-reevaluate" in listed and "snapgen-pipeline/snapgen-nightly" in listed

    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "snapgen-process", "--limit", "2"],
                              cwd=ROOT, env=env, stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        ref = f"models:/snapgen-deploy/{version}"
        params = {"model": ref, "benchmarks": ["geneval"],
                  "options": {"steps": 2, "images_per_prompt": 1, "max_prompts_per_task": 1, "chunk_size": 8}}
        run_out = _cli(env, "deployment", "run", "reevaluate/snapgen-reevaluate", "--params",
                       json.dumps({"params": params}), "--watch", "--watch-interval", "2", "--watch-timeout", "420",
                       timeout=480)
        assert re.search(r"COMPLETED|Completed", run_out), run_out[-2000:]

        client = MlflowClient(mlflow_server.uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`snapgen.model_ref` = '{ref}'")
        assert runs, "the re-evaluation logged no MLflow run"
        assert "geneval/overall" in runs[0].data.metrics and runs[0].data.tags["snapgen.stage"] == "evaluate"

        # the evaluation-completed event fires the promotion deployment's trigger; its decision is recorded
        deadline, decision = time.monotonic() + 240, None
        while time.monotonic() < deadline and decision is None:
            decision = client.get_model_version("snapgen-deploy", version).tags.get("snapgen.promotion.decision")
            time.sleep(3)
        assert decision is not None, (tmp_path / "worker.log").read_text()[-3000:]
        record = json.loads(decision)
        # a bare checkpoint registered without checksums or an export cannot pass the gates: blocked, with reasons
        assert record["passed"] is False and record["promoted"] is False
        assert any("checksums" in r for r in record["reasons"]) and any("parity" in r for r in record["reasons"])
    finally:
        # a worker under load may not exit within the grace period of SIGTERM: SIGKILL it and its flow-run children
        assert stop_process_tree(worker) == [], "the prefect worker (or a flow run it started) outlived SIGKILL"
