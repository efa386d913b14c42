"""MLflow tracking for snapgen: runs (the run side of MLflow; `registry.py` owns registered versions,
`metric_log.py` the buffered training logger, `lineage.py` the lineage tags).

Everything else logs through :func:`start_run` and the :class:`RunHandle` it yields, so that
secret masking, parameter flattening, lineage tags and the "tracking is down, keep training"
policy live in one place.

Policy in short:

* ``configure_mlflow(settings)`` sets the tracking URI, puts the tracking token (a
  ``SecretStr``) into this process's ``MLFLOW_TRACKING_TOKEN`` and nowhere else, and, for a local
  ``sqlite:`` backend, creates the database's folder and roots new experiments' artifacts under
  ``settings.mlflow_artifact_root`` (as a ``file://`` URI when it is a plain path).
* Parameters are flattened (``{"a": {"b": 1}}`` -> ``a.b``), truncated to MLflow's length limit,
  and masked (``***``) when the key or the value looks like a credential. Dicts logged as
  artifacts are masked the same way.
* Metric logging retries transient failures (server down, 5xx, timeouts) with exponential
  backoff, then warns and carries on; after giving up it skips metric logging for a cool-down
  period instead of stalling every training step. Other calls retry the same way but raise.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import mlflow
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.lineage import lineage_tags
from tasks.secrets import MASK, mask_secrets, mask_uri, mask_value, secret_value

try:  # limits of the MLflow REST API; fall back to the documented values
    from mlflow.utils.validation import (
        MAX_METRICS_PER_BATCH,
        MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH,
    )
except ImportError:  # pragma: no cover - depends on the mlflow version
    MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH = 6000, 100, 1000

__all__ = [
    "MASK",
    "RetryPolicy",
    "RunHandle",
    "TrackingSettings",
    "configure_mlflow",
    "flatten_params",
    "get_or_create_experiment",
    "mask_secrets",
    "start_run",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

PARENT_RUN_TAG = "mlflow.parentRunId"
# Bound MLflow's own HTTP retries (7 tries with factor 2 by default: minutes per call while a
# server is down); RetryPolicy retries on top. setdefault: an operator's env wins.
_MLFLOW_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# Artifact roots for local (sqlite) backends, by tracking URI; filled by configure_mlflow.
_LOCAL_ARTIFACT_ROOTS: dict[str, str] = {}
_ACTIVE_RUNS: contextvars.ContextVar[tuple[RunHandle, ...]] = contextvars.ContextVar(
    "snapgen_active_runs", default=()
)


class TrackingSettings(Protocol):
    """The part of ``tasks.settings.SnapgenSettings`` this module reads."""

    home: Path
    mlflow_tracking_uri: str
    mlflow_artifact_root: str
    mlflow_tracking_token: Any  # pydantic SecretStr | None
    experiment_name: str


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def configure_mlflow(settings: TrackingSettings) -> str:
    """Point MLflow at ``settings`` and return the tracking URI.

    The token is exported to this process's environment only (MLflow reads it from there) and
    is never logged. Idempotent.
    """
    uri = str(settings.mlflow_tracking_uri)
    for key, value in _MLFLOW_HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    token = getattr(settings, "mlflow_tracking_token", None)
    if token is not None:
        os.environ["MLFLOW_TRACKING_TOKEN"] = cast(str, secret_value(token))
    if uri.startswith("sqlite:"):
        _prepare_sqlite(uri, settings)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; settings read that variable as the user's
    # choice (when SNAPGEN_MLFLOW_TRACKING_URI is unset), so the user's value (or its absence) is kept.
    users = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if users is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users
    log.debug("MLflow tracking URI: %s", mask_uri(uri))
    return uri


def _prepare_sqlite(uri: str, settings: TrackingSettings) -> None:
    """Create the sqlite database's folder and remember where new experiments keep artifacts."""
    db_path = sqlite_path(uri)
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    root = getattr(settings, "mlflow_artifact_root", None) or Path(settings.home) / "mlartifacts"
    _LOCAL_ARTIFACT_ROOTS[uri] = artifact_root_uri(root)


