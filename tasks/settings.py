"""Project settings: one typed object, read from ``SNAPGEN_*`` env vars, then a config file.

Precedence, highest first:

1. keyword overrides passed to :func:`get_settings` (tests, CLI flags);
2. environment variables ``SNAPGEN_<FIELD>`` (nested models, if any, use ``__``);
3. the config file named by ``SNAPGEN_CONFIG_FILE`` (``.toml``, ``.yaml`` or ``.yml``);
4. defaults, most of them derived from ``home`` (``./.snapgen`` by default).

Every path-like default is absolute, so a worker that changes directory still writes to the
same place. S3 credentials and region, the MLflow tracking URI and the experiment fall back to the
standard env vars (``AWS_*``, ``AWS_DEFAULT_REGION``, ``MLFLOW_TRACKING_URI``,
``MLFLOW_EXPERIMENT_NAME``) when unset here.

Secrets are ``SecretStr`` and never printed: :meth:`SnapgenSettings.masked_dict` and
:meth:`SnapgenSettings.render_table` replace them (and passwords embedded in URIs) by ``***``,
following the project's one secrets policy (``tasks/secrets.py``); validation errors do not echo
input values.
"""
from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from tasks.secrets import MASK, mask_uri, mask_value, secret_value  # noqa: F401  (the one secrets policy; re-exported)

ENV_PREFIX = "SNAPGEN_"
CONFIG_FILE_ENV = "SNAPGEN_CONFIG_FILE"
STORAGE_SCHEMES = ("file", "s3")
MIB = 1024 * 1024
# settings field -> standard AWS env var used when the field is unset.
_AWS_ENV_FALLBACKS = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}
# settings field -> the tool's own env var used when the field is unset (MLflow's, boto3's conventions).
_STANDARD_ENV_FALLBACKS = {
    **_AWS_ENV_FALLBACKS,
    "s3_region": "AWS_DEFAULT_REGION",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "experiment_name": "MLFLOW_EXPERIMENT_NAME",
}
# A config file given to get_settings() directly (wins over SNAPGEN_CONFIG_FILE).
_CONFIG_FILE_OVERRIDE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "snapgen_config_file", default=None
)


