"""tasks.settings: env prefix, config file < env < overrides, derived defaults, masking, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import SecretStr
from rich.console import Console

from tasks.settings import MASK, SnapgenSettings, get_settings, mask_uri

SECRET = "s3cr3t-SENTINEL-value"
TOKEN = "tok-SENTINEL-123"
URI_PASSWORD = "pw-SENTINEL-456"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SNAPGEN_*/AWS_* from the outer environment; cwd is a fresh tmp dir."""
    for name in list(os.environ):
        if name.startswith(("SNAPGEN_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _rendered(settings: SnapgenSettings) -> str:
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(settings.render_table())
    return console.export_text()


# ---------------------------------------------------------------------------- defaults
def test_defaults_are_derived_from_home_and_absolute(tmp_path: Path) -> None:
    s = get_settings()
    home = (tmp_path / ".snapgen").resolve()
    assert s.home == home
    assert s.storage_root == f"file://{home}/storage"
    assert s.mlflow_tracking_uri == f"sqlite:///{home}/mlflow.db"
    assert s.mlflow_tracking_uri.startswith("sqlite:////")  # four slashes: absolute path
    assert s.mlflow_artifact_root == str(home / "mlartifacts")
    assert s.prefect_result_storage == str(home / "prefect-results")
    assert s.experiment_name == "snapgen" and s.s3_region == "us-east-1"
    assert s.s3_endpoint_url is None and s.aws_secret_access_key is None
    assert s.s3_multipart_threshold == 64 * 1024 * 1024


def test_home_override_moves_every_derived_default(tmp_path: Path) -> None:
    s = get_settings(home=tmp_path / "h")
    assert s.storage_root == f"file://{tmp_path}/h/storage"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path}/h/mlflow.db"
    assert Path(s.mlflow_artifact_root).parent == tmp_path / "h"


def test_explicit_values_win_over_derived_defaults(tmp_path: Path) -> None:
    s = get_settings(home=tmp_path, storage_root="s3://my-bucket/some/prefix/",
                     mlflow_tracking_uri="sqlite:///rel/db.sqlite", mlflow_artifact_root="arts")
    assert s.storage_root == "s3://my-bucket/some/prefix"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path}/rel/db.sqlite"
    assert s.mlflow_artifact_root == str(tmp_path / "arts")


@pytest.mark.parametrize("value", ["data/store", "file://data/store"])
def test_local_storage_root_is_made_absolute(tmp_path: Path, value: str) -> None:
    assert get_settings(storage_root=value).storage_root == f"file://{tmp_path}/data/store"


