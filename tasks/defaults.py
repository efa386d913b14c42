"""Prefect task defaults shared by every stage: one place for retries and result persistence.

I/O tasks (object storage, downloads, MLflow uploads) retry with exponential backoff and jitter
and persist their results so a re-run is a cache hit; compute tasks (training, evaluation) do
not retry by default: a crash there is resumed from checkpoints by the flow, not re-run blind.

Usage::

    @task(**io_task_options(settings))
    def upload_shard(...): ...
"""
from __future__ import annotations

import os
import subprocess
import types
from pathlib import Path
from typing import Any, Protocol

if "PREFECT_API_URL" in os.environ and not os.environ["PREFECT_API_URL"].strip():
    # before prefect is imported (it reads its settings then): see prefect_env_defaults
    del os.environ["PREFECT_API_URL"]

from prefect.tasks import exponential_backoff  # noqa: E402 - after the environment fix above

__all__ = [
    "IO_BACKOFF_FACTOR",
    "IO_RETRIES",
    "IO_RETRY_DELAYS",
    "IO_RETRY_JITTER_FACTOR",
    "compute_task_options",
    "detach_temporary_server",
    "io_task_options",
    "prefect_env_defaults",
    "result_storage_path",
]

IO_RETRIES = 3
IO_BACKOFF_FACTOR = 2.0  # seconds before the first retry; doubles each time: 2, 4, 8
IO_RETRY_DELAYS = exponential_backoff(backoff_factor=IO_BACKOFF_FACTOR)
IO_RETRY_JITTER_FACTOR = 0.5  # each delay is randomised up to +50%
PREFECT_STARTUP_TIMEOUT_S = 90


class HasHome(Protocol):
    """The part of ``tasks.settings.SnapgenSettings`` used here."""

    home: Path


def result_storage_path(settings: HasHome) -> Path:
    """Local folder for persisted task results: ``settings.prefect_result_storage`` if set,
    else ``<home>/prefect-results``. Created if missing; ``file://`` URIs are accepted."""
    configured = getattr(settings, "prefect_result_storage", None)
    text = str(configured) if configured else str(Path(settings.home) / "prefect-results")
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        raise ValueError(
            f"prefect_result_storage must be a local path here, got {text!r}; "
            "use a saved Prefect storage block for remote result storage"
        )
    path = Path(text).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def io_task_options(settings: HasHome | None = None, **overrides: Any) -> dict[str, Any]:
    """``@task`` kwargs for I/O-bound tasks: retries with backoff + jitter, persisted results.

    ``settings`` picks the result folder (Prefect's default storage when None); ``overrides``
    replace any key (tests pass ``retry_delay_seconds=0``).
    """
    options: dict[str, Any] = {
        "retries": IO_RETRIES,
        "retry_condition_fn": retry_on_io_errors,
        "retry_delay_seconds": IO_RETRY_DELAYS,
        "retry_jitter_factor": IO_RETRY_JITTER_FACTOR,
        "persist_result": True,
    }
    if settings is not None:
        options["result_storage"] = result_storage_path(settings)
    options.update(overrides)
    return options


TRANSIENT_MODULES = ("botocore", "boto3", "urllib3", "requests", "s3transfer", "httpx", "mlflow")


# botocore/boto3 errors that retrying cannot fix (matched by class name: no botocore import here)
PERMANENT_CLIENT_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError")
PERMANENT_CLIENT_CODES = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket")


def is_io_error(exc: BaseException) -> bool:
    """True for failures worth retrying: OS/network errors and storage/HTTP client errors.

    Not retried: missing files, permissions, and permanent storage errors (missing credentials,
    403, no such bucket), whether raised by ``tasks.storage`` or straight from botocore."""
    from tasks.storage import PermanentStorageError

    if isinstance(exc, PermanentStorageError) or type(exc).__name__ in PERMANENT_CLIENT_ERRORS:
        return False
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in PERMANENT_CLIENT_CODES or status == "403":
            return False
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
    return type(exc).__module__.split(".")[0] in TRANSIENT_MODULES


def retry_on_io_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry I/O failures, not bugs or bad input (those fail at once)."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception is what we classify
        return is_io_error(exc)
    return True


def compute_task_options(settings: HasHome | None = None, **overrides: Any) -> dict[str, Any]:
    """``@task`` kwargs for compute tasks: no retries, results persisted like I/O tasks."""
    options: dict[str, Any] = {"retries": 0, "persist_result": True}
    if settings is not None:
        options["result_storage"] = result_storage_path(settings)
    options.update(overrides)
    return options


def prefect_env_defaults(settings: HasHome | None = None) -> dict[str, str]:
    """Set Prefect env defaults (existing values win) and return the values now in effect.

    Must run before Prefect reads its settings (i.e. before the first flow run in a process).
    """
    defaults = {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(PREFECT_STARTUP_TIMEOUT_S),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if settings is not None:
        defaults["PREFECT_HOME"] = str(Path(settings.home).expanduser().resolve() / "prefect")
    if os.environ.get("PREFECT_API_URL", None) == "":
        # an empty (exported but unset) API URL makes Prefect's events worker fail on every event and print
        # an ERROR with a traceback each time; unset means "use the ephemeral server", which is what it meant.
        # Prefect reads it when imported: the CLI drops it first (flows.console), and so does this module's import
        del os.environ["PREFECT_API_URL"]
    applied = {key: os.environ.setdefault(key, value) for key, value in defaults.items()}
    if "PREFECT_HOME" in applied:
        Path(applied["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # sqlite needs the folder
    detach_temporary_server()
    return applied


class _NewSessionSubprocess(types.ModuleType):
    """`subprocess` as Prefect's server module sees it: the same module, except that `Popen` starts its
    process in a session of its own (see `detach_temporary_server`)."""

    _snapgen_detached = True

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - subprocess's own name
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, **kwargs)


def detach_temporary_server() -> None:
    """Start Prefect's temporary API server (the `uvicorn` child a run without PREFECT_API_URL starts) in a
    session of its own, outside the terminal's process group.

    In the caller's group, Ctrl-C (SIGINT to the whole group) and `kill -TERM -- -<group>` stopped the server
    at the same moment as the command, which then tried to record the stop on the server it had just lost:
    a Ctrl-C'd flow hung for minutes printing "--- Error logging to API ---", a group SIGTERM printed
    connection-refused tracebacks for 75 s. Detached, only the command receives the signal, records the stop,
    and stops the server on its way out (Prefect's own atexit). Idempotent; Prefect is pinned (3.9.1), and
    tests/integration/test_stop_signals.py fails if its server module stops starting the server this way."""
    if os.environ.get("PREFECT_API_URL"):
        return  # a real server: Prefect starts none (and its server module need not be imported)
    from prefect.server.api import server as prefect_server

    if not getattr(prefect_server.subprocess, "_snapgen_detached", False):
        prefect_server.subprocess = _NewSessionSubprocess("subprocess")
