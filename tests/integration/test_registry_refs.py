"""Registry references (models:/name@alias, models:/name/N) resolved against a real MLflow server."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_resolve_alias_version_and_storage_tag(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from tasks.settings import get_settings
    from tasks.registry import CHECKPOINT_TAG, register_model_version, resolve_model_version
    from tasks.tracking import start_run

    settings = get_settings(home=tmp_path, mlflow_tracking_uri=mlflow_server.uri)
    ckpt = tmp_path / "model" / "unet.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    with start_run(settings, "register-test") as run:
        run.log_artifact(ckpt.parent, "model")
        run_id = run.run_id
    v1 = register_model_version(settings, "snapgen-test", f"runs:/{run_id}/model", run_id=run_id)
    client = MlflowClient(mlflow_server.uri)
    client.set_registered_model_alias("snapgen-test", "champion", v1)
    by_alias = resolve_model_version(settings, "models:/snapgen-test@champion")
    by_number = resolve_model_version(settings, f"models:/snapgen-test/{v1}")
    assert by_alias["version"] == v1 and by_alias["run_id"] == run_id
    assert (Path(by_alias["source"]) / "unet.safetensors").read_bytes() == b"weights"
    assert by_number["source"] == by_alias["source"]
    v2 = register_model_version(settings, "snapgen-test", f"runs:/{run_id}/model", run_id=run_id,
                                tags={CHECKPOINT_TAG: "s3://bucket/runs/x/student"})
    assert resolve_model_version(settings, f"models:/snapgen-test/{v2}")["source"] == "s3://bucket/runs/x/student"
    with pytest.raises(LookupError, match="not found in the registry"):
        resolve_model_version(settings, "models:/snapgen-test@nope")
    with pytest.raises(ValueError, match="malformed"):
        resolve_model_version(settings, "models:snapgen")