# ---------------------------------------------------------------------------- sources
def test_env_prefix_and_types(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "envhome"))
    monkeypatch.setenv("SNAPGEN_EXPERIMENT_NAME", "from-env")
    monkeypatch.setenv("SNAPGEN_S3_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("SNAPGEN_S3_MULTIPART_THRESHOLD", "5MiB")
    monkeypatch.setenv("EXPERIMENT_NAME", "unprefixed-is-ignored")
    s = get_settings()
    assert s.home == tmp_path / "envhome"
    assert s.storage_root == f"file://{tmp_path}/envhome/storage"
    assert s.experiment_name == "from-env"
    assert s.s3_max_attempts == 7
    assert s.s3_multipart_threshold == 5 * 1024 * 1024


def test_no_caching_env_changes_are_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPGEN_EXPERIMENT_NAME", "first")
    assert get_settings().experiment_name == "first"
    monkeypatch.setenv("SNAPGEN_EXPERIMENT_NAME", "second")
    assert get_settings().experiment_name == "second"


TOML_CONFIG = """
experiment_name = "from-file"
s3_region = "eu-west-1"
storage_root = "s3://file-bucket/prefix"
s3_max_attempts = 9
"""
YAML_CONFIG = """
experiment_name: from-file
s3_region: eu-west-1
storage_root: s3://file-bucket/prefix
s3_max_attempts: 9
"""


@pytest.mark.parametrize("name,text", [("snapgen.toml", TOML_CONFIG), ("snapgen.yaml", YAML_CONFIG)])
def test_config_file_then_env_then_overrides(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, text: str
) -> None:
    config = tmp_path / name
    config.write_text(text)
    monkeypatch.setenv("SNAPGEN_CONFIG_FILE", str(config))
    from_file = get_settings()
    assert (from_file.experiment_name, from_file.s3_region) == ("from-file", "eu-west-1")
    assert from_file.storage_root == "s3://file-bucket/prefix" and from_file.s3_max_attempts == 9
    assert from_file.masked_dict()["config_file"] == str(config)

    monkeypatch.setenv("SNAPGEN_EXPERIMENT_NAME", "from-env")
    env_wins = get_settings()
    assert env_wins.experiment_name == "from-env"
    assert env_wins.s3_region == "eu-west-1"  # not in env: the file still applies

    assert get_settings(experiment_name="override").experiment_name == "override"


def test_config_file_argument_replaces_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('experiment_name = "a"\n')
    (tmp_path / "b.toml").write_text('experiment_name = "b"\n')
    monkeypatch.setenv("SNAPGEN_CONFIG_FILE", str(tmp_path / "a.toml"))
    assert get_settings(config_file=tmp_path / "b.toml").experiment_name == "b"
    assert get_settings().experiment_name == "a"


def test_missing_or_unsupported_config_file_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SNAPGEN_CONFIG_FILE", str(tmp_path / "nope.toml"))
    with pytest.raises(ValueError, match="SNAPGEN_CONFIG_FILE.*nope.toml.*does not exist"):
        get_settings()
    (tmp_path / "cfg.ini").write_text("x=1\n")
    monkeypatch.setenv("SNAPGEN_CONFIG_FILE", str(tmp_path / "cfg.ini"))
    with pytest.raises(ValueError, match=r"unsupported config file type '\.ini'"):
        get_settings()


def test_unknown_key_in_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('experiment_nmae = "typo"\n')
    monkeypatch.setenv("SNAPGEN_CONFIG_FILE", str(config))
    with pytest.raises(ValueError, match="experiment_nmae"):
        get_settings()


def test_aws_env_vars_are_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    s = get_settings()
    assert s.aws_access_key_id.get_secret_value() == "aws-id"
    assert s.aws_secret_access_key.get_secret_value() == "aws-secret"
    monkeypatch.setenv("SNAPGEN_AWS_SECRET_ACCESS_KEY", "snapgen-secret")
    assert get_settings().aws_secret_access_key.get_secret_value() == "snapgen-secret"


# ---------------------------------------------------------------------------- masking
def _secret_settings(monkeypatch: pytest.MonkeyPatch) -> SnapgenSettings:
    monkeypatch.setenv("SNAPGEN_AWS_SECRET_ACCESS_KEY", SECRET)
    return get_settings(
        aws_access_key_id="AKIAIOSFODNN7SENTINEL",
        mlflow_tracking_token=TOKEN,
        s3_endpoint_url=f"http://minio:{URI_PASSWORD}@localhost:9000",
        mlflow_tracking_uri=f"https://user:{URI_PASSWORD}@mlflow.example.com/?token={TOKEN}",
    )


def test_masked_dict_hides_secrets_and_uri_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _secret_settings(monkeypatch)
    masked = s.masked_dict()
    assert set(SnapgenSettings.model_fields) <= set(masked)  # every setting is shown
    assert masked["aws_secret_access_key"] == MASK
    assert masked["aws_access_key_id"] == MASK
    assert masked["mlflow_tracking_token"] == MASK
    assert masked["aws_session_token"] is None  # unset secrets show as unset, not as ***
    assert masked["s3_endpoint_url"] == f"http://minio:{MASK}@localhost:9000"
    assert masked["mlflow_tracking_uri"].startswith(f"https://user:{MASK}@mlflow.example.com/")
    dumped = json.dumps(masked)
    for secret in (SECRET, TOKEN, URI_PASSWORD, "SENTINEL"):
        assert secret not in dumped
    # the real values are still there for the code that needs them
    assert s.aws_secret_access_key.get_secret_value() == SECRET
    assert URI_PASSWORD in s.s3_endpoint_url


def test_render_table_repr_and_str_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _secret_settings(monkeypatch)
    text = _rendered(s)
    for name in SnapgenSettings.model_fields:
        assert name in text
    assert f"minio:{MASK}@localhost" in text and "SNAPGEN_STORAGE_ROOT" in text
    for shown in (text, repr(s), str(s)):
        assert "SENTINEL" not in shown, shown


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("postgresql://user:pw123@db:5432/mlflow", f"postgresql://user:{MASK}@db:5432/mlflow"),
        ("https://host/path?a=1&token=abc", f"https://host/path?a=1&token={MASK}"),
        ("s3://bucket/key", "s3://bucket/key"),
        ("/plain/path", "/plain/path"),
        ("https://user@host/x", "https://user@host/x"),
    ],
)
def test_mask_uri(uri: str, expected: str) -> None:
    assert mask_uri(uri) == expected


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("storage_root", "ftp://host/x", r"storage_root[\s\S]*'ftp'[\s\S]*file, s3"),
        ("storage_root", "s3:///no-bucket", r"storage_root[\s\S]*no bucket"),
        ("s3_endpoint_url", "ftp://x", "s3_endpoint_url"),
        ("s3_retry_mode", "fast", "s3_retry_mode"),
        ("s3_max_attempts", -1, "s3_max_attempts"),
        ("s3_multipart_chunksize", "1MiB", r"s3_multipart_chunksize[\s\S]*5 MiB"),
        ("experiment_name", "  ", "experiment_name"),
    ],
)
def test_validation_error_names_the_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        get_settings(**{field: value})


def test_env_type_error_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPGEN_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="s3_max_attempts"):
        get_settings()


def test_validation_errors_do_not_echo_secrets() -> None:
    with pytest.raises(ValueError) as info:
        get_settings(storage_root=f"ftp://u:{URI_PASSWORD}@host/x")
    assert "storage_root" in str(info.value) and URI_PASSWORD not in str(info.value)
    with pytest.raises(ValueError) as info:
        get_settings(s3_endpoint_url=f"ftp://u:{URI_PASSWORD}@host")
    assert URI_PASSWORD not in str(info.value)


def test_secret_fields_are_secretstr() -> None:
    s = get_settings(aws_secret_access_key="x", mlflow_tracking_token="y")
    assert isinstance(s.aws_secret_access_key, SecretStr) and isinstance(s.mlflow_tracking_token, SecretStr)


def test_cli_settings_json_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("SNAPGEN_AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["settings", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["aws_secret_access_key"] == MASK and shown["mlflow_tracking_token"] == MASK
    assert "SENTINEL" not in result.output
