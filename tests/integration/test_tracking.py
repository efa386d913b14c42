"""tasks.tracking against a real ``mlflow server`` (the session's ``mlflow_server`` fixture)."""
from __future__ import annotations

import json
import os
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tasks import lineage as lineage_mod
from tasks import tracking
from tests.fixtures.mlflow_server import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def client(mlflow_server: Any) -> MlflowClient:
    """A plain MLflow client reading back what tasks.tracking wrote."""
    return MlflowClient(tracking_uri=mlflow_server.uri)


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """All artifact file paths of a run, recursively."""
    found: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def _read_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    """Download one artifact and return its local path."""
    return Path(client.download_artifacts(run_id, path, str(dst)))


def test_params_metrics_and_artifacts_round_trip(
    mlflow_settings: Any, client: MlflowClient, tmp_path: Path
) -> None:
    local_file = tmp_path / "report.csv"
    local_file.write_text("a,b\n1,2\n")
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :4] = (255, 0, 0)

    with tracking.start_run(mlflow_settings, "roundtrip") as run:
        run.log_params({"model": {"width": 64, "blocks": [1, 2]}, "lr": 1e-3, "name": "x" * 7000})
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
        run.log_text("hello snapgen", "notes/hello.txt")
        run.log_dict({"a": 1, "nested": {"b": [1, 2]}}, "config/cfg.json")
        run.log_image(image, "images/red.png")
        run.log_image(Image.new("RGB", (4, 4), (0, 255, 0)), "images/green.png")
        run.log_artifact(local_file, "tables")
        run.set_tags({"stage": "test"})

    data = client.get_run(run.run_id)
    assert data.info.status == "FINISHED"
    assert data.info.run_name == "roundtrip"
    params = data.data.params
    assert params["model.width"] == "64"
    assert params["model.blocks"] == "[1, 2]"
    assert params["lr"] == "0.001"
    assert len(params["name"]) == 6000 and params["name"].endswith("[truncated]")
    assert data.data.tags["stage"] == "test"

    history = client.get_metric_history(run.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
    assert sorted(m.value for m in history) == pytest.approx([1 / 3, 0.5, 1.0])

    assert _artifact_paths(client, run.run_id) == {
        "notes/hello.txt",
        "config/cfg.json",
        "images/red.png",
        "images/green.png",
        "tables/report.csv",
    }
    dst = tmp_path / "dl"
    dst.mkdir()
    assert _read_artifact(client, run.run_id, "notes/hello.txt", dst).read_text() == "hello snapgen"
    cfg = json.loads(_read_artifact(client, run.run_id, "config/cfg.json", dst).read_text())
    assert cfg == {"a": 1, "nested": {"b": [1, 2]}}
    assert _read_artifact(client, run.run_id, "tables/report.csv", dst).read_text() == "a,b\n1,2\n"
    red = np.asarray(Image.open(_read_artifact(client, run.run_id, "images/red.png", dst)))
    np.testing.assert_array_equal(red, image)


def test_secrets_are_masked_in_params_tags_and_dicts(
    mlflow_settings: Any, client: MlflowClient, tmp_path: Path
) -> None:
    from pydantic import SecretStr

    params = {
        "storage": {"aws_access_key_id": "plain-id", "aws_secret_access_key": "s3cr3t"},
        "db_password": "hunter2",
        "hf_token": "hf_abcdefghijklmnopqrstuvwxyz",
        "api": SecretStr("very-secret"),
        "key_id": "AKIAABCDEFGHIJKLMNOP",
        "db_uri": "postgresql://user:pw123@db:5432/mlflow",
        "lr": 0.1,
    }
    with tracking.start_run(mlflow_settings, "secrets") as run:
        logged = run.log_params(params)
        run.log_dict({"s3": {"secret_key": "s3cr3t", "bucket": "b"}}, "cfg.json")

    stored = client.get_run(run.run_id).data.params
    assert stored == logged
    assert stored["storage.aws_secret_access_key"] == tracking.MASK
    assert stored["storage.aws_access_key_id"] == tracking.MASK  # "access_key" in the key
    assert stored["db_password"] == tracking.MASK
    assert stored["hf_token"] == tracking.MASK
    assert stored["api"] == tracking.MASK
    assert stored["key_id"] == tracking.MASK  # value shaped like an AWS key id
    assert stored["db_uri"] == "postgresql://user:***@db:5432/mlflow"
    assert stored["lr"] == "0.1"
    secret_values = ("s3cr3t", "hunter2", "very-secret", "pw123", "abcdefghijklmnop")
    assert not any(s in v for v in stored.values() for s in secret_values)
    cfg = Path(client.download_artifacts(run.run_id, "cfg.json", str(tmp_path)))
    assert json.loads(cfg.read_text()) == {"s3": {"secret_key": tracking.MASK, "bucket": "b"}}


def test_lineage_tags_and_nested_runs(mlflow_settings: Any, client: MlflowClient) -> None:
    lineage = lineage_mod.lineage_tags(
        dataset_hash="d" * 64, teacher_id="toy-teacher", config_hash="c0ffee", parent_runs=["r1"]
    )
    with tracking.start_run(mlflow_settings, "parent", tags=lineage) as parent:
        with tracking.start_run(mlflow_settings, "child", nested=True) as child:
            child.log_metrics({"x": 1.0}, step=0)
        with tracking.start_run(mlflow_settings, "explicit", parent_run_id=parent.run_id) as other:
            pass

    tags = client.get_run(parent.run_id).data.tags
    assert tags["snapgen.git_commit"] == lineage_mod.git_commit()
    assert tags["snapgen.git_commit"] == "unknown" or len(tags["snapgen.git_commit"]) == 40
    assert tags["snapgen.code_version"] == lineage_mod.code_version()
    assert tags["snapgen.dataset_hash"] == "d" * 64
    assert tags["snapgen.teacher_id"] == "toy-teacher"
    assert tags["snapgen.config_hash"] == "c0ffee"
    assert tags["snapgen.parent_runs"] == "r1"
    assert "mlflow.parentRunId" not in tags
    for run_id in (child.run_id, other.run_id):
        child_tags = client.get_run(run_id).data.tags
        assert child_tags["mlflow.parentRunId"] == parent.run_id
        assert "snapgen.git_commit" in child_tags


def test_failed_block_marks_run_failed(mlflow_settings: Any, client: MlflowClient) -> None:
    with pytest.raises(ValueError, match="boom"):
        with tracking.start_run(mlflow_settings, "fails") as run:
            raise ValueError("boom")
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_a_stopped_block_marks_the_run_killed_not_failed(mlflow_settings: Any, client: MlflowClient) -> None:
    """A SIGTERM outside the training loop (an evaluation, a stage's set-up) arrives as SystemExit(143) from
    flows.console.exit_on_sigterm: a stop, resumable, like Ctrl-C; it used to be recorded FAILED."""
    for stop in (SystemExit(143), SystemExit(129), KeyboardInterrupt()):
        with pytest.raises(type(stop)):
            with tracking.start_run(mlflow_settings, "stopped") as run:
                raise stop
        assert client.get_run(run.run_id).info.status == "KILLED", stop
    with pytest.raises(SystemExit):
        with tracking.start_run(mlflow_settings, "exits") as run:
            raise SystemExit(2)  # a usage error is no stop
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_nested_without_parent_is_an_error(mlflow_settings: Any) -> None:
    with pytest.raises(RuntimeError, match="enclosing run"):
        with tracking.start_run(mlflow_settings, "orphan", nested=True):
            pass


def test_metrics_to_unreachable_server_warn_and_continue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")
    policy = tracking.RetryPolicy(attempts=3, base_delay_s=0.01, cooldown_s=60)
    run = tracking.RunHandle(client=dead, run_id="0" * 32, retry=policy)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run.log_metrics({"loss": 1.0}, step=1) is False
        assert run.log_metrics({"loss": 0.5, "acc": 0.1}, step=2) is False  # cool-down: skipped
    assert run.dropped_metrics == 3
    assert [w for w in caught if "MLflow unreachable" in str(w.message)]
    with pytest.raises(Exception):  # other calls retry too, but do raise
        run.log_text("x", "x.txt")


def _local_settings(tmp_path: Path) -> Any:
    """Settings for an embedded sqlite backend (a stand-in while tasks.settings is absent)."""
    overrides = {
        "home": tmp_path,
        "mlflow_tracking_uri": f"sqlite:///{tmp_path}/db/nested/mlflow.db",
        "mlflow_artifact_root": str(tmp_path / "arts"),
        "mlflow_tracking_token": "tok-not-logged-123",
        "experiment_name": "local-exp",
    }
    try:
        from tasks.settings import get_settings
    except ImportError:
        from pydantic import SecretStr

        overrides["mlflow_tracking_token"] = SecretStr(overrides["mlflow_tracking_token"])
        return types.SimpleNamespace(**overrides)
    return get_settings(**overrides)


def test_embedded_sqlite_backend_roots_artifacts_and_exports_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    previous_uri = mlflow.get_tracking_uri()
    settings = _local_settings(tmp_path)
    try:
        with tracking.start_run(settings, "local") as run:
            run.log_text("local", "t.txt")
            run.log_params({"token": "tok-not-logged-123"})
        assert os.environ["MLFLOW_TRACKING_TOKEN"] == "tok-not-logged-123"
        assert (tmp_path / "db" / "nested" / "mlflow.db").is_file()
        local = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        location = local.get_experiment_by_name("local-exp").artifact_location
        assert location.startswith((tmp_path / "arts").resolve().as_uri())
        assert list((tmp_path / "arts").rglob("t.txt"))
        assert local.get_run(run.run_id).data.params["token"] == tracking.MASK
    finally:
        mlflow.set_tracking_uri(previous_uri)
