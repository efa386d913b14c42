"""Shared pytest set-up: CPU threads, offline flags, and the real-server fixtures."""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# One intra-op thread: the suite shares 2 cores with the servers it starts (SeaweedFS, MLflow,
# Prefect); two OpenMP threads under that contention made tiny UNet steps 50x slower.
torch.set_num_threads(1)

pytest_plugins = [
    "tests.fixtures.seaweed",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.prefect_harness",
    "tests.fixtures.tiny_bundle",
]

import pytest  # noqa: E402

# Environment variables other libraries write behind our back: `mlflow.set_tracking_uri` exports
# MLFLOW_TRACKING_URI (and MLflow may export MLFLOW_EXPERIMENT_NAME). The settings honour these
# standard variables when the SNAPGEN_ ones are unset, so a value left behind by one test would point
# every later test at that test's (stopped) MLflow server. Each test starts from the session's values.
_LEAKY_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "AWS_DEFAULT_REGION")
_SESSION_ENV = {name: os.environ.get(name) for name in _LEAKY_ENV}


@pytest.fixture(autouse=True)
def _restore_leaky_env():
    for name, value in _SESSION_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    yield
    for name, value in _SESSION_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
