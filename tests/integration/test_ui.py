"""`snapgen ui --check`: a real Prefect server and MLflow UI on the embedded stores, on 127.0.0.1."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_starts_both_servers_on_loopback_and_prints_urls(tmp_path):
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = dict(os.environ) | {"SNAPGEN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    for key in ("PREFECT_API_URL", "SNAPGEN_MLFLOW_TRACKING_URI", "PREFECT_HOME"):
        env.pop(key, None)
    proc = subprocess.run([str(Path(sys.executable).parent / "snapgen"), "ui", "--check", "--prefect-port",
                           str(prefect_port), "--mlflow-port", str(mlflow_port)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"http://127.0.0.1:{prefect_port}" in proc.stdout and f"http://127.0.0.1:{mlflow_port}" in proc.stdout
    assert re.search(r"sqlite:///.*home/mlflow\.db", proc.stdout.replace("\n", ""))
    with socket.socket() as s:  # both stopped again
        assert s.connect_ex(("127.0.0.1", prefect_port)) != 0