def sqlite_path(uri: str) -> Path | None:
    """Database file of a ``sqlite:///rel`` or ``sqlite:////abs`` URI (None for in-memory)."""
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def artifact_root_uri(root: str | Path) -> str:
    """``root`` as a URI: plain paths become absolute ``file://`` URIs, URIs pass through."""
    text = str(root)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", text):
        return text.rstrip("/")
    return Path(text).expanduser().resolve().as_uri()


def get_or_create_experiment(
    name: str, artifact_location: str | None = None, *, tracking_uri: str | None = None
) -> str:
    """Return the id of experiment ``name``, creating (or restoring) it if needed.

    With a local sqlite backend configured by :func:`configure_mlflow`, a new experiment's
    artifacts default to ``<mlflow_artifact_root>/<name>``; against a server, the server's
    default artifact root applies.
    """
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = artifact_location or _default_artifact_location(uri, name)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created concurrently by another task
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _default_artifact_location(tracking_uri: str, name: str) -> str | None:
    """``<root>/<name slug>`` for a configured local backend, else None (the store decides)."""
    root = _LOCAL_ARTIFACT_ROOTS.get(tracking_uri)
    if root is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"
    return f"{root}/{slug}"


# --------------------------------------------------------------------------------------------
# params: flattening, truncation, masking
# --------------------------------------------------------------------------------------------
def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings (and pydantic models) into dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump") and not hasattr(value, "get_secret_value"):
            value = value.model_dump()
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _param_string(value: Any) -> str:
    """MLflow parameter text for ``value``, truncated to the server's limit."""
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        marker = "...[truncated]"
        text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
    return text


def prepare_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flatten, mask and stringify ``params`` for ``log_batch``."""
    flat = flatten_params(params)
    return {key: _param_string(mask_value(key, value)) for key, value in flat.items()}


# --------------------------------------------------------------------------------------------
# retries
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient tracking failures: delays base * 2**n, capped."""

    attempts: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    cooldown_s: float = 60.0  # metrics are skipped this long after giving up

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.max_delay_s, self.base_delay_s * 2**attempt)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection failures, timeouts, 429 and 5xx replies."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, MlflowException):
        return False
    if str(exc.message).startswith("API request to"):  # mlflow's wrapper for requests errors
        return True
    status = exc.get_http_status_code()
    return status == 429 or status >= 500


