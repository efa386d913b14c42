"""Bad inputs through the real `snapgen` command (a subprocess, as a user runs it): each one ends with one
line that names the input, exit code 2, no traceback, and, where the input can be checked before a
server starts, before Prefect's server starts (no "Starting temporary server" line, seconds not tens).

s3:// cases run against the real SeaweedFS fixture: no credentials, a wrong secret (403) and a missing
bucket are permanent, so they are reported at once and never retried as if they were transient."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.checkpoints import save_toy_checkpoint

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SNAPGEN = Path(sys.executable).parent / "snapgen"
FAST_S = 20.0  # a Prefect server start alone takes 15-30 s on a loaded 2-core machine


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAPGEN_", "AWS_", "MLFLOW_", "PREFECT_API_URL"))}
    return env | {"SNAPGEN_HOME": str(home), "AWS_CONFIG_FILE": str(home / "no-aws-config"),
                  "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
                  "AWS_EC2_METADATA_DISABLED": "true"} | extra


def _snapgen(home: Path, *args: str, **env: str) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([str(SNAPGEN), *args], cwd=home.parent, env=_env(home, **env), capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def _assert_one_line(code: int, output: str, seconds: float, *fragments: str, fast: bool = True) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output[-3000:]
    assert "Traceback" not in output and len(lines) == 1, output[-3000:]
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]
    if fast:
        assert "Starting temporary server" not in output and seconds < FAST_S, (seconds, output)
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_toy_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", "toy-smoke")
    path = folder / "unet.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    return path


def test_out_with_an_unknown_scheme(home: Path) -> None:
    _assert_one_line(*_snapgen(home, "curate", "--source", "shapes:8", "--out", "ftp://host/data"),
                     "--out", "ftp://host/data", "unknown scheme 'ftp'", "file, s3")


def test_s3_without_credentials_is_not_retried(home: Path, seaweed_s3) -> None:
    bucket = seaweed_s3.new_bucket()
    _assert_one_line(*_snapgen(home, "curate", "--source", "shapes:8", "--out", f"s3://{bucket}/d1",
                               SNAPGEN_S3_ENDPOINT_URL=seaweed_s3.endpoint_url),
                     "--out", f"s3://{bucket}/d1", "no S3 credentials", "AWS_ACCESS_KEY_ID")


def test_s3_with_a_wrong_secret_is_refused_at_once(home: Path, seaweed_s3) -> None:
    bucket = seaweed_s3.new_bucket()
    line = _assert_one_line(*_snapgen(home, "curate", "--source", "shapes:8", "--out", f"s3://{bucket}/d1",
                                      SNAPGEN_S3_ENDPOINT_URL=seaweed_s3.endpoint_url,
                                      AWS_ACCESS_KEY_ID=seaweed_s3.access_key,
                                      AWS_SECRET_ACCESS_KEY="not-the-secret-0123456789"),
                            "--out", f"s3://{bucket}/d1", "403")
    assert "not-the-secret" not in line


def test_s3_bucket_that_does_not_exist(home: Path, seaweed_s3) -> None:
    _assert_one_line(*_snapgen(home, "curate", "--source", "shapes:8", "--out", "s3://no-such-bucket-sg16/d1",
                               SNAPGEN_S3_ENDPOINT_URL=seaweed_s3.endpoint_url,
                               AWS_ACCESS_KEY_ID=seaweed_s3.access_key, AWS_SECRET_ACCESS_KEY=seaweed_s3.secret_key),
                     "--out", "s3://no-such-bucket-sg16/d1", "bucket 'no-such-bucket-sg16' does not exist")


@pytest.mark.parametrize("command", ["eval", "export"])
def test_registry_ref_that_does_not_exist(command: str, home: Path) -> None:
    _assert_one_line(*_snapgen(home, command, "--model", "models:/nope@champion"),
                     "--model models:/nope@champion", "not found in the registry")


def test_truncated_checkpoint_in_export(home: Path, truncated: Path) -> None:
    _assert_one_line(*_snapgen(home, "export", "--model", str(truncated)), "--model", str(truncated), "truncated")


def test_truncated_checkpoint_in_sample(home: Path, truncated: Path) -> None:
    _assert_one_line(*_snapgen(home, "sample", "--preset", "toy-smoke", "--checkpoint", str(truncated)),
                     str(truncated), "truncated")


def test_ui_with_a_port_out_of_range(home: Path) -> None:
    _assert_one_line(*_snapgen(home, "ui", "--prefect-port", "99999"), "--prefect-port 99999", "1-65535")
    assert not (home / "logs" / "prefect-ui.log").exists()  # no server was started


def test_export_format_that_does_not_exist(home: Path, truncated: Path) -> None:
    _assert_one_line(*_snapgen(home, "export", "--model", str(truncated), "--formats", "onnx,tflite"),
                     "--formats 'tflite'", "choose from onnx, coreml")


@pytest.mark.parametrize("command", [["settings"], ["curate", "--source", "shapes:8"], ["run", "--preset", "toy-smoke"]])
def test_bad_snapgen_setting_names_the_variable(command: list[str], home: Path) -> None:
    _assert_one_line(*_snapgen(home, *command, SNAPGEN_S3_MAX_ATTEMPTS="many"),
                     "SNAPGEN_S3_MAX_ATTEMPTS='many'", "valid integer")


def test_bad_secret_setting_is_named_but_not_echoed(home: Path) -> None:
    line = _assert_one_line(*_snapgen(home, "settings", SNAPGEN_STORAGE_ROOT="ftp://user:hunter22@host/x"),
                            "SNAPGEN_STORAGE_ROOT", "ftp")
    assert "hunter22" not in line
