"""tasks.defaults: shared Prefect task options, and a real retried task run."""
from __future__ import annotations

import os

import types
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task

from tasks import defaults


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    """Project settings rooted at ``tmp_path`` (a stand-in while tasks.settings is absent)."""
    try:
        from tasks.settings import get_settings
    except ImportError:
        return types.SimpleNamespace(home=tmp_path, prefect_result_storage=None)
    return get_settings(home=tmp_path)


def test_io_task_options_retry_with_backoff_and_jitter(settings: Any) -> None:
    options = defaults.io_task_options(settings)
    assert options["retries"] == defaults.IO_RETRIES > 0
    assert options["retry_jitter_factor"] > 0
    delays = options["retry_delay_seconds"](options["retries"])
    assert len(delays) == options["retries"]
    assert all(b == 2 * a for a, b in zip(delays, delays[1:])) and delays[0] > 0
    assert options["persist_result"] is True
    storage = options["result_storage"]
    assert isinstance(storage, Path) and storage.is_dir()
    assert storage.is_relative_to(Path(settings.home).resolve()) or getattr(
        settings, "prefect_result_storage", None
    )


def test_compute_task_options_do_not_retry(settings: Any) -> None:
    options = defaults.compute_task_options(settings)
    assert options["retries"] == 0
    assert options["persist_result"] is True
    assert defaults.io_task_options(settings, retries=7)["retries"] == 7


def test_result_storage_rejects_remote_uri(tmp_path: Path) -> None:
    remote = types.SimpleNamespace(home=tmp_path, prefect_result_storage="s3://bucket/results")
    with pytest.raises(ValueError, match="local path"):
        defaults.io_task_options(remote)
    local = types.SimpleNamespace(home=tmp_path, prefect_result_storage=f"file://{tmp_path}/r")
    assert defaults.result_storage_path(local) == (tmp_path / "r").resolve()


def test_prefect_env_defaults_keep_existing_values(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    applied = defaults.prefect_env_defaults(settings)
    assert applied["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert applied["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "90"
    assert Path(applied["PREFECT_HOME"]).is_relative_to(Path(settings.home).resolve())


def test_an_empty_prefect_api_url_is_dropped_and_a_real_one_kept(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # `export PREFECT_API_URL=` (empty) made Prefect's events worker print an ERROR + traceback per event
    monkeypatch.setenv("PREFECT_API_URL", "")
    defaults.prefect_env_defaults(settings)
    assert "PREFECT_API_URL" not in os.environ
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    defaults.prefect_env_defaults(settings)
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_io_task_is_really_retried(prefect_harness: float, settings: Any) -> None:
    calls: list[int] = []
    options = defaults.io_task_options(settings, retry_delay_seconds=0)  # keep the test fast

    @task(**options)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("transient")
        return "ok"

    @flow
    def pipeline() -> str:
        return flaky()

    assert pipeline() == "ok"
    assert len(calls) == 3
    assert any(options["result_storage"].iterdir()), "task result was not persisted"