def call_with_retry(fn: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Run ``fn``, retrying transient failures per ``policy``; re-raise the last error."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == policy.attempts - 1:
                raise
            wait = policy.delay(attempt)
            log.info("MLflow %s failed (%s); retry %d in %.1fs", what, exc, attempt + 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
@dataclass
class RunHandle:
    """One MLflow run, logged through an explicit client (thread-safe, no fluent globals)."""

    client: MlflowClient
    run_id: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dropped_metrics: int = 0
    _metrics_down_until: float = 0.0

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log flattened, masked, truncated params; return what was logged."""
        prepared = prepare_params(params)
        items = [Param(k, v) for k, v in prepared.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._call(lambda: self.client.log_batch(self.run_id, params=chunk), "log_params")
        return prepared

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> bool:
        """Log metrics at ``step``; never raises on tracking outages (warns, returns False)."""
        if time.monotonic() < self._metrics_down_until:
            self.dropped_metrics += len(metrics)
            return False
        stamp = int(time.time() * 1000)
        return self.log_metric_items([Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()])

    def log_metric_items(self, items: list[Metric]) -> bool:
        """Batched metric upload; an outage is warned about, counted and never raised."""
        try:
            for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
                self._call(lambda: self.client.log_batch(self.run_id, metrics=chunk), "metrics")
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._give_up_metrics(exc, len(items))
            return False
        return True

    def _give_up_metrics(self, exc: BaseException, count: int) -> None:
        """Warn once per outage and pause metric logging for the cool-down period."""
        self.dropped_metrics += count
        self._metrics_down_until = time.monotonic() + self.retry.cooldown_s
        message = (
            f"MLflow unreachable, metrics for run {self.run_id} dropped "
            f"({self.dropped_metrics} so far); retrying in {self.retry.cooldown_s:.0f}s: {exc}"
        )
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values masked and stringified like params)."""
        items = [RunTag(k, v) for k, v in prepare_params(tags).items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self._call(lambda: self.client.log_batch(self.run_id, tags=chunk), "set_tags")

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` to the run's artifact ``artifact_file``."""
        self._call(lambda: self.client.log_text(self.run_id, text, artifact_file), "log_text")

    def log_dict(self, obj: Mapping[str, Any], artifact_file: str) -> None:
        """Write ``obj`` (secrets masked) as JSON/YAML, chosen by the file's extension."""
        masked = json.loads(json.dumps(mask_secrets(obj), default=str))
        self._call(lambda: self.client.log_dict(self.run_id, masked, artifact_file), "log_dict")

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image or an HxW[xC] numpy array (uint8, or float in [0, 1])."""
        self._call(lambda: self.client.log_image(self.run_id, image, artifact_file), "log_image")

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file (or a folder's contents) under ``artifact_path``."""
        upload = self.client.log_artifacts if Path(local_path).is_dir() else self.client.log_artifact
        self._call(lambda: upload(self.run_id, str(local_path), artifact_path), "log_artifact")

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run one client call under the retry policy."""
        return call_with_retry(fn, self.retry, what)


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def active_run() -> RunHandle | None:
    """The innermost run opened by :func:`start_run` in this context, if any."""
    stack = _ACTIVE_RUNS.get()
    return stack[-1] if stack else None


# An end-to-end pipeline run sets these (process-wide, so stage runs opened in worker threads and
# launched subprocesses see them too): stage runs then land in the pipeline's experiment, nested
# under the pipeline's run. `pipeline_scope` sets and restores them.
PIPELINE_PARENT_ENV = "SNAPGEN_PIPELINE_PARENT_RUN_ID"
PIPELINE_EXPERIMENT_ENV = "SNAPGEN_PIPELINE_EXPERIMENT"


@contextmanager
def pipeline_scope(experiment: str, parent_run_id: str) -> Iterator[None]:
    """Within the block, runs opened by :func:`start_run` go to `experiment`, nested under `parent_run_id`."""
    saved = {k: os.environ.get(k) for k in (PIPELINE_PARENT_ENV, PIPELINE_EXPERIMENT_ENV)}
    os.environ[PIPELINE_PARENT_ENV], os.environ[PIPELINE_EXPERIMENT_ENV] = parent_run_id, experiment
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def start_run(
    settings: TrackingSettings,
    run_name: str,
    *,
    experiment: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    retry: RetryPolicy | None = None,
    system_metrics: bool = False,
) -> Iterator[RunHandle]:
    """Open an MLflow run and yield its :class:`RunHandle`; end it FINISHED, FAILED or KILLED.

    ``parent_run_id`` (or, with ``nested=True``, the innermost run opened here) becomes the
    ``mlflow.parentRunId`` tag. Base lineage tags (git commit, code version) are always set;
    ``tags`` override them.
    """
    uri = configure_mlflow(settings)
    client = MlflowClient(tracking_uri=uri)
    policy = retry or RetryPolicy()
    experiment_id = call_with_retry(
        lambda: get_or_create_experiment(experiment or os.environ.get(PIPELINE_EXPERIMENT_ENV) or settings.experiment_name,
                                         tracking_uri=uri),
        policy,
        "get_or_create_experiment",
    )
    run_tags = _run_tags(tags, nested=nested, parent_run_id=parent_run_id)
    run = call_with_retry(
        lambda: client.create_run(experiment_id, tags=run_tags, run_name=run_name),
        policy,
        "create_run",
    )
    handle = RunHandle(client=client, run_id=run.info.run_id, retry=policy)
    token = _ACTIVE_RUNS.set((*_ACTIVE_RUNS.get(), handle))
    monitor = _system_monitor(run.info.run_id, uri) if system_metrics else None
    try:
        yield handle
    except BaseException as exc:
        from prefect.exceptions import TerminationSignal

        from snapgen_model.training.state import TrainingInterrupted

        # a stop (Ctrl-C, or SIGTERM with the training state saved, or SIGTERM / SIGHUP outside the training
        # loop: flows.console.exit_on_sigterm) is KILLED: resumable, not a failure
        stopped = isinstance(exc, (KeyboardInterrupt, TrainingInterrupted)) or (
            isinstance(exc, SystemExit) and exc.code in (129, 143)) or isinstance(exc, TerminationSignal)
        _terminate(handle, "KILLED" if stopped else "FAILED")
        raise
    else:
        _terminate(handle, "FINISHED")
    finally:
        if monitor is not None:
            _stop_monitor(monitor)
        _ACTIVE_RUNS.reset(token)


SYSTEM_METRICS_INTERVAL_S = float(os.environ.get("SNAPGEN_SYSTEM_METRICS_INTERVAL_S", "10"))


def _system_monitor(run_id: str, tracking_uri: str) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network; GPU when present) sampled into the run
    (`system/...` metrics) while it is open; None if the monitor cannot start (never fails a run)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, samples_before_logging=1,
                                       tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - monitoring is best effort
        warnings.warn(f"system metrics disabled for run {run_id}: {type(exc).__name__}: {str(exc)[:160]}", stacklevel=3)
        return None


def _stop_monitor(monitor: Any) -> None:
    try:
        monitor.finish()
    except Exception as exc:  # noqa: BLE001 - an outage at the end must not fail the run
        warnings.warn(f"system metrics: final flush failed: {type(exc).__name__}", stacklevel=3)


def _run_tags(
    tags: Mapping[str, Any] | None, *, nested: bool, parent_run_id: str | None
) -> dict[str, str]:
    """Tags a new run starts with: base lineage, the caller's tags, the parent link."""
    merged: dict[str, Any] = {**lineage_tags(), **(tags or {})}
    parent = parent_run_id or os.environ.get(PIPELINE_PARENT_ENV) or None
    if parent is None and nested:
        outer = active_run()
        if outer is None:
            raise RuntimeError("start_run(nested=True) needs an enclosing run or parent_run_id")
        parent = outer.run_id
    if parent is not None:
        merged[PARENT_RUN_TAG] = parent
    return prepare_params(merged)


def _terminate(handle: RunHandle, status: str) -> None:
    """Mark the run ended; an outage here is warned about, never raised."""
    try:
        handle._call(lambda: handle.client.set_terminated(handle.run_id, status), "end_run")
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("could not mark MLflow run %s %s: %s", handle.run_id, status, exc)


# --------------------------------------------------------------------------------------------
# metric histories and run queries (run reports)
# --------------------------------------------------------------------------------------------
def log_metric_series(run: RunHandle, key: str, points: list[tuple[int, float]] | tuple[tuple[int, float], ...]) -> None:
    """Log a whole metric history ``[(step, value), ...]`` (a loss curve) in a few batches.

    Outages are handled like :meth:`RunHandle.log_metrics`: warned about, never raised.
    """
    stamp = int(time.time() * 1000)
    run.log_metric_items([Metric(key, float(value), stamp, int(step)) for step, value in points])


def metric_histories(settings: TrackingSettings, run_id: str, prefixes: tuple[str, ...] = ("",),
                     limit: int = 40) -> dict[str, list[tuple[int, float]]]:
    """Metric histories of a run, `{key: [(step, value), ...]}` for keys starting with any of
    `prefixes` (at most `limit` keys): the loss curves of a run report. An outage gives {}."""
    client = MlflowClient(tracking_uri=configure_mlflow(settings))
    try:
        run = call_with_retry(lambda: client.get_run(run_id), RetryPolicy(), "get_run")
        keys = sorted(k for k in run.data.metrics if any(k.startswith(p) for p in prefixes))[:limit]
        return {k: [(int(m.step), float(m.value)) for m in
                    call_with_retry(lambda: client.get_metric_history(run_id, k), RetryPolicy(), "metric history")]
                for k in keys}
    except Exception as exc:  # noqa: BLE001 - the report shows "not available" rather than failing the run
        warnings.warn(f"metric histories of run {run_id}: {type(exc).__name__}: {str(exc)[:200]}", stacklevel=2)
        return {}


def stage_metric_history(settings: TrackingSettings, config_hash: str, stage: str,
                         key: str) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """(`key` points sorted by step, the logged params) over every run of a stage with this config hash (a
    resumed run spans several MLflow runs, each logging its own steps); ([], {}) when the store has none
    (another machine, tracking off) or cannot be reached."""
    client = MlflowClient(tracking_uri=configure_mlflow(settings))
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.`snapgen.config_hash` = '{config_hash}'") \
            if experiments else []
        points: dict[int, float] = {}
        params: dict[str, Any] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            if run.data.tags.get("snapgen.stage") != stage:
                continue
            params = params or dict(run.data.params)
            for m in client.get_metric_history(run.info.run_id, key):
                points[int(m.step)] = float(m.value)
    except Exception as exc:  # noqa: BLE001 - a card without a curve rather than no card
        warnings.warn(f"{stage} runs of {config_hash}: {type(exc).__name__}: {str(exc)[:200]}", stacklevel=2)
        return [], {}
    return [{"step": s, "loss": v} for s, v in sorted(points.items())], params


def latest_artifact(settings: TrackingSettings, run_id: str, folder: str, dst_dir: str | Path) -> Path | None:
    """Download the last file (by name) under artifact `folder` of a run (e.g. the final preview grid);
    None when there is none or MLflow is unreachable."""
    client = MlflowClient(tracking_uri=configure_mlflow(settings))
    try:
        files = sorted(a.path for a in client.list_artifacts(run_id, folder) if not a.is_dir and a.path.endswith(".png"))
        if not files:
            return None
        return Path(client.download_artifacts(run_id, files[-1], str(dst_dir)))
    except Exception as exc:  # noqa: BLE001 - a report without this image is still a report
        warnings.warn(f"artifact {folder} of run {run_id}: {type(exc).__name__}: {str(exc)[:160]}", stacklevel=2)
        return None


def run_experiment_ids(settings: TrackingSettings, run_ids: list[str]) -> dict[str, str]:
    """run id -> experiment id (for links into the MLflow UI); runs that cannot be read are left out."""
    client = MlflowClient(tracking_uri=configure_mlflow(settings))
    out: dict[str, str] = {}
    for run_id in dict.fromkeys(r for r in run_ids if r):
        try:
            out[run_id] = call_with_retry(lambda: client.get_run(run_id), RetryPolicy(attempts=2), "get_run").info.experiment_id
        except Exception as exc:  # noqa: BLE001 - a report without this link is still a report
            warnings.warn(f"run {run_id}: {type(exc).__name__}: {str(exc)[:160]}", stacklevel=2)
    return out


def ui_base_url(settings: TrackingSettings, local_ui: str = "http://127.0.0.1:5000") -> str:
    """Where the MLflow UI of these runs is: the tracking server itself, or (for a local sqlite/file store)
    the UI `snapgen ui` serves on it."""
    uri = str(settings.mlflow_tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return local_ui
    parts = urlsplit(uri)  # no user:password@ in a link, no query (tokens)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="")).rstrip("/")