def _absolute(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


# --------------------------------------------------------------------------------------------
# the settings object
# --------------------------------------------------------------------------------------------
class SnapgenSettings(BaseSettings):
    """All snapgen settings. Build with :func:`get_settings`; print with :meth:`render_table`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,  # errors must not echo values (they may be secrets)
        validate_default=True,
    )

    home: Path = Field(Path("./.snapgen"), description="root of all local state")
    storage_root: str = Field("", description="object store root: file://<path> or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, SeaweedFS); None: AWS")
    s3_region: str = Field("us-east-1", description="S3 region")
    aws_access_key_id: SecretStr | None = Field(None, description="S3 key id (else AWS_ACCESS_KEY_ID)")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3 secret (else AWS_SECRET_ACCESS_KEY)")
    aws_session_token: SecretStr | None = Field(None, description="S3 session token (else AWS_SESSION_TOKEN)")
    s3_max_attempts: int = Field(4, ge=0, le=20, description="botocore max_attempts: retries after the 1st try")
    s3_retry_mode: Literal["standard", "adaptive"] = Field("standard", description="botocore retry mode")
    s3_connect_timeout: float = Field(10.0, gt=0, description="S3 connect timeout, seconds")
    s3_read_timeout: float = Field(60.0, gt=0, description="S3 read timeout, seconds")
    s3_multipart_threshold: ByteSize = Field(ByteSize(64 * MIB), description="multipart upload from this size")
    s3_multipart_chunksize: ByteSize = Field(ByteSize(16 * MIB), description="multipart part size (>= 5 MiB)")
    mlflow_tracking_uri: str = Field("", description="MLflow backend (default sqlite:///<home>/mlflow.db)")
    mlflow_artifact_root: str = Field("", description="MLflow artifacts for local backends")
    mlflow_tracking_token: SecretStr | None = Field(None, description="bearer token for an MLflow server")
    prefect_result_storage: str = Field("", description="folder for persisted Prefect task results")
    geneval_metadata_path: Path | None = Field(None, description="GenEval prompt metadata (jsonl)")
    dpg_bench_dir: Path | None = Field(None, description="DPG-Bench folder")
    experiment_name: str = Field("snapgen", min_length=1, description="MLflow experiment")
    eval_concurrency: int = Field(2, ge=1, le=64, description="evaluations that run at once (more queue)")

    # ---------------------------------------------------------------- sources
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides, then env vars, then the config file (if any)."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = config_file_path()
        if path is not None:
            sources.append(_file_source(settings_cls, path))
        return tuple(sources)

    # ---------------------------------------------------------------- derived defaults
    @model_validator(mode="before")
    @classmethod
    def _derive_defaults(cls, data: Any) -> Any:
        """Fill the standard env fallbacks (AWS, MLflow) and the defaults that depend on ``home``."""
        if not isinstance(data, Mapping):
            return data
        values = dict(data)
        home = _absolute(values.get("home") or Path("./.snapgen"))
        values["home"] = home
        for name, env_var in _STANDARD_ENV_FALLBACKS.items():
            if values.get(name) in (None, "") and os.environ.get(env_var, "").strip():
                values[name] = os.environ[env_var]
        derived = {
            "storage_root": f"file://{home / 'storage'}",
            "mlflow_tracking_uri": f"sqlite:///{home / 'mlflow.db'}",
            "mlflow_artifact_root": str(home / "mlartifacts"),
            "prefect_result_storage": str(home / "prefect-results"),
        }
        for name, default in derived.items():
            if not values.get(name):
                values[name] = default
        return values

    # ---------------------------------------------------------------- field checks
    @field_validator("home", "geneval_metadata_path", "dpg_bench_dir")
    @classmethod
    def _absolute_path(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute(value)

    @field_validator("storage_root")
    @classmethod
    def _check_storage_root(cls, value: str) -> str:
        """``file://`` (made absolute; a plain path is accepted) or ``s3://bucket[/prefix]``."""
        from tasks.storage import parse_uri  # storage imports this module: import late

        text = value.strip()
        if "://" not in text:
            text = f"file://{_absolute(text)}"
        try:
            return str(parse_uri(text)).rstrip("/") or "file:///"
        except ValueError as exc:
            message = f"storage_root: {exc}"
            if "allowed" not in message:
                message += f" (allowed schemes: {', '.join(STORAGE_SCHEMES)})"
            raise ValueError(message) from None

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"s3_endpoint_url: expected http(s)://host[:port], got {mask_uri(value)!r}"
            )
        return value.strip().rstrip("/")

    @field_validator("s3_region", "experiment_name")
    @classmethod
    def _not_blank(cls, value: str, info: Any) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name}: must not be empty")
        return value.strip()

    @field_validator("s3_multipart_chunksize")
    @classmethod
    def _check_chunksize(cls, value: ByteSize) -> ByteSize:
        if value < 5 * MIB:
            raise ValueError(f"s3_multipart_chunksize: S3 parts must be >= 5 MiB, got {int(value)} bytes")
        return value

    @field_validator("s3_multipart_threshold")
    @classmethod
    def _check_threshold(cls, value: ByteSize) -> ByteSize:
        if value < 1:
            raise ValueError("s3_multipart_threshold: must be >= 1 byte")
        return value

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _check_tracking_uri(cls, value: str) -> str:
        """A relative ``sqlite:///rel.db`` becomes absolute; other URIs are kept."""
        text = value.strip()
        if text.startswith("sqlite:///") and not text.startswith("sqlite:////"):
            rel = text[len("sqlite:///"):]
            if rel and not rel.startswith(":memory:"):
                return f"sqlite:///{_absolute(rel)}"
        return text

    @field_validator("mlflow_artifact_root", "prefect_result_storage")
    @classmethod
    def _absolute_local(cls, value: str) -> str:
        """Plain local paths become absolute; URIs (``s3://``, ``file://``) are kept."""
        text = value.strip()
        return text if "://" in text else str(_absolute(text))

    # ---------------------------------------------------------------- display
    def masked_dict(self) -> dict[str, Any]:
        """Every setting as JSON-able values, secrets (and URI passwords) replaced by ``***``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[name] = None if value is None else mask_value(name, str(value) if isinstance(value, Path) else value)
        path = config_file_path()
        out["config_file"] = str(path) if path else None
        return out

    def render_table(self) -> Any:
        """A ``rich`` table of :meth:`masked_dict` (setting, value, env var)."""
        from rich.table import Table
        from rich.text import Text

        table = Table(title="snapgen settings (secrets masked)")
        table.add_column("setting", style="bold")
        table.add_column("value")
        table.add_column("env var", style="dim")
        for name, value in self.masked_dict().items():
            env = CONFIG_FILE_ENV if name == "config_file" else f"{ENV_PREFIX}{name.upper()}"
            shown = Text("(unset)", style="dim") if value is None else Text(str(value))  # no markup
            table.add_row(name, shown, env)
        return table

    def __repr_args__(self) -> Any:  # repr(settings) shows masked values only
        return list(self.masked_dict().items())


# --------------------------------------------------------------------------------------------
# config file
# --------------------------------------------------------------------------------------------
def config_file_path() -> Path | None:
    """The config file in effect: the one given to :func:`get_settings`, else
    ``$SNAPGEN_CONFIG_FILE``, else none. Must exist when named."""
    path = _CONFIG_FILE_OVERRIDE.get()
    if path is None:
        raw = os.environ.get(CONFIG_FILE_ENV, "").strip()
        if not raw:
            return None
        path = Path(raw)
    path = _absolute(path)
    if not path.is_file():
        raise ValueError(f"{CONFIG_FILE_ENV}: config file {str(path)!r} does not exist")
    return path


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """A pydantic-settings source for a TOML or YAML file, chosen by extension."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ValueError(
        f"{CONFIG_FILE_ENV}: unsupported config file type {suffix!r} for {str(path)!r} "
        "(use .toml, .yaml or .yml)"
    )


def get_settings(config_file: str | Path | None = None, **overrides: Any) -> SnapgenSettings:
    """Fresh settings (no caching: env changes are always seen).

    ``overrides`` are field values that win over env and file; ``config_file`` replaces
    ``$SNAPGEN_CONFIG_FILE``. Raises ``ValueError`` (pydantic ``ValidationError``) naming the
    offending field.
    """
    token = _CONFIG_FILE_OVERRIDE.set(Path(config_file) if config_file is not None else None)
    try:
        return SnapgenSettings(**overrides)
    finally:
        _CONFIG_FILE_OVERRIDE.reset(token)
