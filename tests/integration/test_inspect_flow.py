"""inspect_flow: a real Prefect flow run logging a preset's table and config to a real MLflow server."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_inspect_flow_logs_run_with_artifacts(tmp_path, monkeypatch, mlflow_server, prefect_harness):
    from mlflow.tracking import MlflowClient

    from flows.inspect import InspectParams, inspect_flow

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path))
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    result = inspect_flow(InspectParams(preset="toy", overrides=["unet.ffn_ratio=4"]))
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["unet.ffn_ratio"] == "4"
    assert run.data.metrics["unet_params"] == result["report"]["unet_params"]
    assert run.data.tags["snapgen.config_hash"] == result["config_hash"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "inspect_report.json", "inspect_table.md"} <= names
    local = client.download_artifacts(run.info.run_id, "inspect_report.json", str(tmp_path))
    assert json.load(open(local))["rows"][1]["stage"] == "down0"
